"""`sipo eval`: sample the base and the aligned model on the same prompts and seeds, score, compare.

Protocol. Every image is keyed by ``(model, prompt index, seed)`` and drawn with its own CPU
``torch.Generator(seed)`` (one per image, so batching and resuming never change an image); base and
aligned share the prompts, seeds, scheduler (the family pipeline's, DDIM for SD1.5), step count and
guidance scale, so image ``(i, s)`` of the two models differs only by the weights. Images are saved
as PNG under ``<output_dir>/images/<model>/`` and re-running skips those already there. Scores are
computed from the saved PNGs (so a resumed run scores exactly what a fresh one would).

Images are keyed by the weights that made them: ``images/aligned/weights.json`` records the sha256
of the run's checkpoint weights (:func:`sipo.checkpoints.run_weights`). When the run has trained
further, the old images move to ``images/aligned-<step>-<digest>/`` and the new weights are sampled,
so images of old weights are never scored for new ones (:func:`claim_output_folder`).

Per scorer we report the mean score of each model with a 95% percentile-bootstrap interval, and the
win rate of aligned over base (per ``(prompt, seed)``: 1 if aligned scores higher, 0 if lower,
1/2 on a tie) with its bootstrap interval. Outputs: ``scores.csv`` (every image's scores),
``summary.md`` (the table, also printed), ``summary.json`` and ``grid.png`` (base | aligned).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sipo.errors import SipoError

MODELS = ("base", "aligned")


# ----------------------------------------------------------------------------- pure statistics
def win_outcomes(scores: Tensor, base_scores: Tensor, tolerance: float = 0.0) -> Tensor:
    """Per sample: 1 where ``scores`` beats ``base_scores`` by more than ``tolerance``, 0 where it
    loses by more, 1/2 otherwise (a tie). Same shape as the inputs, float64."""
    scores, base_scores = torch.as_tensor(scores), torch.as_tensor(base_scores)
    if scores.shape != base_scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and base scores {tuple(base_scores.shape)} differ")
    difference = scores.double() - base_scores.double()
    return (difference > tolerance).double() + 0.5 * (difference.abs() <= tolerance).double()


def win_rate(scores: Tensor, base_scores: Tensor, tolerance: float = 0.0) -> float:
    """Fraction of samples whose score beats the base's on the same prompt and seed; ties count half."""
    return float(win_outcomes(scores, base_scores, tolerance).mean())


