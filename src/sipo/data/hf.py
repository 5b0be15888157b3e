"""Preference pairs through Hugging Face ``datasets``: a hub id, a hub-layout folder, or a ``save_to_disk`` folder.

``data.path`` is one of

- a ``save_to_disk`` folder (it holds ``dataset_info.json`` or ``dataset_dict.json``): `datasets.load_from_disk`;
- any other local folder, laid out as the hub lays datasets out (``data/train-00000-of-00003.parquet``,
  ``.arrow`` files, ...): ``datasets.load_dataset(folder, split=data.split)``;
- anything else is a hub id (``yuvalkirstain/pickapic_v2``): ``datasets.load_dataset(id, split=...)``,
  which needs the network (or the hub cache with ``HF_HUB_OFFLINE=1``).

Columns: ``data.columns`` maps ``prompt``, ``chosen``, ``rejected``, ``label`` and ``input_image`` to the
dataset's column names (``input_image``: the picture both sides edit or animate, for the conditioned
families; by default the column named ``input_image`` where there is one). Unset keys follow the layout the columns show: Pick-a-Pic v2's (``caption``, ``jpg_0``,
``jpg_1``, ``label_0``) when ``jpg_0`` and ``jpg_1`` exist, else the chosen/rejected layout
(``prompt``, ``chosen``, ``rejected``, no label). With a label column, ``chosen`` and ``rejected`` name
the first and the second picture and the label is the first one's preference: 1 the first won, 0 the
second, 0.5 a tie (dropped, as Pick-a-Pic's ``label_0``). Without one, ``chosen`` is the winner.

Pictures may be raw bytes, ``datasets.Image`` features (read undecoded, as ``{bytes, path}``, so the one
decoder of ``sipo.data.decode`` sees every picture), or file paths; videos are paths (``.mp4``, ``.gif``,
...). Paths are relative to the dataset folder and may not leave it (as in a JSONL manifest).

``data.streaming=true`` reads the same rows as an iterable stream instead (`HfStreamingPairs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sipo.data.decode import MalformedRow, decode_file, decode_image, decode_input_image, media_of_path
from sipo.data.pairs import PreferenceDataset, check_input_images, family_needs_input_image, media_of_family
from sipo.data.report import INVALID_LABEL, INVALID_PATH, MISSING_FIELD, NOT_A_PICTURE, NOT_A_VIDEO, PATH_ESCAPES_ROOT, WRONG_FIELD_TYPE
from sipo.data.sizes import original_size
from sipo.data.video import VideoSpec
from sipo.errors import SipoError

COLUMN_KEYS = ("prompt", "chosen", "rejected", "label", "input_image")
#: the column read as the pairs' input image when data.columns.input_image is unset
INPUT_IMAGE_COLUMN = "input_image"
#: Pick-a-Pic v2 on the hub: caption, the two pictures, label_0 = preference for jpg_0
PICKAPIC_COLUMNS = {"prompt": "caption", "chosen": "jpg_0", "rejected": "jpg_1", "label": "label_0"}
#: the chosen/rejected layout (diffusers' DPO example datasets, TRL-style pairs): chosen is the winner
PAIR_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "label": None}
#: files that mark a `save_to_disk` folder
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def need_datasets():
    """The ``datasets`` module, or one sentence on installing it."""
    try:
        import datasets
    except ImportError:
        raise SipoError("data.format=hf needs the datasets library; run pip install 'sipo[hf]' "
                        "(or pip install datasets)") from None
    return datasets


def is_saved_folder(path: str) -> bool:
    """Whether ``path`` is a folder `datasets.Dataset.save_to_disk` (or a DatasetDict's) wrote."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).is_file() for name in SAVED_MARKERS)


def is_local(path: str) -> bool:
    """A local folder or file (else ``data.path`` is read as a hub id)."""
    return Path(path).expanduser().exists()


def resolve_columns(available: list[str], configured: dict[str, str | None]) -> dict[str, str | None]:
    """The column of each of prompt/chosen/rejected/label: ``data.columns`` over the detected layout."""
    layout = PICKAPIC_COLUMNS if {"jpg_0", "jpg_1"} <= set(available) else PAIR_COLUMNS
    found = {"input_image": INPUT_IMAGE_COLUMN if INPUT_IMAGE_COLUMN in available else None}
    return {**layout, **found, **configured}


def open_hf(path: str, split: str, streaming: bool = False):
    """``path`` opened with `datasets` as one split: a ``Dataset`` (or ``IterableDataset`` when streaming).

    Every failure a user can cause (a missing split, an unreachable hub, an unreadable folder) is one
    `SipoError` sentence.
    """
    datasets = need_datasets()
    if not path:
        raise SipoError("data.path is empty; set data.path to a hub dataset id, a dataset folder or a save_to_disk folder")
    if is_saved_folder(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, path)
        return loaded.to_iterable_dataset() if streaming else loaded
    local = is_local(path)
    try:
        try:  # the one split only: a hub id then downloads that split's files, not every split's
            return datasets.load_dataset(path, split=split, streaming=streaming)
        except ValueError as error:
            if "split" not in str(error).lower():
                raise
            names = list(datasets.get_dataset_split_names(path))
        if split == "validation" and len(names) == 1:  # data.validation_path: a folder of held-out pairs only
            return datasets.load_dataset(path, split=names[0], streaming=streaming)
        raise SipoError(f"data.path {path} has no {split} split (it has {', '.join(names)}); set data.split to one of them")
    except FileNotFoundError as error:  # an empty folder, an id the hub does not have
        raise SipoError(f"data.path {path} holds no dataset datasets can read ({str(error)[:200]}); point data.path "
                        "at parquet/arrow files laid out as on the hub (data/train-00000-of-00001.parquet), or "
                        "check the hub id") from None
    except (ConnectionError, OSError) as error:
        if local:
            raise SipoError(f"data.path {path} cannot be read as a dataset folder ({type(error).__name__}: "
                            f"{str(error)[:200]}); point data.path at parquet/arrow files laid out as on the hub") from None
        raise SipoError(f"data.path {path} is no local folder and the hub cannot be reached ({str(error)[:160]}); "
                        "connect to the network, or download it first and point data.path at the folder") from None
    except ValueError as error:  # an unknown builder, unreadable files
        raise SipoError(f"data.path {path} holds no dataset datasets can read ({str(error)[:200]}); point data.path "
                        "at parquet/arrow files laid out as on the hub (data/train-00000-of-00001.parquet)") from None


def _pick_split(splits, split: str, path: str):
    names = list(splits.keys())
    if split in names:
        return splits[split]
    if split == "validation" and len(names) == 1:  # data.validation_path: a folder of held-out pairs only
        return splits[names[0]]
    raise SipoError(f"data.path {path} has no {split} split (it has {', '.join(names)}); set data.split to one of them")


def column_kinds(features) -> dict[str, str]:
    """Each column's kind: ``text``, ``number``, ``bytes``, ``image`` (an Image feature), ``video``,
    ``media`` (a struct with bytes/path) or ``other``."""
    datasets = need_datasets()
    kinds = {}
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            kinds[name] = "image"
        elif isinstance(feature, datasets.Video):
            kinds[name] = "video"
        elif isinstance(feature, datasets.Value):
            dtype = feature.dtype
            kinds[name] = ("text" if dtype in ("string", "large_string") else "bytes" if "binary" in dtype
                           else "number" if dtype.startswith(("float", "int", "uint", "bool")) else "other")
        elif isinstance(feature, dict) and ("bytes" in feature or "path" in feature):
            kinds[name] = "media"
        else:
            kinds[name] = "other"
    return kinds


_ACCEPTED = {"prompt": ("text",), "chosen": ("bytes", "image", "video", "media", "text"),
             "rejected": ("bytes", "image", "video", "media", "text"), "label": ("number",),
             "input_image": ("bytes", "image", "media", "text")}
_EXPECTED = {"prompt": "text", "chosen": "image bytes, an Image feature or file paths",
             "rejected": "image bytes, an Image feature or file paths", "label": "a number",
             "input_image": "image bytes, an Image feature or file paths"}


def check_columns(path: str, features, columns: dict[str, str | None]) -> None:
    """Stop with one sentence when a mapped column is missing or of the wrong kind."""
    kinds = column_kinds(features)
    for key in COLUMN_KEYS:
        name = columns.get(key)
        if name is None:
            if key in ("label", "input_image"):
                continue
            raise SipoError(f"data.columns.{key} is null, but pairs need a {key} column; set it to one of {list(kinds)}")
        if name not in kinds:
            raise SipoError(f"data.path {path} has no column {name!r} (data.columns.{key}); its columns are "
                            f"{list(kinds)}: set data.columns.{key} to the one holding the {key}")
        if kinds[name] not in _ACCEPTED[key]:
            raise SipoError(f"data.path {path} column {name!r} (data.columns.{key}) holds {features[name]}, expected "
                            f"{_EXPECTED[key]}; set data.columns.{key} to another column")


def undecoded(dataset, columns: dict[str, str | None]):
    """``dataset`` with its Image/Video columns read as ``{bytes, path}``: sipo decodes every picture itself."""
    datasets = need_datasets()
    for key in ("chosen", "rejected", "input_image"):
        if columns.get(key) is None:
            continue
        feature = dataset.features[columns[key]]
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(columns[key], datasets.Image(decode=False))
        elif isinstance(feature, datasets.Video) and feature.decode:
            dataset = dataset.cast_column(columns[key], datasets.Video(decode=False))
    return dataset


def decided_rows(labels: np.ndarray, report, raise_or_count, where) -> tuple[np.ndarray, np.ndarray]:
    """(rows kept, first picture won) of a label column: ties dropped and counted, invalid labels skipped."""
    report.rows_seen += len(labels)
    valid = np.isfinite(labels) & (labels >= 0.0) & (labels <= 1.0)
    for row in np.flatnonzero(~valid):
        raise_or_count(INVALID_LABEL, f"{where(int(row))} (label={labels[row]})")
    tie = valid & (labels == 0.5)
    report.ties_dropped += int(tie.sum())
    rows = np.flatnonzero(valid & ~tie).astype(np.int64)
    return rows, labels[rows] > 0.5


def label_values(column) -> np.ndarray:
    """A label column (arrow) as float64, nulls as NaN (counted as invalid labels)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.Table):
        column = column.column(0)
    return np.asarray(pc.fill_null(column.cast(pa.float64()), float("nan")).to_numpy(), dtype=np.float64)


class MediaReader:
    """Turns one picture cell (bytes, ``{bytes, path}``, a path) into a tensor, paths inside ``root``."""

    def __init__(self, root: str | None, resolution: int, video: VideoSpec, media: str | None) -> None:
        self.root = os.path.realpath(root) if root else None
        self.resolution, self.video, self.media = resolution, video, media

    def read_input(self, cell: Any) -> torch.Tensor:
        """An input image cell (bytes, ``{bytes, path}``, a path inside ``root``) -> ``[3, H, W]`` (`decode_input_image`)."""
        if isinstance(cell, dict):
            cell = cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
        if cell is None:
            raise MalformedRow(MISSING_FIELD, "input_image is null")
        if hasattr(cell, "getexif") and hasattr(cell, "save"):
            cell = _png_bytes(cell)
        if isinstance(cell, (bytes, bytearray, memoryview)):
            return decode_input_image(bytes(cell), self.resolution, self.video, self.media)
        if not isinstance(cell, str) or not cell or "\x00" in cell:
            raise MalformedRow(WRONG_FIELD_TYPE if not isinstance(cell, str) else INVALID_PATH, "input_image")
        if self.root is None:
            raise MalformedRow(INVALID_PATH, f"input_image {cell!r} is a path, but the dataset has no local folder")
        real = os.path.realpath(os.path.join(self.root, cell))
        if os.path.commonpath([self.root, real]) != self.root:
            raise MalformedRow(PATH_ESCAPES_ROOT, f"input_image {cell!r} resolves to {real}")
        try:
            return decode_input_image(real, self.resolution, self.video, self.media)
        except MalformedRow as problem:
            raise MalformedRow(problem.reason, f"input_image {cell!r}: {problem.detail}") from None

    def read(self, cell: Any, which: str) -> tuple[torch.Tensor, Any]:
        """(tensor, what `original_size` reads: the bytes or the file)."""
        if isinstance(cell, dict):  # an undecoded Image/Video feature; a clip is read from its file
            path = cell.get("path")
            clip = isinstance(path, str) and media_of_path(path) != "image"
            cell = path if clip or cell.get("bytes") is None else cell.get("bytes")
        if cell is None:
            raise MalformedRow(MISSING_FIELD, f"{which} is null")
        if hasattr(cell, "getexif") and hasattr(cell, "save"):  # a decoded PIL image (features sipo could not see)
            cell = _png_bytes(cell)
        if isinstance(cell, (bytes, bytearray, memoryview)):
            if self.media == "video":
                raise MalformedRow(NOT_A_VIDEO, f"{which} holds picture bytes")
            return decode_image(bytes(cell), self.resolution), bytes(cell)
        if not isinstance(cell, str):
            raise MalformedRow(WRONG_FIELD_TYPE, f"{which} is {type(cell).__name__}, not bytes or a path")
        return self._read_path(cell, which)

    def _read_path(self, relative: str, which: str) -> tuple[torch.Tensor, Any]:
        if not relative or "\x00" in relative:
            raise MalformedRow(INVALID_PATH, f"{which} {relative!r}")
        kind = media_of_path(relative)
        if self.media is not None and kind is not None and kind != self.media:
            raise MalformedRow(NOT_A_VIDEO if self.media == "video" else NOT_A_PICTURE, f"{which} {relative!r}")
        if self.root is None:
            raise MalformedRow(INVALID_PATH, f"{which} {relative!r} is a path, but the dataset has no local folder")
        real = os.path.realpath(os.path.join(self.root, relative))
        if os.path.commonpath([self.root, real]) != self.root:
            raise MalformedRow(PATH_ESCAPES_ROOT, f"{which} {relative!r} resolves to {real}")
        try:
            return decode_file(real, self.resolution, self.video, self.media), real
        except MalformedRow as problem:
            raise MalformedRow(problem.reason, f"{which} {relative!r}: {problem.detail}") from None


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def dataset_root(path: str) -> str | None:
    """The folder relative picture paths are read from: the dataset folder (None for a hub id)."""
    target = Path(path).expanduser()
    if target.is_dir():
        return os.fspath(target)
    return os.fspath(target.parent) if target.exists() else None


class HfDataset(PreferenceDataset):
    """Preference pairs of a `datasets` split, read by row (see the module docstring)."""

    format = "hf"

    def __init__(
        self,
        path: str,
        resolution: int,
        *,
        max_pairs: int | None = None,
        strict: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        split: str = "train",
        columns: dict[str, str | None] | None = None,
        video: VideoSpec | None = None,
        family: str | None = None,
    ) -> None:
        super().__init__(path, resolution, strict=strict, random_flip=random_flip, seed=seed)
        self.split = split
        table = open_hf(path, split)
        self.columns = resolve_columns(table.column_names, dict(columns or {}))
        check_columns(path, table.features, self.columns)
        table = undecoded(table, self.columns)
        self._reader = MediaReader(dataset_root(path), resolution, video or VideoSpec(), media_of_family(family))
        label = self.columns["label"]
        if label is not None:
            labels = label_values(table.with_format("arrow")[label])
            rows, first_won = decided_rows(labels, self.report, self._raise_or_count, self._where_row)
        else:
            self.report.rows_seen += len(table)
            rows, first_won = np.arange(len(table), dtype=np.int64), np.ones(len(table), dtype=bool)
        if max_pairs is not None:
            rows, first_won = rows[:max_pairs], first_won[:max_pairs]
        self._row, self._first_won = rows, first_won
        self._table = table.select_columns([self.columns[key] for key in ("prompt", "chosen", "rejected")])
        self.needs_input = family_needs_input_image(family)
        input_column = self.columns.get("input_image")
        self._inputs = table.select_columns([input_column]) if input_column is not None else None
        check_input_images(family, path, len(rows) if input_column is not None else 0, len(rows))
        self.report.shards = len(table.cache_files) or 1
        self.report.set_pairs(len(rows))
        if len(rows) == 0:
            report = self.report
            if report.rows_seen > 0 and report.ties_dropped == report.rows_seen:
                raise SipoError(f"all {report.rows_seen} pairs in {path} are ties (label 0.5), which carry no preference; "
                                "point data.path at pairs with decided labels")
            raise SipoError(f"no valid pairs in {path} ({report.rows_seen} rows, {report.ties_dropped} ties, "
                            f"{report.skip_summary()}); point data.path at a dataset of preference pairs")

    def __len__(self) -> int:
        return len(self._row)

    def _where_row(self, row: int) -> str:
        return f"row {row} of {self.source} ({self.split})"

    def _where(self, index: int) -> str:
        return self._where_row(int(self._row[index]))

    def pair_key(self, index: int) -> str:  # a hub id names itself; a folder by its last part
        return f"row {int(self._row[index])} of {os.path.basename(os.path.normpath(str(self.source)))} ({self.split})"

    def _load(self, index: int):
        record = self._table[int(self._row[index])]
        return load_pair(record, self.columns, bool(self._first_won[index]), self._reader)

    def _load_input(self, index: int) -> torch.Tensor | None:
        if self._inputs is None:
            return None
        return load_input(self._inputs[int(self._row[index])], self.columns, self._reader)


def load_input(record: dict[str, Any], columns: dict[str, str | None], reader: MediaReader) -> torch.Tensor | None:
    """The input image of one row (``None`` without an input_image column); raises `MalformedRow`
    (a null cell: "missing field"), as a bad picture of the pair does."""
    column = columns.get("input_image")
    if column is None:
        return None
    return reader.read_input(record.get(column))


def load_pair(record: dict[str, Any], columns: dict[str, str | None], first_won: bool, reader: MediaReader):
    """(prompt, chosen, rejected[, original size]) of one row; raises `MalformedRow`."""
    prompt = record.get(columns["prompt"])
    if not isinstance(prompt, str):
        raise MalformedRow(MISSING_FIELD if prompt is None else WRONG_FIELD_TYPE, "prompt is not text")
    first, second = record.get(columns["chosen"]), record.get(columns["rejected"])
    winner, loser = (first, second) if first_won else (second, first)
    chosen, source = reader.read(winner, "chosen")
    rejected, _ = reader.read(loser, "rejected")
    if chosen.ndim != 3:  # a clip: no SDXL size conditioning
        return prompt, chosen, rejected
    return prompt, chosen, rejected, original_size(source)
