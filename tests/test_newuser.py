"""A new user's pass over sipo pairs, iterate, sweep and compare (issue 30, "keep going"): each test
reproduces one fault that user met, on the tiny SD1.5 of tests/tiny_models.py."""

from __future__ import annotations

import pytest
import yaml
from train_fixtures import write_jsonl_pairs, write_tiny_config

from sipo.errors import SipoError


def test_a_sweep_whose_config_file_changed_stops_instead_of_pooling_two_configurations(tiny_sd15_dir, tmp_path, capsys):
    """A finished cell trained at objective.beta 5000; the YAML edited to beta 1 and the sweep rerun with one
    more seed: the old cell would be skipped and pooled with a beta-1 cell under one configuration's name."""
    from sipo.sweep import run_sweep

    manifest = write_jsonl_pairs(tmp_path / "data")
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_sd15_dir, manifest, tmp_path / "unused",
                               **{"train.max_steps": 1, "objective.beta": 5000.0})
    grid = {"objective.name": ["dpo"]}
    run_sweep(config, grid, [0], tmp_path / "sweep", progress=False)
    values = yaml.safe_load(config.read_text())
    values["objective"]["beta"] = 1.0
    config.write_text(yaml.safe_dump(values))
    for print_commands in (True, False):
        with pytest.raises(SipoError, match=r"objective\.beta: 5000\.0 -> 1\.0.*restore them"):
            run_sweep(config, grid, [0, 1], tmp_path / "sweep", print_commands=print_commands, progress=False)
    assert not (tmp_path / "sweep" / "objective.name=dpo,seed=1").exists()  # nothing trained before the refusal
    # restored: the finished cell is skipped again and the new seed trains
    values["objective"]["beta"] = 5000.0
    config.write_text(yaml.safe_dump(values))
    result = run_sweep(config, grid, [0, 1], tmp_path / "sweep", progress=False)
    assert result.status == {"objective.name=dpo,seed=0": "finished before", "objective.name=dpo,seed=1": "trained"}


