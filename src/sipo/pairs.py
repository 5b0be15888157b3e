"""`sipo pairs`: preference pairs sampled from the model itself and labelled by reward models
(docs/spec.md section 11; docs/pairs.md).

For each prompt ``i`` of ``--prompts``, ``K = --samples-per-prompt`` pictures are sampled from the
base model (or a run's weights, ``--checkpoint``), picture ``k`` from seed ``--seed + i*K + k``
through :func:`sipo.evaluate.generate` (the one sampling path: one CPU ``torch.Generator`` per
picture), and scored by each scorer through :func:`sipo.evaluate.score_images`. A picture's
combined score is the weighted sum of its per-scorer standardised scores
(``z_j = (s_j - mean_j) / std_j`` over every picture of the run, population std; ``--scorer-weights``,
default 1 each). Pairs are chosen per prompt from the combined scores:

- ``best-worst``: the highest against the lowest (one pair per prompt);
- ``all``: every two pictures, the higher-scored one chosen;
- ``margin``: disjoint pairs, greedily the widest margins first (each picture in one pair at most).

Every rule keeps only pairs whose margin is above ``--min-margin`` (in standardised units; 0
drops exact ties). The output folder ``--out``:

- ``images/samples/p<prompt>_s<seed>.png`` (a video: a folder of frames, and ``clips/...gif``, the
  clip the JSONL format reads);
- ``pairs.jsonl``: what ``sipo train`` reads with ``data.format=jsonl data.path=<out>/pairs.jsonl``;
  each row: ``prompt``, ``chosen``, ``rejected`` (paths relative to it), ``score_chosen``,
  ``score_rejected``, ``score_margin`` (combined scores), ``scores_chosen`` / ``scores_rejected``
  (each scorer's raw score), ``chosen_seed``, ``rejected_seed``, ``noise_dtype`` (what
  ``objective.noise=stored`` reproduces each side's starting noise from), ``prompt_index``,
  ``sampler`` (model, family, steps, guidance, dtype, sizes) and ``weights_sha256``;
- ``report.json`` / ``report.md``: counts, margins, each scorer's mean and std, the agreement
  between scorers (over every two pictures of a prompt) and with the chosen pairs;
  ``scores.png``: the score histograms;
- ``pairs-state.json``: what made the folder (weights digest, scorer digests, sampler settings,
  prompts, K, seed). A rerun with any of them changed stops with one sentence; with all the same
  it continues: pictures already on disk are not sampled again (pictures are written atomically,
  chunk by chunk of ``--batch-size``), scores already in ``scores.jsonl`` are not recomputed (one
  fsync'd append per chunk), and ``pairs.jsonl`` and the report are rewritten from all the scores,
  so an interrupted and rerun command writes the same bytes as one that ran through.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sipo.errors import SipoError

PAIRINGS = ("best-worst", "all", "margin")
STATE = "pairs-state.json"
SCORES = "scores.jsonl"
MANIFEST = "pairs.jsonl"
#: the folder (under ``<out>/images/``) the samples go to: evaluate's ``model`` argument
SAMPLES = "samples"


@dataclass
class PairsOptions:
    """The options of ``sipo pairs`` (the module docstring says what each does)."""

    prompts: str
    out: str | Path
    checkpoint: str | None = None
    samples_per_prompt: int = 4
    scorers: list[str] = field(default_factory=lambda: ["pickscore"])
    scorer_weights: list[float] | None = None
    scorer_paths: dict[str, str] = field(default_factory=dict)
    pairing: str = "best-worst"
    min_margin: float = 0.0
    seed: int = 0
    batch_size: int = 4
    #: None: the family's own sampler (sipo.models.sampler_settings), as sipo eval and compare sample
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    dtype: str = "fp32"
    pickapic_path: str | None = None
    max_prompts: int | None = None
    progress: bool = True


@dataclass
class PairsResult:
    """What one ``make_pairs`` call wrote and did."""

    out: Path
    manifest: Path
    pairs: int
    samples: int
    sampled: int  # pictures this call sampled (0 when all were on disk)
    scored: int  # (picture, scorer) scores this call computed
    report: dict[str, Any]

    def summary(self) -> str:
        agreement = self.report.get("scorer_agreement") or {}
        said = "; ".join(f"{k} agree on {v:.3f} of within-prompt orderings" for k, v in agreement.items())
        return (f"{self.pairs} pairs from {self.samples} samples into {self.manifest}"
                + (f"; {said}" if said else ""))


# ----------------------------------------------------------------------------- pure parts
def sample_seed(base_seed: int, prompt_index: int, samples_per_prompt: int, k: int) -> int:
    """The seed of picture ``k`` of prompt ``prompt_index``: distinct for every picture of the run."""
    return base_seed + prompt_index * samples_per_prompt + k


def standardise(scores: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(z, mean, std)``: ``z = (s - mean) / std`` (population std; all zeros when the std is 0)."""
    values = np.asarray(scores, dtype=np.float64)
    mean, std = float(values.mean()), float(values.std())
    if std == 0.0 or not math.isfinite(std):
        return np.zeros_like(values), mean, std
    return (values - mean) / std, mean, std


