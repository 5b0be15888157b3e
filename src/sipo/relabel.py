"""``sipo relabel``: label every pair again with a reward model ("AI feedback", as the official
Diffusion-DPO code's ``--choice_model``), and say how often it agrees with the original labels.

Both pictures of every pair of ``data.path`` (a JSONL manifest) are scored by a scorer of
``sipo.rewards``; the new manifest lists each pair with the higher-scored picture as ``chosen``
and adds ``score_chosen``, ``score_rejected``, ``score_margin`` (their difference, >= 0 after the
relabel), ``relabel_flipped`` (whether the scorer disagreed with the original label) and
``scorer``. ``data.min_score_margin`` then trains on the pairs the scorer separates clearly.

Resumable: rows go to ``<out>.partial`` as they are scored, one fsync'd line each batch; a rerun
continues after the last complete line, and the finished file replaces ``<out>`` in one rename.
Rows the dataset skips (unreadable pictures) are counted and left out of the new manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

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


def default_out(manifest: Path, scorer: str) -> Path:
    return manifest.with_name(f"{manifest.stem}.{scorer}.jsonl")


def relabel(config, scorer_name: str, out: str | Path | None = None, batch_size: int = 8,
            scorer_path: str | None = None, progress: bool = True, device: str | None = None) -> RelabelResult:
    """Score every pair of ``config.data`` with ``scorer_name`` and write the relabelled manifest."""
    from tqdm.auto import tqdm

    from sipo.data import open_preference_dataset
    from sipo.data.report import SkippedRow
    from sipo.rewards import load_scorer, scorer_class

    data = config.data
    if data.format != "jsonl":
        raise SipoError(f"sipo relabel reads JSONL manifests (data.format=jsonl), not data.format={data.format}; "
                        "list the pairs in a manifest (docs/data.md)")
    if batch_size < 1:
        raise SipoError(f"--batch-size must be at least 1, got {batch_size}")
    scorer_class(scorer_name)  # an unknown name stops before any picture is read
    manifest = Path(data.path)
    out = Path(out).expanduser() if out is not None else default_out(manifest, scorer_name)
    if out.resolve() == manifest.resolve():
        raise SipoError(f"--out {out} is data.path itself; write the relabelled manifest to another file")
    root, out_root = manifest.parent.resolve(), out.parent.resolve()
    if os.path.commonpath([root, out_root]) != str(out_root):
        raise SipoError(f"--out {out} is outside {manifest.parent} and the folders above it, so its picture paths "
                        "could not stay inside its dataset root; write it into that folder (the default)")
    data_for_scoring = type(data)(**{**data.__dict__, "random_flip": False, "min_score_margin": None,
                                     "validation_fraction": None, "validation_path": None})
    dataset = open_preference_dataset(data_for_scoring, config.model.resolution, seed=config.train.seed)
    originals = _manifest_rows(manifest, dataset)

    partial = out.with_name(out.name + ".partial")
    done = _complete_lines(partial)
    counts = _counts(partial)
    resolved_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = load_scorer(scorer_name, scorer_path, resolved_device) if done < len(dataset) else None
    bar = tqdm(total=len(dataset), initial=done, desc=f"relabel ({scorer_name})", unit="pair", disable=not progress,
               dynamic_ncols=True)
    with partial.open("a", encoding="utf-8") as handle:
        for start in range(done, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            pairs = [item for item in items if not isinstance(item, SkippedRow)]
            scores = _score_pairs(scorer, pairs) if pairs else []
            lines, scored = [], iter(scores)
            for index, item in zip(range(start, start + len(items)), items):
                if isinstance(item, SkippedRow):
                    lines.append({"_skipped": item.reason, "_index": index})
                    continue
                lines.append(_relabelled(originals[index], *next(scored), scorer_name, manifest.parent, out.parent))
            handle.write("".join(json.dumps(line) + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(items))
    bar.close()
    counts = _counts(partial)
    rows = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines() if line.strip()]
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows if "_skipped" not in row), encoding="utf-8")
    os.replace(tmp, out)
    result = RelabelResult(out=out, pairs=counts["pairs"], agreeing=counts["agreeing"], ties=counts["ties"],
                           skipped=counts["skipped"], resumed_from=done)
    out.with_name(out.stem + ".relabel.json").write_text(json.dumps({
        "scorer": scorer_name, "source": str(manifest), "out": str(out), "pairs": result.pairs,
        "agreeing": result.agreeing, "agreement": result.agreement, "ties": result.ties,
        "unreadable_rows": result.skipped}, indent=2) + "\n")
    partial.unlink()
    return result


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


def _counts(partial: Path) -> dict[str, int]:
    counts = {"pairs": 0, "agreeing": 0, "ties": 0, "skipped": 0}
    if not partial.is_file():
        return counts
    for line in partial.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "_skipped" in row:
            counts["skipped"] += 1
            continue
        counts["pairs"] += 1
        counts["ties"] += bool(row["relabel_tie"])
        counts["agreeing"] += not row["relabel_flipped"] and not row["relabel_tie"]
    return counts
