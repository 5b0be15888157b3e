"""`sipo compare`: several runs (and the base) sampled on the same prompts, seeds and sampler, scored,
ranked, and shown side by side on one page.

Protocol. As `sipo eval` (:mod:`sipo.evaluate`, whose generate/score path this composes): picture
``(prompt, seed)`` of every model is drawn with its own ``torch.Generator(seed)`` and the same sampler
(steps, guidance: the family's own unless named, :func:`sipo.models.sampler_settings`), so two
models' pictures of one ``(prompt, seed)`` differ only by the weights.

Reuse. Pictures live under ``<output_dir>/images/<weights>-<sampler>/p<prompt digest>_s<seed>.png``:
``<weights>`` is the first 16 hex digits of the sha256 of the run's checkpoint weights (``base`` for
the base model) and ``<sampler>`` a digest of the model path, family, steps, guidance, dtype and clip
size. A later compare into the same folder with one more run, more prompts or more seeds samples only
what is missing; the base is sampled once for all; a run that trained further gets a new folder.

Statistics (:mod:`sipo.stats`), per scorer: each model's mean with its 95% percentile-bootstrap
interval; the win rate of every model over every other, per ``(prompt, seed)`` (ties half), with a
paired bootstrap interval (a resample keeps each ``(prompt, seed)`` with all models' pictures of it);
a ranking by a Bradley-Terry fit to all pairwise outcomes (one virtual tie per pair keeps it finite
when a model wins everything), with bootstrap intervals of the log-strength and of the rank, from the
same resamples. Bradley-Terry rather than the mean score: it reads only who won each comparison, as
the win rates do, so a scorer's scale or a few outliers do not decide the order.

Pooled (``groups``, what `sipo sweep` passes): the entries are configurations, each run once per
training seed; a configuration's mean, its win rate over another (seed s against seed s, the same
LoRA initialisation and data order) and its Bradley-Terry strength (one fit per training seed) are
averaged over seeds with the t-interval over seeds (:func:`sipo.stats.t_interval`, as the demo's claims).

Outputs: ``scores.csv``, ``summary.md`` (also printed), ``summary.json``, ``win_matrix.png`` and
``report.html`` (one self-contained page: the matrix and the ranking on top, then every prompt's
pictures side by side with their scores, sortable by any scorer or by disagreement; videos as
animated clips).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sipo.errors import SipoError

BASE = "base"


@dataclass
class CompareOptions:
    runs: list[str]
    prompts: str
    #: also compare the base model (sampled once, reused by every later compare into the same folder)
    base: bool = False
    #: a name per run for the tables and the page (default: the run folder's name)
    labels: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    scorers: list[str] = field(default_factory=lambda: ["pickscore"])
    scorer_paths: dict[str, str] = field(default_factory=dict)
    output_dir: Path | None = None
    batch_size: int = 4
    #: None: the family's own sampler (sipo.models.sampler_settings)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    pickapic_path: str | None = None
    max_prompts: int | None = None
    progress: bool = True
    dtype: str = "fp32"
    #: pooled entries (sipo sweep): configuration -> {training seed: run label}; None: every model on its own
    groups: dict[str, dict[int, str]] | None = None
    num_resamples: int = 2000
    #: two scores closer than this are a tie (half a win each) in the win rates and the ranking
    tie_tolerance: float = 0.0


@dataclass
class Model:
    label: str
    run: str | None  # None: the base model
    key: dict  # sipo.evaluate.weights_key
    folder: str  # under <output_dir>/images/


@dataclass
class CompareResult:
    output_dir: Path
    summary: dict[str, Any]
    #: scorer -> [models, samples] scores, in the order of summary["models"] and the samples
    scores: dict[str, np.ndarray]


# ----------------------------------------------------------------------------- which pictures
def prompt_key(prompt: str) -> int:
    """A picture's prompt part of its file name: the prompt's own digest, not its line number, so a
    picture is reused by a later compare whatever prompts file it comes from."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:10], 16)


