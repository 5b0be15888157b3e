"""`sipo iterate` on the tiny SD1.5: two rounds straight through, and the same two rounds killed in
round 0's evaluation and in round 1's training, rerun: the same weights and the same round table."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_scorers import make_tiny_clip
from train_fixtures import tiny_overrides

from sipo.config import load_config
from sipo.errors import SipoError
from sipo.iterate import IterateOptions, iterate
from sipo.pairs import PairsOptions


def _options(root: Path, scorer: Path, out: Path, **extra) -> IterateOptions:
    pairs = PairsOptions(prompts=str(root / "prompts.txt"), out=out, samples_per_prompt=2, scorers=["pickscore"],
                         scorer_paths={"pickscore": str(scorer)}, num_inference_steps=2, batch_size=2, progress=False)
    values = dict(pairs=pairs, out=out, rounds=2, steps_per_round=1, eval_prompts=str(root / "eval.txt"), eval_seeds=[0])
    values.update(extra)
    return IterateOptions(**values)


@pytest.fixture(scope="module")
def setting(tiny_sd15_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("iterate")
    (root / "prompts.txt").write_text("a cat\na red dog\n")
    (root / "eval.txt").write_text("a blue car\n")
    scorer = make_tiny_clip(root / "clip", positive=True)
    # tau 0: no pair is masked, so every round's step moves the weights
    config = load_config(None, tiny_overrides(tiny_sd15_dir, root / "none.jsonl", root / "unused", **{
        "objective.tau": 0.0, "train.learning_rate": 0.05}))
    return root, scorer, config


@pytest.fixture(scope="module")
def straight(setting):
    root, scorer, config = setting
    out = root / "straight"
    summaries = iterate(config, _options(root, scorer, out))
    return out, summaries


@pytest.mark.slow
def test_two_rounds_write_pairs_a_growing_run_and_a_round_table(straight):
    out, summaries = straight
    assert [s["round"] for s in summaries] == [0, 1] and [s["steps"] for s in summaries] == [1, 2]
    for index in (0, 1):
        folder = out / f"round-{index:03d}"
        assert (folder / "pairs" / "pairs.jsonl").is_file() and (folder / "eval" / "scores.csv").is_file()
    # round 1's pairs came from the run after round 0 (its checkpoint's digest), round 0's from the base
    rows = [json.loads((out / f"round-{i:03d}" / "pairs" / "pairs.jsonl").read_text().splitlines()[0]) for i in (0, 1)]
    step_one = json.loads((out / "run" / "checkpoints" / "step-00000001" / "manifest.json").read_text())
    assert rows[1]["weights_sha256"] == step_one["files"]["trainable.safetensors"]["sha256"] != rows[0]["weights_sha256"]
    # round 0's previous is the base, so its two win rates agree; round 1 compares with round 0's scores
    first = summaries[0]["scorers"]["pickscore"]
    assert first["win_rate_vs_previous"] == first["win_rate_vs_base"]
    assert json.loads((out / "rounds.json").read_text()) == summaries
    assert (out / "rounds.png").stat().st_size > 0 and "| 1 | 2 |" in (out / "rounds.md").read_text()


@pytest.mark.slow
def test_a_killed_iterate_continues_to_the_same_result(setting, straight, monkeypatch):
    root, scorer, config = setting
    out = root / "killed"
    evaluate_module, train_module = importlib.import_module("sipo.evaluate"), importlib.import_module("sipo.train")
    real_csv, real_step = evaluate_module.write_scores_csv, train_module.optimizer_step

    def csv_then_kill(*args, **kwargs):  # round 0's evaluation: pictures sampled and scored, then the kill
        monkeypatch.setattr(evaluate_module, "write_scores_csv", real_csv)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "write_scores_csv", csv_then_kill)
    with pytest.raises(KeyboardInterrupt):
        iterate(config, _options(root, scorer, out))
    assert json.loads((out / "iterate.json").read_text())["done"] == {"0": ["pairs", "train"]}

    def step_then_kill(run, step):  # round 1's training, before its step lands
        if run.state.step == 1:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(train_module, "optimizer_step", step_then_kill)
    pairs_stamp = (out / "round-000" / "pairs" / "pairs.jsonl").stat().st_mtime_ns
    with pytest.raises(KeyboardInterrupt):
        iterate(config, _options(root, scorer, out))
    assert json.loads((out / "iterate.json").read_text())["done"] == {"0": ["pairs", "train", "eval"], "1": ["pairs"]}
    monkeypatch.setattr(train_module, "optimizer_step", real_step)
    summaries = iterate(config, _options(root, scorer, out))
    assert (out / "round-000" / "pairs" / "pairs.jsonl").stat().st_mtime_ns == pairs_stamp  # not made again

    straight_out, straight_summaries = straight
    assert summaries == straight_summaries
    for index in (0, 1):
        pairs = f"round-{index:03d}/pairs/pairs.jsonl"
        assert (out / pairs).read_bytes() == (straight_out / pairs).read_bytes()
    final = "run/checkpoints/step-00000002/trainable.safetensors"
    mine, theirs = load_file(out / final), load_file(straight_out / final)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_other_settings_in_the_same_folder_stop_in_one_sentence(setting, straight):
    root, scorer, config = setting
    out, _ = straight
    with pytest.raises(SipoError, match=r"holds rounds made with other settings \(steps_per_round\); rerun with the same"):
        iterate(config, _options(root, scorer, out, steps_per_round=2))
    with pytest.raises(SipoError, match="must be at least 1"):
        iterate(config, _options(root, scorer, root / "new", rounds=0))


def test_reference_checkpoint_is_a_frozen_copy_with_that_checkpoints_weights(setting, straight):
    """train.reference_checkpoint (--reference previous): the reference predicts what the run's policy at
    that checkpoint predicts, while the policy itself starts from the base's LoRA (B = 0)."""
    from sipo.checkpoints import load_run_weights
    from sipo.models import adapter_from_config
    from sipo.train import build_model

    root, scorer, config = setting
    out, _ = straight
    checkpoint = out / "run" / "checkpoints" / "step-00000001"
    values = config.to_dict()
    values["train"]["reference_checkpoint"] = str(checkpoint)
    from sipo.config import config_from_dict

    adapter, reference = build_model(config_from_dict(values), None)
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    at_step_one = adapter_from_config(config.model)
    load_run_weights(at_step_one, out / "run", checkpoint)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn((1, 4, 16, 16), generator=generator)
    cond = at_step_one.encode_prompts(["a cat"])
    t = torch.tensor([500])
    with torch.no_grad():
        expected = at_step_one.predict(x_t, t, cond)
        torch.testing.assert_close(adapter.predict(x_t, t, cond, denoiser=reference), expected)
        assert not torch.allclose(adapter.predict(x_t, t, cond), expected)  # the policy is still the base
