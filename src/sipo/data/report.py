"""What a preference dataset skipped and why: `SkippedRow`, `DataReport` and the reason strings.

A malformed row never stops a (non-strict) run: it becomes a `SkippedRow` with one of the
reason strings below, and the `DataReport` counts it. The reasons are a closed set so that
counts group cleanly; the free-form detail goes into `SkippedRow.where`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# --- reason strings (stable: tests, docs/data.md and users' logs refer to them) --------------
MALFORMED_JSON = "malformed JSON line"
MISSING_FIELD = "missing field"
WRONG_FIELD_TYPE = "wrong field type"
INVALID_PATH = "invalid path"
PATH_ESCAPES_ROOT = "path escapes dataset root"
MISSING_FILE = "missing file"
CORRUPT_IMAGE = "corrupt image"
IMAGE_TOO_LARGE = "image too large"
IMAGE_TOO_SMALL = "image too small"
UNSUPPORTED_MODE = "unsupported image mode"
VIDEO_NEEDS_AV = "video support needs `pip install av`"
UNREADABLE_VIDEO = "unreadable video"
VIDEO_TOO_SHORT = "video too short"
PAIR_KIND_MISMATCH = "chosen and rejected differ in kind or frame count"
INVALID_LABEL = "invalid label_0"
UNREADABLE_SHARD = "unreadable parquet shard"
UNREADABLE_ROW_GROUP = "unreadable parquet row group"
UNREADABLE_TAR = "unreadable tar shard"
#: both sides decode to the same pixels (one file twice, or two copies): no preference to learn
IDENTICAL_PAIR = "chosen and rejected are the same picture"
#: the row's kind is not the model's: a picture for a video family, a clip for an image family
NOT_A_VIDEO = "a picture where the model needs a video clip"
NOT_A_PICTURE = "a video clip where the model needs a picture"

#: data.min_score_margin: the pair's |score margin| (sipo relabel) is below it, or the row has no scores
BELOW_MARGIN = "score margin below data.min_score_margin"
NO_SCORE = "no score columns (sipo relabel writes them)"

#: locations kept per reason so that a user can find a few of the offending rows
EXAMPLES_PER_REASON = 3


class MalformedRow(Exception):
    """A row's content cannot be used; ``reason`` is one of the strings in this module.

    Raised by the decoders (``sipo.data.decode``, ``sipo.data.video``) and turned into a
    `SkippedRow` by the dataset (or a `SipoError` when strict). It lives here, beside the reasons
    it carries, so the decoders share it without importing each other.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SkippedRow:
    """A row that could not be used, returned by ``dataset[i]`` in place of the pair.

    ``index`` is the dataset index (-1 for rows dropped while indexing, which have none);
    ``reason`` is one of the reason strings of this module; ``where`` locates the row in the
    user's files (e.g. ``"line 7 of data/pairs.jsonl (chosen: a.png)"``).
    """

    index: int
    reason: str
    where: str = ""


class DataReport:
    """Counts of what a preference dataset read, dropped, skipped and used.

    Index-time counts (rows read, ties dropped, rows skipped before they got an index) are fixed
    when the dataset is opened. Load-time counts (rows skipped or used when ``dataset[i]`` runs)
    are keyed by dataset index, so recording the same row twice — a second epoch, or the trainer
    calling :meth:`record` on a batch that ``dataset[i]`` already recorded — counts it once.
    With DataLoader workers, ``dataset[i]`` runs in other processes; call ``report.record(batch)``
    in the main process with each ``collate_pairs`` output to keep the report complete.
    """

    def __init__(self, source: str, data_format: str) -> None:
        self.source = source
        self.format = data_format
        self.rows_seen = 0
        self.ties_dropped = 0
        self.shards = 0
        self.pairs = 0
        self.index_skips: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._load_skips: dict[int, str] = {}
        self._loaded = np.zeros(0, dtype=bool)

    # --- filled in by the dataset ----------------------------------------------------------
    def skip_at_index_time(self, reason: str, where: str) -> None:
        """Count a row (or shard) dropped before it got a dataset index."""
        self.index_skips[reason] += 1
        self._remember(reason, where)

    def set_pairs(self, pairs: int) -> None:
        """Fix the number of candidate pairs (``len(dataset)``) once indexing is done."""
        self.pairs = pairs
        self._loaded = np.zeros(pairs, dtype=bool)

    def record(self, items: Mapping[str, Any] | Iterable[Any]) -> None:
        """Count loaded and skipped rows from a ``collate_pairs`` batch or a list of items.

        Items are pair dicts (with their ``index``) or `SkippedRow`s; each index counts once.
        """
        if isinstance(items, Mapping):
            skipped = items.get("skipped", [])
            loaded = items.get("indices", [])
        else:
            items = list(items)
            skipped = [item for item in items if isinstance(item, SkippedRow)]
            loaded = [item["index"] for item in items if not isinstance(item, SkippedRow)]
        for row in skipped:
            if row.index >= 0 and row.index not in self._load_skips:
                self._load_skips[row.index] = row.reason
                self._remember(row.reason, row.where)
        for index in loaded:
            if 0 <= index < len(self._loaded):
                self._loaded[index] = True

    def _remember(self, reason: str, where: str) -> None:
        examples = self.examples.setdefault(reason, [])
        if where and len(examples) < EXAMPLES_PER_REASON:
            examples.append(where)

    # --- read by users ---------------------------------------------------------------------
    @property
    def skipped(self) -> Counter[str]:
        """Skipped rows by reason, index-time and load-time together."""
        counts = Counter(self.index_skips)
        counts.update(self._load_skips.values())
        return counts

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def used(self) -> int:
        """Distinct pairs loaded successfully so far."""
        return int(self._loaded.sum())

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for logs and JSON."""
        return {
            "source": self.source,
            "format": self.format,
            "shards": self.shards,
            "rows_seen": self.rows_seen,
            "ties_dropped": self.ties_dropped,
            "pairs": self.pairs,
            "used": self.used,
            "skipped_total": self.skipped_total,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {reason: list(where) for reason, where in sorted(self.examples.items())},
        }

    def __str__(self) -> str:
        shards = f" in {self.shards} shard{'s' * (self.shards != 1)}" if self.format in ("pickapic", "webdataset") else ""
        text = (
            f"{self.format} {self.source}: {self.rows_seen} rows{shards}, "
            f"{self.ties_dropped} ties dropped, {self.pairs} pairs, {self.used} loaded"
        )
        if self.skipped:
            text += f", {self.skipped_total} skipped ({self.skip_summary()})"
        return text

    def skip_summary(self) -> str:
        """``"reason: count, ..."`` most frequent first, or ``"nothing skipped"``."""
        counts = self.skipped.most_common()
        return ", ".join(f"{reason}: {count}" for reason, count in counts) or "nothing skipped"

    def __repr__(self) -> str:
        return f"DataReport({self})"
