"""`sipo iterate`: rounds of on-policy preference optimisation on one run (docs/spec.md section 11;
docs/pairs.md).

Round ``r`` (``r = 0 .. --rounds - 1``) has three phases, each a command sipo already has:

1. ``pairs``: :func:`sipo.pairs.make_pairs` samples ``K`` pictures per prompt from the policy of
   round ``r - 1`` (round 0: the base model; later rounds: the run's newest checkpoint, which is
   round ``r - 1``'s last step), scores and pairs them into ``round-RRR/pairs/pairs.jsonl``;
2. ``train``: :func:`sipo.train.train` trains ``--steps-per-round`` more steps of the one run in
   ``<out>/run`` on those pairs (``train.max_steps = (r + 1) * N``, ``--resume`` from round
   ``r - 1``'s final checkpoint, with ``train.resume_new_data`` so the run may change its pairs);
   ``--reference previous`` copies round ``r - 1``'s weights into ``round-RRR/reference/`` and sets
   ``train.reference_checkpoint`` to it, so the round's DPO reference is the policy it starts from
   (the cost: a second, frozen copy of the denoiser in memory; the reference forward costs the same);
3. ``eval``: :func:`sipo.evaluate.run_eval` samples the base and the run on the held-out prompts
   (``--eval-prompts``, ``--eval-seeds``) into ``round-RRR/eval/``; the round's win rate over the
   base is eval's, its win rate over the previous round compares the same prompts and seeds with
   round ``r - 1``'s scores (round 0: the base), both with bootstrap intervals.

``iterate.json`` records the settings and each finished phase; a rerun skips finished phases and
continues an unfinished one where it stopped (each phase resumes by itself: pictures and scores on
disk, the run's newest checkpoint), so a kill in any phase costs at most the unfinished part of a
batch or a step. ``rounds.json``, ``rounds.md`` and ``rounds.png`` (mean reward and win rates per
round) are rewritten after every round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sipo.errors import SipoError, TrainingInterrupted
from sipo.pairs import PairsOptions

STATE = "iterate.json"
PHASES = ("pairs", "train", "eval")


@dataclass
class IterateOptions:
    """``sipo iterate``'s options; ``pairs`` carries the sampling and scoring ones (its ``out`` and
    ``checkpoint`` are set per round)."""

    pairs: PairsOptions
    out: str | Path
    rounds: int
    steps_per_round: int
    reference: str = "base"
    eval_prompts: str | None = None
    eval_seeds: list[int] = field(default_factory=lambda: [0])


def round_dir(out: Path, index: int) -> Path:
    return out / f"round-{index:03d}"


def _settings(config, options: IterateOptions) -> dict[str, Any]:
    """What a rerun must share with the first call (``--rounds`` may grow; ``progress`` may change)."""
    pairs = {k: v for k, v in dataclasses.asdict(options.pairs).items() if k not in ("out", "checkpoint", "progress")}
    values = config.to_dict()
    values["train"] = {k: v for k, v in values["train"].items() if k not in ("output_dir", "max_steps")}
    return json.loads(json.dumps({"config": values, "pairs": pairs, "steps_per_round": options.steps_per_round,
                                  "reference": options.reference, "eval_prompts": options.eval_prompts,
                                  "eval_seeds": list(options.eval_seeds)}, default=str))


def _load_state(out: Path, settings: dict) -> dict:
    path = out / STATE
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("settings") != settings:
            changed = changed_keys(state.get("settings", {}), settings)
            raise SipoError(f"{out} holds rounds made with other settings ({', '.join(changed)}); rerun with the same "
                            "command (only --rounds may grow), or pass another --out")
        return state
    if out.is_dir() and any(out.iterdir()):
        raise SipoError(f"{out} is not empty and holds no {STATE}, so it is no sipo iterate folder; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    state = {"settings": settings, "done": {}}
    _save_state(out, state)
    return state


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ (``pairs.batch_size``, ``config.objective.beta``), nested dicts opened."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _save_state(out: Path, state: dict) -> None:
    tmp = out / f".tmp-{STATE}"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, out / STATE)


def round_config(config, out: Path, index: int, options: IterateOptions):
    """The config round ``index`` trains with: the one run, N more steps, this round's pairs."""
    from sipo.config import config_from_dict

    values = config.to_dict()
    values["train"].update(output_dir=str(out / "run"), max_steps=(index + 1) * options.steps_per_round,
                           resume_new_data=True,
                           reference_checkpoint=(str(round_dir(out, index) / "reference")
                                                 if options.reference == "previous" and index > 0 else None))
    values["data"].update(format="jsonl", path=str(round_dir(out, index) / "pairs" / "pairs.jsonl"))
    return config_from_dict(values)


