"""The experiment behind the defaults of SPEC 4-5 (docs/defaults.md): SIPO's switches on the demo task.

    python -m sipo.demo.sweep --output-dir runs/defaults_sweep

Same base model, same off-policy pairs, same fixed evaluation prompts and noise as `sipo demo`, at
the demo's default beta, for every seed of the demo. Variants (each a set of ``objective.*``
overrides on configs/demo.yaml):

- ``sipo``: tau in {0.1, 0.3, 0.5, 0.7} x w_clip in {1.5, 2, 4} x weight_source in {sample, timestep_ema};
- ``sipo`` with ``weight_norm=sum`` (log w summed over the 64 pixels instead of averaged), tau grid;
- ``dpo-cm`` (mask only), tau grid; and ``dpo``, the baseline;
- two diagnostics: the timestep band t >= 100 alone, and SIPO's reweighting alone (tau = 0).

The runs are cells of the library's sweep (:func:`sipo.demo.run.run_sweep` ->
:func:`sipo.sweep.run_cells`); every variant's win rate over the base is the library compare's pooled
statistic (:func:`sipo.compare.pooled_statistics`: the mean over seeds with its 95% t-interval over
seeds), its difference to DPO :func:`sipo.stats.paired_differences`. Writes ``sweep.json``,
``sweep.md`` (the table docs/defaults.md quotes) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from itertools import product
from pathlib import Path
from typing import Any

TAUS = (0.1, 0.3, 0.5, 0.7)
CLIPS = (1.5, 2.0, 4.0)
SOURCES = ("sample", "timestep_ema")


def variants(taus=TAUS, clips=CLIPS, sources=SOURCES) -> list[tuple[str, str, list[str]]]:
    """``(variant label, method, objective overrides)`` for every cell of the sweep."""
    out: list[tuple[str, str, list[str]]] = [("dpo", "dpo", [])]
    for tau in taus:
        out.append((f"cm_tau{tau:g}", "dpo-cm-outside", [f"objective.tau={tau}"]))
    for tau, clip, source in product(taus, clips, sources):
        out.append((f"sipo_tau{tau:g}_clip{clip:g}_{source}", "sipo-outside",
                    [f"objective.tau={tau}", f"objective.clip_eps={clip - 1.0:g}", f"objective.weight_source={source}"]))
    for tau in taus:
        out.append((f"sipo_sum_tau{tau:g}", "sipo-outside", [f"objective.tau={tau}", "objective.weight_norm=sum"]))
    # diagnostics: the timestep band alone (no weights: C&M with tau 0 keeps every t >= 100), and
    # SIPO's reweighting alone (tau 0: only the undefined last step is masked)
    out.append(("band_t100_only", "dpo-cm-outside", ["objective.tau=0.0", "objective.t_min=100"]))
    out.append(("sipo_tau0_reweight_only", "sipo-outside", ["objective.tau=0.0"]))
    return out


def run_defaults_sweep(output_dir: Path, seeds=(0, 1, 2), workers: int = 2, quick: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from sipo.config import load_config
    from sipo.demo.evaluate import EvalSet, sample_and_score
    from sipo.demo.pairs import make_pairs
    from sipo.demo.pretrain import load_digit_images, pretrain
    from sipo.demo.reward import DigitReward
    from sipo.demo.run import QUICK, DemoSettings, RunJob, run_sweep
    from sipo.demo.settings import demo_config_path, setup_torch
    from sipo.models.digits import DigitsAdapter

    import numpy as np

    started = time.perf_counter()
    settings = QUICK if quick else DemoSettings()
    setup_torch(1)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = demo_config_path()
    config = load_config(config_path)
    beta = float(config.objective.beta)
    max_steps = settings.max_steps or config.train.max_steps

    pretrained = pretrain(settings.pretrain, progress=progress)
    base_dir = output_dir / "base"
    shutil.rmtree(base_dir, ignore_errors=True)
    shutil.copytree(pretrained.base_dir, base_dir)
    base = DigitsAdapter.from_pretrained(base_dir)
    early = DigitsAdapter.from_pretrained(pretrained.early_dir)
    reward = DigitReward(settings.reward_seed)
    real_images, real_labels = load_digit_images(base.resolution)
    pairs_dir = output_dir / "pairs"
    shutil.rmtree(pairs_dir, ignore_errors=True)
    pairs = make_pairs(early, reward, real_images, real_labels, pairs_dir, settings.pairs, progress=progress)
    eval_set = EvalSet.make(settings.eval_per_class, base.resolution, settings.eval_seed)
    _, base_rewards = sample_and_score(base, reward, eval_set, settings.sampling_steps)
    weight_stats = weight_distribution(base, pairs, settings)

    cells = variants() if not quick else variants(taus=(0.5,), clips=(2.0,), sources=SOURCES)
    jobs = []
    for label, method, overrides in cells:
        for seed in seeds:
            run_dir = output_dir / "runs" / f"{label}-seed{seed}"
            jobs.append(RunJob(
                method=method, beta=beta, seed=seed, config_path=str(config_path),
                overrides=[
                    f"model.pretrained_path={base_dir.resolve()}", f"data.path={pairs.manifest.resolve()}",
                    f"objective.name={method}", f"objective.beta={beta}", f"train.seed={seed}",
                    f"train.max_steps={max_steps}", f"train.output_dir={run_dir.resolve()}", *overrides,
                ],
                base_dir=str(base_dir.resolve()), run_dir=str(run_dir), eval_every=max_steps,
                eval_per_class=settings.eval_per_class, eval_seed=settings.eval_seed,
                sampling_steps=settings.sampling_steps, reward_seed=settings.reward_seed, variant=label,
            ))
    results = run_sweep(jobs, workers, progress=progress)

    from sipo.compare import BASE, pooled_statistics
    from sipo.demo.evaluate import TIE_TOLERANCE
    from sipo.stats import paired_differences

    labels = [BASE] + [r["name"] for r in results]
    scores = np.stack([base_rewards.double().numpy()] + [np.asarray(r["rewards"], dtype=np.float64) for r in results])
    groups = {label: {int(r["seed"]): r["name"] for r in results if r["variant"] == label} for label, _, _ in cells}
    _, statistics = pooled_statistics({"reward": scores}, labels, groups, tolerance=TIE_TOLERANCE)
    statistics = statistics["reward"]
    per_seed = {label: dict(zip(statistics["win_rate"][label][BASE]["seeds"], statistics["win_rate"][label][BASE]["per_seed"]))
                for label in groups}
    rows = []
    for label, method, overrides in cells:
        runs = [r for r in results if r["variant"] == label]
        wins, means = statistics["win_rate"][label][BASE], statistics["means"][label]
        vs_dpo = paired_differences(per_seed[label], per_seed["dpo"])
        rows.append({
            "variant": label, "method": method, "overrides": overrides,
            "win_rate": [wins["rate"], wins["low"], wins["high"]], "win_rate_per_seed": wins["per_seed"],
            "vs_dpo": [vs_dpo["mean"], vs_dpo["low"], vs_dpo["high"]],
            "mean_reward": [means["mean"], means["low"], means["high"]],
            "masked_fraction": _mean([_mean([h.get("masked_fraction", math.nan) for h in r["history"]]) for r in runs]),
            "mean_weight": _mean([_mean([h.get("mean_weight", math.nan) for h in r["history"]]) for r in runs]),
        })
    record = {
        "command": "python -m sipo.demo.sweep" + (" --quick" if quick else "") + f" --output-dir {output_dir}",
        "beta": beta, "seeds": list(seeds), "max_steps": max_steps, "eval_samples": len(eval_set),
        "base_mean_reward": float(base_rewards.mean()), "wall_seconds": time.perf_counter() - started,
        "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan,
        "weight_distribution": weight_stats,
        "rows": rows,
    }
    (output_dir / "sweep.json").write_text(json.dumps(record, indent=2))
    table = format_table(record)
    (output_dir / "sweep.md").write_text(table + "\n")
    print(table)
    return record


def weight_distribution(base, pairs, settings) -> dict[str, Any]:
    """How the base model's pair weights w on the demo pairs fall relative to each tau and w_clip.

    t uniform over [0, T) (one draw per pair in each of ``profile_buckets`` buckets), for both
    weight norms; ``undefined`` is the share with no weight (t < T/50: the previous step is x0).
    """
    import numpy as np

    from sipo.demo.profile import weight_profile

    n = min(settings.profile_pairs, len(pairs.prompts))
    out: dict[str, Any] = {}
    for norm in ("mean", "sum"):
        profile = weight_profile(base, pairs.labels[:n], pairs.chosen[:n], pairs.rejected[:n],
                                 settings.profile_buckets, seed=0, weight_norm=norm)
        w = np.exp(profile.log_w_pair.reshape(-1))
        defined = np.isfinite(w)
        out[norm] = {
            "undefined": float(1 - defined.mean()),
            **{f"below_tau_{tau:g}": float((w[defined] < tau).mean()) for tau in TAUS},
            **{f"above_clip_{clip:g}": float((w[defined] > clip).mean()) for clip in CLIPS},
            "median_w": float(np.median(w[defined])),
        }
    return out


def _mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def format_table(record: dict[str, Any]) -> str:
    lines = [
        f"`{record['command']}` - beta {record['beta']:g}, {len(record['seeds'])} seeds, {record['max_steps']} steps, "
        f"{record['eval_samples']} eval samples; base mean reward {record['base_mean_reward']:.3f}; "
        f"wall {record['wall_seconds']:.0f} s",
        "",
        "| variant | win rate vs base [95% CI] | minus DPO (paired) [95% CI] | mean reward [95% CI] | masked frac. | mean w |",
        "|---|---|---|---|---|---|",
    ]
    fmt = lambda v, d=3: "-" if v is None or not math.isfinite(v) else f"{v:.{d}f}"  # noqa: E731
    ci = lambda m, lo, hi, d=3: f"{fmt(m, d)} [{fmt(lo, d)}, {fmt(hi, d)}]"  # noqa: E731
    for row in record["rows"]:
        lines.append(
            f"| {row['variant']} | {ci(*row['win_rate'])} | {ci(*row['vs_dpo'])} | {ci(*row['mean_reward'], d=4)} | "
            f"{fmt(row['masked_fraction'])} | {fmt(row['mean_weight'])} |"
        )
    stats = record.get("weight_distribution")
    if stats:
        keys = list(next(iter(stats.values())))
        lines += ["", "Base model's pair weights w on the demo pairs (t uniform):", "",
                  "| weight_norm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for norm, values in stats.items():
            lines.append(f"| {norm} | " + " | ".join(fmt(values[k]) for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sipo.demo.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/defaults_sweep")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke version of the sweep")
    args = parser.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    run_defaults_sweep(Path(args.output_dir), seeds=seeds, workers=args.workers, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
