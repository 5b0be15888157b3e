"""Pick-a-Pic v2 parquet shards: ``caption``, ``jpg_0``, ``jpg_1`` (encoded images), ``label_0``.

``label_0 == 1`` means ``jpg_0`` won, ``0`` means ``jpg_1`` won, ``0.5`` is a tie (dropped, as in
Diffusion-DPO). Opening reads only the ``label_0`` column of each shard; image bytes are read
per row when the pair is requested, one row group at a time through a memory map, with a small
per-process cache of open files and of the last row groups (so the dataset scales to hundreds
of shards and DataLoader workers do not share file handles).
"""

from __future__ import annotations

import glob
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sipo.data.decode import MalformedRow, decode_image
from sipo.data.pairs import PreferenceDataset
from sipo.data.sizes import original_size
from sipo.data.report import (
    BELOW_MARGIN,
    INVALID_LABEL,
    MISSING_FIELD,
    NO_SCORE,
    UNREADABLE_ROW_GROUP,
    UNREADABLE_SHARD,
)
from sipo.errors import SipoError

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
_READ_COLUMNS = ["caption", "jpg_0", "jpg_1"]
#: open shard files kept per process; older ones are closed
OPEN_FILES = 8
#: decoded row groups kept per process (sequential reads hit it; a row group holds many rows)
CACHED_ROW_GROUPS = 2


#: the split names of the Hugging Face hub layout (``data/<split>-00000-of-00014-<hash>.parquet``);
#: Pick-a-Pic v2 has train, validation, test, validation_unique and test_unique
SPLIT_NAMES = frozenset({"train", "validation", "valid", "val", "dev", "test", "validation_unique", "test_unique"})
#: the splits ``sipo eval --prompts pickapic-test`` reads (its captions are deduplicated)
TEST_SPLITS = ("test", "test_unique")


def shard_split(path: Path) -> str | None:
    """The split a shard's file name declares (``train-00000-of-00645.parquet``: train), or None."""
    prefix = Path(path).stem.split("-", 1)[0].lower()
    return prefix if prefix in SPLIT_NAMES else None


def select_split(shards: list[Path], split: str | tuple[str, ...], where: str, fix: str | None = None) -> list[Path]:
    """The shards of ``split`` (one name or several), plus those whose name declares no split.

    Shards named for other splits are left out: the hub layout keeps train, validation and test side
    by side, and reading them all trains (or evaluates) on every split at once. Raises `SipoError`
    when shards declare splits but none of ``split``; ``fix`` is the advice that ends the sentence.
    """
    wanted = tuple(name.lower() for name in ((split,) if isinstance(split, str) else split))
    found = sorted({shard_split(p) for p in shards} - {None})
    kept = [p for p in shards if shard_split(p) in wanted or shard_split(p) is None]
    if found and not kept:
        fix = fix or f"set data.split to one of {', '.join(found)}"
        raise SipoError(f"{where} holds {', '.join(found)} shards but none of the {' or '.join(wanted)} split; {fix}")
    return kept


def find_shards(path: str, split: str | tuple[str, ...] = "train", fix: str | None = None) -> list[Path]:
    """The .parquet files named by ``path`` (one file, a directory's files, or a glob) of ``split``.

    Files whose names declare another split (`shard_split`) are left out; see `select_split`.
    """
    return select_split(_named_shards(path), split, f"data.path {path}", fix)


def _named_shards(path: str) -> list[Path]:
    if not path:
        raise SipoError("data.path is empty; set data.path to a .parquet file, a directory of shards or a glob")
    if glob.has_magic(path):
        shards = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not shards:
            raise SipoError(f"data.path {path} matches no files; fix the glob or point data.path at the shards")
        return shards
    target = Path(path)
    if target.is_file():
        return [target]
    if target.is_dir():
        shards = sorted(p for p in target.glob("*.parquet") if p.is_file())
        if shards:
            return shards
        nested = sorted(target.rglob("*.parquet"))
        if nested:
            # Not recursive on purpose: a dataset snapshot holds train, validation and test
            # shards side by side, and mixing them silently would leak the test split.
            raise SipoError(
                f"{target} has no .parquet files directly inside (found some below, e.g. {nested[0]}); "
                f"set data.path to that folder or a glob such as {nested[0].parent}/train-*.parquet"
            )
        raise SipoError(f"{target} contains no .parquet files; set data.path to a directory of Pick-a-Pic shards")
    raise SipoError(f"data.path {path} does not exist; set data.path to a .parquet file, a directory of shards or a glob")


def _column_type_problem(name: str, kind: pa.DataType) -> str | None:
    if name == "caption":
        ok = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
        return None if ok else "text"
    if name == "label_0":
        return None if pa.types.is_floating(kind) or pa.types.is_integer(kind) else "a number"
    # Image columns: raw bytes, or Hugging Face's Image feature struct<bytes, path>.
    if _is_binary(kind):
        return None
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _is_binary(kind.field("bytes").type):
        return None
    return "image bytes"


