"""`sipo eval`: the statistics against hand-computed values, prompts, deterministic sampling on the tiny
SD1.5, the command end to end in a subprocess (train a tiny LoRA, evaluate it), and bad input."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_scorers import make_tiny_aesthetic, make_tiny_clip
from train_fixtures import write_jsonl_pairs, write_tiny_config

from sipo.errors import SipoError
from sipo.evaluate import (
    EvalOptions,
    Sample,
    bootstrap_ci,
    generate,
    image_path,
    load_picture,
    parse_seeds,
    read_prompts,
    run_eval,
    win_outcomes,
    win_rate,
)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- statistics
def test_win_rate_counts_ties_as_half():
    aligned = torch.tensor([3.0, 1.0, 2.0, 2.0])
    base = torch.tensor([1.0, 2.0, 2.0, 5.0])
    # win, loss, tie, loss -> (1 + 0 + 0.5 + 0) / 4
    assert win_outcomes(aligned, base).tolist() == [1.0, 0.0, 0.5, 0.0]
    assert win_rate(aligned, base) == pytest.approx(0.375)
    assert win_rate(base, base) == 0.5
    # with a tolerance of 1.5 the 3-vs-1 win stays, 1-vs-2 becomes a tie: (1 + 0.5 + 0.5 + 0) / 4
    assert win_rate(aligned, base, tolerance=1.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        win_rate(aligned[:3], base)


def test_bootstrap_interval_hand_computed():
    """[0, 0, 1]: a resample's mean is k/3, k ~ Binomial(3, 1/3): P(k=0) = 8/27 = 0.296 > 0.025, so the
    2.5% quantile is 0; P(k<=2) = 26/27 = 0.963 < 0.975, so the 97.5% quantile is 1."""
    assert bootstrap_ci([0.0, 0.0, 1.0], num_resamples=20000) == (0.0, 1.0)
    assert bootstrap_ci([2.5] * 7) == (2.5, 2.5)
    # 90%: P(k<=1) = 20/27 = 0.741 < 0.95 <= P(k<=2) = 0.963 -> the upper quantile is 2/3
    low, high = bootstrap_ci([0.0, 0.0, 1.0], confidence=0.90, num_resamples=20000)
    assert (low, high) == (0.0, pytest.approx(2 / 3))


def test_bootstrap_interval_agrees_with_scipy():
    from scipy.stats import bootstrap

    values = np.random.default_rng(1).normal(0.3, 1.0, size=200)
    reference = bootstrap((values,), np.mean, confidence_level=0.95, method="percentile", n_resamples=20000,
                          random_state=np.random.default_rng(2)).confidence_interval
    low, high = bootstrap_ci(values, num_resamples=20000, seed=3)
    # Monte-Carlo noise of both: well under 0.01 at 20000 resamples (half-width here is ~0.14)
    assert low == pytest.approx(reference.low, abs=0.01)
    assert high == pytest.approx(reference.high, abs=0.01)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)


# ----------------------------------------------------------------------------- prompts and seeds
def test_read_prompts_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a red dog  \n")
    assert read_prompts(path) == ["a cat", "a red dog"]
    assert read_prompts(path, limit=1) == ["a cat"]


@pytest.mark.parametrize("content, message", [
    (b"", "holds no prompts"), (b"\n  \n", "holds no prompts"), (b"\xff\xfe\x00bad", "cannot be read as UTF-8"),
])
def test_bad_prompts_file_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(SipoError, match=message):
        read_prompts(path)
    with pytest.raises(SipoError, match="does not exist"):
        read_prompts(tmp_path / "absent.txt")


def test_pickapic_test_prompts_from_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(SipoError, match="--pickapic-path"):
        read_prompts("pickapic-test")
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat", " ", "a red dog"]}), tmp_path / "test-00000.parquet")
    assert read_prompts("pickapic-test", str(tmp_path)) == ["a cat", "a dog", "a red dog"]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(SipoError, match="caption"):
        read_prompts("pickapic-test", str(tmp_path / "other.parquet"))


def test_parse_seeds():
    assert parse_seeds("0,1") == [0, 1]
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    with pytest.raises(SipoError, match="--seeds"):
        parse_seeds("a,b")


# ----------------------------------------------------------------------------- sampling
def test_same_seed_same_image_whatever_the_batch(tiny_sd15_adapter):
    """Each image has its own generator: (prompt, seed) fixes the image, alone or batched, and run again."""
    options = {"num_inference_steps": 3, "guidance_scale": 5.0}
    alone = tiny_sd15_adapter.sample(["a cat"], generator=[torch.Generator().manual_seed(0)], **options)
    batch = tiny_sd15_adapter.sample(["a red dog", "a cat"], generator=[torch.Generator().manual_seed(1),
                                                                       torch.Generator().manual_seed(0)], **options)
    again = tiny_sd15_adapter.sample(["a cat"], generator=[torch.Generator().manual_seed(0)], **options)
    other_seed = tiny_sd15_adapter.sample(["a cat"], generator=[torch.Generator().manual_seed(5)], **options)
    assert alone.shape == (1, 3, 32, 32) and 0 <= alone.min() and alone.max() <= 1
    torch.testing.assert_close(again, alone, atol=0, rtol=0)
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)
    assert (other_seed - alone).abs().max() > 1e-3


def test_generate_skips_images_already_on_disk(tiny_sd15_adapter, tmp_path):
    samples = [Sample(0, 0, "a cat"), Sample(1, 0, "a dog")]
    options = {"num_inference_steps": 2, "guidance_scale": 5.0}
    assert generate(tiny_sd15_adapter.sample, samples, tmp_path, "base", 2, progress=False, **options) == 2
    picture = load_picture(image_path(tmp_path, "base", samples[0]))
    assert picture.shape == (3, 32, 32)
    calls = []
    assert generate(lambda *a, **k: calls.append(1), samples, tmp_path, "base", 2, progress=False) == 0
    assert calls == []


def test_video_pictures_are_frame_folders(tmp_path):
    from sipo.evaluate import save_picture

    video = torch.rand(4, 3, 8, 8)
    path = image_path(tmp_path, "base", Sample(0, 0, "a cat"))
    save_picture(path, video)
    stored = image_path(tmp_path, "base", Sample(0, 0, "a cat"))
    assert stored.is_dir() and len(list(stored.glob("frame_*.png"))) == 4
    torch.testing.assert_close(load_picture(stored), video, atol=0.5 / 255 + 1e-6, rtol=0)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained_run(tiny_sd15_dir, tmp_path_factory):
    """A tiny SD1.5 LoRA trained by `sipo train` (in process), plus the config file it was trained with."""
    from sipo.cli import main

    root = tmp_path_factory.mktemp("eval_run")
    manifest = write_jsonl_pairs(root / "data")
    config = write_tiny_config(root / "tiny.yaml", tiny_sd15_dir, manifest, root / "run",
                               **{"train.learning_rate": 0.05, "train.max_steps": 3})
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    return config, root / "run"


@pytest.fixture(scope="module")
def scorer_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_scorers")
    return {"pickscore": make_tiny_clip(root / "pickscore"), "aesthetic": make_tiny_aesthetic(root / "aesthetic")}


def _eval_command(config, run, prompts, output, scorer_paths, *extra):
    return [sys.executable, "-m", "sipo", "eval", "--config", str(config), "--checkpoint", str(run),
            "--prompts", str(prompts), "--seeds", "0,1", "--scorers", "pickscore,aesthetic",
            "--scorer-path", f"pickscore={scorer_paths['pickscore']}", "--scorer-path", f"aesthetic={scorer_paths['aesthetic']}",
            "--num-inference-steps", "2", "--batch-size", "3", "--output-dir", str(output), "--no-progress", *extra]


@pytest.mark.slow
def test_sipo_eval_end_to_end(trained_run, scorer_paths, tmp_path, capsys):
    config, run = trained_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\nthe blue painting\n")
    output = tmp_path / "eval"
    done = subprocess.run(_eval_command(config, run, prompts, output, scorer_paths), capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| pickscore |" in done.stdout and "| aesthetic |" in done.stdout and "win rate" in done.stdout
    for name in ("scores.csv", "summary.md", "summary.json", "grid.png"):
        assert (output / name).is_file()
    rows = list(csv.DictReader((output / "scores.csv").open()))
    assert len(rows) == 2 * 3 * 2  # models x prompts x seeds
    assert {r["model"] for r in rows} == {"base", "aligned"}
    # the LoRA changed the images: aligned differs from base on the same prompt and seed
    base = load_picture(output / "images" / "base" / "p00000_s0.png")
    aligned = load_picture(output / "images" / "aligned" / "p00000_s0.png")
    assert (base - aligned).abs().max() > 2 / 255
    # the reported win rate is the one of the CSV's scores
    from sipo.evaluate import win_rate as reference_win_rate

    score = {(r["model"], r["prompt_index"], r["seed"]): float(r["pickscore"]) for r in rows}
    keys = sorted({(r["prompt_index"], r["seed"]) for r in rows})
    expected = reference_win_rate(torch.tensor([score[("aligned", *k)] for k in keys]),
                                  torch.tensor([score[("base", *k)] for k in keys]))
    assert "| pickscore |" in (output / "summary.md").read_text()
    import json

    summary = json.loads((output / "summary.json").read_text())
    assert summary["scorers"][0]["win_rate"] == pytest.approx(expected, abs=1e-6)

    # re-running (in process) generates nothing: the PNGs are not rewritten, the table is the same
    from sipo.cli import main

    stamp = (output / "images" / "aligned" / "p00002_s1.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(_eval_command(config, run, prompts, output, scorer_paths)[3:]) == 0
    assert (output / "images" / "aligned" / "p00002_s1.png").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == done.stdout


def test_cli_bad_input_is_one_sentence(trained_run, tmp_path, capsys):
    """Each stops before any sampling, with exit status 2 and one `sipo: error:` line (CLI in process)."""
    import re

    from sipo.cli import main

    config, run = trained_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (("--config", config, "--checkpoint", run, "--prompts", empty), "holds no prompts"),
        (("--config", config, "--checkpoint", run, "--prompts", prompts, "--scorers", "pickscore,hpsv9"), "unknown scorer 'hpsv9'"),
        (("--config", config, "--checkpoint", run, "--prompts", prompts, "--scorer-path", f"pickscore={tmp_path / 'nope'}"),
         "pickscore scorer directory .* does not exist"),
    ]
    for args, message in cases:
        capsys.readouterr()
        status = main(["eval", *map(str, args), "--output-dir", str(tmp_path / "out"), "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("sipo: error: "), lines
        assert re.search(message, lines[0]), lines[0]
        assert not (tmp_path / "out" / "images").exists()


def test_checkpoint_of_another_family_is_one_sentence(tiny_sd15_dir, tmp_path):
    import yaml

    from sipo.config import load_config

    run = tmp_path / "digits_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "digits"}}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    config = load_config(None, [f"model.pretrained_path={tiny_sd15_dir}"])
    with pytest.raises(SipoError, match="trained on a digits model but --config loads a sd15 model"):
        run_eval(config, EvalOptions(prompts=str(prompts), checkpoint=str(run), output_dir=tmp_path / "out"))
    with pytest.raises(SipoError, match="not a sipo run directory"):
        run_eval(config, EvalOptions(prompts=str(prompts), checkpoint=str(tmp_path), output_dir=tmp_path / "out"))


def test_images_made_with_other_settings_are_not_reused(tmp_path):
    from sipo.evaluate import check_generation_settings

    settings = {"model": "m", "num_inference_steps": 50, "guidance_scale": 7.5}
    check_generation_settings(tmp_path, settings, ["a", "b"])
    check_generation_settings(tmp_path, settings, ["a", "b", "c"])  # more prompts: fine
    check_generation_settings(tmp_path, settings, ["a"])  # fewer: fine
    with pytest.raises(SipoError, match="guidance_scale"):
        check_generation_settings(tmp_path, {**settings, "guidance_scale": 5.0}, ["a", "b"])
    with pytest.raises(SipoError, match="the prompts"):
        check_generation_settings(tmp_path, settings, ["a", "x"])


# ----------------------------------------------------------------------------- video benchmark hook
def test_video_benchmark_hook_gets_each_models_videos_and_prompts(tmp_path):
    from sipo.evaluate import save_picture, video_table
    from sipo.rewards.vbench import run_video_benchmarks

    samples = [Sample(0, 0, "a cat"), Sample(1, 0, "a dog")]
    for model in ("base", "aligned"):
        for sample in samples:
            save_picture(image_path(tmp_path, model, sample), torch.rand(3, 3, 8, 8))

    class StandIn:
        name = "standin"

        def __init__(self):
            self.calls = []

        def evaluate(self, videos, prompts, output_dir):
            self.calls.append((list(videos), list(prompts), output_dir))
            return {"frames": float(sum(len(load_picture(v)) for v in videos))}

    bench = StandIn()
    videos = {m: [image_path(tmp_path, m, s) for s in samples] for m in ("base", "aligned")}
    results = run_video_benchmarks([bench], videos, [s.prompt for s in samples], tmp_path)
    assert results == {"standin": {"base": {"frames": 6.0}, "aligned": {"frames": 6.0}}}
    assert [c[1] for c in bench.calls] == [["a cat", "a dog"]] * 2
    assert all(v.is_dir() for v in bench.calls[0][0])
    assert "| standin frames | 6.0000 | 6.0000 |" in video_table(results, ("base", "aligned"))


def test_vbench_not_installed_is_one_sentence(tmp_path):
    import importlib.util

    from sipo.rewards.vbench import VBench

    if importlib.util.find_spec("vbench") is not None:
        pytest.skip("vbench is installed here")
    with pytest.raises(SipoError, match="pip install vbench"):
        VBench(["subject_consistency"]).evaluate([tmp_path / "v"], ["a cat"], tmp_path / "out")
    with pytest.raises(SipoError, match="at least one dimension"):
        VBench([])


def test_base_only_reports_means_without_win_rate(trained_run, scorer_paths, tmp_path, capsys):
    from sipo.cli import main

    config, _ = trained_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    status = main(["eval", "--config", str(config), "--base", "--prompts", str(prompts), "--scorers", "pickscore",
                   "--scorer-path", f"pickscore={scorer_paths['pickscore']}", "--num-inference-steps", "2",
                   "--output-dir", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "base mean" in out and "win rate" not in out and "aligned" not in out
    assert not (tmp_path / "out" / "images" / "aligned").exists()


def test_prompts_from_a_dataset_column(tmp_path):
    """``--prompts hf:DATASET[:SPLIT[:COLUMN]]`` (issue 27's `sipo pairs --prompts hf:...`): the unique non-empty
    strings of the column, in order; the first of prompt/caption/text by default; a missing column is one sentence."""
    import datasets

    from sipo.evaluate import read_prompts

    folder = tmp_path / "prompts"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"caption": ["a cat", " a dog ", "a cat", ""], "other": ["x", "y", "z", "w"]})}).save_to_disk(str(folder))
    assert read_prompts(f"hf:{folder}") == ["a cat", "a dog"]
    assert read_prompts(f"hf:{folder}:test:other", limit=2) == ["x", "y"]
    with pytest.raises(SipoError, match=r"has no nope column \(it has caption, other\); name one: hf:.*:test:COLUMN"):
        read_prompts(f"hf:{folder}:test:nope")
