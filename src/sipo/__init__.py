"""sipo: Diffusion-DPO, DPO-C&M and SIPO for diffusion models (arXiv 2505.21893)."""

from sipo.errors import SipoError

__all__ = ["SipoError"]
__version__ = "0.1.0"