def sampler_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _labels(runs: list[str], labels: list[str] | None, base: bool) -> list[str]:
    if labels is not None:
        if len(labels) != len(runs):
            raise SipoError(f"{len(labels)} labels for {len(runs)} runs; pass one label per run")
        names = list(labels)
    else:
        names = [Path(r).resolve().name for r in runs]
        if len(set(names)) < len(names):  # runs/a/run and runs/b/run: name them by their parent too
            names = [f"{Path(r).resolve().parent.name}/{Path(r).resolve().name}" for r in runs]
    all_names = ([BASE] if base else []) + names
    duplicates = sorted({n for n in all_names if all_names.count(n) > 1})
    if duplicates:
        raise SipoError(f"two models are named {duplicates[0]!r}; pass each run once (or other labels)")
    return names


def _models(config, options: CompareOptions, sampler: str) -> list[Model]:
    from sipo.evaluate import check_run_base, check_run_family, weights_key

    models = []
    if options.base:
        models.append(Model(BASE, None, weights_key(config, None), f"base-{sampler}"))
    for label, run in zip(_labels(options.runs, options.labels, options.base), options.runs):
        check_run_family(run, config.model.family)
        check_run_base(run, config.model)
        key = weights_key(config, run)  # no checkpoint: one sentence, before anything is sampled
        models.append(Model(label, str(run), key, f"{key['weights'][:16]}-{sampler}"))
    return models


def _check_options(config, options: CompareOptions) -> None:
    from sipo.evaluate import EvalOptions, check_eval_options
    from sipo.rewards import scorer_class

    if len(options.runs) + bool(options.base) < 2:
        raise SipoError("sipo compare needs at least two models: pass two or more run directories, or one and --base")
    check_eval_options(EvalOptions(prompts=options.prompts, scorers=options.scorers, batch_size=options.batch_size,
                                   num_inference_steps=options.num_inference_steps,
                                   guidance_scale=options.guidance_scale, dtype=options.dtype,
                                   max_prompts=options.max_prompts))
    for name in options.scorers:
        scorer_class(name)  # unknown names stop here
    unknown = sorted(set(options.scorer_paths) - set(options.scorers))
    if unknown:
        raise SipoError(f"--scorer-path names {unknown[0]}, which is not in --scorers {options.scorers}; add it to --scorers")
    if options.num_resamples < 1:
        raise SipoError("num_resamples must be at least 1")
    if not options.tie_tolerance >= 0:
        raise SipoError(f"--tie-tolerance {options.tie_tolerance} is negative; pass 0 (only equal scores tie) or more")


# ----------------------------------------------------------------------------- the command
def run_compare(config, options: CompareOptions) -> CompareResult:
    """Sample what is missing, score, and write the report (see the module docstring)."""
    from sipo.evaluate import (
        Sample,
        check_scorers_loadable,
        generate,
        picture_exists,
        prepare_for_sampling,
        read_prompts,
        score_images,
        video_sample_sizes,
        with_sampler_defaults,
    )
    from sipo.rundir import check_output_dir, model_numbers

    options = with_sampler_defaults(config, options)
    _check_options(config, options)
    sizes = video_sample_sizes(config)
    model_path = Path(str(config.model.pretrained_path)).expanduser()
    sampler = {"model": str(model_path.resolve()) if model_path.exists() else str(config.model.pretrained_path),
               "family": config.model.family, "num_inference_steps": options.num_inference_steps,
               "guidance_scale": options.guidance_scale, "dtype": options.dtype, **sizes}
    models = _models(config, options, sampler_digest(sampler))
    prompts = read_prompts(options.prompts, options.pickapic_path, options.max_prompts)
    samples = [Sample(prompt_key(prompt), seed, prompt) for prompt in prompts for seed in options.seeds]
    output_dir = Path(options.output_dir or Path(options.runs[0]).resolve().parent / "compare")
    check_output_dir(output_dir, name="--output-dir")
    num_train_timesteps = model_numbers(config.model.pretrained_path)[0]
    if num_train_timesteps is not None and options.num_inference_steps > num_train_timesteps:
        raise SipoError(f"--num-inference-steps {options.num_inference_steps} is more than the model's "
                        f"{num_train_timesteps} training timesteps; pass at most {num_train_timesteps}")
    check_scorers_loadable(options.scorers, options.scorer_paths)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sample_options = {"num_inference_steps": options.num_inference_steps, "guidance_scale": options.guidance_scale, **sizes}
    for model in models:
        folder = output_dir / "images" / model.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "made_by.json").write_text(json.dumps({**model.key, "sampler": sampler}, indent=2))
        if all(picture_exists(output_dir, model.folder, s) for s in samples):
            continue
        adapter = _load(config, model, device)
        prepare_for_sampling(adapter, options.dtype)
        generate(adapter.sample, samples, output_dir, model.folder, options.batch_size,
                 options.progress, **sample_options)
        del adapter
        if device.type == "cuda":
            torch.cuda.empty_cache()

    from sipo.rewards import load_scorer

    scores: dict[str, np.ndarray] = {}
    for name in options.scorers:
        scorer = load_scorer(name, options.scorer_paths.get(name), device)
        scores[name] = np.stack([score_images(scorer, samples, output_dir, m.folder, options.batch_size,
                                              options.progress).double().cpu().numpy() for m in models])
        del scorer

    settings = {"model": str(config.model.pretrained_path), "family": config.model.family,
                "prompts": options.prompts, "num_prompts": len(prompts), "seeds": options.seeds,
                "num_samples": len(samples), "num_inference_steps": options.num_inference_steps,
                "guidance_scale": options.guidance_scale, "dtype": options.dtype, **sizes}
    return write_comparison(output_dir, settings, models, samples, scores, groups=options.groups,
                            num_resamples=options.num_resamples, tie_tolerance=options.tie_tolerance)