def combined_scores(raw: dict[str, np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, dict[str, dict]]:
    """The weighted sum of the per-scorer standardised scores, and each scorer's mean and std."""
    total = np.zeros_like(next(iter(raw.values())), dtype=np.float64)
    stats = {}
    for (name, values), weight in zip(raw.items(), weights):
        z, mean, std = standardise(values)
        total = total + float(weight) * z
        stats[name] = {"mean": mean, "std": std, "weight": float(weight)}
    return total, stats


def choose_pairs(scores: Sequence[float], rule: str, min_margin: float = 0.0) -> list[tuple[int, int, float]]:
    """``(chosen, rejected, margin)`` positions among one prompt's ``scores`` by ``rule``.

    Only pairs with ``margin > min_margin`` are kept. Ties in the order are broken by position, so
    the same scores always give the same pairs.
    """
    values = [float(v) for v in scores]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))  # best first
    if rule == "best-worst":
        best, worst = order[0], order[-1]
        margin = values[best] - values[worst]
        return [(best, worst, margin)] if len(values) >= 2 and margin > min_margin else []
    candidates = [(order[a], order[b], values[order[a]] - values[order[b]])
                  for a in range(len(order)) for b in range(a + 1, len(order))]
    candidates = [c for c in candidates if c[2] > min_margin]
    if rule == "all":
        return candidates
    if rule == "margin":
        used: set[int] = set()
        chosen = []
        for winner, loser, margin in sorted(candidates, key=lambda c: (-c[2], c[0], c[1])):
            if winner not in used and loser not in used:
                used.update((winner, loser))
                chosen.append((winner, loser, margin))
        return chosen
    raise SipoError(f"--pairing {rule!r} is not a pairing rule; choose one of {list(PAIRINGS)}")


