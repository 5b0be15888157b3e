"""sipo relabel end to end with a tiny PickScore, its labels, margins and agreement checked against scores
taken apart from it (the pictures read with PIL, scored one by one); a kill mid-way and the rerun that
continues; data.min_score_margin's filter and its counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sipo.cli import main
from sipo.config import DataConfig, load_config
from sipo.data import open_preference_dataset
from sipo.data.report import BELOW_MARGIN
from sipo.errors import SipoError
from sipo import relabel as relabel_module
from sipo.relabel import relabel
from sipo.rewards import load_scorer
from tiny_scorers import make_tiny_clip
from train_fixtures import write_jsonl_pairs

PAIRS = 7


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("pickscore"), seed=0, positive=True)


@pytest.fixture
def manifest(tmp_path) -> Path:
    path = write_jsonl_pairs(tmp_path / "pairs", num_pairs=PAIRS, seed=5)
    # swap half the pairs, so the original labels disagree with any one scorer on some of them
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows[::2]:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(manifest: Path, **data):
    values = {"data.format": "jsonl", "data.path": str(manifest), "model.resolution": 32,
              **{f"data.{k}": v for k, v in data.items()}}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def _by_hand(manifest: Path, scorer_dir: Path) -> list[tuple[float, float]]:
    """(score of the original chosen, of the original rejected) per row, each picture scored alone."""
    scorer = load_scorer("pickscore", str(scorer_dir))
    out = []
    for row in map(json.loads, manifest.read_text().splitlines()):
        pair = []
        for side in ("chosen", "rejected"):
            pixels = np.asarray(Image.open(manifest.parent / row[side]).convert("RGB"), dtype=np.float32) / 255
            pair.append(float(scorer.score(torch.from_numpy(pixels).permute(2, 0, 1)[None], [row["prompt"]])[0]))
        out.append(tuple(pair))
    return out


def test_relabel_end_to_end_labels_scores_margin_and_agreement(manifest, scorer_dir, tmp_path, capsys):
    config = tmp_path / "relabel.yaml"
    config.write_text(f"data:\n  format: jsonl\n  path: {manifest}\nmodel:\n  resolution: 32\n")
    assert main(["relabel", "--config", str(config), "--scorer", "pickscore", "--scorer-path", str(scorer_dir),
                 "--batch-size", "3", "--no-progress"]) == 0
    out = manifest.with_name("pairs.pickscore.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    originals = [json.loads(line) for line in manifest.read_text().splitlines()]
    expected = _by_hand(manifest, scorer_dir)
    assert len(rows) == PAIRS
    agreeing = 0
    for row, original, (chosen, rejected) in zip(rows, originals, expected):
        flipped = rejected > chosen
        agreeing += not flipped and chosen != rejected
        assert row["relabel_flipped"] == flipped and row["prompt"] == original["prompt"]
        assert (row["chosen"], row["rejected"]) == ((original["rejected"], original["chosen"]) if flipped
                                                    else (original["chosen"], original["rejected"]))
        assert row["score_chosen"] == pytest.approx(max(chosen, rejected), abs=1e-4)
        assert row["score_rejected"] == pytest.approx(min(chosen, rejected), abs=1e-4)
        assert row["score_margin"] == pytest.approx(abs(chosen - rejected), abs=2e-4)
    assert 0 < agreeing < PAIRS  # the swapped rows make both kinds occur
    printed = capsys.readouterr().out
    assert f"agreement with the original labels: {agreeing / PAIRS:.3f} ({agreeing} of {PAIRS} pairs" in printed
    summary = json.loads(out.with_name("pairs.pickscore.relabel.json").read_text())
    assert summary["agreeing"] == agreeing and summary["pairs"] == PAIRS
    assert not out.with_name(out.name + ".partial").exists()
    # the new manifest trains: it is a valid data.path
    assert len(open_preference_dataset(DataConfig(format="jsonl", path=str(out)), 32)) == PAIRS


def test_a_killed_relabel_continues_from_the_rows_written(manifest, scorer_dir, monkeypatch):
    calls = []
    real = relabel_module._score_pairs

    def dies_on_the_third_batch(scorer, pairs):
        calls.append(len(pairs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(scorer, pairs)

    monkeypatch.setattr(relabel_module, "_score_pairs", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        relabel(_config(manifest), "pickscore", batch_size=2, scorer_path=str(scorer_dir), progress=False)
    out = manifest.with_name("pairs.pickscore.jsonl")
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 4
    with partial.open("a") as handle:
        handle.write('{"prompt": "cut sh')  # a line torn by the kill
    calls.clear()
    monkeypatch.setattr(relabel_module, "_score_pairs", lambda s, p: calls.append(len(p)) or real(s, p))
    result = relabel(_config(manifest), "pickscore", batch_size=2, scorer_path=str(scorer_dir), progress=False)
    assert result.resumed_from == 4 and calls == [2, 1] and result.pairs == PAIRS
    resumed = out.read_text()
    out.unlink()
    relabel(_config(manifest), "pickscore", batch_size=2, scorer_path=str(scorer_dir), progress=False)
    assert json.loads("[" + ",".join(resumed.splitlines()) + "]") == json.loads(
        "[" + ",".join(out.read_text().splitlines()) + "]")


def test_min_score_margin_skips_and_counts_the_close_pairs(tmp_path):
    write_jsonl_pairs(tmp_path, num_pairs=4)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    margins = [0.5, -2.0, 0.05, 1.0]  # |margin| kept when >= 0.4: rows 0, 1, 3
    for row, margin in zip(rows, margins):
        row["score_margin"] = margin
    rows[3] = {k: v for k, v in rows[3].items() if k != "score_margin"} | {"score_chosen": 3.0, "score_rejected": 2.0}
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = open_preference_dataset(_config(scored, min_score_margin=0.4).data, 32)
    assert [dataset[i]["prompt"] for i in range(len(dataset))] == [rows[i]["prompt"] for i in (0, 1, 3)]
    assert dataset.report.index_skips[BELOW_MARGIN] == 1 and dataset.report.to_dict()["skipped"][BELOW_MARGIN] == 1
    assert len(open_preference_dataset(_config(scored).data, 32)) == 4  # unset: every pair

    with pytest.raises(SipoError, match="needs score columns.*sipo relabel"):
        open_preference_dataset(_config(tmp_path / "pairs.jsonl", min_score_margin=0.4).data, 32)
    with pytest.raises(SipoError, match="must be 0 or more"):
        _config(scored, min_score_margin=-1)


def test_pickapic_input_becomes_a_scored_shard_that_min_score_margin_filters(scorer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pictures = write_jsonl_pairs(tmp_path / "pictures", num_pairs=5, seed=9)
    rows = [json.loads(line) for line in pictures.read_text().splitlines()]
    labels = [1.0, 0.0, 0.5, 0.0, 1.0]  # the tie is dropped, as training drops it
    table = pa.table({
        "caption": [r["prompt"] for r in rows],
        "jpg_0": pa.array([(pictures.parent / r["chosen"]).read_bytes() for r in rows], pa.binary()),
        "jpg_1": pa.array([(pictures.parent / r["rejected"]).read_bytes() for r in rows], pa.binary()),
        "label_0": pa.array(labels, pa.float64()),
    })
    (tmp_path / "shards").mkdir()
    pq.write_table(table, tmp_path / "shards" / "train-00000-of-00001.parquet")
    config = load_config(None, ["data.format=pickapic", f"data.path={tmp_path / 'shards'}", "model.resolution=32"])
    result = relabel(config, "pickscore", batch_size=3, scorer_path=str(scorer_dir), progress=False)
    assert result.out == tmp_path / "shards" / "relabelled-pickscore" / "train-00000-of-00001.parquet"
    written = pq.read_table(result.out).to_pylist()
    hand = {r["prompt"]: pair for r, pair in zip(rows, _by_hand(pictures, scorer_dir))}  # (jpg_0, jpg_1) scores
    assert [w["caption"] for w in written] == [rows[i]["prompt"] for i in (0, 1, 3, 4)]
    agreeing = 0
    for row in written:
        score_0, score_1 = hand[row["caption"]]
        assert row["score_0"] == pytest.approx(score_0, abs=1e-4) and row["score_1"] == pytest.approx(score_1, abs=1e-4)
        assert row["label_0"] == (1.0 if score_0 > score_1 else 0.0)
        assert row["score_margin"] == pytest.approx(abs(score_0 - score_1), abs=2e-4)
        agreeing += row["label_0"] == row["original_label_0"]
        assert row["jpg_0"] == table.column("jpg_0")[[r["prompt"] for r in rows].index(row["caption"])].as_py()
    assert result.agreeing == agreeing and result.pairs == 4

    margins = sorted(w["score_margin"] for w in written)
    threshold = (margins[1] + margins[2]) / 2  # keeps the two clearest pairs
    kept = open_preference_dataset(load_config(None, [
        "data.format=pickapic", f"data.path={result.out.parent}", f"data.min_score_margin={threshold}"]).data, 32)
    assert len(kept) == 2 and kept.report.index_skips[BELOW_MARGIN] == 2
    with pytest.raises(SipoError, match="needs a score_margin"):
        open_preference_dataset(load_config(None, ["data.format=pickapic", f"data.path={tmp_path / 'shards'}",
                                                   "data.min_score_margin=0.1"]).data, 32)


def test_a_rerun_with_another_scorer_checkpoint_or_manifest_scores_every_pair_afresh(manifest, scorer_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """Issue 30 item 1: the .partial rows of the first scorer were kept under the second one's name."""
    other_scorer = make_tiny_clip(tmp_path / "other_pickscore", seed=3, positive=True)
    real = relabel_module._score_pairs
    calls = []

    def dies_on_the_second_batch(scorer, pairs):
        calls.append(len(pairs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(scorer, pairs)

    monkeypatch.setattr(relabel_module, "_score_pairs", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        relabel(_config(manifest), "pickscore", batch_size=3, scorer_path=str(scorer_dir), progress=False)
    out = manifest.with_name("pairs.pickscore.jsonl")
    assert len(out.with_name(out.name + ".partial").read_text().splitlines()) == 3
    monkeypatch.setattr(relabel_module, "_score_pairs", real)
    result = relabel(_config(manifest), "pickscore", batch_size=3, scorer_path=str(other_scorer), progress=False)
    assert result.resumed_from == 0 and "scorer_checkpoint" in capsys.readouterr().out
    expected = _by_hand(manifest, other_scorer)  # every row by the second scorer, none by the first
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, (chosen, rejected) in zip(rows, expected):
        assert row["score_chosen"] == pytest.approx(max(chosen, rejected), rel=1e-4)
    assert not out.with_name(out.name + ".partial.provenance.json").exists()

    # the same with the manifest changed under the partial file (one row dropped)
    out.unlink()
    calls.clear()
    monkeypatch.setattr(relabel_module, "_score_pairs", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        relabel(_config(manifest), "pickscore", batch_size=3, scorer_path=str(scorer_dir), progress=False)
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[1:]))
    monkeypatch.setattr(relabel_module, "_score_pairs", real)
    result = relabel(_config(manifest), "pickscore", batch_size=3, scorer_path=str(scorer_dir), progress=False)
    assert result.resumed_from == 0 and result.pairs == PAIRS - 1 and "data:" in capsys.readouterr().out