def test_sipo_pairs_that_keep_no_pair_stop_with_the_reason_and_rerun_with_a_lower_margin(tiny_sd15_dir, tmp_path):
    """--min-margin above every margin: the command used to exit 0 with an empty pairs.jsonl, and sipo train
    (or sipo iterate's training phase) then called the manifest malformed. Now it says why; the rerun with
    a lower margin re-pairs the kept samples and scores without sampling again."""
    from tiny_scorers import make_tiny_clip
    from train_fixtures import tiny_overrides

    from sipo.config import load_config
    from sipo.pairs import PairsOptions, make_pairs

    config = load_config(None, tiny_overrides(tiny_sd15_dir, tmp_path / "none.jsonl", tmp_path / "run"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    scorer = str(make_tiny_clip(tmp_path / "clip", positive=True))

    def options(min_margin: float) -> PairsOptions:
        return PairsOptions(prompts=str(prompts), out=tmp_path / "out", samples_per_prompt=2, scorers=["pickscore"],
                            scorer_paths={"pickscore": scorer}, min_margin=min_margin, num_inference_steps=1,
                            batch_size=2, progress=False)

    with pytest.raises(SipoError, match=r"no two pictures of a prompt differ by more than --min-margin 100 .*lower"):
        make_pairs(config, options(100.0))
    result = make_pairs(config, options(0.0))
    # two pictures standardised over themselves are -1 and +1: one pair of margin 2
    assert (result.pairs, result.sampled, result.scored) == (1, 0, 0)
    assert result.report["margin"]["max"] == pytest.approx(2.0)


def test_a_run_of_another_base_model_is_refused_by_compare_and_pairs(tiny_sd15_dir, tiny_sd15_v_dir, tmp_path):
    """A run trained on the v-prediction tiny SD1.5, compared with (or sampled for pairs from) the
    epsilon one's config: its LoRA was sampled on a base it never trained with, and scored as the run."""
    import shutil

    from train_fixtures import tiny_overrides

    from sipo.compare import CompareOptions, run_compare
    from sipo.config import load_config
    from sipo.pairs import PairsOptions, make_pairs
    from sipo.train import train

    manifest = write_jsonl_pairs(tmp_path / "data")
    run = tmp_path / "v-run"
    train(load_config(None, tiny_overrides(tiny_sd15_v_dir, manifest, run, **{"train.max_steps": 1})), progress=False)
    eps = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path / "unused"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    from tiny_scorers import make_tiny_clip

    scorer = {"pickscore": str(make_tiny_clip(tmp_path / "clip"))}
    with pytest.raises(SipoError, match=r"was trained on the base model .*tiny_sd15_v.*another model"):
        run_compare(eps, CompareOptions(runs=[str(run)], prompts=str(prompts), base=True, output_dir=tmp_path / "cmp",
                                        scorer_paths=scorer, num_inference_steps=1, progress=False))
    with pytest.raises(SipoError, match=r"pass the config the run was trained with"):
        make_pairs(eps, PairsOptions(prompts=str(prompts), out=tmp_path / "pairs", checkpoint=str(run), scorer_paths=scorer,
                                     num_inference_steps=1, progress=False))
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "pairs").exists()
    # the same base copied elsewhere (new path, new file times) is the same model: accepted
    from sipo.evaluate import check_run_base

    copy = shutil.copytree(tiny_sd15_v_dir, tmp_path / "moved-v")
    check_run_base(run, load_config(None, tiny_overrides(copy, manifest, tmp_path / "unused")).model)


def test_iterate_reads_its_eval_prompts_before_round_0_samples_and_trains(tiny_sd15_dir, tmp_path):
    """--eval-prompts with a typo: round 0's pairs and training ran, then the eval phase stopped, and the
    corrected command was refused in that folder (other settings): the round's work was lost."""
    from train_fixtures import tiny_overrides

    from sipo.config import load_config
    from tiny_scorers import make_tiny_clip

    from sipo.iterate import IterateOptions, iterate
    from sipo.pairs import PairsOptions

    config = load_config(None, tiny_overrides(tiny_sd15_dir, tmp_path / "none.jsonl", tmp_path / "unused"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    pairs = PairsOptions(prompts=str(prompts), out=tmp_path / "unused", samples_per_prompt=2,
                         scorer_paths={"pickscore": str(make_tiny_clip(tmp_path / "clip", positive=True))},
                         num_inference_steps=1, progress=False)
    for eval_prompts, eval_seeds, message in ((str(tmp_path / "typo.txt"), [0], "typo.txt does not exist"),
                                              (None, [], "--eval-seeds is empty")):
        with pytest.raises(SipoError, match=message):
            iterate(config, IterateOptions(pairs=pairs, out=tmp_path / "rounds", rounds=1, steps_per_round=1,
                                           eval_prompts=eval_prompts, eval_seeds=eval_seeds))
        assert not (tmp_path / "rounds").exists()


def test_ctrl_c_in_iterates_or_sweeps_training_says_to_rerun_that_command(tiny_sd15_dir, tmp_path, monkeypatch):
    """A real SIGINT during round 0's first step: training checkpoints and stops, and the sentence used to be
    sipo train's ("continue with --resume"), a flag sipo iterate does not have."""
    import importlib
    import os
    import signal

    from tiny_scorers import make_tiny_clip
    from train_fixtures import tiny_overrides

    from sipo.config import load_config
    from sipo.errors import TrainingInterrupted
    from sipo.iterate import IterateOptions, iterate
    from sipo.pairs import PairsOptions

    config = load_config(None, tiny_overrides(tiny_sd15_dir, tmp_path / "none.jsonl", tmp_path / "unused"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    pairs = PairsOptions(prompts=str(prompts), out=tmp_path / "unused", samples_per_prompt=2,
                         scorer_paths={"pickscore": str(make_tiny_clip(tmp_path / "clip", positive=True))},
                         num_inference_steps=1, progress=False)
    train_module = importlib.import_module("sipo.train")
    real_step = train_module.optimizer_step

    def signalled_step(run, step):  # the user's Ctrl-C arrives while step 1 runs
        os.kill(os.getpid(), signal.SIGINT)
        return real_step(run, step)

    monkeypatch.setattr(train_module, "optimizer_step", signalled_step)
    # a test run started in the background (a non-interactive shell's `&`, some CI runners) inherits SIGINT
    # ignored, and sipo leaves an ignored signal ignored: give this process the terminal's Ctrl-C back
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted, match=r"SIGINT in round 0's training after step 1; rerun the same sipo iterate"):
            iterate(config, IterateOptions(pairs=pairs, out=tmp_path / "rounds", rounds=1, steps_per_round=2))
        assert (tmp_path / "rounds" / "run" / "checkpoints" / "step-00000001").is_dir()
        # sipo sweep trains inside itself too: the same sentence, with its own command
        from sipo.sweep import run_sweep

        manifest = write_jsonl_pairs(tmp_path / "data")
        swept = write_tiny_config(tmp_path / "tiny.yaml", tiny_sd15_dir, manifest, tmp_path / "unused", **{"train.max_steps": 2})
        with pytest.raises(TrainingInterrupted, match=r"SIGINT in cell objective.name=dpo,seed=0 after step 1; rerun the same sipo sweep"):
            run_sweep(swept, {"objective.name": ["dpo"]}, [0], tmp_path / "sweep", progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)

@pytest.mark.parametrize("command, flag", [
    (["iterate", "--prompts", "p.txt", "--rounds", "1", "--steps-per-round", "1", "--out", "o", "--eval-seeds"], "--eval-seeds"),
    (["sweep", "--grid", "objective.name=dpo", "--output-dir", "o", "--compare-prompts", "p.txt", "--compare-seeds"],
     "--compare-seeds"),
])
def test_a_bad_seed_list_names_the_option_it_came_from(command, flag, tmp_path, capsys):
    """``--eval-seeds 3-1`` (a range written downwards) was answered "--seeds is empty", an option iterate has not."""
    from sipo.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("model: {family: sd15, pretrained_path: nowhere}\n")
    assert main([command[0], "--config", str(config), *command[1:], "3-1"]) == 2
    error = capsys.readouterr().err
    assert f"error: {flag} '3-1' names no seed; write e.g. {flag} 0,1" in error


def test_iterates_refusal_names_the_option_that_changed_inside_the_sampling_and_config_settings():
    """A rerun with another --batch-size was refused as "other settings (pairs)": which of twenty options?"""
    from sipo.iterate import changed_keys

    old = {"pairs": {"batch_size": 4, "scorers": ["pickscore"]}, "config": {"objective": {"beta": 5000.0}}, "rounds": 2}
    new = {"pairs": {"batch_size": 2, "scorers": ["pickscore"]}, "config": {"objective": {"beta": 1.0}}, "rounds": 2}
    assert changed_keys(old, new) == ["config.objective.beta", "pairs.batch_size"]
    assert changed_keys(old, {**old, "extra": 1}) == ["extra"]
