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


def compare(config: SipoConfig, runs: list[str | Path], prompts: str, *, base: bool = False, **options: Any):
    """``sipo compare``: sample every run in ``runs`` (and the base model with ``base=True``) on the same
    prompts, seeds and sampler, score them, and write the win-rate matrix, the Bradley-Terry ranking and
    report.html; returns a :class:`sipo.compare.CompareResult` (``.summary`` is summary.json).
    ``options`` are the fields of :class:`sipo.compare.CompareOptions` (``seeds=[0, 1]``,
    ``scorers=["pickscore"]``, ``scorer_paths={"pickscore": DIR}``, ``output_dir=...``, ``labels=[...]``)."""
    from sipo.compare import CompareOptions, run_compare

    if isinstance(runs, (str, Path)):
        runs = [runs]
    if isinstance(options.get("scorers"), str):
        options["scorers"] = [s.strip() for s in options["scorers"].split(",") if s.strip()]
    if options.get("output_dir") is not None:
        options["output_dir"] = Path(options["output_dir"])
    return run_compare(config, CompareOptions(runs=[str(r) for r in runs], prompts=str(prompts), base=base, **options))


def sweep(config: str | Path, grid: dict[str, list], seeds: list[int], output_dir: str | Path, *,
          overrides: list[str] | None = None, compare_prompts: str | Path | None = None, base: bool = True,
          progress: bool = True, workers: int = 1, **compare_options: Any):
    """``sipo sweep``: train one run per combination of ``grid`` (``{"objective.name": ["dpo", "sipo"]}``)
    and training seed under ``output_dir`` (finished cells skipped, stopped ones resumed), then compare
    them with ``compare_prompts`` (the seeds pooled per configuration); ``config`` is a YAML path or a
    packaged config's name, with ``overrides`` as `sipo train` takes them (each cell re-applies them, so
    an objective preset resolves as on the command line). ``compare_options``: the fields of
    :class:`sipo.compare.CompareOptions` (``scorers``, ``scorer_paths``, ``seeds``, ``tie_tolerance``, ...);
    ``workers``: cells trained at once, each in its own process (:func:`sipo.sweep.run_cells`; call it from
    under ``if __name__ == "__main__":``, as every spawned process re-imports the calling script). Returns a
    :class:`sipo.sweep.SweepResult`."""
    from sipo.sweep import run_sweep

    if isinstance(overrides, str):
        overrides = [overrides]
    grid = {key: [str(v) for v in (values if isinstance(values, (list, tuple)) else [values])] for key, values in grid.items()}
    if isinstance(compare_options.get("scorers"), str):
        compare_options["scorers"] = [s.strip() for s in compare_options["scorers"].split(",") if s.strip()]
    options = {**compare_options, "prompts": str(compare_prompts)} if compare_prompts is not None else None
    return run_sweep(config, grid, [int(s) for s in seeds], output_dir, overrides=overrides, compare_options=options,
                     base=base, progress=progress, workers=workers)


def pairs(config: SipoConfig, prompts: str, out: str | Path, checkpoint: str | Path | None = None, **options: Any):
    """``sipo pairs``: sample ``samples_per_prompt`` pictures per prompt from the base model (or the run in
    ``checkpoint``), score them, and write the chosen pairs as ``<out>/pairs.jsonl`` (``data.format=jsonl``);
    ``options`` are the fields of :class:`sipo.pairs.PairsOptions` (``samples_per_prompt=4``,
    ``scorers=["pickscore"]``, ``scorer_paths={...}``, ``pairing="best-worst"`` ...). Returns a
    :class:`sipo.pairs.PairsResult`; a rerun continues an interrupted one."""
    from sipo.pairs import PairsOptions, make_pairs

    return make_pairs(config, PairsOptions(prompts=str(prompts), out=out,
                                           checkpoint=None if checkpoint is None else str(checkpoint), **options))


def iterate(config: SipoConfig, prompts: str, out: str | Path, *, rounds: int, steps_per_round: int,
            reference: str = "base", eval_prompts: str | None = None, eval_seeds: list[int] | None = None,
            **options: Any):
    """``sipo iterate``: ``rounds`` rounds of pairs from the current policy -> ``steps_per_round`` more
    training steps of one run -> evaluation, all under ``out``; ``options`` are
    :class:`sipo.pairs.PairsOptions` fields. Returns the rounds' summaries (a list of dicts)."""
    from sipo.iterate import IterateOptions, iterate as run_rounds
    from sipo.pairs import PairsOptions

    return run_rounds(config, IterateOptions(
        pairs=PairsOptions(prompts=str(prompts), out=out, **options), out=out, rounds=rounds,
        steps_per_round=steps_per_round, reference=reference, eval_prompts=eval_prompts,
        eval_seeds=eval_seeds if eval_seeds is not None else [0]))
