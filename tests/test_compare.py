"""`sipo sweep` and `sipo compare` on the tiny SD1.5: a 2-objective x 2-seed sweep, resumed; its pooled
compare against numbers recomputed from scores.csv; pictures reused by weights digest; the HTML page
opened in headless Chromium, its numbers read back against summary.json."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_scorers import make_tiny_aesthetic, make_tiny_clip
from train_fixtures import write_jsonl_pairs, write_tiny_config

from sipo.errors import SipoError

GRID = {"objective.name": ["dpo", "sipo"]}
SCORERS = ["pickscore", "aesthetic"]


@pytest.fixture(scope="module")
def setting(tiny_sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    manifest = write_jsonl_pairs(root / "data")
    config = write_tiny_config(root / "tiny.yaml", tiny_sd15_dir, manifest, root / "unused",
                               **{"train.learning_rate": 0.05, "train.max_steps": 2})
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\nthe blue painting\n")
    paths = {"pickscore": str(make_tiny_clip(root / "pickscore")), "aesthetic": str(make_tiny_aesthetic(root / "aesthetic"))}
    options = {"scorers": SCORERS, "scorer_paths": paths, "seeds": [0, 1], "num_inference_steps": 2, "progress": False}
    return root, config, prompts, options


@pytest.fixture(scope="module")
def swept(setting):
    from sipo.sweep import run_sweep

    root, config, prompts, options = setting
    result = run_sweep(config, GRID, [0, 1], root / "sweep", overrides=["train.max_steps=1"],
                       compare_options={**options, "prompts": str(prompts)}, progress=False)
    return root / "sweep", result


def _scores_csv(folder: Path) -> dict[tuple[str, int], dict[str, float]]:
    """(model, sample) -> {scorer: score}, read back from scores.csv."""
    rows = csv.DictReader((folder / "scores.csv").open())
    return {(r["model"], int(r["sample"])): {n: float(r[n]) for n in SCORERS} for r in rows}


# ----------------------------------------------------------------------------- sweep
def test_sweep_trains_every_cell_and_pools_seeds_per_configuration(swept):
    from sipo.stats import t_interval

    folder, result = swept
    names = ["objective.name=dpo,seed=0", "objective.name=dpo,seed=1", "objective.name=sipo,seed=0",
             "objective.name=sipo,seed=1"]
    assert [c.name for c in result.cells] == names
    assert all(result.status[n] == "trained" for n in names)
    for name in names:
        saved = (folder / name / "config.yaml").read_text()
        assert f"seed: {name[-1]}" in saved and f"name: {name.split('=')[1].split(',')[0]}" in saved
    summary = json.loads((folder / "compare" / "summary.json").read_text())
    assert summary["entries"] == ["objective.name=dpo", "objective.name=sipo", "base"]
    scores = _scores_csv(folder / "compare")
    samples = sorted({n for _, n in scores})
    assert len(samples) == 2 * 2  # prompts x picture seeds
    for scorer in SCORERS:
        stats = summary["scorers"][scorer]
        for configuration in ("dpo", "sipo"):
            cells = [f"objective.name={configuration},seed={s}" for s in (0, 1)]
            per_seed = [np.mean([scores[(c, n)][scorer] for n in samples]) for c in cells]
            mean, low, high = t_interval(per_seed)
            got = stats["means"][f"objective.name={configuration}"]
            assert got["per_seed"] == pytest.approx(per_seed) and (got["mean"], got["low"], got["high"]) == pytest.approx((mean, low, high))
        # dpo over sipo: seed s against seed s, a hand count of wins (ties half), then the t-interval
        per_seed = []
        for s in (0, 1):
            a, b = (f"objective.name={m},seed={s}" for m in ("dpo", "sipo"))
            diffs = [scores[(a, n)][scorer] - scores[(b, n)][scorer] for n in samples]
            per_seed.append(sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / len(diffs))
        cell = stats["win_rate"]["objective.name=dpo"]["objective.name=sipo"]
        assert cell["per_seed"] == pytest.approx(per_seed) and cell["rate"] == pytest.approx(np.mean(per_seed))
        _, low, high = t_interval(per_seed)  # cut to [0, 1], where a rate lies
        assert (cell["low"], cell["high"]) == pytest.approx((max(low, 0.0), min(high, 1.0)))
        assert stats["win_rate"]["objective.name=sipo"]["objective.name=dpo"]["rate"] == pytest.approx(1 - np.mean(per_seed))
        strengths = [r["strength"] for r in stats["ranking"]]  # listed best first; equal strengths share a rank
        assert strengths == sorted(strengths, reverse=True) and stats["ranking"][0]["rank"] == 1
    for name in ("summary.md", "win_matrix.png", "report.html"):
        assert (folder / "compare" / name).is_file()


def test_sweep_workers_train_the_same_cells_in_their_own_processes(setting, swept, tmp_path, capsys):
    """--workers 2: both cells trained at once in spawned processes, to the weights one process trains
    (up to float summation order: the workers run one torch thread each)."""
    from safetensors.torch import load_file

    from sipo.sweep import run_sweep

    _, config, _, _ = setting
    folder = tmp_path / "sweep"
    result = run_sweep(config, GRID, [0], folder, overrides=["train.max_steps=1"], progress=False, workers=2)
    assert result.status == {"objective.name=dpo,seed=0": "trained", "objective.name=sipo,seed=0": "trained"}
    assert "2 of 2 cells to train, 2 at a time" in capsys.readouterr().out
    for name in result.status:
        mine = load_file(folder / name / "checkpoints" / "step-00000001" / "trainable.safetensors")
        theirs = load_file(swept[0] / name / "checkpoints" / "step-00000001" / "trainable.safetensors")
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-6)
    # a rerun finds both finished: nothing is trained again
    again = run_sweep(config, GRID, [0], folder, overrides=["train.max_steps=1"], progress=False, workers=2)
    assert set(again.status.values()) == {"finished before"}
    with pytest.raises(SipoError, match=r"--workers 0: pass 1 or more"):
        run_sweep(config, GRID, [0], tmp_path / "none", progress=False, workers=0)


@pytest.mark.parametrize("how", ["SIGTERM to the sweep alone", "Ctrl-C to the process group"])
def test_a_stopped_sweep_with_workers_checkpoints_every_running_cell_and_starts_no_other(setting, tmp_path, how):
    """SIGTERM to the `sipo sweep --workers 2` process alone (as Kubernetes sends it; the sweep passes it on),
    or SIGINT to its whole process group (Ctrl-C in a terminal: every worker hears it, and the sweep's
    passing it on arrives as the same stop): both running cells finish their step and checkpoint it (no
    logged step lost), the third cell never starts, the command says to rerun itself and exits 128 +
    the signal; --print-commands then resumes both."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, config, _, _ = setting
    folder = tmp_path / "sweep"
    grid = "objective.name=dpo,dpo-cm,sipo"
    command = [sys.executable, "-m", "sipo", "sweep", "--config", str(config), "--grid", grid, "--seeds", "0",
               "--output-dir", str(folder), "--workers", "2", "--no-progress", "train.max_steps=100000",
               "train.checkpoint_every=100000", "train.log_every=1"]
    signum = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
    # its own session (a process group to signal), with SIGINT back where pytest runs in the background
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    cells = [folder / f"objective.name={name},seed=0" for name in ("dpo", "dpo-cm", "sipo")]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        logged = [len((c / "metrics.jsonl").read_text().splitlines()) if (c / "metrics.jsonl").is_file() else 0
                  for c in cells[:2]]
        if min(logged) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0][-3000:]
    if signum == signal.SIGTERM:
        os.kill(process.pid, signum)
    else:
        os.killpg(process.pid, signum)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 128 + signum, output[-3000:]
    assert "rerun the same sipo sweep command" in output, output[-3000:]
    for cell in cells[:2]:
        checkpoints = sorted((cell / "checkpoints").glob("step-*"))
        last_logged = json.loads((cell / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        assert checkpoints and int(checkpoints[-1].name.split("-")[1]) == last_logged >= 3
    assert not (cells[2] / "checkpoints").exists()
    again = subprocess.run([*command, "--print-commands"], capture_output=True, text=True, timeout=240)
    lines = again.stdout.strip().splitlines()
    assert len(lines) == 3 and sum(line.endswith(" --resume") for line in lines) == 2, again.stdout + again.stderr


def test_tie_tolerance_of_a_compare(tmp_path):
    """write_comparison on hand-made scores: base 0.50 on every sample; run r 0.505, 0.52, 0.49, 0.50:
    with --tie-tolerance 0.01, tie, win, loss, tie -> (0.5 + 1 + 0 + 0.5) / 4 = 0.5; without, 2.5 / 4."""
    from sipo.compare import BASE, Model, write_comparison
    from sipo.evaluate import Sample, image_path, save_picture

    samples = [Sample(i, i, f"prompt {i}") for i in range(4)]
    models = [Model(BASE, None, {}, "base"), Model("r", None, {}, "r")]
    for folder in ("a", "b"):  # each compare reads its pictures under its own folder
        for model in models:
            for sample in samples:
                save_picture(image_path(tmp_path / folder, model.folder, sample), torch.full((3, 4, 4), 0.5))
    scores = {"s": np.array([[0.50, 0.50, 0.50, 0.50], [0.505, 0.52, 0.49, 0.50]])}
    settings = {"description": "hand-made", "num_samples": 4, "seeds": [0, 1, 2, 3]}
    tied = write_comparison(tmp_path / "a", settings, models, samples, scores, tie_tolerance=0.01, echo=False)
    assert tied.summary["scorers"]["s"]["win_rate"]["r"][BASE]["rate"] == pytest.approx(0.5)
    assert "within 0.01 of each other tie" in tied.summary["intervals"]
    strict = write_comparison(tmp_path / "b", settings, models, samples, scores, echo=False)
    assert strict.summary["scorers"]["s"]["win_rate"]["r"][BASE]["rate"] == pytest.approx(2.5 / 4)
    assert (tmp_path / "a" / "summary.md").read_text().startswith("# sipo compare\n\nhand-made\n")
    from sipo.compare import CompareOptions, _check_options

    with pytest.raises(SipoError, match="--tie-tolerance -0.5 is negative; pass 0"):
        _check_options(None, CompareOptions(runs=["a", "b"], prompts="p.txt", tie_tolerance=-0.5))


def test_sweep_skips_finished_cells_and_resumes_a_killed_one_exactly(setting, tmp_path, capsys):
    """A one-cell sweep of 2 steps; its step-2 checkpoint and model card removed (killed after step 1):
    --print-commands names it with --resume, and the rerun continues from step 1 to the same weights."""
    from safetensors.torch import load_file

    from sipo.sweep import run_sweep

    _, config, _, _ = setting
    folder = tmp_path / "sweep"
    grid = {"objective.name": ["sipo"]}
    run_sweep(config, grid, [0], folder, overrides=["train.checkpoint_every=1"], progress=False)
    cell = folder / "objective.name=sipo,seed=0"
    uninterrupted = load_file(cell / "checkpoints" / "step-00000002" / "trainable.safetensors")
    capsys.readouterr()
    run_sweep(config, grid, [0], folder, overrides=["train.checkpoint_every=1"], print_commands=True)
    assert capsys.readouterr().out == ""  # finished: no command left
    shutil.rmtree(cell / "checkpoints" / "step-00000002")
    (cell / "README.md").unlink()
    run_sweep(config, grid, [0], folder, overrides=["train.checkpoint_every=1"], print_commands=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sipo train --config ") and lines[0].endswith(" --resume")
    assert f"train.output_dir={cell.resolve()}" in lines[0] and "objective.name=sipo train.seed=0" in lines[0]
    result = run_sweep(config, grid, [0], folder, overrides=["train.checkpoint_every=1"], progress=False)
    assert result.status == {cell.name: "resumed"}
    resumed = load_file(cell / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    # the same folder with other overrides is another sweep: refused, never mixed
    with pytest.raises(SipoError, match="holds a sweep of --config"):
        run_sweep(config, grid, [0], folder, overrides=["train.checkpoint_every=2"], progress=False)


def test_grid_parsing_and_cell_names():
    from sipo.sweep import make_cells, parse_grid

    grid = parse_grid(["objective.name=dpo,dpo-cm,sipo", "objective.beta=1000,5000"])
    assert grid == {"objective.name": ["dpo", "dpo-cm", "sipo"], "objective.beta": ["1000", "5000"]}
    cells = make_cells(grid, [0, 1])
    assert len(cells) == 12 and cells[0].name == "objective.name=dpo,objective.beta=1000,seed=0"
    assert cells[1].configuration == "objective.name=dpo,objective.beta=1000" and cells[1].seed == 1
    for bad, message in (("beta=1", "section.key"), ("objective.beta=", "section.key"), ("train.seed=1,2", "--seeds")):
        with pytest.raises(SipoError, match=message):
            parse_grid([bad])


# ----------------------------------------------------------------------------- compare
@pytest.fixture(scope="module")
def compared(swept, setting, tmp_path_factory):
    """dpo seed 0 with the base, then dpo, sipo (seed 0) and the base: how many pictures each sampled."""
    import importlib

    from sipo.compare import CompareOptions, run_compare
    from sipo.config import load_config

    folder, _ = swept
    _, config_path, prompts, options = setting
    config = load_config(config_path)
    out = tmp_path_factory.mktemp("compared") / "out"
    evaluate_module = importlib.import_module("sipo.evaluate")  # sipo.evaluate is also the API's function
    original, generated = evaluate_module.generate, []

    def counting(*args, **kwargs):
        generated.append((args[3], original(*args, **kwargs)))
        return generated[-1][1]

    runs = [str(folder / "objective.name=dpo,seed=0"), str(folder / "objective.name=sipo,seed=0")]
    evaluate_module.generate = counting
    try:
        run_compare(config, CompareOptions(runs=runs[:1], base=True, prompts=str(prompts), output_dir=out, **options))
        first = list(generated)
        generated.clear()
        result = run_compare(config, CompareOptions(runs=runs, base=True, prompts=str(prompts), output_dir=out,
                                                    labels=["dpo", "sipo"], **options))
        second = list(generated)
    finally:
        evaluate_module.generate = original
    return out, result, first, second


def test_compare_samples_each_weights_once(compared):
    out, result, first, second = compared
    # the first compare sampled the base and dpo (4 pictures each); the second only sipo, the one new run
    assert [n for _, n in first] == [4, 4] and [n for _, n in second] == [4]
    folders = {m["label"]: m["images"] for m in result.summary["models"]}
    assert folders["base"].startswith("images/base-") and second[0][0] == folders["sipo"].split("/")[1]
    made_by = json.loads((out / folders["dpo"] / "made_by.json").read_text())
    assert folders["dpo"].split("/")[1].startswith(made_by["weights"][:16])


def test_compare_statistics_equal_a_recount_of_scores_csv(compared):
    from sipo.evaluate import bootstrap_ci
    from sipo.stats import bradley_terry

    out, result, _, _ = compared
    summary = json.loads((out / "summary.json").read_text())
    assert summary["entries"] == ["base", "dpo", "sipo"]
    scores = _scores_csv(out)
    samples = sorted({n for _, n in scores})
    for scorer in SCORERS:
        stats = summary["scorers"][scorer]
        values = {m: [scores[(m, n)][scorer] for n in samples] for m in summary["entries"]}
        wins = np.zeros((3, 3))
        for i, a in enumerate(summary["entries"]):
            assert stats["means"][a]["mean"] == pytest.approx(np.mean(values[a]))
            # the same resamples as sipo eval's interval of a mean
            assert (stats["means"][a]["low"], stats["means"][a]["high"]) == pytest.approx(bootstrap_ci(values[a]))
            for j, b in enumerate(summary["entries"]):
                if a != b:
                    wins[i, j] = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(values[a], values[b]))
                    assert stats["win_rate"][a][b]["rate"] == pytest.approx(wins[i, j] / len(samples))
                    assert stats["win_rate"][a][b]["low"] <= stats["win_rate"][a][b]["rate"] <= stats["win_rate"][a][b]["high"]
        theta = bradley_terry(wins, prior=0.5)
        got = {r["entry"]: r["strength"] for r in stats["ranking"]}
        assert [got[e] for e in summary["entries"]] == pytest.approx(theta.tolist(), abs=1e-8)


def test_compare_needs_two_models(setting, swept):
    from sipo.compare import CompareOptions, run_compare
    from sipo.config import load_config

    folder, _ = swept
    _, config_path, prompts, options = setting
    with pytest.raises(SipoError, match="at least two models"):
        run_compare(load_config(config_path), CompareOptions(runs=[str(folder / "objective.name=dpo,seed=0")],
                                                             prompts=str(prompts), **options))


def test_videos_become_animated_clips():
    from PIL import Image
    import base64
    import io

    from sipo.compare import picture_data_uri

    uri = picture_data_uri(torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert uri.startswith("data:image/gif;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as clip:
        assert clip.n_frames == 5


# ----------------------------------------------------------------------------- the page in a browser
def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _browser(page: Path, tmp_path: Path, *flags: str, hash_part: str = "") -> subprocess.CompletedProcess:
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it in CI)")
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *flags, page.resolve().as_uri() + hash_part]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class _Cells(HTMLParser):
    """The numbers the script drew: td.win / td.mean / td.strength with their data attributes, and the rows."""

    def __init__(self):
        super().__init__()
        self.cells, self.rows, self.images, self._open = [], [], 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and attrs.get("class") in ("win", "mean", "strength"):
            self._open = [attrs, ""]
        if tag == "div" and attrs.get("class") == "row":
            self.rows.append(int(attrs["data-index"]))
        if tag == "img" and (attrs.get("src") or "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._open is not None:
            self.cells.append(tuple(self._open))
            self._open = None


def test_report_page_in_headless_chromium(compared, tmp_path):
    from PIL import Image

    out, result, _, _ = compared
    page = out / "report.html"
    shot = tmp_path / "page.png"
    # one browser start: the screenshot, and the page's DOM after its script drew the tables and rows
    done = _browser(page, tmp_path, f"--screenshot={shot}", "--dump-dom", "--window-size=1100,1300", "--hide-scrollbars")
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, tables, pictures

    summary = json.loads((out / "summary.json").read_text())
    parsed = _Cells()
    parsed.feed(done.stdout)
    numbers = lambda text: [float(x) for x in re.findall(r"-?\d+\.\d+", text)]  # noqa: E731
    seen = defaultdict(int)
    for attrs, text in parsed.cells:
        stats = summary["scorers"][attrs["data-scorer"]]
        if attrs["class"] == "win":
            cell = stats["win_rate"][attrs["data-row"]][attrs["data-col"]]
            expected = [cell["rate"], cell["low"], cell["high"]]
        elif attrs["class"] == "mean":
            cell = stats["means"][attrs["data-entry"]]
            expected = [cell["mean"], cell["low"], cell["high"]]
        else:
            cell = next(r for r in stats["ranking"] if r["entry"] == attrs["data-entry"])
            expected = [cell["strength"], cell["low"], cell["high"]]
        assert numbers(text) == pytest.approx(expected, abs=5.1e-5), (attrs, text)
        seen[attrs["class"]] += 1
    assert dict(seen) == {"win": 2 * 3 * 2, "mean": 2 * 3, "strength": 2 * 3}  # scorers x off-diagonal / entries
    assert parsed.rows == list(range(4)) and parsed.images == 3 * 4  # prompt order; every model's picture

    # report.html#sort=1: sorted by pickscore's spread between the models, largest first
    scores = _scores_csv(out)
    spread = [max(scores[(m, n)]["pickscore"] for m in summary["entries"]) -
              min(scores[(m, n)]["pickscore"] for m in summary["entries"]) for n in range(4)]
    parsed = _Cells()
    parsed.feed(_browser(page, tmp_path, "--dump-dom", hash_part="#sort=1").stdout)
    assert [round(spread[i], 3) for i in parsed.rows] == sorted((round(s, 3) for s in spread), reverse=True)
    assert not math.isnan(sum(spread))


def test_cli_compare_reads_the_first_runs_config_and_reuses_every_picture(compared, setting, swept, capsys):
    """`sipo compare RUN RUN --base` without --config (the first run's config.yaml) into the folder of the
    fixture: nothing is sampled again, and the printed table is the one summary.md holds."""
    from sipo.cli import main

    out, _, _, _ = compared
    folder, _ = swept
    _, _, prompts, options = setting
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    scorer_paths = [f"--scorer-path={name}={path}" for name, path in options["scorer_paths"].items()]
    args = ["compare", str(folder / "objective.name=dpo,seed=0"), str(folder / "objective.name=sipo,seed=0"), "--base",
            "--labels", "dpo,sipo", "--prompts", str(prompts), "--seeds", "0,1", "--scorers", ",".join(SCORERS),
            *scorer_paths, "--num-inference-steps", "2", "--output-dir", str(out), "--no-progress"]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps
    table = printed[printed.index("## pickscore"):printed.index("report.html, summary")].strip()
    assert table and table in (out / "summary.md").read_text()
    assert main(["compare", str(folder / "objective.name=dpo,seed=0"), "--prompts", str(prompts)]) == 2
    assert "at least two models" in capsys.readouterr().err


def test_cli_tells_runs_from_overrides(tmp_path):
    from sipo.cli import _runs_and_overrides

    cell = tmp_path / "objective.name=dpo,seed=0"
    cell.mkdir()
    runs, overrides = _runs_and_overrides([str(cell), "model.resolution=32", "runs/missing", "runs/x/objective.beta=1,seed=0"])
    assert runs == [str(cell), "runs/missing", "runs/x/objective.beta=1,seed=0"] and overrides == ["model.resolution=32"]
