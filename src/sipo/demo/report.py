"""The demo's numbers, table, verdict, plots and ``report.md``.

Statistics: every figure is a mean over seeds; "std" is the sample standard deviation across
seeds (``ddof=1``; undefined, shown as ``-``, with one seed). SIPO vs DPO is compared *paired*:
the same seed means the same LoRA initialisation, data order, timesteps and noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sipo.demo.evaluate import TIE_TOLERANCE, EvalSet, win_rate
from sipo.plotting import pyplot

LABELS = {"dpo": "Diffusion-DPO", "dpo-cm": "DPO-C&M", "sipo": "SIPO"}
COLORS = {"dpo": "tab:blue", "dpo-cm": "tab:orange", "sipo": "tab:green"}


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _history_mean(history: list[dict[str, float]], key: str) -> float:
    values = [h[key] for h in history if key in h and math.isfinite(h[key])]
    return float(np.mean(values)) if values else float("nan")


def summarise(results: list[dict[str, Any]], base_rewards, methods, betas) -> dict[str, dict[str, Any]]:
    """``summary[method][str(beta)]``: mean reward, win rate vs base, their std over seeds, per-seed values."""
    import torch

    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        summary[method] = {}
        for beta in betas:
            runs = sorted((r for r in results if r["method"] == method and r["beta"] == beta), key=lambda r: r["seed"])
            per_seed = []
            for run in runs:
                rewards = torch.tensor(run["rewards"])
                per_seed.append({
                    "seed": run["seed"],
                    "mean_reward": float(rewards.mean()),
                    "win_rate": win_rate(rewards, base_rewards),
                    "masked_fraction": _history_mean(run["history"], "masked_fraction"),
                    "mean_weight": _history_mean(run["history"], "mean_weight"),
                    "implicit_acc_last": run["history"][-1].get("implicit_acc", float("nan")) if run["history"] else float("nan"),
                    "grad_norm": _history_mean(run["history"], "grad_norm"),
                    "wall_seconds": run["wall_seconds"],
                })
            rewards = [p["mean_reward"] for p in per_seed]
            wins = [p["win_rate"] for p in per_seed]
            summary[method][f"{beta:g}"] = {
                "beta": beta,
                "mean_reward": float(np.mean(rewards)),
                "mean_reward_std": _std(rewards),
                "win_rate": float(np.mean(wins)),
                "win_rate_std": _std(wins),
                "masked_fraction": float(np.mean([p["masked_fraction"] for p in per_seed])),
                "mean_weight": float(np.mean([p["mean_weight"] for p in per_seed])),
                "per_seed": per_seed,
            }
    return summary


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def table_rows(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for method, by_beta in summary.items():
        for key, entry in by_beta.items():
            rows.append([
                LABELS.get(method, method), key,
                f"{_fmt(entry['mean_reward'])} ± {_fmt(entry['mean_reward_std'])}",
                f"{_fmt(entry['win_rate'])} ± {_fmt(entry['win_rate_std'])}",
                _fmt(entry["masked_fraction"], 3),
                _fmt(entry["mean_weight"], 3),
                str(len(entry["per_seed"])),
            ])
    return rows


HEADER = ["method", "beta", "mean reward ± std", "win rate vs base ± std", "masked frac.", "mean w", "seeds"]


def format_table(summary: dict[str, dict[str, Any]], context: dict[str, Any]) -> str:
    rows = [HEADER] + table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["", f"sipo demo: {context['eval_samples']} fixed prompts+noise per model; base mean reward "
             f"{context['base_mean_reward']:.3f}; wall time {context['wall_seconds']:.0f} s"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("")
    lines.append(verdict(summary, context["default_beta"]))
    lines.append(f"report: {context.get('report_path', 'report.md')}")
    return "\n".join(lines)


def final_line(summary: dict[str, dict[str, Any]], default_beta: float, methods) -> str:
    """``win rate vs base: dpo=0.NN dpo-cm=0.NN sipo=0.NN`` (means over seeds at the default beta)."""
    key = f"{default_beta:g}"
    parts = [f"{method}={summary[method][key]['win_rate']:.2f}" for method in methods]
    return "win rate vs base: " + " ".join(parts)


def paired_difference(summary, method: str, other: str, beta_key: str, metric: str) -> tuple[float, float, list[float]]:
    """Mean and std over seeds of ``metric(method) - metric(other)`` on the same seeds."""
    a = {p["seed"]: p[metric] for p in summary[method][beta_key]["per_seed"]}
    b = {p["seed"]: p[metric] for p in summary[other][beta_key]["per_seed"]}
    differences = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    return float(np.mean(differences)), _std(differences), differences


def verdict(summary: dict[str, dict[str, Any]], default_beta: float) -> str:
    """One plain paragraph: did SIPO beat DPO, by how much, and is it more than seed noise."""
    if "sipo" not in summary or "dpo" not in summary:
        return ""
    lines = []
    for key in summary["sipo"]:
        mean, std, diffs = paired_difference(summary, "sipo", "dpo", key, "win_rate")
        r_mean, r_std, _ = paired_difference(summary, "sipo", "dpo", key, "mean_reward")
        n = len(diffs)
        if n > 1 and std > 0:
            t_stat = mean / (std / math.sqrt(n))
            noise = "consistent across seeds" if all(d > 0 for d in diffs) or all(d < 0 for d in diffs) else "not consistent across seeds"
            significance = f", paired t = {t_stat:.2f} over {n} seeds ({noise})"
        else:
            significance = " (one seed: no estimate of seed noise)" if n == 1 else ""
        tag = " (default)" if float(key) == default_beta else ""
        if mean > 0:
            outcome = f"SIPO beat Diffusion-DPO by {mean:+.3f} win rate vs base"
        elif mean < 0:
            outcome = f"SIPO did not beat Diffusion-DPO: {mean:+.3f} win rate vs base"
        else:
            outcome = "SIPO tied with Diffusion-DPO on win rate vs base"
        spread = summary["dpo"][key].get("win_rate_std", float("nan"))
        scale = ""
        if math.isfinite(spread) and mean != 0:
            scale = (f"; |difference| {'<' if abs(mean) < spread else '>='} Diffusion-DPO's own across-seed std "
                     f"{spread:.3f}")
        lines.append(
            f"beta {key}{tag}: {outcome} (per seed {', '.join(f'{d:+.3f}' for d in diffs)}){significance}{scale}; "
            f"mean reward difference {r_mean:+.4f}."
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def plot_reward_vs_step(path: Path, results, methods, betas, base_reward: float) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(betas), figsize=(4.2 * len(betas), 3.4), sharey=True, squeeze=False)
    for ax, beta in zip(axes[0], betas):
        for method in methods:
            runs = [r for r in results if r["method"] == method and r["beta"] == beta]
            if not runs:  # a method not run at this beta (e.g. the beta sweep covers fewer methods)
                continue
            steps = [p["step"] for p in runs[0]["curve"]]
            values = np.array([[p["mean_reward"] for p in r["curve"]] for r in runs])
            mean = values.mean(axis=0)
            ax.plot(steps, mean, marker="o", ms=3, color=COLORS.get(method), label=LABELS.get(method, method))
            if len(runs) > 1:
                std = values.std(axis=0, ddof=1)
                ax.fill_between(steps, mean - std, mean + std, color=COLORS.get(method), alpha=0.15)
        ax.axhline(base_reward, color="grey", ls="--", lw=1, label="base")
        ax.set_title(f"beta = {beta:g}")
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("mean reward of samples")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Reward vs step (mean over seeds, band = ±1 std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_win_rate_vs_beta(path: Path, summary, methods, betas) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, method in enumerate(methods):
        keys = [f"{b:g}" for b in betas]
        mean = [summary[method][k]["win_rate"] for k in keys]
        std = [summary[method][k]["win_rate_std"] for k in keys]
        std = [0.0 if not math.isfinite(s) else s for s in std]
        offset = 1.0 + 0.04 * (i - 1)  # small horizontal offset so the error bars do not overlap
        ax.errorbar([b * offset for b in betas], mean, yerr=std, marker="o", capsize=3,
                    color=COLORS.get(method), label=LABELS.get(method, method))
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="= base")
    ax.set_xscale("log")
    ax.set_xticks(list(betas))
    ax.set_xticklabels([f"{b:g}" for b in betas])
    ax.minorticks_off()
    ax.set_xlabel("beta")
    ax.set_ylabel("win rate vs base")
    ax.set_title("Sensitivity to beta (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mosaic(images, labels, per_class: int) -> np.ndarray:
    """Columns = digits 0-9, rows = the first ``per_class`` eval samples of each digit."""
    tiles = np.ones((per_class, 10, images.shape[-2], images.shape[-1]))
    for digit in range(10):
        index = np.nonzero(labels == digit)[0][:per_class]
        for row, i in enumerate(index):
            tiles[row, digit] = (images[i, 0] + 1) / 2
    h, w = images.shape[-2:]
    canvas = np.ones((per_class * (h + 1) - 1, 10 * (w + 1) - 1))
    for row in range(per_class):
        for col in range(10):
            canvas[row * (h + 1):row * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = tiles[row, col]
    return canvas


def plot_samples(path: Path, panels: list[tuple[str, Any, Any]], eval_set: EvalSet, per_class: int = 4) -> None:
    plt = pyplot()
    labels = eval_set.labels.numpy()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 1.9), squeeze=False)
    for ax, (title, images, rewards) in zip(axes[0], panels):
        ax.imshow(_mosaic(images.numpy(), labels, per_class), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{title}\nmean reward {float(rewards.mean()):.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Same prompts (columns: digits 0-9) and same initial noise in every panel", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_w_profile(path: Path, off, on, tau: float) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for profile, name, color in ((off, "off-policy demo pairs", "tab:red"), (on, "base model's own samples", "tab:blue")):
        ax.plot(profile.t_mid, profile.quantiles(0.5), color=color, marker="o", ms=3, label=f"{name} (median)")
        ax.fill_between(profile.t_mid, profile.quantiles(0.05), profile.quantiles(0.95), color=color, alpha=0.15)
        ax2.plot(profile.t_mid, profile.masked_fraction(tau), color=color, marker="o", ms=3, label=name)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.axhline(math.log(tau), color="grey", ls=":", lw=1, label=f"log tau = log {tau:g}")
    ax.set_xlabel("timestep t (0 = clean image, 999 = pure noise)")
    ax.set_ylabel("log w(t) of the pair (5-95% band)")
    ax.set_title("Step-wise importance weight of the base model", fontsize=10)
    ax.legend(fontsize=7)
    ax2.set_xlabel("timestep t")
    ax2.set_ylabel(f"fraction masked (w < {tau:g} or undefined)")
    ax2.set_title("What the C&M / SIPO mask removes", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- report.md
def write_report(output_dir: Path, context, summary, results, base_images, base_rewards, eval_set,
                 profile_off, profile_on, analysis=None) -> Path:
    import torch

    methods = list(summary)
    betas = [summary[methods[0]][k]["beta"] for k in summary[methods[0]]]
    default_key = f"{context['default_beta']:g}"
    plot_reward_vs_step(output_dir / "reward_vs_step.png", results, methods, betas, context["base_mean_reward"])
    plot_win_rate_vs_beta(output_dir / "win_rate_vs_beta.png", summary, methods, betas)
    first_seed = min(r["seed"] for r in results)
    panels = [("base", base_images, base_rewards)]
    for method in methods:
        run = next(r for r in results if r["method"] == method and f"{r['beta']:g}" == default_key and r["seed"] == first_seed)
        panels.append((f"{LABELS.get(method, method)} (beta {default_key}, seed {first_seed})", run["images"], torch.tensor(run["rewards"])))
    per_class = max(1, min(4, len(eval_set) // 10))
    plot_samples(output_dir / "samples.png", panels, eval_set, per_class)
    tau = context["config"]["objective"]["tau"]
    plot_w_profile(output_dir / "w_profile.png", profile_off, profile_on, tau)
    _write_profile_csv(output_dir / "w_profile.csv", profile_off, profile_on, tau)

    (output_dir / "results.json").write_text(json.dumps({
        "context": context, "summary": summary,
        "curves": [{k: r[k] for k in ("method", "beta", "seed", "curve", "steps", "wall_seconds")} for r in results],
    }, indent=2, default=str))

    rows = [HEADER] + table_rows(summary)
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows[:1]) + "\n"
    table += "|" + "---|" * len(HEADER) + "\n"
    table += "\n".join("| " + " | ".join(row) + " |" for row in rows[1:])
    per_seed = ["| method | beta | seed | mean reward | win rate vs base | masked frac. | mean w | wall s |", "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for key, entry in summary[method].items():
            for p in entry["per_seed"]:
                per_seed.append(f"| {LABELS.get(method, method)} | {key} | {p['seed']} | {p['mean_reward']:.4f} | "
                                f"{p['win_rate']:.3f} | {_fmt(p['masked_fraction'])} | {_fmt(p['mean_weight'])} | {p['wall_seconds']:.0f} |")
    timings = "\n".join(f"| {name} | {seconds:.0f} |" for name, seconds in context["timings"].items())
    cfg = context["config"]
    pairs = context["pairs"]
    machine = context["machine"]
    settings = context["settings"]
    off_low = profile_off.mean()[: max(1, len(profile_off.t_mid) // 10)]
    text = f"""# sipo demo report{" (--quick)" if context["quick"] else ""}

