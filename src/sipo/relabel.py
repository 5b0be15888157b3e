"""``sipo relabel``: label every pair again with a reward model ("AI feedback", as the official
Diffusion-DPO code's ``--choice_model``), and say how often it agrees with the original labels.

Both pictures of every pair of ``data.path`` are scored by a scorer of ``sipo.rewards``. A JSONL
manifest becomes a new manifest listing each pair with the higher-scored picture as ``chosen`` and
``score_chosen``, ``score_rejected``, ``score_margin`` (their difference, >= 0), ``relabel_flipped``
(the scorer disagreed with the original label), ``relabel_tie`` and ``scorer``. Pick-a-Pic parquet
becomes one parquet shard of the same columns with ``label_0`` set by the scorer (a tie keeps the
old label), ``original_label_0``, ``score_0``, ``score_1`` and ``score_margin``.
``data.min_score_margin`` then trains on the pairs the scorer separates clearly.

Resumable: scores go to ``<out>.partial`` as they are computed, one fsync'd write per batch; a rerun
continues after the last complete line, and the finished file replaces ``<out>`` in one rename. The
partial file's provenance record (:mod:`sipo.provenance`: scorer, its checkpoint's digest, the data's
digest, split, resolution) must match the rerun's, else the partial scores are discarded and every
pair is scored afresh: one output never mixes two reward models or two manifests.
Rows the dataset skips (unreadable pictures) are counted and left out of the output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sipo import provenance
from sipo.errors import SipoError


@dataclass
class RelabelResult:
    """What one ``relabel`` call wrote and found."""

    out: Path
    pairs: int  # pairs scored (the rows written)
    agreeing: int  # pairs where the scorer prefers the originally chosen picture
    ties: int  # pairs scored exactly equal (kept in their original order, counted as not agreeing)
    skipped: int  # rows the dataset could not read
    resumed_from: int  # rows already in the .partial file when this call started

    @property
    def agreement(self) -> float:
        return self.agreeing / self.pairs if self.pairs else float("nan")

    def summary(self) -> str:
        return (f"agreement with the original labels: {self.agreement:.3f} ({self.agreeing} of {self.pairs} pairs; "
                f"{self.ties} ties, {self.skipped} unreadable rows left out)")


def relabel(config, scorer_name: str, out: str | Path | None = None, batch_size: int = 8,
            scorer_path: str | None = None, progress: bool = True, device: str | None = None) -> RelabelResult:
    """Score every pair of ``config.data`` with ``scorer_name`` and write the relabelled manifest
    (JSONL input) or parquet shard (Pick-a-Pic input)."""
    from tqdm.auto import tqdm

    from sipo.data import open_preference_dataset
    from sipo.data.report import SkippedRow
    from sipo.rewards import load_scorer, scorer_class

    data = config.data
    if data.format not in ("jsonl", "pickapic"):
        raise SipoError(f"sipo relabel reads JSONL manifests and Pick-a-Pic parquet, not data.format={data.format}")
    if batch_size < 1:
        raise SipoError(f"--batch-size must be at least 1, got {batch_size}")
    scorer_class(scorer_name)  # an unknown name stops before any picture is read
    data_for_scoring = type(data)(**{**data.__dict__, "random_flip": False, "min_score_margin": None,
                                     "validation_fraction": None, "validation_path": None})
    dataset = open_preference_dataset(data_for_scoring, config.model.resolution, seed=config.train.seed)
    out = _out_path(data, dataset, scorer_name, out)

    partial = out.with_name(out.name + ".partial")
    discarded = provenance.claim(partial, relabel_provenance(config, scorer_name, scorer_path),
                                 what="the scores in", on_change="fresh")
    if discarded:
        print(f"sipo: {discarded}")
    done = _complete_lines(partial)
    resolved_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = load_scorer(scorer_name, scorer_path, resolved_device) if done < len(dataset) else None
    bar = tqdm(total=len(dataset), initial=done, desc=f"relabel ({scorer_name})", unit="pair", disable=not progress,
               dynamic_ncols=True)
    with partial.open("a", encoding="utf-8") as handle:
        for start in range(done, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            pairs = [item for item in items if not isinstance(item, SkippedRow)]
            scored = iter(_score_pairs(scorer, pairs) if pairs else [])
            lines = []
            for index, item in zip(range(start, start + len(items)), items):
                if isinstance(item, SkippedRow):
                    lines.append({"_index": index, "_skipped": item.reason})
                else:
                    chosen, rejected = next(scored)
                    lines.append({"_index": index, "score_chosen": chosen, "score_rejected": rejected})
            handle.write("".join(json.dumps(line) + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(items))
    bar.close()
    scores = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines() if line.strip()]
    if data.format == "jsonl":
        _write_manifest(Path(data.path), dataset, scores, scorer_name, out)
    else:
        _write_parquet(dataset, scores, scorer_name, out)
    kept = [row for row in scores if "_skipped" not in row]
    result = RelabelResult(
        out=out, pairs=len(kept), agreeing=sum(r["score_chosen"] > r["score_rejected"] for r in kept),
        ties=sum(r["score_chosen"] == r["score_rejected"] for r in kept), skipped=len(scores) - len(kept),
        resumed_from=done)
    summary = out.with_name(out.stem + ".relabel.json") if data.format == "jsonl" else out.parent / "relabel.json"
    summary.write_text(json.dumps({
        "scorer": scorer_name, "source": str(data.path), "out": str(out), "pairs": result.pairs,
        "agreeing": result.agreeing, "agreement": result.agreement, "ties": result.ties,
        "unreadable_rows": result.skipped}, indent=2) + "\n")
    partial.unlink()
    provenance.forget(partial)
    return result


def relabel_provenance(config, scorer_name: str, scorer_path: str | None) -> dict:
    """What makes the scores of a relabel: the scorer and its checkpoint's contents, the data files and
    which of their rows are read, and the resolution the pictures are scored at."""
    from sipo.checkpoints import data_signature
    from sipo.rewards import scorer_class

    data = config.data
    return {"scorer": scorer_name,
            "scorer_checkpoint": provenance.source_digest(scorer_path, getattr(scorer_class(scorer_name),
                                                                               "default_source", None)),
            "data": data_signature(str(data.path)), "data_format": data.format, "data_split": data.split,
            "data_max_pairs": data.max_pairs, "resolution": config.model.resolution}


def _out_path(data, dataset, scorer_name: str, out: str | Path | None) -> Path:
    """``--out``, or its default; a manifest's must keep its picture paths inside its dataset root."""
    if data.format == "pickapic":
        first = Path(dataset._shard_paths[0])
        target = Path(out).expanduser() if out is not None else (
            first.parent / f"relabelled-{scorer_name}" / "train-00000-of-00001.parquet")
        if target.suffix != ".parquet":
            raise SipoError(f"--out {target} must name a .parquet file for Pick-a-Pic input")
        if any(target.resolve() == Path(p).resolve() for p in dataset._shard_paths):
            raise SipoError(f"--out {target} is one of the input shards; write the relabelled shard elsewhere")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target
    manifest = Path(data.path)
    target = Path(out).expanduser() if out is not None else manifest.with_name(f"{manifest.stem}.{scorer_name}.jsonl")
    if target.resolve() == manifest.resolve():
        raise SipoError(f"--out {target} is data.path itself; write the relabelled manifest to another file")
    root, out_root = manifest.parent.resolve(), target.parent.resolve()
    if os.path.commonpath([root, out_root]) != str(out_root):
        raise SipoError(f"--out {target} is outside {manifest.parent} and the folders above it, so its picture paths "
                        "could not stay inside its dataset root; write it into that folder (the default)")
    return target


