"""The Python API behind ``import sipo``: the CLI's commands as functions (``sipo.cache``,
``sipo.analyze``, ``sipo.evaluate``; ``sipo.train`` is :func:`sipo.train.train` itself).

Each takes a :class:`~sipo.config.SipoConfig` (from :func:`sipo.load_config`) and does what the
command of the same name does, with the same checks and the same files written::

    import sipo
    config = sipo.load_config("demo", ["train.max_steps=50", "train.output_dir=runs/nb"])
    result = sipo.train(config)
    sipo.analyze(config, checkpoint=result.output_dir)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sipo.config import SipoConfig


def cache(config: SipoConfig, *, progress: bool = True) -> Path:
    """``sipo cache``: encode every pair of ``config.data`` once (VAE latents and text embeddings)
    into the latent cache that ``sipo.train`` then reads instead of the pictures; returns its folder.
    A rerun after an interruption encodes only the missing shards."""
    from sipo.data.cache import build_cache

    return build_cache(config, progress=progress)


def analyze(config: SipoConfig, checkpoint: str | Path | None = None, *, num_pairs: int = 64, num_buckets: int = 20,
            output_dir: str | Path | None = None, progress: bool = True, **options: Any):
    """``sipo analyze``: per-timestep importance weights, loss and gradient variance (SPEC 6) of the
    base model, or of the run in ``checkpoint``, written as CSV, JSON and PNG under ``output_dir``
    (default ``<checkpoint>/analysis``, beside the weights analysed, or ``<train.output_dir>/analysis``
    for the base model: never into the config's run when ``checkpoint`` names another).
    ``options`` go to :func:`sipo.analysis.run_analysis` (``adapter=``, ``dataset=``, ``plots=`` ...);
    returns its result."""
    from sipo.analysis import run_analysis

    if output_dir is None:
        from sipo.evaluate import default_output_dir

        output_dir = (default_output_dir(checkpoint, "analysis") if checkpoint is not None
                      else Path(config.train.output_dir) / "analysis")
    return run_analysis(config, checkpoint=checkpoint, num_pairs=num_pairs, num_buckets=num_buckets,
                        output_dir=output_dir, progress=progress, **options)


def evaluate(config: SipoConfig, prompts: str, checkpoint: str | Path | None = None, **options: Any):
    """``sipo eval``: sample the base model and the run in ``checkpoint`` on the same prompts and
    seeds, score both with reward models and report win rates; returns one summary per scorer.
    ``prompts`` is a text file (one prompt per line) or ``pickapic-test``; ``options`` are the fields
    of :class:`sipo.evaluate.EvalOptions` (``seeds=[0, 1]``, ``scorers=["pickscore"]``,
    ``scorer_paths={"pickscore": DIR}``, ``base_only=True``, ``num_inference_steps=...``)."""
    from sipo.evaluate import EvalOptions, run_eval

    if "output_dir" in options and options["output_dir"] is not None:
        options["output_dir"] = Path(options["output_dir"])
    return run_eval(config, EvalOptions(prompts=str(prompts), checkpoint=None if checkpoint is None else str(checkpoint),
                                        **options))