def write_comparison(output_dir: Path, settings: dict[str, Any], models: list[Model], samples, scores: dict[str, np.ndarray],
                     groups: dict[str, dict[int, str]] | None = None, num_resamples: int = 2000,
                     tie_tolerance: float = 0.0, echo: bool = True) -> CompareResult:
    """The statistics and every output of a compare, from pictures already under
    ``<output_dir>/images/<model.folder>/`` (:func:`sipo.evaluate.image_path`) and their ``scores``
    (scorer -> ``[models, samples]``): what `sipo compare` writes after sampling, and what a caller with
    its own pictures and scores (the demo: its reward on its fixed noise) writes through the same code.
    ``settings`` describes the sampling (its keys as :func:`settings_line` reads them)."""
    labels = [m.label for m in models]
    if groups:
        entries, per_scorer = pooled_statistics(scores, labels, groups, tie_tolerance)
    else:
        entries = labels
        per_scorer = {name: model_statistics(values, labels, num_resamples, tolerance=tie_tolerance)
                      for name, values in scores.items()}
    note = POOLED_NOTE if groups else MODELS_NOTE.replace("2000 resamples", f"{num_resamples} resamples")
    if tie_tolerance:
        note += f"; scores within {tie_tolerance:g} of each other tie"
    summary = {
        "settings": settings,
        "models": [{"label": m.label, "run": m.run, "weights_sha256": None if m.run is None else m.key.get("weights"),
                    "checkpoint": m.key.get("checkpoint"), "images": f"images/{m.folder}"} for m in models],
        "entries": entries,
        "groups": {c: {str(s): lbl for s, lbl in runs.items()} for c, runs in groups.items()} if groups else None,
        "intervals": note,
        "tie_tolerance": tie_tolerance,
        "scorers": per_scorer,
    }
    summary = _finite(summary)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_scores_csv(output_dir / "scores.csv", samples, models, scores, output_dir)
    table = markdown_summary(summary)
    (output_dir / "summary.md").write_text(f"# sipo compare\n\n{settings_line(summary)}\n\n{table}\n")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_win_matrix(output_dir / "win_matrix.png", summary)
    write_html(output_dir / "report.html", summary, samples, models, scores, output_dir)
    if echo:
        print(table)
        print(f"report.html, summary, scores and win-rate matrix in {output_dir}")
    return CompareResult(output_dir, summary, scores)