def _write_manifest(manifest: Path, dataset, scores: list[dict], scorer: str, out: Path) -> None:
    originals = _manifest_rows(manifest, dataset)
    rows = [_relabelled(originals[s["_index"]], s["score_chosen"], s["score_rejected"], scorer, manifest.parent,
                        out.parent) for s in scores if "_skipped" not in s]
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, out)


def _write_parquet(dataset, scores: list[dict], scorer: str, out: Path) -> None:
    """One shard of the scored rows with every original column, ``label_0`` set by the scorer
    (``original_label_0`` keeps the old one), ``score_0``, ``score_1`` and ``score_margin``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_index = {s["_index"]: s for s in scores if "_skipped" not in s}
    tmp = out.with_name(f".tmp-{out.name}")
    writer = None
    try:
        for shard_number, shard_path in enumerate(dataset._shard_paths):
            indices = [i for i in np.flatnonzero(dataset._shard == shard_number).tolist() if i in by_index]
            if not indices:
                continue
            table = pq.read_table(shard_path).take(pa.array(dataset._row[indices]))
            first_won = dataset._winner_is_0[indices]
            chosen = np.array([by_index[i]["score_chosen"] for i in indices])
            rejected = np.array([by_index[i]["score_rejected"] for i in indices])
            score_0, score_1 = np.where(first_won, chosen, rejected), np.where(first_won, rejected, chosen)
            old = table.column("label_0").to_numpy().astype(np.float64)
            label_0 = np.where(score_0 > score_1, 1.0, np.where(score_0 < score_1, 0.0, old))
            columns = {"label_0": label_0, "original_label_0": old, "score_0": score_0, "score_1": score_1,
                       "score_margin": np.abs(score_0 - score_1)}
            if "label_1" in table.column_names:
                columns["label_1"] = 1.0 - label_0
            for name, values in columns.items():
                array = pa.array(values, type=pa.float64())
                if name in table.column_names:
                    table = table.set_column(table.column_names.index(name), name, array)
                else:
                    table = table.append_column(name, array)
            table = table.replace_schema_metadata({"sipo_relabel_scorer": scorer})
            if writer is None:
                writer = pq.ParquetWriter(str(tmp), table.schema)
            writer.write_table(table.cast(writer.schema), row_group_size=256)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise SipoError("no pair could be read, so no relabelled shard was written; check data.path's pictures")
    os.replace(tmp, out)


def _score_pairs(scorer, pairs: list[dict]) -> list[tuple[float, float]]:
    """(score of chosen, score of rejected) per pair: one scorer call for both sides of the batch."""
    prompts = [p["prompt"] for p in pairs]
    images = torch.cat([torch.stack([p["chosen"] for p in pairs]), torch.stack([p["rejected"] for p in pairs])])
    scores = scorer.score(((images.float() + 1) / 2).clamp(0, 1), prompts + prompts).double().tolist()
    return list(zip(scores[: len(pairs)], scores[len(pairs):]))


def _relabelled(row: dict, score_chosen: float, score_rejected: float, scorer: str, root: Path, out_dir: Path) -> dict:
    """The manifest row with the scorer's preference: the higher-scored picture as chosen (a tie keeps the order)."""
    flipped = score_rejected > score_chosen
    chosen, rejected = (row["rejected"], row["chosen"]) if flipped else (row["chosen"], row["rejected"])
    high, low = (score_rejected, score_chosen) if flipped else (score_chosen, score_rejected)
    new = {key: value for key, value in row.items() if not key.startswith("score_") and key not in ("relabel_flipped", "scorer")}
    new.update(chosen=_moved(chosen, root, out_dir), rejected=_moved(rejected, root, out_dir), score_chosen=high,
               score_rejected=low, score_margin=high - low, relabel_flipped=flipped, scorer=scorer,
               relabel_tie=score_chosen == score_rejected)
    return new


def _moved(relative: str, root: Path, out_dir: Path) -> str:
    """A picture path relative to the new manifest's folder (the same string when it sits beside the old one)."""
    if root.resolve() == out_dir.resolve():
        return relative
    return os.path.relpath(os.path.normpath(os.path.join(root.resolve(), relative)), out_dir.resolve())


def _manifest_rows(manifest: Path, dataset) -> list[dict]:
    """The original JSON object of each dataset index (the dataset keeps their line numbers)."""
    wanted = {int(line): index for index, line in enumerate(dataset._lines)}
    rows: list[dict] = [{}] * len(wanted)
    with manifest.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number in wanted:
                rows[wanted[number]] = json.loads(raw)
    return rows


def _complete_lines(partial: Path) -> int:
    """Rows already written; a last line cut short by a kill is dropped from the file."""
    if not partial.is_file():
        return 0
    data = partial.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        partial.write_bytes(keep)
    return keep.count(b"\n")
