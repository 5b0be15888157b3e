"""``data.streaming=true``: a `datasets` split read as a stream, with the trainer's exact resume.

The stream has no length and no random access, so the trainer's seeded permutation (`DataOrder`)
does not apply; instead the pairs are numbered as they come:

- **order**: epoch ``e`` reads the stream's files in an order drawn from ``(train.seed, e)`` and
  passes the rows through a buffer of ``data.shuffle_buffer`` (`buffer_shuffle`, seeded the same
  way); ``shuffle_buffer: 1`` keeps the stream's own order. Ties and invalid labels are dropped as they pass; every other row
  is the next *position*. ``data.max_pairs`` ends each epoch after that many pairs.
- **processes**: micro-batch ``m`` of process ``r`` of ``W`` holds positions
  ``[(m W + r) B, (m W + r + 1) B)``, the same arithmetic as `DataOrder.batch`; every process reads the
  whole stream and decodes its own positions only.
- **workers**: with ``data.num_workers = k``, worker ``w`` builds micro-batches ``w, w + k, ...``; the
  DataLoader hands them out in that round-robin order, so the batches are those of ``k = 0``.
- **resume**: a run that consumed ``M`` micro-batches starts by reading (not decoding) the first
  ``M W B`` positions again, so it continues with exactly the pairs the uninterrupted run would
  read next. That re-read costs the rows' download or disk time, not their decoding.
- a malformed row keeps its position as a `SkippedRow` (the same skip-and-count as the other
  formats); ``index`` is the position within its epoch (what ``random_flip`` hashes).

Held-out sets (``data.validation_path``) are indexed, not streamed; ``data.validation_fraction`` and
the latent cache need an indexed dataset (``data.streaming=false``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch

from sipo.data.hf import (
    MediaReader,
    check_columns,
    dataset_root,
    load_input,
    load_pair,
    open_hf,
    resolve_columns,
    undecoded,
)
from sipo.data.pairs import PreferenceDataset, collate_pairs, media_of_family
from sipo.data.report import INVALID_LABEL, DataReport, SkippedRow
from sipo.data.video import VideoSpec
from sipo.errors import SipoError


class StreamReport(DataReport):
    """A `DataReport` whose pair count grows as the stream is read.

    Workers (and the main process) count what the first epoch's rows held; each batch carries the
    reading side's running counts (``stream_counts``) and :meth:`record` takes them over, so the main
    process's report is right with DataLoader workers too.
    """

    def _grow(self, index: int) -> None:
        if index >= len(self._loaded):
            grown = np.zeros(max(index + 1, 2 * len(self._loaded)), dtype=bool)
            grown[: len(self._loaded)] = self._loaded
            self._loaded = grown

    def record(self, items) -> None:
        if isinstance(items, dict) and items.get("stream_counts"):
            counts = items["stream_counts"]
            self.rows_seen, self.ties_dropped, self.pairs = counts["rows_seen"], counts["ties_dropped"], counts["pairs"]
            self.index_skips = Counter(counts["index_skips"])
            for reason, where in counts["examples"].items():
                self.examples.setdefault(reason, [])
                for place in where:
                    if place not in self.examples[reason] and len(self.examples[reason]) < 3:
                        self.examples[reason].append(place)
        indices = items.get("indices", []) if isinstance(items, dict) else [
            item["index"] for item in items if not isinstance(item, SkippedRow)]
        for index in indices:
            self._grow(index)
        super().record(items)

    def __str__(self) -> str:
        """A stream has no length: its counts are of what was read so far."""
        text = (f"{self.format} {self.source} (streamed from {self.shards} file{'s' * (self.shards != 1)}): "
                f"{self.rows_seen} rows read so far, {self.ties_dropped} ties dropped, {self.pairs} pairs, "
                f"{self.used} loaded")
        if self.skipped:
            text += f", {self.skipped_total} skipped ({self.skip_summary()})"
        return text

    def counts(self) -> dict[str, Any]:
        return {"rows_seen": self.rows_seen, "ties_dropped": self.ties_dropped, "pairs": self.pairs,
                "index_skips": dict(self.index_skips), "examples": {k: list(v) for k, v in self.examples.items()}}


class HfStreamingPairs(PreferenceDataset):
    """Preference pairs of a streamed `datasets` split (see the module docstring)."""

    format = "hf"
    streaming = True

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
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__(path, resolution, strict=strict, random_flip=random_flip, seed=seed)
        self.report = StreamReport(path, self.format)
        self.split, self.max_pairs, self.shuffle_buffer = split, max_pairs, shuffle_buffer
        stream = open_hf(path, split, streaming=True)
        features = stream.features
        if features is None and hasattr(stream, "_resolve_features"):
            features = stream._resolve_features().features
        names = list(features or {})
        self.columns = resolve_columns(names, dict(columns or {}))
        check_columns(path, features, self.columns)
        self._stream = undecoded(stream, self.columns).select_columns(
            [name for name in self.columns.values() if name is not None])
        self.report.shards = self._stream.num_shards  # the files the stream reads
        self._reader = MediaReader(dataset_root(path), resolution, video or VideoSpec(), media_of_family(family))
        self._first_epoch_done = False

    # a stream has no length: 0 tells the trainer's checks it is unknown, not empty
    def __len__(self) -> int:
        return 0

    def _where(self, index: int) -> str:
        return f"pair {index} of the stream {self.source} ({self.split})"

    def __getitem__(self, index: int):
        raise SipoError("data.streaming=true reads pairs in the stream's order only; set data.streaming=false "
                        "for indexed access (held-out fractions, the latent cache)")

    # --- the stream ----------------------------------------------------------------------------
    def epoch_rows(self, epoch: int) -> Iterator[tuple[int, dict[str, Any], bool]]:
        """(position in the epoch, row, first picture won) of each usable pair of ``epoch``, in order."""
        label = self.columns["label"]
        position = 0
        counting = epoch == 0
        for row_number, record in enumerate(self.shuffled_rows(epoch)):
            if self.max_pairs is not None and position >= self.max_pairs:
                break
            if counting:
                self.report.rows_seen += 1
            first_won = True
            if label is not None:
                value = record.get(label)
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    value = math.nan
                if not 0.0 <= value <= 1.0:  # NaN too
                    if counting:
                        self._raise_or_count(INVALID_LABEL, f"row {row_number} of the stream {self.source} (label={value})")
                    continue
                if value == 0.5:
                    if counting:
                        self.report.ties_dropped += 1
                    continue
                first_won = value > 0.5
            position += 1
            if counting:  # before the pair is handed out: the report never counts fewer pairs than were loaded
                self.report.pairs = max(self.report.pairs, position)
            yield position - 1, record, first_won
        if position == 0:
            report = self.report
            if report.rows_seen and report.ties_dropped == report.rows_seen:
                raise SipoError(f"all {report.rows_seen} pairs in {self.source} are ties (label 0.5), which carry no "
                                "preference; point data.path at pairs with decided labels")
            raise SipoError(f"no valid pairs in the stream {self.source} ({report.rows_seen} rows, {report.ties_dropped} "
                            f"ties, {report.skip_summary()}); point data.path at a dataset of preference pairs")

    def shuffled_rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Epoch ``epoch``'s rows: the files in a seeded order, then a seeded buffer shuffle.

        sipo draws both itself (numpy, seeded by ``(train.seed, epoch)``) from the files' own order,
        rather than through ``IterableDataset.shuffle``: the order is then sipo's, the same for every
        ``datasets`` version, and it avoids the 5 s that datasets 5.2's shuffle waits at each pass's end.
        """
        if self.shuffle_buffer <= 1:
            return _rows(self._stream)
        generator = np.random.default_rng([self.seed, epoch])
        files = self._stream.num_shards
        order = generator.permutation(files)
        rows = (row for k in order for row in _rows(self._stream.shard(num_shards=files, index=int(k))))
        return buffer_shuffle(rows, self.shuffle_buffer, generator)

    def positions(self) -> Iterator[tuple[int, int, dict[str, Any], bool]]:
        """(epoch, position, row, first won) of every pair, epoch after epoch, without end."""
        epoch = 0
        while True:
            for position, record, first_won in self.epoch_rows(epoch):
                yield epoch, position, record, first_won
            epoch += 1

    def item(self, epoch: int, position: int, record: dict[str, Any], first_won: bool):
        """The pair dict (or `SkippedRow`) of one position: the same checks and flips as ``dataset[i]``."""
        self.epoch = epoch
        self._current = (record, first_won)
        return self._item(position)

    def _load(self, index: int):
        record, first_won = self._current
        return load_pair(record, self.columns, first_won, self._reader)

    def _load_input(self, index: int):
        return load_input(self._current[0], self.columns, self._reader)

    def micro_batches(self, batch_size: int, start: int, rank: int = 0, world: int = 1,
                      every: int = 1, offset: int = 0) -> Iterator[dict[str, Any]]:
        """Collated micro-batches ``start + offset, start + offset + every, ...`` of process ``rank``."""
        wanted = start + offset
        pending: list[Any] = []
        for global_position, (epoch, position, record, first_won) in enumerate(self.positions()):
            micro_batch, within = divmod(global_position, batch_size * world)
            if micro_batch < wanted or within // batch_size != rank:
                continue
            pending.append(self.item(epoch, position, record, first_won))
            if len(pending) == batch_size:
                batch = collate_pairs(pending)
                batch["stream_counts"] = self.report.counts()
                yield batch
                pending = []
                wanted += every