Diffusion-DPO, DPO-C&M and SIPO fine-tune the same tiny digits diffusion model on the same
off-policy preference pairs, over a beta sweep and several seeds; each fine-tune is scored on the
same {context["eval_samples"]} prompts and initial noises as the base model. Written by `sipo demo`
({"quick variant" if context["quick"] else "full run"}); every number below was measured in this run.

**Wall time: {context["wall_seconds"]:.0f} s** on {machine["cpu_count"]} CPU cores
({machine["workers"]} fine-tuning process(es), {machine["torch_threads_per_process"]} torch thread each; load average
{machine["load_average_at_start"]:.2f} at start, {machine["load_average_at_end"]:.2f} at end: other work on the
machine slows this down). Pretraining {"was read from the cache" if context["pretrain_cached"] else "ran in this call"}.

| phase | seconds |
|---|---|
{timings}

## Result

{table}

Mean reward: the reward averaged over the {context["eval_samples"]} samples, then over seeds. Win rate vs base: the
fraction of prompts where the fine-tune's sample scores higher than the base model's sample from
the same initial noise (rewards within {TIE_TOLERANCE} count as a tie, half a win); 0.5 = no change.
± is the sample standard deviation over seeds. Masked fraction and mean w are the trainer's
logged averages over training (w = the pair's importance weight, docs/spec.md section 3).

{verdict(summary, context["default_beta"]).replace(chr(10), chr(10) + chr(10))}

![reward vs step](reward_vs_step.png)

![win rate vs beta](win_rate_vs_beta.png)

![samples](samples.png)

## The task

- **Base model**: a class-conditional `UNet2DModel` ({context["pretrain_info"]["num_parameters"]:,} parameters,
  8x8 grey pixels, epsilon-prediction DDPM, T = 1000, linear betas) trained for
  {settings["pretrain"]["steps"]} steps on all {context["pretrain_info"]["num_images"]} digits of scikit-learn's
  `load_digits`; the weights' moving average is the base. Prompt "a handwritten digit N" = class N.
  Samples: DDIM, {settings["sampling_steps"]} steps, eta 0 (a function of the initial noise).
  Base mean reward **{context["base_mean_reward"]:.3f}**.
- **Reward**: how sure a digit reader trained on real handwriting is that the picture shows the
  prompted digit: the probability a logistic-regression classifier (fitted on half of the real
  digits) gives to class N. Held-out accuracy of the reader on the other half:
  {context["reward_held_out_accuracy"]:.3f}.
- **Off-policy pairs** ({pairs["pairs"]}): each side is a real digit N (probability
  {settings["pairs"]["real_fraction"]}) or a sample from an *early* checkpoint (step
  {settings["pretrain"]["early_step"]} of pretraining, mean reward {context["early_mean_reward"]:.3f}); the side
  with the higher reward is chosen; {pairs["dropped_near_ties"]} near-ties (reward gap <
  {settings["pairs"]["min_gap"]}) were dropped. Kinds (chosen>rejected): {pairs["kinds (chosen>rejected)"]}.
  Mean reward chosen {pairs["mean_reward_chosen"]:.3f}, rejected {pairs["mean_reward_rejected"]:.3f}.
  None of them comes from the base model.
- **Fine-tuning** (`{Path(context["config_path"]).name}`): LoRA rank {cfg["train"]["lora_rank"]} (alpha
  {cfg["train"]["lora_alpha"]}) on the UNet's attention projections and ResNet convolutions, AdamW lr
  {cfg["train"]["learning_rate"]}, batch {cfg["train"]["batch_size"]} pairs, {context["max_steps"]} steps, gradient
  clip {cfg["train"]["max_grad_norm"]}. Objective switches per method from the presets (dpo: none;
  dpo-cm: mask; sipo: mask + clip + self-normalised reweighting) with tau {cfg["objective"]["tau"]},
  clip_eps {cfg["objective"]["clip_eps"]}, placement {cfg["objective"]["weight_placement"]}, weight_source {cfg["objective"]["weight_source"]}, weight_norm
  {cfg["objective"]["weight_norm"]}, pair_weight {cfg["objective"]["pair_weight"]}. Same seed = same LoRA init, data
  order, timesteps and noise for all three methods.

## w(t) profile

![w(t) profile](w_profile.png)

log w of the pair (docs/spec.md section 3, per-element mean, product over winner and loser) of the base model,
{len(profile_off.log_w_pair[0])} pairs x {len(profile_off.t_mid)} timestep buckets, on the demo's off-policy pairs and on
pairs of the base model's own samples (`w_profile.csv`). t = 0 is the clean end. In the lowest
tenth of t the mean log w is {float(np.nanmean(off_low)):.3f} on the off-policy pairs (the
bucket holding t < T/50 has no defined weight: its previous step is x0 itself).

{_analysis_section(output_dir, analysis)}
## Per seed

{chr(10).join(per_seed)}

Files: `results.json` (everything above), `runs/<method>-beta<beta>-seed<seed>/` (each run's
config, LoRA weights, metrics.jsonl, TensorBoard logs), `base/` and `pairs/` (so that
`sipo train --config configs/demo.yaml` re-runs one fine-tune by hand).
"""
    path = output_dir / "report.md"
    path.write_text(text)
    return path


def _write_profile_csv(path: Path, off, on, tau: float) -> None:
    lines = ["t_mid,source,log_w_pair_mean,log_w_pair_q05,log_w_pair_q50,log_w_pair_q95,masked_fraction_at_tau"]
    for profile, name in ((off, "off_policy_pairs"), (on, "base_own_samples")):
        mean, q05, q50, q95, masked = (profile.mean(), profile.quantiles(0.05), profile.quantiles(0.5),
                                       profile.quantiles(0.95), profile.masked_fraction(tau))
        for i, t in enumerate(profile.t_mid):
            lines.append(f"{t:.1f},{name},{mean[i]:.6g},{q05[i]:.6g},{q50[i]:.6g},{q95[i]:.6g},{masked[i]:.4f}")
    path.write_text("\n".join(lines) + "\n")


def _analysis_section(output_dir: Path, analysis) -> str:
    """The `sipo analyze` study of the base model on the demo's pairs (docs/analysis.md)."""
    if analysis is None:
        return ""
    plots = "\n".join(
        f"![{name}]({Path(analysis.files[key]).relative_to(output_dir)})"
        for key, name in (("plot_weights", "log w vs t"), ("plot_variance", "gradient variance vs t"),
                          ("plot_tau", "masked fraction vs tau"))
        if key in analysis.files
    )
    return f"""## `sipo analyze`: weights and gradient variance per timestep

{plots}

{analysis.findings}

(`analysis/analysis.csv`, `analysis/analysis.json`; the same study `sipo analyze --config
configs/demo.yaml` runs, on the base model before any fine-tuning.)
"""