def check_iterate_options(options: IterateOptions) -> None:
    if options.rounds < 1 or options.steps_per_round < 1:
        raise SipoError("--rounds and --steps-per-round must be at least 1")
    if options.reference not in ("base", "previous"):
        raise SipoError(f"--reference {options.reference!r} is not valid; choose base or previous")


def check_eval_inputs(options: IterateOptions) -> None:
    """The eval phase's prompts and seeds, read before round 0 samples or trains: a typo found at the end of
    round 0 would cost its pairs and training, and the corrected command is another folder's settings."""
    from sipo.evaluate import read_prompts

    if not options.eval_seeds:
        raise SipoError("--eval-seeds is empty; pass the held-out seeds, e.g. --eval-seeds 0-3")
    read_prompts(options.eval_prompts or options.pairs.prompts, options.pairs.pickapic_path)


def iterate(config, options: IterateOptions) -> list[dict[str, Any]]:
    """Run (or continue) every round; returns one summary per round (see the module docstring)."""
    from sipo.pairs import check_pairs_options

    check_iterate_options(options)
    check_pairs_options(options.pairs)
    check_eval_inputs(options)
    out = Path(options.out).expanduser()
    state = _load_state(out, _settings(config, options))
    summaries = []
    for index in range(options.rounds):
        done = state["done"].setdefault(str(index), [])
        folder = round_dir(out, index)
        for phase in PHASES:
            if phase in done:
                continue
            print(f"sipo iterate: round {index}, {phase}")
            {"pairs": _pairs_phase, "train": _train_phase, "eval": _eval_phase}[phase](config, out, index, options)
            done.append(phase)
            _save_state(out, state)
        summaries.append(json.loads((folder / "round.json").read_text()))
        write_rounds(out, summaries)
    print(f"sipo iterate: {options.rounds} rounds in {out}; table in {out / 'rounds.md'}")
    return summaries


def _pairs_phase(config, out: Path, index: int, options: IterateOptions) -> None:
    from sipo.pairs import make_pairs

    checkpoint = None if index == 0 else str(out / "run")
    make_pairs(round_config(config, out, index, options),
               dataclasses.replace(options.pairs, out=round_dir(out, index) / "pairs", checkpoint=checkpoint))


def _train_phase(config, out: Path, index: int, options: IterateOptions) -> None:
    from sipo.checkpoints import checkpoint_step, list_checkpoints, newest_intact_checkpoint
    from sipo.train import train

    run = out / "run"
    target = (index + 1) * options.steps_per_round
    checkpoints = list_checkpoints(run) if run.is_dir() else []
    newest = newest_intact_checkpoint(run)[0] if checkpoints else None
    if newest is not None and checkpoint_step(newest) >= target:
        return  # the round's last step was saved before the kill
    if options.reference == "previous" and index > 0:
        reference = round_dir(out, index) / "reference"
        if not (reference / "trainable.safetensors").is_file():  # copied once, before the round's first step
            if newest is None or checkpoint_step(newest) != index * options.steps_per_round:
                raise SipoError(f"{run} holds no checkpoint of round {index - 1}'s last step, so --reference previous "
                                "has no weights to hold; rerun in a new --out")
            tmp = reference.with_name(".tmp-reference")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy2(newest / "trainable.safetensors", tmp / "trainable.safetensors")
            os.replace(tmp, reference)
    round_config_ = round_config(config, out, index, options)
    try:
        if newest is not None:
            train(round_config_, resume=True, progress=options.pairs.progress)
        else:  # round 0 killed before its first checkpoint: start it again
            train(round_config_, overwrite=run.is_dir() and any(run.iterdir()), progress=options.pairs.progress)
    except TrainingInterrupted as stopped:  # train's advice (--resume, --overwrite) is not this command's
        raise stopped.rerun(f"round {index}'s training", "sipo iterate") from stopped


