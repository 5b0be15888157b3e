"""Held-out pairs (issue 20): the split, the fixed-noise metrics against an independent computation,
exact resume with validation on, best/, the plot, and one sentence per bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sipo.checkpoints import list_checkpoints
from sipo.config import DataConfig, load_config
from sipo.data import open_preference_dataset
from sipo.errors import SipoError
from sipo.train import train
from sipo.validation import VALIDATION_LOG, held_out_noise, held_out_split, preference_metrics
from train_fixtures import tiny_overrides, write_jsonl_pairs

BETA = 5000.0  # tiny_overrides' objective.beta


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=16)


def _config(model_dir, manifest, output_dir, **extra):
    # deterministic kernels (TF32 off on CUDA): the checks below compare to 1e-3 and bit for bit
    values = {"data.validation_fraction": 0.25, "train.validate_every": 2, "train.max_steps": 4,
              "train.report_to": "none", "objective.name": "dpo", "train.deterministic": True, **extra}
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / VALIDATION_LOG).read_text().splitlines()]


# ----------------------------------------------------------------------------- the split
def test_the_split_is_disjoint_complete_and_the_same_for_every_seed(pairs):
    splits = []
    for seed in (0, 7):
        dataset = open_preference_dataset(DataConfig(format="jsonl", path=str(pairs)), 32, seed=seed)
        splits.append(held_out_split(dataset, 0.25))
    keep, held = splits[0]
    assert splits[0] == splits[1]
    assert not set(keep) & set(held) and sorted(keep + held) == list(range(16))
    assert 0 < len(held) < 16



def test_the_split_and_its_noise_do_not_depend_on_where_the_data_lies(pairs, tmp_path):
    # a folder copied elsewhere (another node's mount, a test's temporary directory) holds out the
    # same pairs with the same fixed noise; keyed by absolute path, a 16-pair split moved with it
    import shutil

    moved = Path(shutil.copytree(pairs.parent if pairs.is_file() else pairs, tmp_path / "elsewhere" / "data"))
    moved_path = moved / pairs.name if pairs.is_file() else moved
    here, there = (open_preference_dataset(DataConfig(format="jsonl", path=str(p)), 32) for p in (pairs, moved_path))
    assert held_out_split(here, 0.25) == held_out_split(there, 0.25)
    for index in range(len(here)):
        noise_here = held_out_noise((4, 4, 4), here.pair_key(index), 1000, 1234)
        noise_there = held_out_noise((4, 4, 4), there.pair_key(index), 1000, 1234)
        assert torch.equal(noise_here.timesteps, noise_there.timesteps)
        assert torch.equal(noise_here.eps, noise_there.eps)


def test_preference_metrics_against_hand_computed_values():
    # z = (2, -1, 0.5, -3) at t = (10, 300, 600, 990) of T = 1000: quarters 1, 2, 3, 4
    z, t = torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([10, 300, 600, 990])
    record = preference_metrics(z, t, 1000)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert record["accuracy"] == 0.5 and record["negative_margin_fraction"] == 0.5
    assert record["reward_margin"] == pytest.approx((2 - 1 + 0.5 - 3) / 4)
    assert record["loss"] == pytest.approx(sum(-math.log(sigmoid(v)) for v in (2, -1, 0.5, -3)) / 4)
    assert record["grad_factor"] == pytest.approx(sum(sigmoid(-v) for v in (2, -1, 0.5, -3)) / 4)
    assert [record[f"accuracy_q{q}"] for q in (1, 2, 3, 4)] == [1.0, 0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- the numbers of a real run
def test_held_out_numbers_equal_an_independent_computation(tiny_sd15_dir, pairs, tmp_path):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from sipo.checkpoints import load_run_weights
    from sipo.models import load_adapter

    run = tmp_path / "run"
    train(_config(tiny_sd15_dir, pairs, run), progress=False)
    last = _log(run)[-1]
    assert last["step"] == 4 and [r["step"] for r in _log(run)] == [0, 2, 4]

    # Independently: the diffusers scheduler noises x0, the UNet predicts with and without the LoRA.
    adapter = load_adapter("sd15", str(tiny_sd15_dir))
    load_run_weights(adapter, run)
    scheduler = DDPMScheduler.from_pretrained(tiny_sd15_dir, subfolder="scheduler")
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")  # the reference: no LoRA at all
    dataset = open_preference_dataset(DataConfig(format="jsonl", path=str(pairs)), 32, seed=0)
    _, held = held_out_split(dataset, 0.25)
    z_values, steps = [], []
    for index in held:
        item = dataset[index]
        encoded = adapter.encode([item["prompt"]], item["chosen"][None], item["rejected"][None])
        noise = held_out_noise(encoded.x0_winner.shape[1:], dataset.pair_key(index), 1000, 1234)
        errors = {}
        for name, x0 in (("w", encoded.x0_winner), ("l", encoded.x0_loser)):
            x_t = scheduler.add_noise(x0, noise.eps, noise.timesteps)
            cond = encoded.conditioning["encoder_hidden_states"]
            with torch.no_grad():
                policy = adapter.denoiser(x_t, noise.timesteps, encoder_hidden_states=cond).sample
                reference = base_unet(x_t, noise.timesteps, encoder_hidden_states=cond).sample
            errors[name] = [((pred.double() - noise.eps.double()) ** 2).mean().item() for pred in (policy, reference)]
        delta = (errors["w"][0] - errors["w"][1]) - (errors["l"][0] - errors["l"][1])
        z_values.append(-0.5 * BETA * delta)  # SPEC 2
        steps.append(int(noise.timesteps))
    z = torch.tensor(z_values, dtype=torch.float64)
    assert last["held_out/pairs"] == len(held)
    # z = -2500 * (a difference of ~1e-5 between float32 errors near 1): float32 rounding moves it ~1e-3
    assert last["held_out/reward_margin"] == pytest.approx(float(z.mean()), abs=2e-3)
    assert last["held_out/loss"] == pytest.approx(float(-F.logsigmoid(z).mean()), abs=1e-3)
    assert z.abs().min() > 0.005  # no pair so close to 0 that float32 rounding (~5e-4) could flip its sign
    assert last["held_out/accuracy"] == float((z > 0).double().mean())
    assert _log(run)[0]["held_out/reward_margin"] == 0.0  # step 0: the LoRA is zero, policy == reference
    assert "train/accuracy" in last and "train/accuracy" not in _log(run)[0]
    assert (run / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((run / "data_report.json").read_text())["validation"]
    assert report["held_out_pairs"] == len(held) and report["training_pairs"] == 16 - len(held)


def test_exact_resume_with_validation_on(tiny_sd15_dir, pairs, tmp_path):
    extra = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.deterministic": True}
    train(_config(tiny_sd15_dir, pairs, tmp_path / "a", **extra), progress=False)

    def crash(step, adapter):
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(_config(tiny_sd15_dir, pairs, tmp_path / "b", **extra), progress=False, callbacks=[crash])
    train(_config(tiny_sd15_dir, pairs, tmp_path / "b", **extra), progress=False, resume=True)
    a = load_file(list_checkpoints(tmp_path / "a")[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(tmp_path / "b")[-1] / "trainable.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert [r["step"] for r in _log(tmp_path / "b")] == [0, 2, 4]  # each validation once
    for left, right in zip(_log(tmp_path / "a"), _log(tmp_path / "b")):
        assert left.keys() == right.keys()
        for key in left:
            assert left[key] == pytest.approx(right[key], abs=1e-6, nan_ok=True), key


def test_validation_takes_no_randomness_from_training(tiny_sd15_dir, pairs, tmp_path):
    """The same run with validation every step and only at the ends trains to the same weights."""
    often = train(_config(tiny_sd15_dir, pairs, tmp_path / "often", **{"train.validate_every": 1}), progress=False)
    rarely = train(_config(tiny_sd15_dir, pairs, tmp_path / "rarely", **{"train.validate_every": 0}), progress=False)
    assert [r["loss"] for r in often.history] == [r["loss"] for r in rarely.history]
    assert [r["step"] for r in _log(tmp_path / "rarely")] == [0, 4]
    final = {r["step"]: r for r in _log(tmp_path / "often")}[4]
    assert final["held_out/reward_margin"] == _log(tmp_path / "rarely")[-1]["held_out/reward_margin"]


def test_keep_best_holds_the_best_validation_and_survives_pruning(tiny_sd15_dir, pairs, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    train(_config(tiny_sd15_dir, pairs, run, **{"train.keep_best": "held_out_accuracy", "train.keep_last": 1,
                                                "train.checkpoint_every": 1, "train.validate_every": 1}),
          progress=False)
    log = _log(run)
    best = max(log, key=lambda r: (r["held_out/accuracy"], -r["step"]))  # the first step at the highest value
    saved = json.loads((run / "best" / "best.json").read_text())
    assert saved == {"step": best["step"], "metric": "held_out_accuracy", "value": best["held_out/accuracy"]}
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]  # keep_last pruned; best/ stays
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.load_lora_weights(run / "best")
    assert f"- best validation: step {saved['step']}, held_out_accuracy = " in (run / "README.md").read_text()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_a_fraction_outside_zero_one_is_one_sentence(fraction):
    with pytest.raises(SipoError, match=rf"data.validation_fraction={float(fraction)} must be between 0 and 1"):
        load_config(None, [f"data.validation_fraction={fraction}"])


def test_a_fraction_that_holds_out_nothing_is_one_sentence(tiny_sd15_dir, tmp_path):
    few = write_jsonl_pairs(tmp_path / "few", num_pairs=2)
    with pytest.raises(SipoError, match=r"holds out none of the 2 pairs; raise it"):
        train(_config(tiny_sd15_dir, few, tmp_path / "run", **{"data.validation_fraction": 0.0001}), progress=False)
    assert not (tmp_path / "run").exists()


def test_an_empty_validation_file_is_one_sentence(tiny_sd15_dir, pairs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SipoError) as info:
        train(_config(tiny_sd15_dir, pairs, tmp_path / "run", **{"data.validation_fraction": "null",
                                                                 "data.validation_path": str(empty)}), progress=False)
    assert str(empty) in str(info.value) and "\n" not in str(info.value)


def test_keep_best_without_held_out_pairs_is_one_sentence():
    with pytest.raises(SipoError, match="train.keep_best=held_out_accuracy needs held-out pairs"):
        from sipo.config import check_values

        check_values(load_config(None, ["train.keep_best=held_out_accuracy"]))


# ----------------------------------------------------------------------------- validation samples
def _sample_config(model_dir, manifest, output_dir, aesthetic: Path, **extra):
    values = {"data.validation_fraction": "null", "train.validation_prompts": "[a red square, a blue circle]",
              "train.validation_seeds": "[0, 1]", "train.sample_every": 2, "train.sample_steps": 2,
              "train.validation_scorers": "[aesthetic]", "train.validation_scorer_paths": f"[aesthetic={aesthetic}]",
              **extra}
    return _config(model_dir, manifest, output_dir, **values)


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory) -> Path:
    from tiny_scorers import make_tiny_aesthetic

    return make_tiny_aesthetic(tmp_path_factory.mktemp("aesthetic"))


def test_validation_samples_are_the_same_across_runs_and_scored_against_step_0(tiny_sd15_dir, pairs, tmp_path, aesthetic):
    from sipo.evaluate import bootstrap_ci, load_picture, win_outcomes
    from sipo.rewards import load_scorer

    for name in ("a", "b"):
        train(_sample_config(tiny_sd15_dir, pairs, tmp_path / name, aesthetic, **{"train.keep_best": "aesthetic"}),
              progress=False)
    steps = sorted(p.name for p in (tmp_path / "a" / "samples").iterdir())
    assert steps == ["step-00000000", "step-00000002", "step-00000004"]
    for step in steps:
        files = sorted(p.name for p in (tmp_path / "a" / "samples" / step).iterdir())
        assert files == ["grid.png", "p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png", "scores.json"]
        for file in files:
            assert (tmp_path / "a" / "samples" / step / file).read_bytes() == (tmp_path / "b" / "samples" / step / file).read_bytes()
    # the logged win rate is recomputed from the saved pictures with the scorer itself
    scorer = load_scorer("aesthetic", str(aesthetic))
    prompts = ["a red square", "a red square", "a blue circle", "a blue circle"]
    names = ["p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"]
    scores = {step: scorer.score(torch.stack([load_picture(tmp_path / "a" / "samples" / step / n) for n in names]),
                                 prompts).double() for step in ("step-00000000", "step-00000004")}
    record = [r for r in _log(tmp_path / "a") if r["step"] == 4 and "samples/aesthetic/mean" in r][0]
    assert record["samples/aesthetic/mean"] == pytest.approx(float(scores["step-00000004"].mean()), abs=1e-3)
    # the win rate from the scores saved beside the pictures, which the scorer reproduces from the 8-bit PNGs to
    # their rounding (~3e-5 here; a win decided by 3e-6, as step 4 against step 0 of this tiny run, may flip on it)
    saved = {step: torch.tensor(json.loads((tmp_path / "a" / "samples" / step / "scores.json").read_text())["aesthetic"],
                                dtype=torch.float64) for step in scores}
    for step in scores:
        assert saved[step] == pytest.approx(scores[step], abs=1e-4)
    outcomes = win_outcomes(saved["step-00000004"], saved["step-00000000"])
    assert record["samples/aesthetic/win_rate_vs_step0"] == pytest.approx(float(outcomes.double().mean()))
    assert (record["samples/aesthetic/win_rate_low"], record["samples/aesthetic/win_rate_high"]) == pytest.approx(
        bootstrap_ci(outcomes))
    means = {r["step"]: r["samples/aesthetic/mean"] for r in _log(tmp_path / "a") if "samples/aesthetic/mean" in r}
    best_step = max(means, key=lambda s: (means[s], -s))
    assert json.loads((tmp_path / "a" / "best" / "best.json").read_text())["step"] == best_step


def test_a_missing_validation_prompts_file_is_one_sentence_before_the_model_loads(tiny_sd15_dir, pairs, tmp_path):
    config = _config(tiny_sd15_dir, pairs, tmp_path / "run", **{"train.validation_prompts": f"[{tmp_path / 'nope.txt'}]"})
    with pytest.raises(SipoError, match=r"train.validation_prompts names .*nope.txt, which does not exist"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_sipo_analyze_reads_the_runs_validation_log(tiny_sd15_dir, pairs, tmp_path):
    from sipo.analysis import run_analysis

    run = tmp_path / "run"
    config = _config(tiny_sd15_dir, pairs, run)
    train(config, progress=False)
    result = run_analysis(config, checkpoint=run, num_pairs=2, num_buckets=2, output_dir=tmp_path / "analysis",
                          progress=False, verbose=False, plots=False)
    document = json.loads(result.files["json"].read_text())
    assert [r["step"] for r in document["validation"]] == [r["step"] for r in _log(run)] == [0, 2, 4]
    assert document["validation"][-1]["held_out/accuracy"] == _log(run)[-1]["held_out/accuracy"]
    assert "Held-out implicit accuracy (the run's validation.jsonl, 3 validations): 0.000 at step 0" in result.findings


def test_a_resume_with_another_keep_best_metric_keeps_best_afresh(tiny_sd15_dir, pairs, tmp_path, capsys):
    """Issue 30 item 3: best.json's value was compared across metrics (a pickscore of ~11.7 stayed
    unbeaten by accuracies <= 1). best/ kept by another metric is replaced, and the log says so."""
    run = tmp_path / "run"
    settings = {"train.keep_best": "held_out_accuracy", "train.validate_every": 1, "train.max_steps": 1,
                "train.checkpoint_every": 1, "data.validation_fraction": 0.125}
    train(_config(tiny_sd15_dir, pairs, run, **settings), progress=False)
    # best/ as a run kept by a sample scorer would have left it (metric and value of another scale)
    (run / "best" / "best.json").write_text(json.dumps({"step": 1, "metric": "pickscore", "value": 11.7}))
    capsys.readouterr()
    train(_config(tiny_sd15_dir, pairs, run, **{**settings, "train.max_steps": 2}), resume=True, progress=False)
    assert ("best/ holds step 1 kept by pickscore = 11.7, and train.keep_best is now held_out_accuracy: the two are "
            "not comparable, so best/ is kept afresh by held_out_accuracy") in capsys.readouterr().out
    saved = json.loads((run / "best" / "best.json").read_text())
    step2 = [r for r in _log(run) if r["step"] == 2][0]
    assert saved == {"step": 2, "metric": "held_out_accuracy", "value": step2["held_out/accuracy"]}
