"""The paper's three claims, tested on the demo with 95% confidence intervals over seeds.

1. **Win rate vs base**: SIPO (and C&M) beat Diffusion-DPO, under both readings of SPEC 4a.
2. **beta sensitivity**: SIPO's win rate varies less than DPO's across a 10x range of beta.
3. **Stability**: in a run 3x longer, DPO's reward falls from its peak ("late-stage degradation")
   and SIPO's does not. Beside the reward, as the paper does (its Fig. 1c/8), the long runs' implicit
   accuracy and reward margin on held-out pairs, read back from each run's ``validation.jsonl``.

Every comparison is paired per seed (the same seed means the same LoRA initialisation, data order,
timesteps and noise for every method), and its interval is the t-interval of the per-seed paired
differences, ``mean +- t_{0.975, n-1} * sd / sqrt(n)``: the library's
:func:`sipo.stats.paired_differences`, as `sipo sweep` pools its seeds. A win rate vs base is
:func:`sipo.evaluate.win_rate` with the demo's tie tolerance, the number the demo's compare
(:func:`sipo.demo.report.write_compares`) pools. A claim counts as *supported* only when the
interval excludes zero in the claimed direction, *contradicted* when it excludes zero the other
way, and *not resolved* otherwise. Nothing here trains; it reads the runs of :mod:`sipo.demo.run`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sipo.demo.evaluate import win_rate
from sipo.plotting import pyplot
from sipo.stats import paired_differences, t_interval  # the library's intervals over seeds, as sipo sweep's

LABELS = {
    "dpo": "Diffusion-DPO", "dpo-cm": "DPO-C&M (paper reading)", "sipo": "SIPO (paper reading)",
    "dpo-cm-outside": "DPO-C&M (project reading)", "sipo-outside": "SIPO (project reading)",
    "hinge": "hinge", "ipo": "IPO", "sft": "SFT (winners only)", "kto": "Diffusion-KTO", "mapo": "MaPO",
    "dspo": "DSPO", "dmpo": "DMPO (+ safeguard)", "alpha-dpo": "alpha-DPO", "sipo-elementwise": "SIPO (sd-scripts, per element)",
    "dpo-auto": "Diffusion-DPO, auto beta",
}
COLORS = {"dpo": "tab:blue", "dpo-cm": "tab:orange", "sipo": "tab:green", "dpo-cm-outside": "tab:red",
          "sipo-outside": "tab:purple"}
SOURCE_LABELS = {"mixed": "mixed pairs (real vs early samples)", "offpolicy": "strongly off-policy pairs (early samples only)"}


def rewards_at(result: dict[str, Any], step: int) -> torch.Tensor:
    """The run's per-sample rewards at evaluation ``step`` (its curve holds every evaluation)."""
    for point in result["curve"]:
        if point["step"] == step and "rewards" in point:
            return torch.tensor(point["rewards"])
    raise KeyError(f"run {result['name']} was not evaluated at step {step}")


def _runs(results, source: str, method: str, beta: float) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in results if r["source"] == source and r["method"] == method and r["beta"] == beta}


def _paired(values: dict[int, float], others: dict[int, float]) -> tuple[tuple[float, float, float], list[float]]:
    """``((mean, low, high), per-seed differences)`` of ``values - others`` on their shared seeds."""
    difference = paired_differences(values, others)
    return (difference["mean"], difference["low"], difference["high"]), difference["per_seed"]