def _eval_phase(config, out: Path, index: int, options: IterateOptions) -> None:
    import csv

    import torch

    from sipo.evaluate import EvalOptions, bootstrap_ci, run_eval, win_outcomes

    folder = round_dir(out, index)
    eval_dir = folder / "eval"
    first = round_dir(out, 0) / "eval" / "images" / "base"
    if index > 0 and first.is_dir():  # the base's pictures are the same every round: sampled once
        target = eval_dir / "images" / "base"
        target.mkdir(parents=True, exist_ok=True)
        for picture in first.iterdir():
            if not (target / picture.name).exists():
                (shutil.copytree if picture.is_dir() else shutil.copy2)(picture, target / picture.name)
    pairs = options.pairs
    summaries = run_eval(round_config(config, out, index, options), EvalOptions(
        prompts=options.eval_prompts or pairs.prompts, checkpoint=str(out / "run"), seeds=list(options.eval_seeds),
        scorers=list(pairs.scorers), scorer_paths=dict(pairs.scorer_paths), output_dir=eval_dir,
        batch_size=pairs.batch_size, num_inference_steps=pairs.num_inference_steps,
        guidance_scale=pairs.guidance_scale, pickapic_path=pairs.pickapic_path, progress=pairs.progress,
        dtype=pairs.dtype))

    def scores(folder_: Path, model: str) -> dict[str, dict[tuple[str, str], float]]:
        rows = list(csv.DictReader((folder_ / "eval" / "scores.csv").open()))
        return {name: {(r["prompt_index"], r["seed"]): float(r[name]) for r in rows if r["model"] == model}
                for name in pairs.scorers}

    mine = scores(folder, "aligned")
    previous = scores(folder, "base") if index == 0 else scores(round_dir(out, index - 1), "aligned")
    result: dict[str, Any] = {"round": index, "steps": (index + 1) * options.steps_per_round, "scorers": {}}
    for summary in summaries:
        keys = sorted(mine[summary.name])
        outcomes = win_outcomes(torch.tensor([mine[summary.name][k] for k in keys], dtype=torch.float64),
                                torch.tensor([previous[summary.name][k] for k in keys], dtype=torch.float64))
        result["scorers"][summary.name] = {
            "mean": summary.means["aligned"], "mean_interval": list(summary.intervals["aligned"]),
            "base_mean": summary.means["base"],
            "win_rate_vs_base": summary.win_rate, "win_rate_vs_base_interval": list(summary.win_rate_interval),
            "win_rate_vs_previous": float(outcomes.mean()), "win_rate_vs_previous_interval": list(bootstrap_ci(outcomes)),
        }
    pairs_report = json.loads((folder / "pairs" / "report.json").read_text())
    result["pairs"] = pairs_report["pairs"]
    result["pair_margin_mean"] = (pairs_report.get("margin") or {}).get("mean")
    (folder / "round.json").write_text(json.dumps(result, indent=2) + "\n")


def write_rounds(out: Path, summaries: list[dict[str, Any]]) -> None:
    """``rounds.json``, ``rounds.md`` and ``rounds.png`` from the rounds so far."""
    (out / "rounds.json").write_text(json.dumps(summaries, indent=2) + "\n")
    lines = ["| round | steps | pairs | scorer | mean [95% CI] | win rate vs base [95% CI] | win rate vs previous [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        for name, v in s["scorers"].items():
            lines.append(f"| {s['round']} | {s['steps']} | {s['pairs']} | {name} | {v['mean']:.4f} "
                         f"[{v['mean_interval'][0]:.4f}, {v['mean_interval'][1]:.4f}] | {v['win_rate_vs_base']:.3f} "
                         f"[{v['win_rate_vs_base_interval'][0]:.3f}, {v['win_rate_vs_base_interval'][1]:.3f}] | "
                         f"{v['win_rate_vs_previous']:.3f} [{v['win_rate_vs_previous_interval'][0]:.3f}, "
                         f"{v['win_rate_vs_previous_interval'][1]:.3f}] |")
    lines.append("\nRound 0's previous is the base. Intervals: percentile bootstrap over prompts x seeds; ties count half.")
    (out / "rounds.md").write_text("\n".join(lines) + "\n")
    _plot_rounds(out / "rounds.png", summaries)


def _plot_rounds(path: Path, summaries: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries[0]["scorers"])
    figure, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 5.5), squeeze=False)
    rounds = [s["round"] for s in summaries]
    for column, name in enumerate(names):
        values = [s["scorers"][name] for s in summaries]
        reward, wins = axes[0][column], axes[1][column]
        means = [v["mean"] for v in values]
        reward.errorbar(rounds, means, yerr=[[m - v["mean_interval"][0] for m, v in zip(means, values)],
                                             [v["mean_interval"][1] - m for m, v in zip(means, values)]],
                        marker="o", capsize=3, label="policy")
        reward.axhline(values[0]["base_mean"], color="gray", linestyle="--", label="base")
        reward.set_title(f"{name}: mean reward", fontsize=9)
        reward.legend(fontsize=7)
        for key, label in (("win_rate_vs_base", "vs base"), ("win_rate_vs_previous", "vs previous round")):
            rates = [v[key] for v in values]
            wins.errorbar(rounds, rates, yerr=[[r - v[f"{key}_interval"][0] for r, v in zip(rates, values)],
                                               [v[f"{key}_interval"][1] - r for r, v in zip(rates, values)]],
                          marker="o", capsize=3, label=label)
        wins.axhline(0.5, color="gray", linestyle=":")
        wins.set_ylim(0, 1)
        wins.set_xlabel("round")
        wins.set_title(f"{name}: win rate", fontsize=9)
        wins.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)