def ordering_agreement(first: np.ndarray, second: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """How often two scorers order two pictures of the same prompt the same way (pairs either ties are left out)."""
    agree = total = 0
    for members in groups:
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                d1, d2 = np.sign(first[i] - first[j]), np.sign(second[i] - second[j])
                if d1 == 0 or d2 == 0:
                    continue
                total += 1
                agree += int(d1 == d2)
    return agree / total if total else float("nan")


# ----------------------------------------------------------------------------- the folder's identity
def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def scorer_digest(name: str, path: str | None) -> str:
    """What identifies a scorer's weights: its files' configs and weight stamps (the latent cache's
    fingerprint), or its hub id."""
    from sipo.data.cache import model_fingerprint
    from sipo.rewards import scorer_class

    source = path or getattr(scorer_class(name), "default_source", "") or name
    return _digest({"name": name, "files": model_fingerprint(str(source))})


def base_weights_sha256(model_path: str, known: dict | None = None) -> tuple[str, dict]:
    """sha256 over every weight file of a local model directory (``name sha256`` lines, sorted), and the
    stamps it was computed for; ``known`` (a previous answer's stamps and digest) is reused when the
    stamps still match, so a rerun does not read gigabytes again. A hub id: its name's digest."""
    from sipo.data.cache import WEIGHT_SUFFIXES

    root = Path(model_path).expanduser()
    if not root.is_dir():
        return _digest({"hub_id": model_path}), {}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    stamps = {str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    if known and known.get("stamps") == stamps and isinstance(known.get("sha256"), str):
        return known["sha256"], stamps
    digest = hashlib.sha256()
    for path in files:
        file_digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(f"{path.relative_to(root)} {file_digest.hexdigest()}\n".encode())
    return digest.hexdigest(), stamps


def check_state(out: Path, identity: dict[str, Any]) -> None:
    """Stop with one sentence when ``out`` holds samples or scores made otherwise; record ``identity`` else."""
    state = out / STATE
    if state.is_file():
        try:
            previous = json.loads(state.read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict):
            raise SipoError(f"{state} is unreadable, so {out} cannot be resumed safely; delete {out} or pass another --out")
        # base_weights only remembers which file stamps weights_sha256 was computed for (a copied model
        # has new stamps and the same digest): the digest is what is compared
        changed = sorted(k for k in set(identity) | set(previous)
                         if k != "base_weights" and previous.get(k) != identity.get(k))
        if changed:
            raise SipoError(f"{out} holds samples made with other settings ({', '.join(changed)}); pass another --out "
                            "or delete that folder to start fresh")
        if previous.get("base_weights") != identity.get("base_weights"):
            _write_atomic(state, json.dumps(identity, indent=2) + "\n")
        return
    if out.is_dir() and any(out.iterdir()):
        raise SipoError(f"{out} is not empty and holds no {STATE}, so it is no sipo pairs folder; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(state, json.dumps(identity, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- scores on disk
def read_scores(path: Path) -> dict[tuple[str, int, int], float]:
    """``{(scorer, prompt index, seed): score}`` from ``scores.jsonl``; a line cut short by a kill is
    dropped (and truncated away, so the next append starts on a fresh line)."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    found = {}
    for line in data[:end].splitlines():
        record = json.loads(line)
        for index, seed, score in record["scores"]:
            found[(record["scorer"], int(index), int(seed))] = float(score)
    return found


def append_scores(path: Path, scorer: str, samples, scores: torch.Tensor) -> None:
    """One line per scored chunk, flushed to the disk before the next chunk starts."""
    line = json.dumps({"scorer": scorer, "scores": [[s.prompt_index, s.seed, float(v)]
                                                    for s, v in zip(samples, scores.double().tolist())]})
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- the command
def check_pairs_options(options: PairsOptions) -> list[float]:
    """Refuse what cannot work, before anything loads; returns the scorer weights."""
    if options.samples_per_prompt < 2:
        raise SipoError(f"--samples-per-prompt {options.samples_per_prompt} makes no pair; pass at least 2 (e.g. 4)")
    if options.pairing not in PAIRINGS:
        raise SipoError(f"--pairing {options.pairing!r} is not a pairing rule; choose one of {list(PAIRINGS)}")
    if not math.isfinite(options.min_margin) or options.min_margin < 0:
        raise SipoError(f"--min-margin {options.min_margin} must be a finite number >= 0 (standardised score units)")
    if options.seed < 0:
        raise SipoError(f"--seed {options.seed} is negative; pass a seed from 0 up")
    weights = options.scorer_weights if options.scorer_weights is not None else [1.0] * len(options.scorers)
    if len(weights) != len(options.scorers):
        raise SipoError(f"--scorer-weights gives {len(weights)} weights for {len(options.scorers)} scorers "
                        f"{options.scorers}; pass one weight per scorer, in the same order")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise SipoError(f"--scorer-weights {weights} must be finite, >= 0 and not all 0; e.g. --scorer-weights 1,1")
    if len(set(options.scorers)) != len(options.scorers):
        raise SipoError(f"--scorers {options.scorers} names a scorer twice; name each once")
    return [float(w) for w in weights]


def make_pairs(config, options: PairsOptions) -> PairsResult:
    """Sample, score, pair and report (see the module docstring)."""
    from sipo.evaluate import (
        SAMPLING_DTYPES, EvalOptions, Sample, check_eval_options, check_run_base, check_run_family, check_scorers_loadable,
        read_prompts, video_sample_sizes, weights_key, with_sampler_defaults,
    )
    from sipo.rundir import check_output_dir

    options = with_sampler_defaults(config, options)
    weights = check_pairs_options(options)
    check_eval_options(EvalOptions(prompts=options.prompts, scorers=options.scorers, batch_size=options.batch_size,
                                   num_inference_steps=options.num_inference_steps,
                                   guidance_scale=options.guidance_scale, dtype=options.dtype,
                                   max_prompts=options.max_prompts))
    from sipo.rewards import scorer_class

    for name in options.scorers:
        scorer_class(name)
    unknown = sorted(set(options.scorer_paths) - set(options.scorers))
    if unknown:
        raise SipoError(f"--scorer-path names {unknown[0]}, which is not in --scorers {options.scorers}; add it to --scorers")
    if options.checkpoint is not None:
        check_run_family(options.checkpoint, config.model.family)
        check_run_base(options.checkpoint, config.model)
    key = weights_key(config, options.checkpoint)
    prompts = read_prompts(options.prompts, options.pickapic_path, options.max_prompts)
    K = options.samples_per_prompt
    if sample_seed(options.seed, len(prompts) - 1, K, K - 1) >= 2**63:
        raise SipoError(f"--seed {options.seed} makes seeds beyond 2**63 for {len(prompts)} prompts; pass a smaller --seed")
    samples = [Sample(i, sample_seed(options.seed, i, K, k), prompt) for i, prompt in enumerate(prompts) for k in range(K)]
    out = Path(options.out).expanduser()
    check_output_dir(out, name="--out")
    check_scorers_loadable(options.scorers, options.scorer_paths)

    from sipo.models import adapter_class

    family = adapter_class(config.model.family)
    sizes = video_sample_sizes(config)
    noise_dtype = getattr(family, "starting_noise_dtype", None) or SAMPLING_DTYPES[options.dtype]
    sampler = {"model": str(config.model.pretrained_path), "family": config.model.family,
               "num_inference_steps": options.num_inference_steps, "guidance_scale": options.guidance_scale,
               "dtype": options.dtype, **sizes}
    previous = {}
    if (out / STATE).is_file():
        try:
            previous = json.loads((out / STATE).read_text()).get("base_weights", {}) or {}
        except (OSError, ValueError, AttributeError):
            previous = {}
    if key["weights"] == "base":
        sha, stamps = base_weights_sha256(config.model.pretrained_path, previous)
        weights_sha256, base_weights = sha, {"sha256": sha, "stamps": stamps}
    else:
        weights_sha256, base_weights = key["weights"], {}
    identity = {"weights": key, "weights_sha256": weights_sha256, "base_weights": base_weights, "sampler": sampler,
                "noise_dtype": str(noise_dtype).removeprefix("torch."), "samples_per_prompt": K, "seed": options.seed,
                "prompts": prompts,
                "scorers": {name: scorer_digest(name, options.scorer_paths.get(name)) for name in options.scorers}}
    identity = json.loads(json.dumps(identity))  # as it reads back from the file
    check_state(out, identity)

    chunks = [samples[i:i + options.batch_size] for i in range(0, len(samples), options.batch_size)]
    sampled = sample_pictures(config, options, key, chunks, out, sizes)
    scored = score_pictures(options, chunks, out)
    scores = read_scores(out / SCORES)
    report = write_pairs(out, samples, scores, options, weights, identity, getattr(config.data, "fps", None))
    print(f"sipo pairs: {report['pairs']} pairs ({options.pairing}) from {len(samples)} samples of {len(prompts)} prompts "
          f"in {out / MANIFEST}")
    if report["pairs"] == 0:  # an empty manifest trains nothing: say why here, not as a malformed file later
        raise SipoError(no_pairs_reason(report, options))
    fps = getattr(config.data, "fps", None)
    if sizes and fps and (1000.0 / fps) % 10:
        print(f"sipo pairs: note: a GIF stores frame times in 10 ms steps, so {1000.0 / fps:g} ms (data.fps={fps:g}) is "
              "not exact; train on these clips with data.fps=null (every sampled frame, in order)")
    return PairsResult(out, out / MANIFEST, report["pairs"], len(samples), sampled, scored, report)


def no_pairs_reason(report: dict[str, Any], options: PairsOptions) -> str:
    """The sentence for a run whose pairing kept no pair: every scorer constant, or no margin above --min-margin."""
    if all(stats["std"] == 0 or stats["weight"] == 0 for stats in report["scorers"].values()):
        return (f"sipo pairs made no pair: every picture of {options.out} scored the same with {options.scorers} (or with "
                "weight 0), so nothing is preferred; check the scorers (--scorer-path) or add another scorer")
    return (f"sipo pairs made no pair: no two pictures of a prompt differ by more than --min-margin "
            f"{options.min_margin:g} (standardised units); rerun with a lower --min-margin (the samples and scores "
            "are kept: only the pairing runs again)")


def sample_pictures(config, options: PairsOptions, key: dict, chunks, out: Path, sizes: dict) -> int:
    """Every picture not on disk, chunk by chunk through :func:`sipo.evaluate.generate`; the model loads
    only when something is missing. Returns how many pictures were sampled."""
    from tqdm.auto import tqdm

    from sipo.evaluate import generate, picture_exists, prepare_for_sampling

    todo = [chunk for chunk in chunks if not all(picture_exists(out, SAMPLES, s) for s in chunk)]
    if not todo:
        return 0
    from sipo.models import adapter_from_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter = adapter_from_config(config.model).to(device)
    if options.checkpoint is not None:
        from sipo.checkpoints import load_run_weights

        load_run_weights(adapter, options.checkpoint, Path(key["run"]) / "checkpoints" / key["checkpoint"])
    prepare_for_sampling(adapter, options.dtype)
    sample_options = {"num_inference_steps": options.num_inference_steps, "guidance_scale": options.guidance_scale,
                      **sizes}
    sampled = 0
    for chunk in tqdm(todo, desc="sampling", unit="batch", disable=not options.progress, dynamic_ncols=True):
        sampled += generate(adapter.sample, chunk, out, SAMPLES, options.batch_size, progress=False, **sample_options)
    del adapter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sampled


def score_pictures(options: PairsOptions, chunks, out: Path) -> int:
    """Each scorer's scores of every picture not yet in ``scores.jsonl``, chunk by chunk (the same
    chunks on every run, so a resumed run scores the same batches). Returns the scores computed."""
    from tqdm.auto import tqdm

    from sipo.evaluate import score_images
    from sipo.rewards import load_scorer

    done = read_scores(out / SCORES)
    computed = 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in options.scorers:
        todo = [c for c in chunks if not all((name, s.prompt_index, s.seed) in done for s in c)]
        if not todo:
            continue
        scorer = load_scorer(name, options.scorer_paths.get(name), device)
        for chunk in tqdm(todo, desc=f"scoring ({name})", unit="batch", disable=not options.progress, dynamic_ncols=True):
            values = score_images(scorer, chunk, out, SAMPLES, len(chunk), progress=False)
            append_scores(out / SCORES, name, chunk, values)
            computed += len(chunk)
        del scorer
    return computed


def _picture_file(out: Path, sample, fps: float | None) -> tuple[str, int, int]:
    """The file a JSONL row names for ``sample`` (relative to ``out``) and its height and width: the PNG,
    or for a video an animated GIF of its frames (written once)."""
    from PIL import Image

    from sipo.evaluate import image_path

    path = image_path(out, SAMPLES, sample)
    if not path.is_dir():
        with Image.open(path) as image:
            width, height = image.size
        return str(path.relative_to(out)), height, width
    frames = sorted(path.glob("frame_*.png"))
    clip = out / "clips" / f"{path.name}.gif"
    with Image.open(frames[0]) as first:
        width, height = first.size
    if not clip.is_file():
        images = []
        for frame in frames:
            with Image.open(frame) as image:
                images.append(image.convert("RGB"))
        clip.parent.mkdir(parents=True, exist_ok=True)
        tmp = clip.with_name(f".tmp-{clip.name}")
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=int(round(1000.0 / (fps or 8.0))))
        os.replace(tmp, clip)
    return str(clip.relative_to(out)), height, width


def write_pairs(out: Path, samples, scores: dict, options: PairsOptions, weights: list[float],
                identity: dict, fps: float | None = None) -> dict[str, Any]:
    """``pairs.jsonl``, ``report.json``, ``report.md`` and ``scores.png`` from every picture's scores
    (``fps``: a video's GIF frame rate, ``data.fps``)."""
    raw = {name: np.asarray([scores[(name, s.prompt_index, s.seed)] for s in samples], dtype=np.float64)
           for name in options.scorers}
    combined, stats = combined_scores(raw, weights)
    groups: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        groups.setdefault(sample.prompt_index, []).append(position)
    rows, margins = [], []
    for prompt_index in sorted(groups):
        members = groups[prompt_index]
        for winner, loser, margin in choose_pairs(combined[members], options.pairing, options.min_margin):
            chosen, rejected = samples[members[winner]], samples[members[loser]]
            chosen_file, height, width = _picture_file(out, chosen, fps)
            rejected_file, _, _ = _picture_file(out, rejected, fps)
            rows.append({
                "prompt": chosen.prompt, "chosen": chosen_file, "rejected": rejected_file,
                "score_chosen": float(combined[members[winner]]), "score_rejected": float(combined[members[loser]]),
                "score_margin": float(margin),
                "scores_chosen": {n: float(raw[n][members[winner]]) for n in options.scorers},
                "scores_rejected": {n: float(raw[n][members[loser]]) for n in options.scorers},
                "chosen_seed": chosen.seed, "rejected_seed": rejected.seed, "noise_dtype": identity["noise_dtype"],
                "prompt_index": prompt_index, "height": height, "width": width,
                "sampler": identity["sampler"], "weights_sha256": identity["weights_sha256"],
            })
            margins.append(float(margin))
    _write_atomic(out / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows))

    names = list(options.scorers)
    scorer_agreement = {f"{a}~{b}": ordering_agreement(raw[a], raw[b], list(groups.values()))
                        for i, a in enumerate(names) for b in names[i + 1:]}
    pairs_agreeing = {n: (float(np.mean([r["scores_chosen"][n] > r["scores_rejected"][n] for r in rows]))
                          if rows else float("nan")) for n in names}
    report = {
        "pairs": len(rows), "samples": len(samples), "prompts": len(groups), "samples_per_prompt": options.samples_per_prompt,
        "pairing": options.pairing, "min_margin": options.min_margin, "scorers": stats,
        "scorer_agreement": scorer_agreement, "pairs_agreeing_per_scorer": pairs_agreeing,
        "margin": ({"mean": float(np.mean(margins)), "median": float(np.median(margins)), "min": float(np.min(margins)),
                    "max": float(np.max(margins))} if margins else None),
        "weights_sha256": identity["weights_sha256"], "sampler": identity["sampler"],
    }
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    lines = [f"# sipo pairs: {len(rows)} pairs ({options.pairing}, margin > {options.min_margin}) from {len(samples)} "
             f"samples of {len(groups)} prompts", "",
             "| scorer | weight | mean | std | agrees with the chosen pairs |", "|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {stats[n]['weight']:g} | {stats[n]['mean']:.4f} | {stats[n]['std']:.4f} | "
                     f"{pairs_agreeing[n]:.3f} |")
    for pair_name, value in scorer_agreement.items():
        lines.append(f"\n{pair_name}: the two scorers order two pictures of a prompt the same way {value:.3f} of the time")
    if margins:
        lines.append(f"\nmargins (standardised): mean {report['margin']['mean']:.4f}, median "
                     f"{report['margin']['median']:.4f}, min {report['margin']['min']:.4f}, max {report['margin']['max']:.4f}")
    _write_atomic(out / "report.md", "\n".join(lines) + "\n")
    _plot_scores(out / "scores.png", raw, combined, margins)
    return report


def _plot_scores(path: Path, raw: dict[str, np.ndarray], combined: np.ndarray, margins: list[float]) -> None:
    """One histogram per scorer, the combined score and the chosen pairs' margins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*raw.items(), ("combined (standardised)", combined), ("pair margins", np.asarray(margins))]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    for axis, (name, values) in zip(axes[0], panels):
        if len(values):
            axis.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue")
        axis.set_title(name, fontsize=9)
    figure.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    figure.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(figure)
    os.replace(tmp, path)