def _fmt_ci(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if not math.isfinite(lo):
        return f"{mean:{sign}.3f} [95% CI n/a]"
    return f"{mean:{sign}.3f} [95% CI {lo:{sign}.3f}, {hi:{sign}.3f}]"


def _verdict(lo: float, hi: float, claimed_positive: bool) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not resolved (one seed)"
    if lo > 0:
        return "supported" if claimed_positive else "contradicted"
    if hi < 0:
        return "contradicted" if claimed_positive else "supported"
    return "not resolved (CI contains 0)"


# ----------------------------------------------------------------------------- claim 1
def claim_win_rate(results, base_rewards, sources, methods, beta: float, step: int) -> dict[str, Any]:
    """Per source and method: win rate vs base (mean, CI) and the paired difference to DPO."""
    out: dict[str, Any] = {}
    for source in sources:
        dpo = {s: win_rate(rewards_at(r, step), base_rewards) for s, r in _runs(results, source, "dpo", beta).items()}
        rows = {}
        for method in methods:
            wins = {s: win_rate(rewards_at(r, step), base_rewards) for s, r in _runs(results, source, method, beta).items()}
            if not wins:
                continue
            minus_dpo, differences = _paired(wins, dpo)
            rows[method] = {
                "per_seed": [wins[s] for s in sorted(wins)],
                "win_rate": t_interval(list(wins.values())),
                "minus_dpo": minus_dpo if method != "dpo" else None,
                "minus_dpo_per_seed": differences,
                "verdict": _verdict(*minus_dpo[1:], claimed_positive=True) if method != "dpo" else "",
            }
        out[source] = rows
    return out


# ----------------------------------------------------------------------------- claim 2
def claim_beta_sensitivity(results, base_rewards, sources, methods, betas, step: int) -> dict[str, Any]:
    """Per seed, the spread (max - min) of a method's win rate over ``betas``; paired vs DPO's spread."""
    out: dict[str, Any] = {}
    for source in sources:
        spreads: dict[str, dict[int, float]] = {}
        by_beta: dict[str, dict[str, Any]] = {}
        for method in methods:
            per_beta = {beta: _runs(results, source, method, beta) for beta in betas}
            seeds = set.intersection(*(set(runs) for runs in per_beta.values())) if per_beta else set()
            if not seeds:
                continue
            wins = {beta: {s: win_rate(rewards_at(per_beta[beta][s], step), base_rewards) for s in seeds} for beta in betas}
            spreads[method] = {s: max(wins[b][s] for b in betas) - min(wins[b][s] for b in betas) for s in seeds}
            by_beta[method] = {f"{b:g}": t_interval(list(wins[b].values())) for b in betas}
        rows = {}
        for method, spread in spreads.items():
            row = {"spread": t_interval(list(spread.values())), "win_rate_by_beta": by_beta[method]}
            if method != "dpo" and "dpo" in spreads:
                row["minus_dpo"], _ = _paired(spread, spreads["dpo"])
                row["verdict"] = _verdict(*row["minus_dpo"][1:], claimed_positive=False)
            rows[method] = row
        if rows:
            out[source] = rows
    return out


# ----------------------------------------------------------------------------- claim 3
HELD_OUT_ACCURACY, HELD_OUT_MARGIN = "held_out/accuracy", "held_out/reward_margin"


def held_out_curve(result: dict[str, Any], key: str = HELD_OUT_ACCURACY) -> dict[int, float]:
    """``step -> value`` of a held-out metric, as the run's validation log (``result["validation"]``,
    the records of its validation.jsonl) holds it; empty for a run without held-out pairs."""
    return {int(record["step"]): float(record[key]) for record in result.get("validation") or [] if key in record}


def _peak_drop(curve: dict[int, float]) -> float:
    """``peak - final`` over the points after step 0 (as the reward's drop)."""
    steps = sorted(step for step in curve if step > 0)
    return max(curve[step] for step in steps) - curve[steps[-1]]


def _held_out_rows(runs: dict[str, dict[int, dict[str, Any]]], short_steps: int | None) -> dict[str, Any]:
    """Per method: the held-out accuracy and margin curves (mean over seeds), the accuracy's drop
    from its peak per seed (paired vs DPO's), and the final accuracy minus DPO's (paired)."""
    per_method: dict[str, dict[int, dict[str, dict[int, float]]]] = {}
    for method, by_seed in runs.items():
        curves = {seed: {key: held_out_curve(run, key) for key in (HELD_OUT_ACCURACY, HELD_OUT_MARGIN)}
                  for seed, run in by_seed.items()}
        if curves and all(len(c[HELD_OUT_ACCURACY]) >= 2 for c in curves.values()):
            per_method[method] = curves
    rows: dict[str, Any] = {}
    for method, curves in per_method.items():
        steps = sorted(set.intersection(*(set(c[HELD_OUT_ACCURACY]) for c in curves.values())))
        final = steps[-1]
        mean = {key: [float(np.mean([c[key][step] for c in curves.values()])) for step in steps]
                for key in (HELD_OUT_ACCURACY, HELD_OUT_MARGIN)}
        drop = {seed: _peak_drop({step: c[HELD_OUT_ACCURACY][step] for step in steps}) for seed, c in curves.items()}
        row = {"steps": steps, "accuracy": mean[HELD_OUT_ACCURACY], "margin": mean[HELD_OUT_MARGIN],
               "final_accuracy": t_interval([c[HELD_OUT_ACCURACY][final] for c in curves.values()]),
               "final_margin": t_interval([c[HELD_OUT_MARGIN][final] for c in curves.values()]),
               "accuracy_at_short": (t_interval([c[HELD_OUT_ACCURACY][short_steps] for c in curves.values()])
                                     if short_steps in steps else (float("nan"),) * 3),
               "drop": t_interval(list(drop.values())), "drop_per_seed": [drop[s] for s in sorted(drop)]}
        if method == "dpo":
            row["verdict"] = "DPO degrades: " + _verdict(*row["drop"][1:], claimed_positive=True)
        elif "dpo" in per_method:
            dpo = per_method["dpo"]
            row["minus_dpo_drop"], _ = _paired(drop, {s: _peak_drop(c[HELD_OUT_ACCURACY]) for s, c in dpo.items()})
            row["final_minus_dpo"], _ = _paired({s: c[HELD_OUT_ACCURACY][final] for s, c in curves.items()},
                                                {s: c[HELD_OUT_ACCURACY][final] for s, c in dpo.items() if final in c[HELD_OUT_ACCURACY]})
            row["verdict"] = (f"drops less than DPO: {_verdict(*row['minus_dpo_drop'][1:], claimed_positive=False)}; "
                              f"ends above DPO: {_verdict(*row['final_minus_dpo'][1:], claimed_positive=True)}")
        rows[method] = row
    return rows


def claim_stability(results, sources, methods, beta: float, long_steps: int,
                    short_steps: int | None = None) -> dict[str, Any]:
    """Per seed, ``drop = peak - end`` of the mean reward along a long run (peak over every
    evaluation after step 0); paired vs DPO's drop. The claim: DPO drops, SIPO drops less.

    Where the runs validated on held-out pairs, each row also has ``held_out``: the same drop for
    the held-out implicit accuracy, the accuracy at ``short_steps`` and at the end, the final
    margin, and the final accuracy minus DPO's, paired per seed (:func:`_held_out_rows`)."""
    out: dict[str, Any] = {}
    for source in sources:
        drops: dict[str, dict[int, float]] = {}
        curves: dict[str, Any] = {}
        for method in methods:
            runs = {s: r for s, r in _runs(results, source, method, beta).items() if r["steps"] == long_steps}
            if not runs:
                continue
            drops[method] = {}
            for seed, run in runs.items():
                values = [p["mean_reward"] for p in run["curve"] if p["step"] > 0]
                drops[method][seed] = max(values) - values[-1]
            steps = [p["step"] for p in next(iter(runs.values()))["curve"]]
            curves[method] = {"steps": steps, "mean_reward": np.mean(
                [[p["mean_reward"] for p in r["curve"]] for r in runs.values()], axis=0).tolist()}
        held_out = _held_out_rows({method: {s: r for s, r in _runs(results, source, method, beta).items()
                                            if r["steps"] == long_steps} for method in drops}, short_steps)
        rows = {}
        for method, drop in drops.items():
            row = {"drop": t_interval(list(drop.values())), "per_seed": [drop[s] for s in sorted(drop)],
                   "curve": curves[method]}
            if method in held_out:
                row["held_out"] = held_out[method]
            if method == "dpo":
                row["verdict"] = "DPO degrades: " + _verdict(*row["drop"][1:], claimed_positive=True)
            elif "dpo" in drops:
                row["minus_dpo"], _ = _paired(drop, drops["dpo"])
                row["verdict"] = _verdict(*row["minus_dpo"][1:], claimed_positive=False)
            rows[method] = row
        if rows:
            out[source] = rows
    return out


# ----------------------------------------------------------------------------- the field's objectives
def claim_which_objective(results, base_rewards, sources, methods, dpo_beta: float, step: int) -> dict[str, Any]:
    """Per source and preset (each at its own beta): win rate vs base and the paired difference to
    Diffusion-DPO at the demo's default beta (the claim-1 runs), both with 95% intervals over seeds."""
    out: dict[str, Any] = {}
    for source in sources:
        dpo = {s: win_rate(rewards_at(r, step), base_rewards) for s, r in _runs(results, source, "dpo", dpo_beta).items()}
        rows = {}
        for method in methods:
            runs = {r["seed"]: r for r in results if r["source"] == source and r["method"] == method}
            if not runs:
                continue
            wins = {s: win_rate(rewards_at(r, step), base_rewards) for s, r in runs.items()}
            minus_dpo, differences = _paired(wins, dpo)
            rows[method] = {"beta": next(iter(runs.values()))["beta"], "per_seed": [wins[s] for s in sorted(wins)],
                            "win_rate": t_interval(list(wins.values())), "minus_dpo": minus_dpo,
                            "minus_dpo_per_seed": differences}
        if rows:
            out[source] = rows
    return out


def claim_field(results, base_rewards, settings, default_beta: float, step: int) -> dict[str, Any]:
    """The "which objective" table and auto beta vs claim 2's fixed betas (``sipo demo --full``), when run."""
    from sipo.demo.settings import AUTO_SUFFIX

    out: dict[str, Any] = {}
    if settings.objective_methods:
        out["which_objective"] = claim_which_objective(results, base_rewards, settings.objective_sources,
                                                       settings.objective_methods, default_beta, step)
    if settings.auto_beta_methods:
        methods = [m for pair in ((m, m + AUTO_SUFFIX) for m in settings.auto_beta_methods) for m in pair]
        # spreads over the same betas, each auto method's paired against DPO's fixed-beta spread
        out["auto_beta"] = claim_beta_sensitivity(results, base_rewards, settings.sensitivity_sources,
                                                  ["dpo", *[m for m in methods if m != "dpo"]], settings.betas, step)
    return out


def field_markdown(claims: dict[str, Any], context: dict[str, Any]) -> str:
    """The "which objective" and auto-beta tables (empty when neither was run)."""
    lines: list[str] = []
    if claims.get("which_objective"):
        lines += [f"### Which objective: every preset at its own defaults, {context['max_steps']} steps (docs/method.md)", "",
                  "| pairs | objective | beta | win rate vs base | minus Diffusion-DPO at beta "
                  f"{context['default_beta']:g} (paired) |", "|---|---|---|---|---|"]
        for source, rows in claims["which_objective"].items():
            for method, row in rows.items():
                lines.append(f"| {source} | {LABELS.get(method, method)} | {row['beta']:g} | {_fmt_ci(*row['win_rate'])} | "
                             f"{_fmt_ci(*row['minus_dpo'], signed=True)} |")
        lines.append("")
    if claims.get("auto_beta"):
        betas = ", ".join(f"{b:g}" for b in context["betas"])
        lines += [f"### Auto beta vs the fixed betas of claim 2 (auto: first-step beta in {{{betas}}})", "",
                  "| pairs | method | win rate per beta | spread | minus fixed DPO's spread |", "|---|---|---|---|---|"]
        for source, rows in claims["auto_beta"].items():
            for method, row in rows.items():
                per_beta = "; ".join(f"{k}: {v[0]:.3f}" for k, v in row["win_rate_by_beta"].items())
                diff = _fmt_ci(*row["minus_dpo"], signed=True) if "minus_dpo" in row else "-"
                lines.append(f"| {source} | {LABELS.get(method, method)} | {per_beta} | {_fmt_ci(*row['spread'])} | {diff} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- on-policy pairs (issue 27)
#: the arms of the on-policy question, in table order: pairs -> how the report names them
ONPOLICY_ARM_LABELS = {
    "mixed": "mixed (real vs early samples)", "offpolicy": "off-policy (early samples only)",
    "onpolicy": "on-policy (base's own samples, best vs worst of K)",
    "onpolicy-stored": "on-policy, stored noise (each side from its own x_T)",
    "iterative": "on-policy, 2 rounds (iterative DPO; round 2 from round 1's policy)",
}
#: (question, arm A, arm B), each arm (pairs, method): the answer is A - B, paired per seed
ONPOLICY_QUESTIONS = (
    ("SIPO beats DPO on on-policy pairs", ("onpolicy", "sipo"), ("onpolicy", "dpo")),
    ("C&M beats DPO on on-policy pairs", ("onpolicy", "dpo-cm"), ("onpolicy", "dpo")),
    ("DPO on on-policy pairs beats SIPO on off-policy pairs", ("onpolicy", "dpo"), ("offpolicy", "sipo")),
    ("DPO on on-policy pairs beats SIPO on mixed pairs", ("onpolicy", "dpo"), ("mixed", "sipo")),
    ("on-policy pairs beat off-policy pairs (DPO on both)", ("onpolicy", "dpo"), ("offpolicy", "dpo")),
    ("on-policy pairs beat mixed pairs (DPO on both)", ("onpolicy", "dpo"), ("mixed", "dpo")),
    ("stored noise helps DPO (on-policy pairs)", ("onpolicy-stored", "dpo"), ("onpolicy", "dpo")),
    ("stored noise helps SIPO (on-policy pairs)", ("onpolicy-stored", "sipo"), ("onpolicy", "sipo")),
    ("iterative DPO beats one round of on-policy DPO", ("iterative", "dpo"), ("onpolicy", "dpo")),
    ("iterative DPO beats SIPO on off-policy pairs", ("iterative", "dpo"), ("offpolicy", "sipo")),
)


def _arm_per_seed(results, base_rewards, source: str, method: str, beta: float, step: int) -> dict[int, tuple[float, float]]:
    """``seed -> (win rate vs base, mean reward)`` of one arm at evaluation ``step``."""
    out = {}
    for seed, run in _runs(results, source, method, beta).items():
        rewards = rewards_at(run, step)
        out[seed] = (win_rate(rewards, base_rewards), float(rewards.mean()))
    return out


def _answer(lo: float, hi: float) -> str:
    """"yes: A beat B" / "no: B beat A" only where the 95% CI excludes zero; else not resolved."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not resolved (one seed)"
    return "yes: A beat B" if lo > 0 else "no: B beat A" if hi < 0 else "not resolved (CI contains 0)"


def claim_onpolicy(results, base_rewards, beta: float, step: int, notes=()) -> dict[str, Any]:
    """The on-policy question (issue 27): every arm's win rate vs base and mean reward (95% CI over
    seeds), and each of ``ONPOLICY_QUESTIONS`` as the paired per-seed difference A - B of both.
    ``notes`` (e.g. the stored-noise arm's skip line) are kept for the report."""
    arms: dict[str, dict[str, Any]] = {}
    per_seed: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for source in ONPOLICY_ARM_LABELS:
        rows = {}
        for method in LABELS:
            values = _arm_per_seed(results, base_rewards, source, method, beta, step)
            if not values:
                continue
            per_seed[source, method] = values
            rows[method] = {"seeds": sorted(values), "win_rate": t_interval([values[s][0] for s in sorted(values)]),
                            "mean_reward": t_interval([values[s][1] for s in sorted(values)]),
                            "win_rate_per_seed": [values[s][0] for s in sorted(values)],
                            "mean_reward_per_seed": [values[s][1] for s in sorted(values)]}
        if rows:
            arms[source] = rows
    questions = []
    for question, a, b in ONPOLICY_QUESTIONS:
        entry: dict[str, Any] = {"question": question, "a": list(a), "b": list(b)}
        if a in per_seed and b in per_seed:
            seeds = sorted(set(per_seed[a]) & set(per_seed[b]))
            win_diff, win = _paired(*({s: v[0] for s, v in per_seed[arm].items()} for arm in (a, b)))
            reward_diff, reward = _paired(*({s: v[1] for s, v in per_seed[arm].items()} for arm in (a, b)))
            entry.update(seeds=seeds, win_rate_diff=win_diff, mean_reward_diff=reward_diff,
                         win_rate_diff_per_seed=win, mean_reward_diff_per_seed=reward,
                         answer_win_rate=_answer(*win_diff[1:]), answer_mean_reward=_answer(*reward_diff[1:]))
        questions.append(entry)
    return {"beta": beta, "step": step, "arms": arms, "questions": questions, "notes": list(notes)}


def onpolicy_markdown(claim: dict[str, Any]) -> str:
    """The on-policy question's two tables: the arms, then the questions with their paired answers."""
    notes = claim.get("notes") or []
    lines = [f"### Does SIPO beat on-policy pairs? (beta {claim['beta']:g}, {claim['step']} steps, 95% CI over seeds)", "",
             "| pairs | method | seeds | win rate vs base | mean reward |", "|---|---|---|---|---|"]
    for source, rows in claim["arms"].items():
        for method, row in rows.items():
            lines.append(f"| {ONPOLICY_ARM_LABELS[source]} | {LABELS.get(method, method)} | {len(row['seeds'])} | "
                         f"{_fmt_ci(*row['win_rate'])} | {_fmt_ci(*row['mean_reward'])} |")
    lines += ["", "Each question as A - B, paired per seed (same seed = same LoRA initialisation, data order, timesteps "
              "and noise); *A beat B* only where the 95% CI excludes 0:", "",
              "| question | A | B | A - B: win rate vs base | answer (win rate) | A - B: mean reward | answer (reward) |",
              "|---|---|---|---|---|---|---|"]
    for entry in claim["questions"]:
        a, b = (f"{LABELS.get(m, m)} on {s}" for s, m in (entry["a"], entry["b"]))
        if "win_rate_diff" not in entry:
            why = next((n.split(" (")[0] for n in notes if "stored" in n), "not run") \
                if "onpolicy-stored" in (entry["a"][0], entry["b"][0]) else "not run"
            lines.append(f"| {entry['question']} | {a} | {b} | {why} | - | - | - |")
            continue
        lines.append(f"| {entry['question']} | {a} | {b} | {_fmt_ci(*entry['win_rate_diff'], signed=True)} | "
                     f"{entry['answer_win_rate']} | {_fmt_ci(*entry['mean_reward_diff'], signed=True)} | "
                     f"{entry['answer_mean_reward']} |")
    lines += [""] + [f"Note: {note}." for note in notes] + ([""] if notes else [])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- text
def claims_markdown(claims: dict[str, Any], context: dict[str, Any]) -> str:
    """The three claims' tables and verdicts (report.md section and docs/demo.md source)."""
    lines = ["## The paper's three claims (95% CI over seeds, paired per seed)", ""]
    beta, steps, long_steps = context["default_beta"], context["max_steps"], context["long_steps"]
    lines += [f"### Claim 1: win rate vs base at beta {beta:g}, {steps} steps", "",
              "| pairs | method | win rate vs base | minus Diffusion-DPO (paired) | claim: beats DPO |",
              "|---|---|---|---|---|"]
    for source, rows in claims["win_rate"].items():
        for method, row in rows.items():
            diff = _fmt_ci(*row["minus_dpo"], signed=True) if row["minus_dpo"] else "-"
            lines.append(f"| {source} | {LABELS.get(method, method)} | {_fmt_ci(*row['win_rate'])} | {diff} | {row['verdict'] or '-'} |")
    betas = ", ".join(f"{b:g}" for b in context["betas"])
    lines += ["", f"### Claim 2: beta sensitivity (spread = max - min win rate over beta in {{{betas}}}, per seed)", "",
              "| pairs | method | win rate per beta | spread | minus DPO's spread | claim: less sensitive than DPO |",
              "|---|---|---|---|---|---|"]
    if not claims["beta_sensitivity"]:
        lines.append("| (not run in this mode: `sipo demo --full`) | | | | | |")
    for source, rows in claims["beta_sensitivity"].items():
        for method, row in rows.items():
            per_beta = "; ".join(f"{k}: {v[0]:.3f}" for k, v in row["win_rate_by_beta"].items())
            diff = _fmt_ci(*row["minus_dpo"], signed=True) if "minus_dpo" in row else "-"
            lines.append(f"| {source} | {LABELS.get(method, method)} | {per_beta} | {_fmt_ci(*row['spread'])} | {diff} | {row.get('verdict', '-')} |")
    lines += ["", f"### Claim 3: stability over {long_steps} steps (drop = peak mean reward - final mean reward)", "",
              "| pairs | method | reward at step " + f"{steps} | final reward | drop from peak | minus DPO's drop | verdict |",
              "|---|---|---|---|---|---|---|"]
    if not claims["stability"]:
        lines.append("| (not run in this mode: `sipo demo --full`) | | | | | | |")
    for source, rows in claims["stability"].items():
        for method, row in rows.items():
            curve = row["curve"]
            at = curve["mean_reward"][curve["steps"].index(steps)] if steps in curve["steps"] else float("nan")
            diff = _fmt_ci(*row["minus_dpo"], signed=True) if "minus_dpo" in row else "-"
            lines.append(f"| {source} | {LABELS.get(method, method)} | {at:.4f} | {curve['mean_reward'][-1]:.4f} | "
                         f"{_fmt_ci(*row['drop'])} | {diff} | {row.get('verdict', '-')} |")
    held_out = [(source, method, row["held_out"]) for source, rows in claims["stability"].items()
                for method, row in rows.items() if "held_out" in row]
    if held_out:
        lines += ["", f"Claim 3 on held-out pairs (implicit accuracy = fraction of pairs with z > 0 at fixed t and noise, "
                  "as the paper's Fig. 1c/8; validation.jsonl of each run):", "",
                  f"| pairs | method | held-out accuracy at step {steps} | final held-out accuracy | final held-out margin | "
                  "accuracy drop from peak | minus DPO's drop | final accuracy minus DPO's (paired) | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for source, method, row in held_out:
            drop = _fmt_ci(*row["minus_dpo_drop"], signed=True) if "minus_dpo_drop" in row else "-"
            final = _fmt_ci(*row["final_minus_dpo"], signed=True) if "final_minus_dpo" in row else "-"
            lines.append(f"| {source} | {LABELS.get(method, method)} | {_fmt_ci(*row['accuracy_at_short'])} | "
                         f"{_fmt_ci(*row['final_accuracy'])} | {_fmt_ci(*row['final_margin'])} | {_fmt_ci(*row['drop'])} | "
                         f"{drop} | {final} | {row.get('verdict', '-')} |")
    lines += ["", "Verdicts: *supported* = the 95% CI of the paired difference excludes 0 in the paper's "
              "direction; *contradicted* = it excludes 0 the other way; *not resolved* = it contains 0. "
              "Peak-minus-final is biased upward by noise (a maximum of noisy values), for every method alike.", ""]
    text = "\n".join(lines) + field_markdown(claims, context)
    return text + ("\n" + onpolicy_markdown(claims["onpolicy"]) if claims.get("onpolicy") else "")


def penultimate_line(claims: dict[str, Any], source: str = "mixed") -> str:
    """``sipo - dpo: +0.0NN [95% CI lo, hi]`` (claim 1, the demo's main pairs, default beta)."""
    mean, lo, hi = claims["win_rate"][source]["sipo"]["minus_dpo"]
    ci = f"[95% CI {lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) else "[95% CI n/a]"
    return f"sipo - dpo: {mean:+.3f} {ci}"


# ----------------------------------------------------------------------------- plots
def plot_claims(output_dir: Path, claims: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
    """claim1_win_rate.png, claim2_beta.png, claim3_stability.png (those with data)."""
    plt = pyplot()
    files = {}
    sources = list(claims["win_rate"])
    fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 3.4), squeeze=False, sharey=True)
    for ax, source in zip(axes[0], sources):
        rows = claims["win_rate"][source]
        for i, (method, row) in enumerate(rows.items()):
            mean, lo, hi = row["win_rate"]
            err = [[mean - lo], [hi - mean]] if math.isfinite(lo) else None
            ax.bar(i, mean, color=COLORS.get(method), yerr=err, capsize=4)
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([m for m in rows], rotation=20, fontsize=8)
        ax.set_title(SOURCE_LABELS.get(source, source), fontsize=9)
    axes[0][0].set_ylabel("win rate vs base (95% CI)")
    fig.tight_layout()
    files["claim1"] = str(output_dir / "claim1_win_rate.png")
    fig.savefig(files["claim1"], dpi=120)
    plt.close(fig)

    sources = list(claims["beta_sensitivity"])
    if sources:
        fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 3.4), squeeze=False, sharey=True)
        for ax, source in zip(axes[0], sources):
            for i, (method, row) in enumerate(claims["beta_sensitivity"][source].items()):
                betas = [float(k) for k in row["win_rate_by_beta"]]
                values = list(row["win_rate_by_beta"].values())
                mean = [v[0] for v in values]
                err = [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]] if math.isfinite(values[0][1]) else None
                ax.errorbar([b * (1 + 0.03 * (i - 2)) for b in betas], mean, yerr=err, marker="o", capsize=3,
                            color=COLORS.get(method), label=method)
            ax.axhline(0.5, color="grey", ls="--", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("beta")
            ax.set_title(SOURCE_LABELS.get(source, source), fontsize=9)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("win rate vs base (95% CI)")
        fig.tight_layout()
        files["claim2"] = str(output_dir / "claim2_beta.png")
        fig.savefig(files["claim2"], dpi=120)
        plt.close(fig)

    sources = list(claims["stability"])
    if sources:
        # a second row, held-out implicit accuracy, where the long runs validated on held-out pairs
        held_out = any("held_out" in row for rows in claims["stability"].values() for row in rows.values())
        fig, axes = plt.subplots(2 if held_out else 1, len(sources), figsize=(5.2 * len(sources), 6.6 if held_out else 3.4),
                                 squeeze=False, sharey="row", sharex="col")
        for column, source in enumerate(sources):
            for method, row in claims["stability"][source].items():
                axes[0][column].plot(row["curve"]["steps"], row["curve"]["mean_reward"], marker="o", ms=3,
                                     color=COLORS.get(method), label=method)
                if "held_out" in row:
                    axes[1][column].plot(row["held_out"]["steps"], row["held_out"]["accuracy"], marker="o", ms=3,
                                         color=COLORS.get(method), label=method)
            axes[0][column].set_title(SOURCE_LABELS.get(source, source), fontsize=9)
            for ax in axes[:, column]:
                ax.axvline(context["max_steps"], color="grey", ls=":", lw=1)
                ax.legend(fontsize=7)
            axes[-1][column].set_xlabel("optimizer step")
        axes[0][0].set_ylabel("mean reward (mean over seeds)")
        if held_out:
            axes[1][0].set_ylabel("held-out implicit accuracy\n(mean over seeds)")
        fig.tight_layout()
        files["claim3"] = str(output_dir / "claim3_stability.png")
        fig.savefig(files["claim3"], dpi=120)
        plt.close(fig)
    return files


# ----------------------------------------------------------------------------- from saved runs
def load_runs(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``runs/**/result.json`` a demo wrote (each run writes its own as it ends)."""
    return [__import__("json").loads(p.read_text()) for p in sorted(Path(output_dir).glob("runs/**/result.json"))]


def claims_from_runs(output_dir: str | Path, eval_per_class: int = 20, eval_seed: int = 1234,
                     sampling_steps: int = 25, reward_seed: int = 0,
                     max_steps: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The three claims from the runs a (possibly interrupted) demo left in ``output_dir``.

    The base model's rewards are recomputed from ``output_dir/base`` on the same fixed prompts and
    noise (DDIM is deterministic), so this needs nothing but the run directories.
    """
    from sipo.demo.evaluate import EvalSet, sample_and_score
    from sipo.demo.reward import DigitReward
    from sipo.models.digits import DigitsAdapter

    results = load_runs(output_dir)
    if not results:
        raise FileNotFoundError(f"no runs/**/result.json under {output_dir}")
    base = DigitsAdapter.from_pretrained(Path(output_dir) / "base")
    eval_set = EvalSet.make(eval_per_class, base.resolution, eval_seed)
    _, base_rewards = sample_and_score(base, DigitReward(reward_seed), eval_set, sampling_steps)
    for result in results:
        if result["curve"] and result["curve"][0]["step"] != 0:
            result["curve"].insert(0, {"step": 0, "mean_reward": float(base_rewards.mean()), "rewards": base_rewards.tolist()})
    counts: dict[float, int] = {}
    for result in results:
        counts[result["beta"]] = counts.get(result["beta"], 0) + 1
    default_beta = max(counts, key=counts.get)
    if max_steps is None:  # the short runs' length (configs/demo.yaml's train.max_steps, or a run's --max-steps)
        max_steps = min(r["steps"] for r in results)
    long_steps = max(r["steps"] for r in results)
    sources = [s for s in ("mixed", "offpolicy") if any(r["source"] == s for r in results)]
    methods = [m for m in LABELS if any(r["method"] == m for r in results)]
    betas = sorted(counts)
    swept = [m for m in methods if all(any(r["method"] == m and r["beta"] == b for r in results) for b in betas)]
    claims = {
        "win_rate": claim_win_rate(results, base_rewards, sources, methods, default_beta, max_steps),
        "beta_sensitivity": claim_beta_sensitivity(results, base_rewards, sources, swept, betas, max_steps) if len(betas) > 1 else {},
        "stability": claim_stability(results, sources, methods, default_beta, long_steps, max_steps)
        if long_steps > max_steps else {},
    }
    from sipo.demo.settings import FIELD_METHODS

    field = [m for m in FIELD_METHODS if any(r["method"] == m for r in results)]
    if field:
        claims["which_objective"] = claim_which_objective(results, base_rewards, sources, field, default_beta, max_steps)
    from sipo.demo.settings import ONPOLICY_SOURCES, STORED_NOISE_SKIP, stored_noise_available

    if any(r["source"] in ONPOLICY_SOURCES for r in results):
        stored_ran = any(r["source"] == "onpolicy-stored" for r in results)
        notes = [STORED_NOISE_SKIP] if not stored_ran and not stored_noise_available() else []
        claims["onpolicy"] = claim_onpolicy(results, base_rewards, default_beta, max_steps, notes)
    context = {"default_beta": default_beta, "max_steps": max_steps, "long_steps": long_steps, "betas": betas,
               "runs": len(results), "base_mean_reward": float(base_rewards.mean())}
    return claims, context


if __name__ == "__main__":
    import sys

    directory = sys.argv[1] if len(sys.argv) > 1 else "runs/demo"
    found, info = claims_from_runs(directory)
    print(f"{info['runs']} runs; base mean reward {info['base_mean_reward']:.4f}")
    print(claims_markdown(found, info))
    plot_claims(Path(directory), found, info)
    # the demo's main pairs when they were run, else the first source there is (e.g. offpolicy alone)
    print(penultimate_line(found, "mixed" if "mixed" in found["win_rate"] else next(iter(found["win_rate"]))))
