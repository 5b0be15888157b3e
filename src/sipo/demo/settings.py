"""What the demo's runner, claims tables and defaults sweep share: where its config lives, how it
sets torch up, and the names of the field-objective and auto-beta runs (each imports this module;
none imports another for it)."""

from __future__ import annotations

from pathlib import Path

from sipo.errors import SipoError

#: the "which objective" table (`--full`): the field's other objectives (docs/spec.md section 9), each at its presets' defaults
FIELD_METHODS = ("hinge", "ipo", "sft", "kto", "mapo", "dspo", "dmpo", "alpha-dpo", "sipo-elementwise")
#: the label of a method run with objective.beta_mode=auto, from each of claim 2's betas as its first-step beta
AUTO_SUFFIX = "-auto"


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


#: the pair sources of the on-policy question (issue 27), beside "mixed" and "offpolicy"
ONPOLICY_SOURCES = ("onpolicy", "onpolicy-stored", "iterative")
#: the report's line where the stored-noise arm could not run
STORED_NOISE_SKIP = "stored noise: needs objective.noise"


def stored_noise_available() -> bool:
    """Whether this sipo has ``objective.noise`` (``stored``: each side trains from its own x_T)."""
    from dataclasses import fields

    from sipo.config import ObjectiveConfig

    return any(item.name == "noise" for item in fields(ObjectiveConfig))