def buffer_shuffle(items, size: int, generator: np.random.Generator) -> Iterator[Any]:
    """``items`` in a shuffled order drawn through a buffer of ``size``: each new item takes the place of
    a uniformly drawn one, which is yielded; at the end the buffer comes out in a random order.
    An item can come out at most ``size - 1`` places before its place in ``items``."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(generator.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in generator.permutation(len(buffer)):
        yield buffer[int(slot)]


#: rows fetched from the stream at a time
READ_ROWS = 64


def _rows(stream) -> Iterator[dict[str, Any]]:
    """The stream's rows in its order. Through ``iter(batch_size)``: iterating the stream itself inside a
    DataLoader worker would hand each worker only some of its shards, and every worker must see them all."""
    for batch in stream.iter(batch_size=READ_ROWS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield dict(zip(names, values))


class _StreamBatches(torch.utils.data.IterableDataset):
    """The micro-batches of one process; with DataLoader workers, worker ``w`` of ``k`` builds every k-th."""

    def __init__(self, pairs: HfStreamingPairs, batch_size: int, start: int, rank: int, world: int) -> None:
        self.pairs, self.batch_size, self.start, self.rank, self.world = pairs, batch_size, start, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        every, offset = (1, 0) if info is None else (info.num_workers, info.id)
        return self.pairs.micro_batches(self.batch_size, self.start, self.rank, self.world, every, offset)


def stream_loader(pairs: HfStreamingPairs, batch_size: int, start: int, rank: int, world: int,
                  num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """The trainer's batches from a stream: micro-batch ``start`` on, this process's share of each."""
    return iter(torch.utils.data.DataLoader(
        _StreamBatches(pairs, batch_size, start, rank, world), batch_size=None, collate_fn=_as_is,
        num_workers=num_workers, pin_memory=pin_memory,
    ))


def _as_is(batch):
    return batch