def _load(config, model: Model, device):
    """A fresh adapter holding ``model``'s weights (fresh each time: a full fine-tune's weights must not
    stay in the next model's)."""
    from sipo.models import adapter_from_config

    adapter = adapter_from_config(config.model).to(device)
    if model.run is not None:
        from sipo.checkpoints import load_run_weights

        load_run_weights(adapter, model.run, Path(model.key["run"]) / "checkpoints" / model.key["checkpoint"])
    return adapter


# ----------------------------------------------------------------------------- statistics
MODELS_NOTE = ("means: 95% percentile bootstrap over (prompt, seed); win rates: share of (prompt, seed) on which the "
               "row's picture scores higher than the column's (ties half), 95% paired bootstrap; ranking: Bradley-Terry "
               "log-strength (mean 0) fit to every pairwise outcome with one virtual tie per pair, 95% bootstrap of the "
               "strength and of the rank; 2000 resamples, the same for every statistic")
POOLED_NOTE = ("configurations pooled over training seeds: each statistic is computed per training seed (a win rate "
               "pairs seed s with seed s; the base pairs with every seed) and reported as the mean over seeds with its "
               "95% t-interval over seeds (a win rate's cut to [0, 1]; none with one seed; the base's mean: bootstrap over (prompt, seed)); Bradley-Terry fit per seed with one virtual tie per pair; "
               "rank range: best and worst rank over seeds")


def model_statistics(scores: np.ndarray, labels: list[str], num_resamples: int = 2000, seed: int = 0,
                     tolerance: float = 0.0) -> dict[str, Any]:
    """One scorer's ``{"means", "win_rate", "ranking"}`` over models ``labels`` (rows of ``scores``);
    scores within ``tolerance`` tie."""
    from sipo.stats import bootstrap_bradley_terry, bootstrap_counts, bootstrap_win_matrix, percentile_interval

    counts = bootstrap_counts(scores.shape[1], num_resamples, seed)
    means = scores.mean(axis=1)
    low, high = percentile_interval(counts @ scores.T / scores.shape[1], 0.95)
    rates, rate_low, rate_high = bootstrap_win_matrix(scores, counts=counts, tolerance=tolerance)
    ranking = bootstrap_bradley_terry(scores, counts=counts, tolerance=tolerance)
    return {
        "means": {lbl: {"mean": float(means[i]), "low": float(low[i]), "high": float(high[i])} for i, lbl in enumerate(labels)},
        "win_rate": {a: {b: None if i == j else {"rate": float(rates[i, j]), "low": float(rate_low[i, j]),
                                                 "high": float(rate_high[i, j])}
                         for j, b in enumerate(labels)} for i, a in enumerate(labels)},
        "ranking": _ranking_rows(labels, ranking),
    }


