"""Where the demo's config lives and how it sets torch up: shared by the runner, the claims tables
and the defaults sweep (each imports this module; none imports another for it)."""

from __future__ import annotations

from pathlib import Path

from sipo.errors import SipoError


def demo_config_path() -> Path:
    """configs/demo.yaml, shipped inside the package (found with importlib.resources)."""
    from sipo.config import packaged_config_path

    path = packaged_config_path("demo")
    if path is None:
        raise SipoError("sipo's packaged configs/demo.yaml is missing; reinstall sipo")
    return path


def setup_torch(threads: int = 1) -> None:
    """One intra-op thread (see sipo.demo.run's docstring) and no denormal slow paths on CPU."""
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
