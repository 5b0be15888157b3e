"""The demo's comparisons, table, plots and ``report.md``.

The comparison of the fine-tunes with the base is the library's `sipo compare`
(:func:`sipo.compare.write_comparison`) on the demo's own pictures and reward: one folder per pair
source (``compare/<source>/``: summary.md, summary.json, win_matrix.png, report.html with every
picture side by side), each configuration pooled over its training seeds with the t-interval over
seeds, as `sipo sweep` pools its cells. The claims (:mod:`sipo.demo.claims`) pair the same per-seed
numbers. The demo keeps only what is its own: the reward-vs-step curves, the w(t) profile and the
report's prose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sipo.demo.evaluate import TIE_TOLERANCE
from sipo.plotting import pyplot

LABELS = {"dpo": "Diffusion-DPO", "dpo-cm": "DPO-C&M", "sipo": "SIPO"}
COLORS = {"dpo": "tab:blue", "dpo-cm": "tab:orange", "sipo": "tab:green"}
#: the demo's reward as the compare names it (the `digits-classifier` scorer of sipo.rewards)
SCORER = "digits-classifier"


def _history_mean(history: list[dict[str, float]], key: str) -> float:
    values = [h[key] for h in history if key in h and math.isfinite(h[key])]
    return float(np.mean(values)) if values else float("nan")


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- the compares
def source_of(result: dict[str, Any]) -> str:
    """The compare a run belongs to: its pair source, or its variant (field runs, on-policy arms)."""
    return result.get("variant") or "mixed"


def entry_names(results: list[dict[str, Any]]) -> dict[tuple[str, str, float], str]:
    """``(source, method, beta) -> entry``: the method's name, with ``beta=B`` where the source ran it at several."""
    betas: dict[tuple[str, str], set[float]] = {}
    for r in results:
        betas.setdefault((source_of(r), r["method"]), set()).add(float(r["beta"]))
    return {(source, method, beta): method if len(values) == 1 else f"{method} beta={beta:g}"
            for (source, method), values in betas.items() for beta in values}


def write_compares(output_dir: Path, results: list[dict[str, Any]], base_images, base_rewards, eval_set,
                   step: int, description: str, methods: tuple[str, ...] = ()) -> dict[str, Any]:
    """One `sipo compare` per pair source in ``output_dir/compare/<source>/``, of the base and every run at
    ``step`` (the eval set's pictures and rewards then), configurations pooled over seeds, rewards within
    :data:`TIE_TOLERANCE` tying; entries in the order of ``methods`` (then as they come), then beta.
    Returns source -> :class:`sipo.compare.CompareResult`."""
    from sipo.compare import BASE, Model, prompt_key, write_comparison
    from sipo.demo.claims import rewards_at
    from sipo.evaluate import Sample, image_path, save_picture
    from sipo.models.digits import digit_prompt

    prompts = [digit_prompt(int(label)) for label in eval_set.labels]
    # picture i: the eval set's prompt i from its initial noise i (the "seed" the page shows)
    samples = [Sample(prompt_key(prompt), i, prompt) for i, prompt in enumerate(prompts)]

    def save(folder: Path, name: str, images) -> None:
        for sample, image in zip(samples, images):
            save_picture(image_path(folder, name, sample), ((image + 1) / 2).clamp(0, 1).expand(3, -1, -1))

    names = entry_names(results)
    order = {method: i for i, method in enumerate(dict.fromkeys([*methods, *(r["method"] for r in results)]))}
    results = sorted(results, key=lambda r: (order[r["method"]], float(r["beta"]), r["seed"]))
    compares = {}
    for source in dict.fromkeys(source_of(r) for r in results):
        runs = [r for r in results if source_of(r) == source]
        folder = output_dir / "compare" / source
        save(folder, BASE, base_images)
        models, rows, groups = [Model(BASE, None, {}, BASE)], [np.asarray(base_rewards, dtype=np.float64)], {}
        for r in runs:
            entry = names[(source, r["method"], float(r["beta"]))]
            label = f"{entry},seed={r['seed']}"
            save(folder, r["name"], r["images_at"][step])
            models.append(Model(label, r.get("run_dir"), {}, r["name"]))
            rows.append(rewards_at(r, step).double().numpy())
            groups.setdefault(entry, {})[int(r["seed"])] = label
        settings = {"description": f"{description}; pairs: {source}", "family": "digits", "num_samples": len(samples),
                    "seeds": list(range(len(samples))), "step": step}
        compares[source] = write_comparison(folder, settings, models, samples, {SCORER: np.stack(rows)}, groups=groups,
                                            tie_tolerance=TIE_TOLERANCE, echo=False)
    return compares