def _ranking_rows(labels: list[str], ranking: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows = [{"entry": lbl, "strength": float(ranking["strength"][i]), "low": float(ranking["low"][i]),
             "high": float(ranking["high"][i]), "rank": int(ranking["rank"][i]),
             "rank_low": int(ranking["rank_low"][i]), "rank_high": int(ranking["rank_high"][i])}
            for i, lbl in enumerate(labels)]
    return sorted(rows, key=lambda r: (r["rank"], r["entry"]))


def pooled_statistics(scores: dict[str, np.ndarray], labels: list[str], groups: dict[str, dict[int, str]],
                      tolerance: float = 0.0) -> tuple[list[str], dict[str, Any]]:
    """``(entries, per scorer statistics)`` for configurations pooled over training seeds (module docstring);
    scores within ``tolerance`` tie. Every interval carries ``per_seed`` and the ``seeds`` it came from."""
    from sipo.evaluate import bootstrap_ci
    from sipo.stats import bradley_terry, ranks_of, t_interval, win_matrix

    index = {lbl: i for i, lbl in enumerate(labels)}
    unknown = sorted({lbl for runs in groups.values() for lbl in runs.values()} - set(index))
    if unknown:
        raise SipoError(f"the group of runs names {unknown[0]!r}, which is no compared model")
    entries = list(groups) + ([BASE] if BASE in index and BASE not in groups else [])
    members = {c: {int(s): index[lbl] for s, lbl in runs.items()} for c, runs in groups.items()}
    seeds = sorted({s for runs in members.values() for s in runs})
    shared = [e for e in entries if e not in members]  # the base

    def rows_of(entry: str, seed: int) -> int | None:
        if entry == BASE and entry not in members:
            return index[BASE]
        return members[entry].get(seed)

    def interval(values: list[float], of_seeds: list[int]) -> dict[str, Any]:
        mean, low, high = t_interval(values)
        return {"mean": mean, "low": low, "high": high, "per_seed": [float(v) for v in values], "seeds": list(of_seeds)}

    out: dict[str, Any] = {}
    for name, values in scores.items():
        means = {e: interval([float(values[rows_of(e, s)].mean()) for s in seeds if rows_of(e, s) is not None],
                             [s for s in seeds if rows_of(e, s) is not None])
                 for e in entries if e not in shared}
        for e in shared:  # one model, no training seed: its interval is the bootstrap over (prompt, seed)
            low, high = bootstrap_ci(values[index[e]])
            means[e] = {"mean": float(values[index[e]].mean()), "low": low, "high": high}
        means = {e: means[e] for e in entries}
        rates: dict[str, dict[str, Any]] = {}
        for a in entries:
            rates[a] = {}
            for b in entries:
                both = [s for s in seeds if a != b and rows_of(a, s) is not None and rows_of(b, s) is not None]
                per_seed = [float(win_matrix(values[[rows_of(a, s), rows_of(b, s)]], tolerance)[0, 1]) for s in both]
                summary = interval(per_seed, both) if per_seed else None
                # a rate lies in [0, 1]: the t-interval is cut there (which end it excludes 0.5 from is unchanged)
                rates[a][b] = None if summary is None else {
                    "rate": summary["mean"], "low": max(0.0, summary["low"]) if math.isfinite(summary["low"]) else summary["low"],
                    "high": min(1.0, summary["high"]) if math.isfinite(summary["high"]) else summary["high"],
                    "per_seed": summary["per_seed"], "seeds": summary["seeds"]}
        strengths: dict[str, list[float]] = {e: [] for e in entries}
        ranks: dict[str, list[int]] = {e: [] for e in entries}
        for s in seeds:
            present = [e for e in entries if rows_of(e, s) is not None]
            if len(present) < 2:
                continue
            rows = [rows_of(e, s) for e in present]
            outcomes = np.stack([[win_matrix(values[[i, j]], tolerance)[0, 1] * values.shape[1] if i != j else 0.0 for j in rows]
                                 for i in rows])
            theta = bradley_terry(outcomes, prior=0.5)
            for e, t, r in zip(present, theta, ranks_of(theta)):
                strengths[e].append(float(t))
                ranks[e].append(int(r))
        ranking = []
        for e in entries:
            mean, low, high = t_interval(strengths[e])
            ranking.append({"entry": e, "strength": mean, "low": low, "high": high,
                            "rank_low": min(ranks[e], default=None), "rank_high": max(ranks[e], default=None),
                            "per_seed": strengths[e]})
        order = ranks_of(np.array([r["strength"] if math.isfinite(r["strength"]) else -np.inf for r in ranking]))
        for row, rank in zip(ranking, order):
            row["rank"] = int(rank)
        out[name] = {"means": means, "win_rate": rates, "ranking": sorted(ranking, key=lambda r: (r["rank"], r["entry"]))}
    return entries, out


def _finite(value):
    """NaN and inf as null: summary.json stays strict JSON (an interval over one seed does not exist)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------- tables and plot
def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_ci(cell: dict | None, key: str) -> str:
    if cell is None:
        return "-"
    return f"{_fmt(cell[key])} [{_fmt(cell['low'])}, {_fmt(cell['high'])}]"


def settings_line(summary: dict) -> str:
    s = summary["settings"]
    if s.get("description"):  # pictures sampled by the caller (write_comparison), described by it
        return s["description"]
    return (f"model {s['model']} ({s['family']}); {s['num_prompts']} prompts x {len(s['seeds'])} seeds = "
            f"{s['num_samples']} pictures per model; {s['num_inference_steps']} steps; guidance {s['guidance_scale']}; "
            f"{s['dtype']}")


def markdown_summary(summary: dict) -> str:
    """Per scorer: the ranking with each entry's mean, then the win-rate matrix (row beats column)."""
    entries = summary["entries"]
    lines = []
    for name, stats in summary["scorers"].items():
        lines += [f"## {name}", "", "| rank [range] | entry | Bradley-Terry strength [95% CI] | mean score [95% CI] |",
                  "|---|---|---|---|"]
        for row in stats["ranking"]:
            rank_range = f"{row['rank_low']}-{row['rank_high']}" if row["rank_low"] is not None else "n/a"
            lines.append(f"| {row['rank']} [{rank_range}] | {row['entry']} | {_fmt_ci(row, 'strength')} | "
                         f"{_fmt_ci(stats['means'][row['entry']], 'mean')} |")
        lines += ["", "| win rate of row over column | " + " | ".join(entries) + " |", "|---|" + "---|" * len(entries)]
        for a in entries:
            lines.append(f"| {a} | " + " | ".join(_fmt_ci(stats["win_rate"][a][b], "rate") for b in entries) + " |")
        lines.append("")
    lines.append(summary["intervals"] + ".")
    return "\n".join(lines)


def write_scores_csv(path: Path, samples, models: list[Model], scores: dict[str, np.ndarray], output_dir: Path) -> None:
    from sipo.evaluate import image_path

    names = list(scores)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "sample", "seed", "prompt", "image", *names])
        for m, model in enumerate(models):
            for n, sample in enumerate(samples):
                writer.writerow([model.label, n, sample.seed, sample.prompt,
                                 str(image_path(output_dir, model.folder, sample).relative_to(output_dir)),
                                 *(f"{float(scores[name][m, n]):.10g}" for name in names)])