def bootstrap_ci(
    values: Sequence[float] | Tensor | np.ndarray, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values``.

    Draw ``num_resamples`` resamples of ``len(values)`` with replacement (numpy ``default_rng(seed)``),
    take each one's mean, return the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles
    (numpy's linear interpolation). Deterministic given ``seed``.
    """
    data = np.asarray(torch.as_tensor(values).double().cpu().numpy() if isinstance(values, Tensor) else values,
                      dtype=np.float64).reshape(-1)
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(num_resamples, data.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ----------------------------------------------------------------------------- prompts
PICKAPIC_TEST = "pickapic-test"


def read_prompts(source: str | Path, pickapic_path: str | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped), ``pickapic-test`` or ``hf:...``.

    ``pickapic-test``: the unique captions, in order of first appearance, of the Pick-a-Pic v2 test
    split read from local parquet (``pickapic_path``: a file, a directory of shards or a glob).
    ``hf:DATASET[:SPLIT[:COLUMN]]``: a column of a dataset `datasets` reads (a hub id, a hub-layout
    folder or a ``save_to_disk`` folder, as ``data.format=hf``); split ``test`` and the first of the
    columns ``prompt``, ``caption``, ``text`` by default; the unique strings, in order.
    """
    if str(source).startswith(HF_PROMPTS):
        prompts = read_hf_prompts(str(source)[len(HF_PROMPTS):])
    elif str(source) == PICKAPIC_TEST:
        if not pickapic_path:
            raise SipoError(
                "--prompts pickapic-test reads the Pick-a-Pic v2 test split from local parquet; download "
                "test-*.parquet of yuvalkirstain/pickapic_v2_no_images (or pickapic_v2) and pass --pickapic-path FILE_OR_DIR"
            )
        import glob

        import pyarrow.parquet as pq

        from sipo.data.pickapic import TEST_SPLITS, find_shards

        # named here as the option the user typed (find_shards speaks of data.path, the training key)
        if not (glob.glob(str(pickapic_path), recursive=True) if glob.has_magic(str(pickapic_path))
                else Path(pickapic_path).exists()):
            raise SipoError(f"--pickapic-path {pickapic_path} does not exist or matches no file; pass the Pick-a-Pic v2 "
                            "test-*.parquet shards (a file, a folder or a glob)")

        prompts: list[str] = []
        for shard in find_shards(pickapic_path, TEST_SPLITS, fix="pass --pickapic-path the test-*.parquet shards"):
            try:
                captions = pq.read_table(shard, columns=["caption"]).column("caption").to_pylist()
            except (KeyError, OSError, ValueError) as error:
                raise SipoError(f"{shard} has no readable caption column ({error.__class__.__name__}); "
                                "pass Pick-a-Pic v2 parquet shards to --pickapic-path") from None
            prompts.extend(c.strip() for c in captions if isinstance(c, str) and c.strip())
        prompts = list(dict.fromkeys(prompts))
    else:
        path = Path(source).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SipoError(f"prompts file {path} does not exist; pass --prompts with a text file of one prompt per line or pickapic-test") from None
        except (OSError, UnicodeDecodeError) as error:
            raise SipoError(f"prompts file {path} cannot be read as UTF-8 text ({error.__class__.__name__}); pass a text file of one prompt per line") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SipoError(f"{source} holds no prompts; write one prompt per line")
    return prompts[:limit] if limit is not None else prompts


#: ``--prompts hf:DATASET[:SPLIT[:COLUMN]]``
HF_PROMPTS = "hf:"
#: the prompt columns ``hf:`` looks for when none is named, in order
PROMPT_COLUMNS = ("prompt", "caption", "text")


def read_hf_prompts(spec: str) -> list[str]:
    """The unique non-empty strings of one column of a dataset (``DATASET[:SPLIT[:COLUMN]]``, see read_prompts)."""
    from sipo.data.hf import open_hf

    dataset, _, rest = spec.partition(":")
    split, _, column = rest.partition(":")
    if not dataset:
        raise SipoError("--prompts hf: names no dataset; write --prompts hf:DATASET[:SPLIT[:COLUMN]], "
                        "e.g. hf:my/prompts:test:prompt")
    table = open_hf(dataset, split or "test")
    names = list(table.column_names)
    column = column or next((name for name in PROMPT_COLUMNS if name in names), "")
    if column not in names:
        raise SipoError(f"--prompts hf:{spec}: the dataset has no {column or ' or '.join(PROMPT_COLUMNS)} column "
                        f"(it has {', '.join(names)}); name one: hf:{dataset}:{split or 'test'}:COLUMN")
    values = table[column]
    return list(dict.fromkeys(v.strip() for v in values if isinstance(v, str) and v.strip()))


def read_inputs(source: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """``(prompt, input image path)`` pairs for a family that edits or animates an input image (``--inputs``).

    A JSONL file, one ``{"prompt": ..., "input_image": ...}`` object per line (the conditioned training rows'
    own two fields; paths relative to the file's folder, returned absolute). Every line is checked now, before
    anything loads: a line that is not such an object, or an input image that does not exist, stops in one sentence.
    """
    path = Path(source).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SipoError(f"--inputs {path} cannot be read ({error.__class__.__name__}); pass a JSONL file of "
                        '{"prompt": ..., "input_image": ...} lines') from None
    inputs: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and isinstance(record.get("input_image"), str) and record["input_image"]):
            raise SipoError(f'line {number} of --inputs {path} is not a {{"prompt": ..., "input_image": ...}} object; '
                            "write one per line (input_image: a picture path relative to the file)")
        image = (path.parent / record["input_image"]).resolve()
        if not image.is_file():
            raise SipoError(f"line {number} of --inputs {path} names {record['input_image']}, which does not exist; "
                            "fix the path (relative to the file's folder)")
        inputs.append((record["prompt"], str(image)))
    if not inputs:
        raise SipoError(f"--inputs {path} holds no prompt and input image; write one JSON object per line")
    return inputs[:limit] if limit is not None else inputs


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``"0-3"`` -> ``[0, 1, 2, 3]``; ``flag``: the option its messages name."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in str(text).split(",") if p.strip()):
            if "-" in part[1:]:
                first, last = part.split("-", 1) if not part.startswith("-") else (part, part)
                seeds.extend(range(int(first), int(last) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise SipoError(f"{flag} {text!r} is not a list of integers; write e.g. {flag} 0,1 or {flag} 0-3") from None
    if not seeds:
        raise SipoError(f"{flag} {text!r} names no seed; write e.g. {flag} 0,1 or {flag} 0-3 (a range goes upwards)")
    outside = [seed for seed in seeds if not 0 <= seed < 2**63]
    if outside:  # torch.Generator takes 64 bits, and a negative seed aliases a large one (-1 is 2**64 - 1)
        raise SipoError(f"{flag} {outside[0]} is outside [0, 2**63); pass seeds from 0 up, e.g. {flag} 0-3")
    return list(dict.fromkeys(seeds))


# ----------------------------------------------------------------------------- images on disk
@dataclass(frozen=True)
class Sample:
    prompt_index: int
    seed: int
    prompt: str
    #: the input image a conditioned family edits or animates (``--inputs``), else None
    input_image: str | None = None


def image_path(output_dir: Path, model: str, sample: Sample) -> Path:
    """Where picture ``(model, prompt index, seed)`` lives: ``p00012_s0.png``, or for a video the folder
    ``p00012_s0/`` of frame PNGs (whichever exists; the PNG name when neither does yet)."""
    path = output_dir / "images" / model / f"p{sample.prompt_index:05d}_s{sample.seed}.png"
    return path.with_suffix("") if path.with_suffix("").is_dir() else path


def picture_exists(output_dir: Path, model: str, sample: Sample) -> bool:
    return image_path(output_dir, model, sample).exists()


def _to_uint8(picture: Tensor) -> np.ndarray:
    return (picture.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())


def save_picture(path: Path, picture: Tensor) -> None:
    """Write ``[3, H, W]`` (a PNG) or ``[F, 3, H, W]`` (a folder of ``frame_NNN.png``), atomically."""
    from PIL import Image

    if picture.ndim == 4:
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    if picture.ndim == 3:
        Image.fromarray(_to_uint8(picture)).save(tmp, format="PNG")
    else:
        tmp.mkdir(exist_ok=True)
        for index, frame in enumerate(picture):
            Image.fromarray(_to_uint8(frame)).save(tmp / f"frame_{index:03d}.png", format="PNG")
    os.replace(tmp, path)


def load_picture(path: Path) -> Tensor:
    """``[3, H, W]`` or ``[F, 3, H, W]`` float in ``[0, 1]`` from what :func:`save_picture` wrote."""
    from PIL import Image

    def read(file: Path) -> Tensor:
        with Image.open(file) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255

    if path.is_dir():
        return torch.stack([read(f) for f in sorted(path.glob("frame_*.png"))])
    return read(path)


def generate(
    sample_fn: Callable[..., Tensor], samples: list[Sample], output_dir: Path, model: str, batch_size: int,
    progress: bool = True, input_loader: Callable[[str], Tensor] | None = None, **sample_options,
) -> int:
    """Sample every image of ``samples`` not yet on disk; returns how many were generated.

    ``sample_fn`` is ``adapter.sample``; each image gets its own ``torch.Generator().manual_seed(seed)``.
    Samples with an ``input_image`` pass it as ``input_images`` (``input_loader(path)``, ``[3, H, W]`` in [-1, 1]).
    """
    from tqdm.auto import tqdm

    todo = [s for s in samples if not picture_exists(output_dir, model, s)]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc=f"sampling {model}", unit="batch", disable=not progress or not batches):
        generators = [torch.Generator().manual_seed(s.seed) for s in batch]
        inputs = {}
        if batch[0].input_image is not None:
            inputs["input_images"] = torch.stack([input_loader(s.input_image) for s in batch])
        pictures = sample_fn([s.prompt for s in batch], generator=generators, **inputs, **sample_options)
        for sample, picture in zip(batch, pictures):
            save_picture(image_path(output_dir, model, sample), picture)
    return len(todo)


def score_images(scorer, samples: list[Sample], output_dir: Path, model: str, batch_size: int,
                 progress: bool = True) -> Tensor:
    """``[N]`` scores of the saved images of ``model``, in the order of ``samples``."""
    from tqdm.auto import tqdm

    scores = []
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    for batch in tqdm(batches, desc=f"scoring {model} ({scorer.name})", unit="batch", disable=not progress):
        pictures = torch.stack([load_picture(image_path(output_dir, model, s)) for s in batch])
        scores.append(scorer.score(pictures, [s.prompt for s in batch]))
    return torch.cat(scores)


# ----------------------------------------------------------------------------- the report
@dataclass
class ScorerSummary:
    name: str
    means: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    win_rate: float | None = None
    win_rate_interval: tuple[float, float] | None = None


def summarize(name: str, scores: dict[str, Tensor], seed: int = 0) -> ScorerSummary:
    """Means with bootstrap intervals per model, and aligned's win rate over base with its interval."""
    summary = ScorerSummary(name)
    for model, values in scores.items():
        summary.means[model] = float(values.double().mean())
        summary.intervals[model] = bootstrap_ci(values, seed=seed)
    if "base" in scores and "aligned" in scores:
        outcomes = win_outcomes(scores["aligned"], scores["base"])
        summary.win_rate = float(outcomes.mean())
        summary.win_rate_interval = bootstrap_ci(outcomes, seed=seed)
    return summary


def _fmt(mean: float, interval: tuple[float, float]) -> str:
    digits = 2 if max(abs(mean), abs(interval[1])) >= 10 else 4
    return f"{mean:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def markdown_table(summaries: list[ScorerSummary], models: Sequence[str], num_images: int) -> str:
    """The report table: one row per scorer; means and win rate with their 95% bootstrap intervals."""
    header = ["scorer", *(f"{m} mean [95% CI]" for m in models)]
    paired = "aligned" in models and "base" in models
    if paired:
        header.append("win rate aligned vs base [95% CI]")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        row = [s.name, *(_fmt(s.means[m], s.intervals[m]) for m in models)]
        if paired:
            row.append(_fmt(s.win_rate, s.win_rate_interval))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"{num_images} images per model (prompts x seeds); intervals: percentile bootstrap, 2000 resamples; "
                 "ties count half a win.")
    return "\n".join(lines)


def video_table(results: dict[str, dict[str, dict[str, float]]], models: Sequence[str]) -> str:
    """One row per (benchmark, dimension), one column per model."""
    lines = ["| benchmark dimension | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    for bench, per_model in results.items():
        for dim in per_model[models[0]]:
            lines.append(f"| {bench} {dim} | " + " | ".join(f"{per_model[m][dim]:.4f}" for m in models) + " |")
    return "\n".join(lines)


def write_scores_csv(path: Path, samples: list[Sample], models: Sequence[str], scores: dict[str, dict[str, Tensor]],
                     output_dir: Path) -> None:
    """One row per image: model, prompt index, seed, prompt, image path, one column per scorer."""
    names = list(scores)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "prompt_index", "seed", "prompt", "image", *names])
        for model in models:
            for i, sample in enumerate(samples):
                writer.writerow([model, sample.prompt_index, sample.seed, sample.prompt,
                                 str(image_path(output_dir, model, sample).relative_to(output_dir)),
                                 *(f"{float(scores[n][model][i]):.6g}" for n in names)])


def write_grid(path: Path, samples: list[Sample], models: Sequence[str], output_dir: Path, max_rows: int = 8) -> None:
    """PNG grid: one row per ``(prompt, seed)`` (up to ``max_rows``), one column per model; a video shows its first frame."""
    from PIL import Image, ImageDraw

    rows = samples[:max_rows]
    tiles = [[load_picture(image_path(output_dir, m, s)) for m in models] for s in rows]
    tiles = [[t[0] if t.ndim == 4 else t for t in row] for row in tiles]
    height, width = tiles[0][0].shape[-2:]
    label = 12
    grid = Image.new("RGB", (width * len(models), label + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, model in enumerate(models):
        draw.text((column * width + 2, 0), model, fill="black")
        for r, row in enumerate(tiles):
            grid.paste(Image.fromarray(_to_uint8(row[column])), (column * width, label + r * height))
    grid.save(path)


# ----------------------------------------------------------------------------- the command
@dataclass
class EvalOptions:
    prompts: str | None
    checkpoint: str | None = None
    base_only: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    scorers: list[str] = field(default_factory=lambda: ["pickscore"])
    scorer_paths: dict[str, str] = field(default_factory=dict)
    output_dir: Path | None = None
    batch_size: int = 4
    #: None: the family's own sampler (sipo.models.sampler_settings: FLUX 28 steps at model.guidance, ...)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    pickapic_path: str | None = None
    max_prompts: int | None = None
    progress: bool = True
    #: weights dtype while sampling: fp32, fp16 or bf16 (scorers stay fp32)
    dtype: str = "fp32"
    #: video benchmarks (sipo.rewards.vbench.VideoBenchmark) run on the saved videos of each model
    video_benchmarks: list = field(default_factory=list)
    #: JSONL of prompt + input_image for the families that edit or animate one (read_inputs); replaces prompts
    inputs: str | None = None

    def __post_init__(self) -> None:
        """The command line's spellings are taken from Python too, never iterated character by character:
        ``scorers="pickscore,hpsv2"``, ``seeds="0-3"`` or ``seeds=0``, ``scorer_paths=["pickscore=DIR"]``."""
        if isinstance(self.scorers, str):
            self.scorers = [name.strip() for name in self.scorers.split(",") if name.strip()]
        if isinstance(self.seeds, str):
            self.seeds = parse_seeds(self.seeds)
        elif isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if isinstance(self.scorer_paths, str):
            self.scorer_paths = [self.scorer_paths]
        if not isinstance(self.scorer_paths, dict):
            self.scorer_paths = parse_scorer_paths(list(self.scorer_paths))


def parse_scorer_paths(items: Sequence[str]) -> dict[str, str]:
    """``["pickscore=/m/PickScore_v1", ...]`` -> ``{"pickscore": "/m/PickScore_v1"}``."""
    paths = {}
    for item in items:
        if "=" not in item:
            raise SipoError(f"--scorer-path {item!r} is not NAME=DIR; write e.g. --scorer-path pickscore=/models/PickScore_v1")
        name, directory = item.split("=", 1)
        if not directory.strip():  # "" would read as the working directory, or fall back to the hub
            raise SipoError(f"--scorer-path {item!r} names no directory; write e.g. --scorer-path {name.strip() or 'pickscore'}=/models/PickScore_v1")
        paths[name.strip()] = os.path.expanduser(directory.strip())
    return paths


def check_run_family(run_dir: str | Path, family: str) -> None:
    """Stop before sampling when ``run_dir`` is no run, or a run of another model family."""
    import yaml

    from sipo.checkpoints import run_directory_of

    saved = run_directory_of(run_dir) / "config.yaml"
    if not saved.is_file():
        raise SipoError(f"{run_dir} is not a sipo run directory (no config.yaml); pass the train.output_dir of a run to --checkpoint")
    run_family = (yaml.safe_load(saved.read_text()) or {}).get("model", {}).get("family", "sd15")
    if run_family != family:
        raise SipoError(f"{run_dir} was trained on a {run_family} model but --config loads a {family} model; "
                        "pass the config the run was trained with")


def generation_settings(config, options: "EvalOptions", sizes: dict) -> dict:
    """What makes the images of an eval folder, recorded in its generation.json: the model (its path and
    the digest of its files, so base weights replaced in place are not mixed with the old images), the
    run, the sampler settings and the picture size (``model.resolution`` for images, ``sizes`` for clips)."""
    from sipo.data.cache import model_files_digest

    return {"model": str(config.model.pretrained_path), "model_files": model_files_digest(config.model),
            "family": config.model.family,
            "checkpoint": None if options.base_only else str(Path(options.checkpoint).resolve()),
            "num_inference_steps": options.num_inference_steps, "guidance_scale": options.guidance_scale,
            "dtype": options.dtype, "resolution": config.model.resolution, **sizes}


def check_run_base(run_dir: str | Path, model_config) -> None:
    """Stop before sampling when ``run_dir`` was trained on another base model than ``model_config`` loads:
    its LoRA (or fine-tuned denoiser) would be sampled on components it never trained with, and scored as
    if it were the run. The same model moved or copied passes: two local folders are compared by their
    configs' contents and weight files' sizes (not paths or times); two hub ids by name. A recorded
    folder that is not on this machine cannot be compared and passes."""
    import yaml

    from sipo.data.cache import model_fingerprint

    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    theirs = str(((yaml.safe_load(saved.read_text()) or {}).get("model") or {}).get("pretrained_path") or "")
    mine = str(model_config.pretrained_path)
    if not theirs or theirs == mine:
        return
    theirs_dir, mine_dir = Path(theirs).expanduser(), Path(mine).expanduser()

    def contents(folder: Path) -> dict:
        return {name: (value[0] if isinstance(value, list) else value) for name, value in model_fingerprint(str(folder)).items()}

    if theirs_dir.is_dir() and mine_dir.is_dir():
        differs = theirs_dir.resolve() != mine_dir.resolve() and contents(theirs_dir) != contents(mine_dir)
    else:  # a hub id against a hub id; a folder not here, or a folder against a hub id, cannot be told apart
        differs = not theirs_dir.exists() and not mine_dir.exists() and all(
            name.count("/") == 1 and not name.startswith((".", "/", "~")) for name in (theirs, mine))
    if differs:
        raise SipoError(f"{run_dir} was trained on the base model {theirs}, but the config loads {mine}, another model: "
                        f"the run's weights would be sampled on a base they were not trained with; pass the config the "
                        f"run was trained with (or model.pretrained_path={theirs})")


def check_generation_settings(output_dir: Path, settings: dict, prompts: list[str]) -> None:
    """Images on disk are reused only if made with the same model, run, sampler settings and prompts.

    ``generation.json`` records them on the first run; a later run may add prompts or seeds, nothing else.
    """
    record = output_dir / "generation.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        old_prompts = previous.pop("prompts", [])
        changed = sorted(k for k in set(settings) | set(previous) if settings.get(k) != previous.get(k))
        shared = min(len(old_prompts), len(prompts))
        if changed or old_prompts[:shared] != prompts[:shared]:
            what = ", ".join(changed) if changed else "the prompts"
            raise SipoError(f"{output_dir} holds images made with other settings ({what}); pass another --output-dir "
                            "or delete that one")
        prompts = prompts if len(prompts) >= len(old_prompts) else old_prompts
    record.write_text(json.dumps({**settings, "prompts": prompts}, indent=2))


def video_sample_sizes(config) -> dict[str, int]:
    """A video family samples clips of the size it trained on (``data.num_frames/height/width``, sides
    defaulting to ``model.resolution`` as the dataset's do), not its pipeline's 480p defaults; images: ``{}``."""
    from sipo.models import adapter_class
    from sipo.models.video import VideoAdapter

    if not issubclass(adapter_class(config.model.family), VideoAdapter):
        return {}
    sizes = {"height": config.data.height or config.model.resolution, "width": config.data.width or config.model.resolution}
    if config.data.num_frames:
        sizes["num_frames"] = config.data.num_frames
    return sizes


WEIGHTS_RECORD = "weights.json"
#: --dtype -> the dtype of the weights while sampling (plain casts, no autocast: fp16 also samples on a CPU)
SAMPLING_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weights_key(config, checkpoint: str | Path | None) -> dict:
    """What made a folder's outputs: ``{"weights": sha256, "checkpoint": "step-...", "run": path}`` for a
    run's trained weights, ``{"weights": "base", "model": path}`` for the base model alone.

    Stops with one sentence when ``checkpoint`` holds no checkpoint, before anything is sampled.
    """
    if checkpoint is None:
        return {"weights": "base", "model": str(config.model.pretrained_path)}
    from sipo.checkpoints import run_weights

    weights = run_weights(checkpoint)
    return {"weights": weights.sha256, "checkpoint": weights.checkpoint.name, "label": weights.label,
            "run": str(Path(checkpoint).resolve()), "path": str(weights.checkpoint.resolve())}


def measuring(checkpoint: str | Path, key: dict) -> str:
    """Which weights ``--checkpoint`` measures, in words (the rule of :func:`sipo.checkpoints.run_weights`)."""
    if key.get("checkpoint") == "best":
        return f"measuring {checkpoint}: {describe_weights(key)}, the weights train.keep_best kept"
    return (f"measuring {checkpoint}: {describe_weights(key)}, its newest checkpoint (pass {Path(checkpoint) / 'best'} "
            "for the weights train.keep_best kept, where it kept any)")


def default_output_dir(checkpoint: str | Path, name: str) -> Path:
    """``RUN/<name>`` for a run, ``RUN/<name>-best`` for ``RUN/best`` (best/ is replaced whole when a
    better step comes, so nothing of another command lives inside it)."""
    from sipo.checkpoints import is_best_dir, run_directory_of

    return run_directory_of(checkpoint) / (f"{name}-best" if is_best_dir(checkpoint) else name)


def _same_weights(previous: dict, key: dict) -> bool:
    return previous.get("weights") == key["weights"] and previous.get("model") == key.get("model")


def describe_weights(key: dict) -> str:
    if key.get("weights") == "base":
        return f"the base model {key.get('model')}"
    return f"{key.get('checkpoint', '?')} (weights sha256 {str(key.get('weights', '?'))[:12]})"


def claim_output_folder(folder: Path, key: dict, products: Sequence[str] | None = None) -> str | None:
    """Make ``folder`` hold outputs of the weights ``key`` names (:func:`weights_key`), and only those.

    ``folder/weights.json`` records whose outputs it holds. Outputs of other weights (or of weights
    nobody recorded) are moved, not deleted, to ``<folder>-<their label>`` beside it; ``products``
    names the entries sipo writes there (None: everything in the folder is sipo's). Returns the
    sentence to print when something moved, else None.
    """
    folder = Path(folder)
    record = folder / WEIGHTS_RECORD
    note = None
    if folder.is_dir():
        try:
            previous = json.loads(record.read_text())
            previous = previous if isinstance(previous, dict) else {}
        except (OSError, ValueError):
            previous = None
        if previous is not None and _same_weights(previous, key):
            return None
        entries = [e for e in folder.iterdir() if e.name != WEIGHTS_RECORD
                   and (products is None or e.name in products)]
        if entries:
            if previous is None:
                label = "unrecorded"
            else:
                label = previous.get("label") or ("base" if previous.get("weights") == "base" else
                                                   str(previous.get("weights", "unrecorded"))[:12])
            label = re.sub(r"[^A-Za-z0-9._-]", "_", str(label))  # a folder name, whatever the record says
            archive = folder.resolve().parent / f"{folder.resolve().name}-{label}"
            suffix = 1
            while archive.exists():
                suffix += 1
                archive = archive.with_name(f"{folder.resolve().name}-{label}-{suffix}")
            archive.mkdir(parents=True)
            for entry in entries:
                os.replace(entry, archive / entry.name)
            if record.is_file():
                os.replace(record, archive / WEIGHTS_RECORD)
            made_by = describe_weights(previous) if previous is not None else "weights sipo did not record"
            note = (f"{folder} held outputs of {made_by}, not of {describe_weights(key)}; they moved to "
                    f"{archive.name} beside it and are not reported")
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(key, indent=2))
    return note


def prepare_for_sampling(adapter, dtype: str) -> None:
    """Cast ``adapter``'s weights to ``dtype`` (``--dtype``: fp32, fp16, bf16; the modules the family keeps
    fp32 stay so) and put the denoiser in eval mode: what every model is sampled in."""
    keep = {id(m) for m in adapter.keep_fp32_modules()}
    for module in (adapter.denoiser, *adapter.frozen_modules()):
        if id(module) not in keep:
            module.to(SAMPLING_DTYPES[dtype])
    adapter.denoiser.eval()


def with_sampler_defaults(config, options):
    """``options`` with the family's sampler steps and guidance where the user named none
    (:func:`sipo.models.sampler_settings`); an explicit value wins. A copy: the caller's stays as given."""
    import dataclasses

    from sipo.models import sampler_settings

    return dataclasses.replace(options, **sampler_settings(config.model, options.num_inference_steps,
                                                           options.guidance_scale))


def check_eval_options(options: EvalOptions) -> None:
    """The command-line values a run could not use, refused before anything loads or samples."""
    import math

    if options.batch_size < 1 or (options.num_inference_steps is not None and options.num_inference_steps < 1):
        raise SipoError("--batch-size and --num-inference-steps must be at least 1")
    # None: the family's own (with_sampler_defaults fills it in)
    if options.guidance_scale is not None and (not math.isfinite(options.guidance_scale) or options.guidance_scale < 0):
        raise SipoError(f"--guidance-scale {options.guidance_scale} is not a finite number >= 0, and the report would "
                        "name a guidance the sampler never used; pass e.g. --guidance-scale 7.5 (1: unguided)")
    if not options.scorers and not options.video_benchmarks:  # sampling every image to score none
        raise SipoError("--scorers names no scorer, so nothing would be scored; pass e.g. --scorers pickscore")
    if options.dtype not in SAMPLING_DTYPES:
        raise SipoError(f"--dtype {options.dtype!r} is not valid; choose one of {list(SAMPLING_DTYPES)}")
    if options.max_prompts is not None and options.max_prompts < 1:
        raise SipoError(f"--max-prompts {options.max_prompts} would evaluate no prompt; pass a positive number, or leave "
                        "it out to use every prompt")


def check_scorers_loadable(scorers: Sequence[str], scorer_paths: dict[str, str]) -> None:
    """Every scorer can be loaded, checked before any sampling: a named directory exists, and a
    scorer without one either has a published checkpoint the hub (or, offline, its cache) holds, or
    stops now with the sentence its loader would give after an hour of sampling."""
    from sipo.models.base import require_hub_access
    from sipo.rewards import scorer_class

    for name in scorers:
        cls = scorer_class(name)  # unknown names stop here
        directory = scorer_paths.get(name)
        if directory is not None:
            if not Path(directory).expanduser().exists():  # a typo found now, not after an hour of sampling
                raise SipoError(f"{name} scorer directory {directory} does not exist; download the checkpoint "
                                f"docs/evaluation.md names and pass --scorer-path {name}=DIR")
            continue
        hub_ids = [h for h in (getattr(cls, "default_source", ""), getattr(cls, "default_tokenizer", None)) if h]
        for hub_id in hub_ids:
            require_hub_access(hub_id, f"the {name} scorer's checkpoint", f"pass --scorer-path {name}=DIR with the "
                               "files docs/evaluation.md lists")
        if not hub_ids:
            cls.load(None, "cpu")  # scorers with no published default stop here, in a second, naming their files


def eval_inputs(config, options: EvalOptions) -> list[tuple[str, str]] | None:
    """``--inputs`` read and checked against the family (one sentence when a family that edits or animates an
    input image gets none, or a text-only family gets some); ``None`` for plain ``--prompts``."""
    from sipo.data.pairs import family_needs_input_image

    needs = family_needs_input_image(config.model.family)
    if options.inputs is None:
        if needs:
            raise SipoError(f"model.family={config.model.family} edits or animates an input image; pass --inputs FILE "
                            '(one {"prompt": ..., "input_image": ...} per line) instead of --prompts')
        if options.prompts is None:
            raise SipoError("sipo eval needs prompts: pass --prompts FILE (one prompt per line) or pickapic-test")
        return None
    if not needs:
        raise SipoError(f"--inputs gives input images, and model.family={config.model.family} generates from text alone; "
                        "pass --prompts FILE, or use a family that takes one (qwenimage_edit, wan_i2v)")
    if options.prompts is not None:
        raise SipoError("--inputs carries the prompts with their input images; leave out --prompts")
    return read_inputs(options.inputs, options.max_prompts)


def input_image_loader(config) -> Callable[[str], Tensor]:
    """Path -> ``[3, H, W]`` in [-1, 1] at the size the run trains on (a clip frame's for a video family), through
    the data's own decoder; an unreadable picture stops in one sentence."""
    from sipo.data import video_spec
    from sipo.data.decode import MalformedRow, decode_input_image
    from sipo.data.pairs import media_of_family

    media = media_of_family(config.model.family)

    def load(path: str) -> Tensor:
        try:
            return decode_input_image(path, config.model.resolution, video_spec(config.data), media)
        except MalformedRow as problem:
            raise SipoError(f"--inputs names {path}, which cannot be used ({problem.reason}); replace it with a "
                            "readable picture") from None

    return load


def run_eval(config, options: EvalOptions) -> list[ScorerSummary]:
    """Generate, score and report (see the module docstring); returns one summary per scorer."""
    from sipo.models import DiffusionAdapter, adapter_from_config
    from sipo.rewards import load_scorer, scorer_class

    if not options.base_only and options.checkpoint is None:
        raise SipoError("sipo eval compares a trained run with its base: pass --checkpoint RUN_DIR (or --base to score the base only)")
    # Every check that needs no GPU, before anything loads or samples: local ones first, the network last.
    options = with_sampler_defaults(config, options)
    check_eval_options(options)
    for name in options.scorers:
        scorer_class(name)  # unknown names stop here
    unknown_paths = sorted(set(options.scorer_paths) - set(options.scorers))
    if unknown_paths:
        raise SipoError(f"--scorer-path names {unknown_paths[0]}, which is not in --scorers {options.scorers}; add it to --scorers")
    aligned_key = None
    if options.checkpoint is not None and not options.base_only:
        check_run_family(options.checkpoint, config.model.family)
        check_run_base(options.checkpoint, config.model)
        aligned_key = weights_key(config, options.checkpoint)  # no checkpoint in it: stop before the base half
    inputs = eval_inputs(config, options)
    prompts = [prompt for prompt, _ in inputs] if inputs else read_prompts(options.prompts, options.pickapic_path,
                                                                            options.max_prompts)
    samples = [Sample(i, seed, prompt, inputs[i][1] if inputs else None) for i, prompt in enumerate(prompts)
               for seed in options.seeds]
    output_dir = Path(options.output_dir or (default_output_dir(options.checkpoint, "eval") if options.checkpoint
                                             else Path(config.train.output_dir) / "eval"))
    from sipo.rundir import check_output_dir

    check_output_dir(output_dir, name="--output-dir")  # a file there: one sentence, not FileExistsError
    from sipo.rundir import model_numbers

    num_train_timesteps = model_numbers(config.model.pretrained_path)[0]
    if num_train_timesteps is not None and options.num_inference_steps > num_train_timesteps:
        raise SipoError(f"--num-inference-steps {options.num_inference_steps} is more than the model's "
                        f"{num_train_timesteps} training timesteps, which no sampler can take; pass at most "
                        f"{num_train_timesteps} (50 is the usual)")
    check_scorers_loadable(options.scorers, options.scorer_paths)
    models = ("base",) if options.base_only else MODELS
    sizes = video_sample_sizes(config)
    check_generation_settings(output_dir, {**generation_settings(config, options, sizes),
                                           **({"inputs": [image for _, image in inputs]} if inputs else {})}, prompts)
    if aligned_key is not None:
        print(f"sipo: {measuring(options.checkpoint, aligned_key)}")
        moved = claim_output_folder(output_dir / "images" / "aligned", aligned_key)
        if moved:
            print(f"sipo: {moved}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapter = adapter_from_config(config.model, config.data).to(device)

    def cast(model: DiffusionAdapter) -> None:
        prepare_for_sampling(model, options.dtype)

    cast(adapter)
    sample_options = {"num_inference_steps": options.num_inference_steps, "guidance_scale": options.guidance_scale, **sizes,
                      **({"input_loader": input_image_loader(config)} if inputs else {})}
    # Base first, then the run's weights go in: the same code path for LoRA and full fine-tunes.
    generate(adapter.sample, samples, output_dir, "base", options.batch_size, options.progress, **sample_options)
    if not options.base_only:
        todo = [s for s in samples if not picture_exists(output_dir, "aligned", s)]
        if todo:
            from sipo.checkpoints import load_run_weights

            load_run_weights(adapter, options.checkpoint, aligned_key["path"])
            cast(adapter)
            generate(adapter.sample, samples, output_dir, "aligned", options.batch_size, options.progress, **sample_options)
    del adapter
    if device.type == "cuda":
        torch.cuda.empty_cache()

    all_scores: dict[str, dict[str, Tensor]] = {}
    summaries = []
    for name in options.scorers:
        scorer = load_scorer(name, options.scorer_paths.get(name), device)
        all_scores[name] = {m: score_images(scorer, samples, output_dir, m, options.batch_size, options.progress)
                            for m in models}
        summaries.append(summarize(name, all_scores[name]))
        del scorer
    write_scores_csv(output_dir / "scores.csv", samples, models, all_scores, output_dir)
    table = markdown_table(summaries, models, len(samples))
    video_results = {}
    if options.video_benchmarks:
        from sipo.rewards.vbench import run_video_benchmarks

        videos = {m: [image_path(output_dir, m, s) for s in samples] for m in models}
        video_results = run_video_benchmarks(options.video_benchmarks, videos, [s.prompt for s in samples], output_dir)
        table += "\n\n" + video_table(video_results, models)
    run = "" if aligned_key is None else f" at {describe_weights(aligned_key)}"
    settings = (f"model {config.model.pretrained_path}; run {options.checkpoint}{run}; {len(prompts)} prompts x "
                f"{len(options.seeds)} seeds; {options.num_inference_steps} steps; guidance {options.guidance_scale}")
    (output_dir / "summary.md").write_text(f"# sipo eval\n\n{settings}\n\n{table}\n")
    (output_dir / "summary.json").write_text(json.dumps(
        {"settings": {"model": config.model.pretrained_path, "checkpoint": options.checkpoint,
                      "checkpoint_step": None if aligned_key is None else aligned_key["checkpoint"],
                      "weights_sha256": None if aligned_key is None else aligned_key["weights"],
                      "prompts": options.prompts, "num_prompts": len(prompts), "seeds": options.seeds,
                      "num_inference_steps": options.num_inference_steps, "guidance_scale": options.guidance_scale},
         "scorers": [s.__dict__ for s in summaries], "video_benchmarks": video_results}, indent=2))
    write_grid(output_dir / "grid.png", samples, models, output_dir)
    print(table)
    print(f"scores, table and grid in {output_dir}")
    return summaries