def win_rates(compare, entry: str) -> dict[str, Any]:
    """The entry's pooled win rate over the base in a compare's summary: ``rate``, ``low``, ``high``, ``per_seed``, ``seeds``."""
    from sipo.compare import BASE

    return compare.summary["scorers"][SCORER]["win_rate"][entry][BASE]


def entry_of(compare, method: str, beta: float) -> str:
    """The compare's entry of ``method`` at ``beta`` (named as :func:`entry_names` names it)."""
    return method if method in compare.summary["entries"] else f"{method} beta={beta:g}"


def final_line(compare, methods, beta: float) -> str:
    """``win rate vs base: dpo=0.NN dpo-cm=0.NN sipo=0.NN``: the compare's pooled win rates (means over
    seeds) at ``beta``."""
    return "win rate vs base: " + " ".join(f"{method}={win_rates(compare, entry_of(compare, method, beta))['rate']:.2f}"
                                           for method in methods)


def printed_table(compare, context: dict[str, Any]) -> str:
    """What the demo prints before its claims: the mixed pairs' compare (ranking, means, win-rate matrix)."""
    from sipo.compare import markdown_summary

    return "\n".join(["", f"sipo demo: {context['eval_samples']} fixed prompts+noise per model; base mean reward "
                      f"{context['base_mean_reward']:.3f}; wall time {context['wall_seconds']:.0f} s", "",
                      markdown_summary(compare.summary), "", f"report: {context.get('report_path', 'report.md')}"])


