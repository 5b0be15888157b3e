"""JSONL manifests: one ``{"prompt": str, "chosen": path, "rejected": path}`` object per line.

A row may name an ``"input_image"`` (a picture path, shared by chosen and rejected): what an edit starts
from (Qwen-Image-Edit) or an image-to-video clip's first frame (Wan i2v). The conditioned families need
it on every row (a row without one is skipped, "missing field"); the others refuse a manifest with any.

Paths are relative to the manifest's directory, the dataset root, and may never leave it: a path
that is absolute outside the root, climbs out with ``..`` or goes through a symlink that points
outside is skipped ("path escapes dataset root"), so a manifest from elsewhere cannot make
training read arbitrary files. ``.gif`` paths load through PIL, a still GIF as a picture and an
animated one as a clip; ``.mp4``, ``.webm`` and ``.mov`` through PyAV when it is installed; clips are
sampled to the ``VideoSpec`` the config's ``data.num_frames``, ``data.fps``, ``data.height`` and
``data.width`` describe (`sipo.data.video`). Given the model's family, rows of the other kind
(pictures for a video model, clips for an image model) are dropped at open, and a manifest of
nothing else stops with one sentence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from sipo.data.decode import MalformedRow, decode_file, decode_input_image, media_of_path
from sipo.data.pairs import PreferenceDataset, check_input_images, family_needs_input_image, media_of_family
from sipo.data.sizes import original_size
from sipo.data.video import VideoSpec
from sipo.data.report import (
    BELOW_MARGIN,
    INVALID_PATH,
    MALFORMED_JSON,
    MISSING_FIELD,
    NO_SCORE,
    NOT_A_PICTURE,
    NOT_A_VIDEO,
    PATH_ESCAPES_ROOT,
    WRONG_FIELD_TYPE,
)
from sipo.errors import SipoError

FIELDS = ("prompt", "chosen", "rejected")


class _PackedStrings:
    """Many strings in one byte buffer plus offsets.

    A list of a million Python strings gets copied page by page into every forked DataLoader
    worker as reference counts change; one numpy buffer is shared untouched.
    """

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._buffer = np.zeros(0, dtype=np.uint8)
        self._offsets = np.zeros(1, dtype=np.int64)

    def append(self, text: str) -> None:
        self._pending.append(text.encode("utf-8", "surrogatepass"))

    def freeze(self) -> None:
        self._offsets = np.concatenate([[0], np.cumsum([len(b) for b in self._pending], dtype=np.int64)])
        self._buffer = np.frombuffer(b"".join(self._pending), dtype=np.uint8)
        self._pending = []

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode("utf-8", "surrogatepass")

    def __len__(self) -> int:
        return len(self._offsets) - 1


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root


class JsonlDataset(PreferenceDataset):
    """Preference pairs listed in a JSONL manifest (see the module docstring)."""

    format = "jsonl"

    def __init__(
        self,
        path: str,
        resolution: int,
        *,
        max_pairs: int | None = None,
        strict: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        video: VideoSpec | None = None,
        family: str | None = None,
        min_score_margin: float | None = None,
    ) -> None:
        super().__init__(path, resolution, strict=strict, random_flip=random_flip, seed=seed)
        self.video = video or VideoSpec()
        # the model's kind ("image"/"video"); None: each file's suffix (and a GIF's frames) decide
        self.family, self.media = family, media_of_family(family)
        self.min_score_margin = min_score_margin  # pairs whose |score margin| is below it are skipped (sipo relabel)
        scored = 0
        if not path:
            raise SipoError("data.path is empty; set data.path to a JSONL manifest of prompt/chosen/rejected rows")
        manifest = Path(path)
        if not manifest.is_file():
            what = "is a directory" if manifest.is_dir() else "does not exist"
            raise SipoError(f"data.path {path} {what}; set data.path to a JSONL manifest file")
        self._manifest = os.fspath(manifest)
        self._root = os.path.realpath(manifest.parent)
        self._prompts, self._chosen, self._rejected = _PackedStrings(), _PackedStrings(), _PackedStrings()
        self._inputs = _PackedStrings()  # each row's input_image path, "" where it has none
        self.needs_input = family_needs_input_image(family)
        with_input = 0
        lines: list[int] = []
        seeds: list[tuple[int, ...]] = []  # (chosen seed, rejected seed, noise dtype code, height, width) or -1s
        margins: list[float] = []  # each row's score margin, NaN where it has none
        with manifest.open("rb") as handle:  # bytes: one line of bad UTF-8 is one bad row
            for line_number, raw in enumerate(handle, start=1):
                if max_pairs is not None and len(lines) >= max_pairs:
                    break
                if not raw.strip():
                    continue
                self.report.rows_seen += 1
                row = self._parse(raw, f"line {line_number} of {self._manifest}")
                if row is not None and min_score_margin is not None:
                    margin = row[3]
                    scored += margin is not None
                    if margin is None or abs(margin) < min_score_margin:
                        self.report.skip_at_index_time(NO_SCORE if margin is None else BELOW_MARGIN,
                                                       f"line {line_number} of {self._manifest}")
                        row = None
                if row is not None:
                    lines.append(line_number)
                    seeds.append(row[4])
                    margins.append(float("nan") if row[3] is None else row[3])
                    for column, text in zip((self._prompts, self._chosen, self._rejected), row[:3]):
                        column.append(text)
                    self._inputs.append(row[5] or "")
                    with_input += bool(row[5])
        for column in (self._prompts, self._chosen, self._rejected, self._inputs):
            column.freeze()
        check_input_images(family, path, with_input, len(lines))
        self._lines = np.asarray(lines, dtype=np.int64)
        self._seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 5)
        self._margins = np.asarray(margins, dtype=np.float64)
        self.report.set_pairs(len(lines))
        wrong_kind = NOT_A_VIDEO if self.media == "video" else NOT_A_PICTURE
        if not lines and self.report.index_skips[wrong_kind]:
            have, need, other = (("pictures", "video clips", "an image family (sd15, sdxl)") if self.media == "video"
                                 else ("video clips", "pictures", "a video family (cogvideox, wan)"))
            raise SipoError(
                f"data.path {path} lists {have} (e.g. {self.report.examples[wrong_kind][0]}), but model.family="
                f"{family} trains on {need}; point data.path at a manifest of {need} or set model.family to {other}"
            )
        if min_score_margin is not None and not scored and self.report.rows_seen:
            raise SipoError(f"data.min_score_margin={min_score_margin} needs score columns (score_margin, or score_chosen "
                            f"and score_rejected) and {path} has none; score the pairs with `sipo relabel --config ... "
                            "--scorer NAME` and train on the manifest it writes, or unset data.min_score_margin")
        if not lines and min_score_margin is not None and self.report.index_skips[BELOW_MARGIN]:
            raise SipoError(f"every scored pair of {path} has |score_margin| below data.min_score_margin="
                            f"{min_score_margin}; lower it")
        if not lines:
            raise SipoError(
                f"no valid pairs in {path} ({self.report.rows_seen} non-empty lines, "
                f"{self.report.skip_summary()}); write one {{\"prompt\", \"chosen\", \"rejected\"}} "
                "object per line with paths relative to the manifest"
            )

    def _parse(self, raw: bytes, where: str) -> tuple[str, str, str, float | None, tuple[int, ...], str | None] | None:
        """The row's (prompt, chosen, rejected, score margin or None, stored-noise seeds, input_image or None),
        or None after counting why it is unusable."""
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
            self._raise_or_count(MALFORMED_JSON, where)
            return None
        if not isinstance(record, dict):
            self._raise_or_count(MALFORMED_JSON, f"{where} (not a JSON object)")
            return None
        missing = [name for name in FIELDS if name not in record]
        if missing:
            self._raise_or_count(MISSING_FIELD, f"{where} (no {', '.join(missing)})")
            return None
        wrong = [name for name in FIELDS if not isinstance(record[name], str)]
        if wrong:
            self._raise_or_count(WRONG_FIELD_TYPE, f"{where} ({', '.join(wrong)} must be strings)")
            return None
        for name in ("chosen", "rejected"):
            problem = self._path_problem(record[name]) or self._kind_problem(record[name])
            if problem is not None:
                self._raise_or_count(problem, f"{where} ({name}: {record[name]!r})")
                return None
        input_image = record.get("input_image")
        if input_image is not None:
            if not isinstance(input_image, str):
                self._raise_or_count(WRONG_FIELD_TYPE, f"{where} (input_image must be a string)")
                return None
            problem = self._path_problem(input_image) or (NOT_A_PICTURE if media_of_path(input_image) == "video" else None)
            if problem is not None:
                self._raise_or_count(problem, f"{where} (input_image: {input_image!r})")
                return None
        return (record["prompt"], record["chosen"], record["rejected"], _score_margin(record), _stored_noise(record),
                input_image)

    def _kind_problem(self, relative: str) -> str | None:
        """A picture for a video model or a clip for an image model, told by the suffix (a GIF may be either)."""
        kind = media_of_path(relative)
        if self.media is None or kind is None or kind == self.media:
            return None
        return NOT_A_VIDEO if self.media == "video" else NOT_A_PICTURE

    def _path_problem(self, relative: str) -> str | None:
        """Lexical checks, done once at open; symlinks are checked again when the file is read."""
        if not relative or "\x00" in relative:
            return INVALID_PATH
        try:
            os.fsencode(relative)
        except UnicodeEncodeError:
            return INVALID_PATH
        if not _inside(os.path.normpath(os.path.join(self._root, relative)), self._root):
            return PATH_ESCAPES_ROOT
        return None

    # --- per-pair reading ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._lines)

    def _where(self, index: int) -> str:
        return f"line {self._lines[index]} of {self._manifest}"

    def row_extras(self, index: int) -> dict | None:
        margin = float(self._margins[index])
        extras = {} if np.isnan(margin) else {"score_margin": margin}
        seeds = self._stored_noise_seeds(index)
        return {**extras, **seeds} if (extras or seeds) else None

    def _stored_noise_seeds(self, index: int) -> dict:
        chosen, rejected, dtype, height, width = (int(v) for v in self._seeds[index])
        if chosen < 0:
            return {}
        trained = self.video.size(self.resolution)
        if height > 0 and (height, width) != trained:
            # another size is another latent shape, whose draw is another tensor than the sampler's x_T
            return {"stored_noise_problem": f"{self._where(index)} was sampled at {height}x{width} px and trains at "
                                            f"{trained[0]}x{trained[1]}; set model.resolution (and data.height/width) "
                                            "to the size sipo pairs sampled at"}
        return {"chosen_seed": chosen, "rejected_seed": rejected, "noise_dtype": NOISE_DTYPE_NAMES[dtype]}

    def pair_key(self, index: int) -> str:
        return f"line {self._lines[index]} of {os.path.basename(self._manifest)}"

    def _load(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        chosen = self._read(self._chosen[index], "chosen")
        rejected = self._read(self._rejected[index], "rejected")
        if chosen.ndim != 3:  # a video: no SDXL size conditioning
            return self._prompts[index], chosen, rejected
        where = os.path.realpath(os.path.join(self._root, self._chosen[index]))
        return self._prompts[index], chosen, rejected, original_size(where)

    def _load_input(self, index: int) -> torch.Tensor | None:
        relative = self._inputs[index]
        if not relative:
            if self.needs_input:
                raise MalformedRow(MISSING_FIELD, "no input_image")
            return None
        real = os.path.realpath(os.path.join(self._root, relative))
        if not _inside(real, self._root):
            raise MalformedRow(PATH_ESCAPES_ROOT, f"input_image {relative!r} resolves to {real}")
        try:
            return decode_input_image(real, self.resolution, self.video, self.media)
        except MalformedRow as problem:
            raise MalformedRow(problem.reason, f"input_image {relative!r}: {problem.detail}") from None

    def _read(self, relative: str, which: str) -> torch.Tensor:
        real = os.path.realpath(os.path.join(self._root, relative))
        if not _inside(real, self._root):
            raise MalformedRow(PATH_ESCAPES_ROOT, f"{which} {relative!r} resolves to {real}")
        try:
            return decode_file(real, self.resolution, self.video, self.media)
        except MalformedRow as problem:
            raise MalformedRow(problem.reason, f"{which} {relative!r}: {problem.detail}") from None


def _score_margin(record: dict) -> float | None:
    """The row's score margin as ``sipo relabel`` writes it, or None when it carries no scores."""
    def number(name):
        value = record.get(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    margin = number("score_margin")
    if margin is None and number("score_chosen") is not None and number("score_rejected") is not None:
        margin = number("score_chosen") - number("score_rejected")
    return margin


#: ``noise_dtype`` values a row may carry (the dtype ``sipo pairs``' pipeline drew its starting noise in)
NOISE_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _stored_noise(record: dict) -> tuple[int, int, int, int, int]:
    """``(chosen_seed, rejected_seed, noise dtype code, height, width)`` as ``sipo pairs`` writes them
    (``-1`` for a size the row does not record), or ``-1`` seeds when the row has no usable pair of
    seeds (integers in [0, 2**63))."""
    chosen, rejected = record.get("chosen_seed"), record.get("rejected_seed")
    usable = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in (chosen, rejected))
    dtype = record.get("noise_dtype", "float32")
    if not usable or dtype not in NOISE_DTYPE_NAMES:
        return -1, -1, 0, -1, -1
    height, width = record.get("height"), record.get("width")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31 for v in (height, width)):
        height = width = -1
    return chosen, rejected, NOISE_DTYPE_NAMES.index(dtype), height, width


def listed_pictures(manifest: str | os.PathLike[str]) -> list[Path]:
    """The files a manifest's rows name (``chosen``, ``rejected`` and ``input_image``, resolved against its
    folder, each once, in order), for the latent cache's key; rows that are not usable objects are passed over."""
    root = Path(manifest).parent
    found: dict[Path, None] = {}
    with open(manifest, "rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if not isinstance(record, dict):
                continue
            for name in ("chosen", "rejected", "input_image"):
                value = record.get(name)
                if isinstance(value, str) and value and "\x00" not in value:
                    found[root / value] = None
    return list(found)
