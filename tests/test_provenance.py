"""sipo.provenance: a resumable output continues only with the record that made it (issue 30 item 1)."""

from __future__ import annotations

import json

import pytest

from sipo import provenance
from sipo.errors import SipoError


def test_claim_starts_continues_stops_or_starts_afresh(tmp_path):
    output = tmp_path / "scores.partial"
    record = {"scorer": "pickscore", "resolution": 512, "seeds": (0, 1)}
    assert provenance.claim(output, record) is None  # nothing yet: the record is written
    assert json.loads(provenance.record_path(output).read_text()) == {"resolution": 512, "scorer": "pickscore",
                                                                      "seeds": [0, 1]}
    output.write_text("row 1\n")
    assert provenance.claim(output, record) is None and output.read_text() == "row 1\n"  # the same: continue
    other = {**record, "resolution": 1024}
    with pytest.raises(SipoError) as stopped:
        provenance.claim(output, other, what="the scores in", fix="pass another --out")
    assert str(stopped.value) == (f"the scores in {output} was made with other settings (resolution: 512 -> 1024), "
                                  "and continuing would mix the two; pass another --out")
    assert output.read_text() == "row 1\n"  # stop: nothing touched
    note = provenance.claim(output, other, what="the scores in", on_change="fresh")
    assert note == (f"the scores in {output} was made with other settings (resolution: 512 -> 1024); it is discarded "
                    "and started afresh")
    assert not output.exists() and provenance.read(output)["resolution"] == 1024
    provenance.forget(output)
    assert provenance.read(output) is None


def test_an_output_without_a_record_is_not_continued_and_folders_work_too(tmp_path):
    folder = tmp_path / "images"
    (folder / "base").mkdir(parents=True)  # written by a sipo that kept no record
    with pytest.raises(SipoError, match=r"\(no record of what made it\)"):
        provenance.claim(folder, {"steps": 50})
    assert "discarded" in provenance.claim(folder, {"steps": 50}, on_change="fresh")
    assert not folder.exists() and provenance.read(folder) == {"steps": 50}


def test_source_digest_follows_the_contents(tmp_path):
    checkpoint = tmp_path / "PickScore_v1"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights a")
    first = provenance.source_digest(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"weights b")
    assert provenance.source_digest(checkpoint) != first and first.startswith("1 files, sha256 ")
    assert provenance.source_digest(None, "yuvalkirstain/PickScore_v1") == "hub yuvalkirstain/PickScore_v1"
    assert provenance.source_digest("org/name") == "hub org/name"