# ----------------------------------------------------------------------------- plots
def plot_reward_vs_step(path: Path, results, methods, betas, base_reward: float) -> None:
    from sipo.stats import t_interval

    plt = pyplot()
    fig, axes = plt.subplots(1, len(betas), figsize=(4.2 * len(betas), 3.4), sharey=True, squeeze=False)
    for ax, beta in zip(axes[0], betas):
        for method in methods:
            runs = [r for r in results if r["method"] == method and r["beta"] == beta]
            if not runs:  # a method not run at this beta (e.g. the beta sweep covers fewer methods)
                continue
            steps = [p["step"] for p in runs[0]["curve"]]
            values = np.array([[p["mean_reward"] for p in r["curve"]] for r in runs])
            band = np.array([t_interval(column) for column in values.T])  # [steps, (mean, low, high)]
            ax.plot(steps, band[:, 0], marker="o", ms=3, color=COLORS.get(method), label=LABELS.get(method, method))
            if len(runs) > 1:
                ax.fill_between(steps, band[:, 1], band[:, 2], color=COLORS.get(method), alpha=0.15)
        ax.axhline(base_reward, color="grey", ls="--", lw=1, label="base")
        ax.set_title(f"beta = {beta:g}")
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("mean reward of samples")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Reward vs step (mean over seeds, band = 95% t-interval over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
def write_report(output_dir: Path, context, results, compares, profile_off, profile_on, analysis=None) -> Path:
    """``report.md`` with its plots; ``results`` are the mixed pairs' runs at step ``max_steps``,
    ``compares`` :func:`write_compares`'s."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    betas = sorted({float(r["beta"]) for r in results})
    plot_reward_vs_step(output_dir / "reward_vs_step.png", results, methods, betas, context["base_mean_reward"])
    tau = context["config"]["objective"]["tau"]
    plot_w_profile(output_dir / "w_profile.png", profile_off, profile_on, tau)
    _write_profile_csv(output_dir / "w_profile.csv", profile_off, profile_on, tau)

    (output_dir / "results.json").write_text(json.dumps({
        "context": context, "compare": {source: compare.summary for source, compare in compares.items()},
        "curves": [{k: r[k] for k in ("method", "beta", "seed", "curve", "steps", "wall_seconds")} for r in results],
    }, indent=2, default=str))

    from sipo.compare import markdown_summary

    names = entry_names(results)
    main = compares.get("mixed") or next(iter(compares.values()))
    per_seed = ["| method | beta | seed | mean reward | win rate vs base | masked frac. | mean w | wall s |",
                "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (methods.index(r["method"]), r["beta"], r["seed"])):
        rates = win_rates(compares[source_of(r)], names[(source_of(r), r["method"], float(r["beta"]))])
        rate = dict(zip(rates["seeds"], rates["per_seed"])).get(int(r["seed"]), float("nan"))
        per_seed.append(f"| {LABELS.get(r['method'], r['method'])} | {r['beta']:g} | {r['seed']} | "
                        f"{float(np.mean(r['rewards'])):.4f} | {rate:.3f} | {_fmt(_history_mean(r['history'], 'masked_fraction'))} | "
                        f"{_fmt(_history_mean(r['history'], 'mean_weight'))} | {r['wall_seconds']:.0f} |")
    table = markdown_summary(main.summary).replace("\n## ", "\n### ").replace("## ", "### ", 1)
    others = ", ".join(f"[{source}](compare/{source}/report.html)" for source in compares if compares[source] is not main)
    timings = "\n".join(f"| {name} | {seconds:.0f} |" for name, seconds in context["timings"].items())
    cfg = context["config"]
    pairs = context["pairs"]
    machine = context["machine"]
    settings = context["settings"]
    off_low = profile_off.mean()[: max(1, len(profile_off.t_mid) // 10)]
    text = f"""# sipo demo report{" (--quick)" if context["quick"] else ""}

Diffusion-DPO, DPO-C&M and SIPO fine-tune the same tiny digits diffusion model on the same
off-policy preference pairs over {len(context["settings"]["seeds"])} seed(s) and beta(s) {", ".join(f"{b:g}" for b in betas)}; each fine-tune is scored on the
same {context["eval_samples"]} prompts and initial noises as the base model. Written by `sipo demo`
({"quick variant" if context["quick"] else "default or full mode"}); every number below was measured in this run.

**Wall time: {context["wall_seconds"]:.0f} s** on {machine["cpu_count"]} CPU cores
({machine["workers"]} fine-tuning process(es), {machine["torch_threads_per_process"]} torch thread each; load average
{machine["load_average_at_start"]:.2f} at start, {machine["load_average_at_end"]:.2f} at end: other work on the
machine slows this down). Pretraining {"was read from the cache" if context["pretrain_cached"] else "ran in this call"}.

| phase | seconds |
|---|---|
{timings}

## Result: `sipo compare` of the base and every fine-tune on the mixed pairs

{table}

The reward is the scorer (`{SCORER}`); a win rate counts, per prompt and initial noise, whether the
row's sample scores higher than the column's (rewards within {TIE_TOLERANCE} tie, half a win); 0.5 = no
change. Each configuration is pooled over its training seeds: the mean over seeds with the 95%
t-interval over seeds. The same comparison as a page, every sample side by side with its reward,
sortable: [compare/mixed/report.html](compare/mixed/report.html){f"; the other pair sources: {others}" if others else ""}.

![win-rate matrix]({Path(main.output_dir).relative_to(output_dir) / "win_matrix.png"})

![reward vs step](reward_vs_step.png)

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

Masked fraction and mean w are the trainer's logged averages over training (w = the pair's
importance weight, docs/spec.md section 3).

Files: `results.json` (everything above), `compare/<pairs>/` (each compare's summary.json, scores.csv,
pictures and page), `runs/<method>-beta<beta>-seed<seed>/` (each run's
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