def _is_binary(kind: pa.DataType) -> bool:
    return (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_binary_view(kind)
        or pa.types.is_fixed_size_binary(kind)
    )


class PickapicDataset(PreferenceDataset):
    """Preference pairs from Pick-a-Pic v2 style parquet shards (see the module docstring)."""

    format = "pickapic"

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
        min_score_margin: float | None = None,
    ) -> None:
        super().__init__(path, resolution, strict=strict, random_flip=random_flip, seed=seed)
        self.min_score_margin = min_score_margin  # rows whose |score_margin| is below it are skipped (sipo relabel)
        self._scored_rows = 0
        shards = find_shards(path, split)
        self._shard_paths: list[str] = []
        self._row_group_starts: list[np.ndarray] = []
        shard_of_pair, row_of_pair, winner_is_0 = [], [], []
        total = 0
        for shard in shards:
            if max_pairs is not None and total >= max_pairs:
                break
            labelled = self._index_shard(shard)
            if labelled is None:
                continue
            rows, first_won = labelled
            if max_pairs is not None:
                rows, first_won = rows[: max_pairs - total], first_won[: max_pairs - total]
            shard_of_pair.append(np.full(len(rows), len(self._shard_paths) - 1, dtype=np.int32))
            row_of_pair.append(rows)
            winner_is_0.append(first_won)
            total += len(rows)
        self._shard = np.concatenate(shard_of_pair) if shard_of_pair else np.zeros(0, np.int32)
        self._row = np.concatenate(row_of_pair) if row_of_pair else np.zeros(0, np.int64)
        self._winner_is_0 = np.concatenate(winner_is_0) if winner_is_0 else np.zeros(0, bool)
        self.report.shards = len(shards)
        self.report.set_pairs(len(self._row))
        if min_score_margin is not None and not self._scored_rows and self.report.rows_seen:
            raise SipoError(f"data.min_score_margin={min_score_margin} needs a score_margin (or score_0 and score_1) "
                            f"column and the shards of {path} have none; score the pairs with `sipo relabel --config "
                            "... --scorer NAME` and train on the shard it writes, or unset data.min_score_margin")
        if not len(self._row) and min_score_margin is not None and self.report.index_skips[BELOW_MARGIN]:
            raise SipoError(f"every scored pair of {path} has |score_margin| below data.min_score_margin="
                            f"{min_score_margin}; lower it")
        if len(self._row) == 0:
            report = self.report
            if report.rows_seen > 0 and report.ties_dropped == report.rows_seen:
                raise SipoError(
                    f"all {report.rows_seen} pairs in {path} are ties (label_0 == 0.5), which carry no "
                    "preference; point data.path at shards with decided labels"
                )
            raise SipoError(
                f"no valid pairs in {path} ({report.rows_seen} rows, {report.ties_dropped} ties, "
                f"{report.skip_summary()}); point data.path at readable Pick-a-Pic shards"
            )
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._row_groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def _index_shard(self, shard: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """Read one shard's labels; returns (rows kept, jpg_0 won) or None for an unreadable shard."""
        try:
            parquet = pq.ParquetFile(shard)
        except (OSError, pa.ArrowException) as error:
            self._raise_or_count(UNREADABLE_SHARD, f"shard {shard} ({type(error).__name__})")
            return None
        try:
            self._check_schema(shard, parquet.schema_arrow)
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            column = parquet.read(columns=["label_0"]).column("label_0")
            labels = pc.fill_null(column.cast(pa.float64()), float("nan")).to_numpy()
        except (OSError, pa.ArrowException) as error:
            self._raise_or_count(UNREADABLE_SHARD, f"shard {shard} ({type(error).__name__})")
            return None
        finally:
            parquet.close()
        self._shard_paths.append(os.fspath(shard))
        self._row_group_starts.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

        report = self.report
        report.rows_seen += len(labels)
        valid = np.isfinite(labels) & (labels >= 0.0) & (labels <= 1.0)
        for row in np.flatnonzero(~valid):
            self._raise_or_count(INVALID_LABEL, f"row {row} of shard {shard} (label_0={labels[row]})")
        tie = valid & (labels == 0.5)
        report.ties_dropped += int(tie.sum())
        keep = valid & ~tie
        if self.min_score_margin is not None:
            keep &= self._margin_keeps(shard, keep)
        rows = np.flatnonzero(keep).astype(np.int64)
        return rows, labels[rows] > 0.5

    def _margin_keeps(self, shard: Path, candidates: np.ndarray) -> np.ndarray:
        """``data.min_score_margin``: which rows' |score margin| reaches it; the others are counted."""
        parquet = pq.ParquetFile(shard)
        try:
            names = parquet.schema_arrow.names
            if "score_margin" in names:
                margin = parquet.read(columns=["score_margin"]).column(0).cast(pa.float64())
                margin = pc.fill_null(margin, float("nan")).to_numpy()
            elif "score_0" in names and "score_1" in names:
                table = parquet.read(columns=["score_0", "score_1"])
                margin = (pc.fill_null(table.column(0).cast(pa.float64()), float("nan")).to_numpy()
                          - pc.fill_null(table.column(1).cast(pa.float64()), float("nan")).to_numpy())
            else:
                margin = np.full(len(candidates), np.nan)
        finally:
            parquet.close()
        scored = np.isfinite(margin)
        self._scored_rows += int(scored.sum())  # the shard has scores at all (ties included)
        keep = scored & (np.abs(np.where(scored, margin, 0.0)) >= self.min_score_margin)
        for row in np.flatnonzero(candidates & ~keep):
            reason = BELOW_MARGIN if scored[row] else NO_SCORE
            self.report.skip_at_index_time(reason, f"row {row} of shard {shard}")
        return keep

    @staticmethod
    def _check_schema(shard: Path, schema: pa.Schema) -> None:
        missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
        if missing:
            raise SipoError(
                f"shard {shard} lacks column{'s' * (len(missing) > 1)} {', '.join(missing)}; Pick-a-Pic "
                f"shards need {', '.join(REQUIRED_COLUMNS)} (or use data.format=jsonl with a manifest)"
            )
        for name in REQUIRED_COLUMNS:
            expected = _column_type_problem(name, schema.field(name).type)
            if expected is not None:
                raise SipoError(
                    f"shard {shard} column {name} holds {schema.field(name).type}, expected {expected}; "
                    "point data.path at Pick-a-Pic v2 shards"
                )

    # --- per-pair reading ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._row)

    def row_group_ids(self) -> np.ndarray:
        """One id per pair naming the (shard, row group) its bytes live in, in index order.

        Reading a pair reads its whole row group (Pick-a-Pic row groups hold many images), so a
        uniformly random order reads a row group per pair. A sampler that shuffles these blocks
        and then the pairs inside each block reads every row group once per epoch.
        """
        ids = np.zeros(len(self._row), dtype=np.int64)
        base = 0
        for shard, starts in enumerate(self._row_group_starts):
            in_shard = self._shard == shard
            ids[in_shard] = base + np.searchsorted(starts, self._row[in_shard], side="right") - 1
            base += len(starts) - 1
        return ids

    def _where(self, index: int) -> str:
        return f"row {self._row[index]} of shard {self._shard_paths[self._shard[index]]}"

    def pair_key(self, index: int) -> str:
        return f"row {self._row[index]} of shard {os.path.basename(self._shard_paths[self._shard[index]])}"

    def _load(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        caption, jpg_0, jpg_1 = self._read_row(int(self._shard[index]), int(self._row[index]))
        if not isinstance(caption, str):
            raise MalformedRow(MISSING_FIELD, "caption is null")
        winner, loser = (jpg_0, jpg_1) if self._winner_is_0[index] else (jpg_1, jpg_0)
        chosen, rejected = self._decode(winner, "chosen"), self._decode(loser, "rejected")
        return caption, chosen, rejected, original_size(winner.get("bytes") if isinstance(winner, dict) else winner)

    def _decode(self, cell: Any, which: str) -> torch.Tensor:
        if isinstance(cell, dict):  # Hugging Face Image feature
            cell = cell.get("bytes")
        if cell is None:
            raise MalformedRow(MISSING_FIELD, f"{which} image is null")
        return decode_image(cell, self.resolution)

    def _read_row(self, shard: int, row: int) -> tuple[Any, Any, Any]:
        starts = self._row_group_starts[shard]
        group = int(np.searchsorted(starts, row, side="right")) - 1
        key = (shard, group)
        table = self._row_groups.get(key)
        if table is None:
            try:
                table = self._file(shard).read_row_group(group, columns=_READ_COLUMNS)
            except (OSError, pa.ArrowException) as error:
                raise MalformedRow(UNREADABLE_ROW_GROUP, f"row group {group}: {type(error).__name__}") from None
            self._row_groups[key] = table
            while len(self._row_groups) > CACHED_ROW_GROUPS:
                self._row_groups.popitem(last=False)
        else:
            self._row_groups.move_to_end(key)
        offset = row - int(starts[group])
        return tuple(table.column(name)[offset].as_py() for name in _READ_COLUMNS)

    def _file(self, shard: int) -> pq.ParquetFile:
        parquet = self._files.get(shard)
        if parquet is None:
            try:
                parquet = pq.ParquetFile(self._shard_paths[shard], memory_map=True, pre_buffer=False)
            except (OSError, pa.ArrowException) as error:
                raise MalformedRow(UNREADABLE_SHARD, type(error).__name__) from None
            self._files[shard] = parquet
            while len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return parquet

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without open files or cached tables; each opens its own.
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state["_row_groups"] = OrderedDict()
        return state