def plot_win_matrix(path: Path, summary: dict) -> None:
    """One heat map per scorer: the win rate of each row over each column, with its value written in."""
    from sipo.plotting import pyplot

    plt = pyplot()
    entries, scorers = summary["entries"], list(summary["scorers"])
    size = 1.0 + 0.9 * len(entries)
    figure, axes = plt.subplots(1, len(scorers), figsize=(size * len(scorers) + 1, size + 0.6), squeeze=False)
    for axis, name in zip(axes[0], scorers):
        rates = np.array([[np.nan if summary["scorers"][name]["win_rate"][a][b] is None
                           else summary["scorers"][name]["win_rate"][a][b]["rate"] for b in entries] for a in entries],
                         dtype=float)
        axis.imshow(rates, cmap="RdBu", vmin=0.0, vmax=1.0)
        for i in range(len(entries)):
            for j in range(len(entries)):
                if math.isfinite(rates[i, j]):
                    axis.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=8)
        axis.set_xticks(range(len(entries)), entries, rotation=45, ha="right", fontsize=7)
        axis.set_yticks(range(len(entries)), entries, fontsize=7)
        axis.set_title(f"{name}: win rate of row over column", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------- the page
def picture_data_uri(picture: torch.Tensor, max_side: int = 384) -> str:
    """A picture as a data URI: PNG (JPEG above ``max_side`` after shrinking to it), or a video
    ``[F, 3, H, W]`` as an animated GIF at 8 frames per second."""
    from PIL import Image

    from sipo.evaluate import _to_uint8

    def image(frame: torch.Tensor) -> Image.Image:
        out = Image.fromarray(_to_uint8(frame))
        if max(out.size) > max_side:
            out.thumbnail((max_side, max_side))
        return out

    buffer = io.BytesIO()
    if picture.ndim == 4:
        frames = [image(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in picture]
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=125, loop=0)
        kind = "gif"
    else:
        shown = image(picture)
        kind = "png" if max(picture.shape[-2:]) <= max_side else "jpeg"
        shown.save(buffer, format=kind.upper(), **({"quality": 88} if kind == "jpeg" else {}))
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def disagreements(scores: dict[str, np.ndarray], orders: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: ``between``, the share of (model pair, scorer pair) on which two scorers order the two
    models oppositely (0 with one scorer), and ``against``, the share of (model pair, scorer) on which the
    sample's order contradicts that scorer's overall ranking ``orders[scorer]`` (model indices, best first)."""
    names = list(scores)
    stacked = np.stack([scores[n] for n in names])  # [S, M, N]
    num_models = stacked.shape[1]
    pairs = [(i, j) for i in range(num_models) for j in range(i + 1, num_models)]
    signs = np.stack([np.sign(stacked[:, i] - stacked[:, j]) for i, j in pairs], axis=1)  # [S, P, N]
    between = np.zeros(stacked.shape[2])
    if len(names) > 1:
        opposite = [(signs[a] * signs[b] < 0) for a in range(len(names)) for b in range(a + 1, len(names))]
        between = np.mean(np.stack(opposite), axis=(0, 1))
    positions = [{model: place for place, model in enumerate(orders[n])} for n in names]
    expected = np.array([[1.0 if p[i] < p[j] else -1.0 for i, j in pairs] for p in positions])[:, :, None]
    against = np.mean(signs * expected < 0, axis=(0, 1))
    return between, against


def write_html(path: Path, summary: dict, samples, models: list[Model], scores: dict[str, np.ndarray],
               output_dir: Path) -> None:
    """The one self-contained page: the data as JSON in the page, drawn by a little inline script."""
    from sipo.evaluate import image_path, load_picture

    labels = [m.label for m in models]
    # pooled: a run stands where its configuration ranks
    entry_of = {lbl: c for c, runs in (summary["groups"] or {}).items() for lbl in runs.values()}
    orders = {}
    for name, stats in summary["scorers"].items():
        ranked = [row["entry"] for row in stats["ranking"]]
        orders[name] = sorted(range(len(labels)), key=lambda m: ranked.index(entry_of.get(labels[m], labels[m])))
    between, against = disagreements(scores, orders)
    rows = []
    for n, sample in enumerate(samples):
        rows.append({
            "index": n, "prompt": sample.prompt, "seed": sample.seed,
            "images": [picture_data_uri(load_picture(image_path(output_dir, m.folder, sample))) for m in models],
            "scores": {name: [float(values[m, n]) for m in range(len(models))] for name, values in scores.items()},
            "between": float(between[n]), "against": float(against[n]),
        })
    data = {"summary": summary, "models": labels, "rows": rows}
    payload = json.dumps(_finite(data)).replace("</", "<\\/")
    page = PAGE.replace("__TITLE__", html.escape(f"sipo compare: {', '.join(labels)}")).replace("__DATA__", payload)
    path.write_text(page, encoding="utf-8")


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .5em;font-size:.85em;text-align:right}
th{background:#f3f3f3}td.label,th.label{text-align:left}.ci{color:#555;font-size:.85em}
.row{border-top:1px solid #ddd;padding:.6em 0}.row h3{font-size:.95em;margin:.2em 0 .4em;font-weight:600}
.pictures{display:flex;flex-wrap:wrap;gap:.6em}figure{margin:0;text-align:center;font-size:.8em}
figure img{width:192px;height:auto;image-rendering:pixelated;border:1px solid #bbb;display:block}
.best{font-weight:700;color:#0a5}.note{color:#555;font-size:.85em;max-width:60em}
</style></head><body>
<h1>sipo compare</h1>
<p id="settings" class="note"></p>
<div id="tables"></div>
<h2>Pictures</h2>
<p><label>sort by <select id="sort"></select></label> <span class="note">(one row per prompt and seed; the best score of each scorer in bold)</span></p>
<div id="rows"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const S = data.summary;
const fmt = v => (v === null || v === undefined) ? "n/a" : v.toFixed(4);
const esc = t => String(t).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const ci = c => `<span class="ci">[${fmt(c.low)}, ${fmt(c.high)}]</span>`;
const st = S.settings;
document.getElementById("settings").textContent = st.description ? `${st.description}. ${S.intervals}.` :
  `model ${st.model} (${st.family}); ${st.num_prompts} prompts x ${st.seeds.length} seeds = ${st.num_samples} pictures per model; ` +
  `${st.num_inference_steps} steps; guidance ${st.guidance_scale}; ${st.dtype}. ${S.intervals}.`;
let tables = "";
for (const [name, stats] of Object.entries(S.scorers)) {
  tables += `<h2>${esc(name)}</h2><table class="ranking" data-scorer="${esc(name)}"><tr><th>rank [range]</th>` +
    `<th class="label">entry</th><th>Bradley-Terry strength [95% CI]</th><th>mean score [95% CI]</th></tr>`;
  for (const r of stats.ranking) {
    const m = stats.means[r.entry];
    const range = r.rank_low === null ? "n/a" : `${r.rank_low}-${r.rank_high}`;
    tables += `<tr><td>${r.rank} [${range}]</td><td class="label">${esc(r.entry)}</td>` +
      `<td class="strength" data-scorer="${esc(name)}" data-entry="${esc(r.entry)}">${fmt(r.strength)} ${ci(r)}</td>` +
      `<td class="mean" data-scorer="${esc(name)}" data-entry="${esc(r.entry)}">${fmt(m.mean)} ${ci(m)}</td></tr>`;
  }
  tables += `</table><table class="matrix"><tr><th class="label">win rate of row over column</th>` +
    S.entries.map(e => `<th>${esc(e)}</th>`).join("") + "</tr>";
  for (const a of S.entries) {
    tables += `<tr><th class="label">${esc(a)}</th>`;
    for (const b of S.entries) {
      const c = stats.win_rate[a][b];
      if (c === null) { tables += "<td>-</td>"; continue; }
      const hue = c.rate >= 0.5 ? `rgba(33,102,172,${(c.rate - 0.5) * 1.6})` : `rgba(178,24,43,${(0.5 - c.rate) * 1.6})`;
      tables += `<td class="win" style="background:${hue}" data-scorer="${esc(name)}" data-row="${esc(a)}" ` +
        `data-col="${esc(b)}">${fmt(c.rate)} ${ci(c)}</td>`;
    }
    tables += "</tr>";
  }
  tables += "</table>";
}
document.getElementById("tables").innerHTML = tables;

const names = Object.keys(S.scorers);
const sorts = [["prompt order", r => -r.index]];
for (const n of names) {
  sorts.push([`${n}: spread, best - worst (largest first)`, r => Math.max(...r.scores[n]) - Math.min(...r.scores[n])]);
  sorts.push([`${n}: best score (highest first)`, r => Math.max(...r.scores[n])]);
}
sorts.push(["disagreement between scorers (most first)", r => r.between]);
sorts.push(["disagreement with the ranking (most first)", r => r.against]);
const select = document.getElementById("sort");
sorts.forEach(([label], i) => { const o = document.createElement("option"); o.value = i; o.textContent = label; select.appendChild(o); });
const wanted = /sort=(\d+)/.exec(location.hash);  // report.html#sort=N opens sorted by option N
if (wanted && Number(wanted[1]) < sorts.length) select.value = wanted[1];

function draw() {
  const key = sorts[Number(select.value)][1];
  const rows = data.rows.slice().sort((a, b) => key(b) - key(a) || a.index - b.index);
  document.getElementById("rows").innerHTML = rows.map(r => {
    const figures = data.models.map((m, i) => {
      const lines = names.map(n => {
        const best = r.scores[n][i] === Math.max(...r.scores[n]);
        return `<div class="${best ? "best" : ""}">${esc(n)} ${r.scores[n][i].toFixed(4)}</div>`;
      }).join("");
      return `<figure><img alt="${esc(m)}" src="${r.images[i]}"><figcaption><div>${esc(m)}</div>${lines}</figcaption></figure>`;
    }).join("");
    return `<div class="row" data-index="${r.index}"><h3>${esc(r.prompt)} <span class="ci">(seed ${r.seed}; ` +
      `scorers disagree ${r.between.toFixed(2)}, against the ranking ${r.against.toFixed(2)})</span></h3>` +
      `<div class="pictures">${figures}</div></div>`;
  }).join("");
}
select.addEventListener("change", draw);
draw();
</script>
</body></html>
"""
