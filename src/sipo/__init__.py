"""sipo: Diffusion-DPO, DPO-C&M and SIPO for diffusion models (arXiv 2505.21893).

The Python API (each name documented where it is defined)::

    import sipo
    config = sipo.load_config("demo", ["train.max_steps=20"])  # a packaged config or a YAML path, plus key=value
    result = sipo.train(config)                                 # -> sipo.TrainResult(output_dir, steps, history, adapter)
    sipo.cache(config); sipo.analyze(config, checkpoint=result.output_dir); sipo.evaluate(config, "prompts.txt", result.output_dir)

- ``load_config``, ``SipoConfig``: the config tree (sipo.config)
- ``train``, ``TrainResult``: the trainer (sipo.train)
- ``cache``, ``analyze``, ``evaluate``, ``compare``, ``sweep``, ``pairs``, ``iterate``: the other commands (sipo.api)
- ``SipoError``: what a user's mistake raises, one sentence naming the fix (sipo.errors)

Names load on first use, so ``import sipo`` (and the CLI's start) stays fast.
"""

import importlib
import sys
import types

from sipo.errors import SipoError

__version__ = "0.1.0"

_HOMES = {
    "load_config": "sipo.config", "SipoConfig": "sipo.config", "train": "sipo.train", "TrainResult": "sipo.train",
    "cache": "sipo.api", "analyze": "sipo.api", "evaluate": "sipo.api", "TrainingInterrupted": "sipo.errors",
    "compare": "sipo.api", "sweep": "sipo.api",
    "pairs": "sipo.api", "iterate": "sipo.api",
}
__all__ = ["SipoError", *_HOMES]


class _Package(types.ModuleType):
    """``sipo.train`` and ``sipo.evaluate`` are functions, though modules of those names exist: the
    import system binds a submodule to its package's attribute on first import, which would replace
    the function. The submodules stay importable (``from sipo.train import train``, ``sys.modules``)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sipo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


sys.modules[__name__].__class__ = _Package
