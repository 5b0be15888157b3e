"""Issue 17, the config / CLI / eval / analyze items: each test reproduces a fault a new user met
(it fails on the code before the fix) and checks the one sentence or behaviour it now has.

Items: 2 (eval keyed by the weights' digest), 3 (analyze writes beside the checkpoint it studies),
9 (lora_alpha <= 0), 14 (duplicate YAML keys, --guidance-scale nan, --max-prompts 0), 17 (another
family's component), 18 (fp16 without a GPU), 22 (offline fail-fast; eval checks before sampling),
23 (``~`` in every path key), 25 (the fixed hypothesis profile).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch

from sipo.cli import build_parser
from sipo.cli import main as cli_main
from sipo.config import PATH_KEYS, SipoConfig, find_duplicate_key, load_config
from sipo.errors import SipoError
from train_fixtures import tiny_overrides, write_jsonl_pairs, write_tiny_config


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in process; it must exit 2 with one `sipo: error:` line naming a fix."""
    status = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("sipo: error: ") and "; " in last, last
    return last[len("sipo: error: "):]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=2)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from tiny_scorers import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "pickscore")


@pytest.fixture(scope="module")
def trained_run(tiny_sd15_dir, manifest, tmp_path_factory):
    """A tiny SD1.5 LoRA run of one step (one checkpoint), trained by `sipo train` in process."""
    root = tmp_path_factory.mktemp("rel_run")
    config = write_tiny_config(root / "tiny.yaml", tiny_sd15_dir, manifest, root / "run",
                               **{"train.max_steps": 1, "train.report_to": "none"})
    assert cli_main(["train", "--config", str(config), "--no-progress"]) == 0
    return config, root / "run"


def _train_further(run: Path) -> Path:
    """What training on does to a run, without the training: a newer checkpoint whose LoRA weights differ."""
    from safetensors.torch import load_file, save_file

    from sipo.checkpoints import list_checkpoints, write_manifest

    newest = list_checkpoints(run)[-1]
    step = int(newest.name.split("-")[1]) + 1
    newer = newest.with_name(f"step-{step:08d}")
    shutil.copytree(newest, newer)
    (newer / "manifest.json").unlink()
    weights = load_file(newer / "trainable.safetensors")
    save_file({k: (v + 0.5 if "lora_B" in k else v) for k, v in weights.items()}, newer / "trainable.safetensors")
    write_manifest(newer)
    return newer


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- item 2: eval keyed by weights
def test_eval_after_training_further_samples_the_new_weights_and_never_reports_the_old(trained_run, tiny_clip,
                                                                                      tmp_path, capsys):
    config, original = trained_run
    run = tmp_path / "run"
    shutil.copytree(original, run)  # the module's run stays as it was for the other tests
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dog\n")

    def evaluate(output: Path) -> dict:
        argv = ["eval", "--config", str(config), "--checkpoint", str(run), "--prompts", str(prompts), "--seeds", "0",
                "--scorers", "pickscore", "--scorer-path", f"pickscore={tiny_clip}", "--num-inference-steps", "2",
                "--output-dir", str(output), "--no-progress"]
        assert cli_main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
        return json.loads((output / "summary.json").read_text())

    output = tmp_path / "eval"
    first = evaluate(output)
    old_png = (output / "images" / "aligned" / "p00000_s0.png").read_bytes()

    newer = _train_further(run)
    second = evaluate(output)  # the same command after the run trained on
    new_png = (output / "images" / "aligned" / "p00000_s0.png").read_bytes()
    assert new_png != old_png, "the images of the old weights were reported for the new ones"
    # the report names the weights it scored
    assert first["settings"]["weights_sha256"] == _sha256(run / "checkpoints" / "step-00000001" / "trainable.safetensors")
    assert second["settings"]["checkpoint_step"] == newer.name
    assert second["settings"]["weights_sha256"] == _sha256(newer / "trainable.safetensors")
    # the old images are kept beside, under their weights' label, and not reported
    archive = output / "images" / f"aligned-step-00000001-{first['settings']['weights_sha256'][:12]}"
    assert (archive / "p00000_s0.png").read_bytes() == old_png
    # reference: a fresh output directory (nothing to reuse) gives the same images and scores
    fresh = tmp_path / "fresh"
    third = evaluate(fresh)
    assert (fresh / "images" / "aligned" / "p00000_s0.png").read_bytes() == new_png
    assert third["scorers"] == second["scorers"]
    rows = {r["model"]: r["pickscore"] for r in csv.DictReader((output / "scores.csv").open())}
    assert rows == {r["model"]: r["pickscore"] for r in csv.DictReader((fresh / "scores.csv").open())}


def test_claim_output_folder_keeps_one_weights_outputs_and_moves_others_aside(tmp_path):
    from sipo.evaluate import claim_output_folder

    folder = tmp_path / "analysis"
    a = {"weights": "a" * 64, "checkpoint": "step-00000001", "label": "step-00000001-aaaaaaaaaaaa"}
    b = {"weights": "b" * 64, "checkpoint": "step-00000002", "label": "step-00000002-bbbbbbbbbbbb"}
    assert claim_output_folder(folder, a, products=["analysis.csv"]) is None
    (folder / "analysis.csv").write_text("of a")
    (folder / "notes.txt").write_text("the user's")  # not a product: stays where it is
    assert claim_output_folder(folder, a, products=["analysis.csv"]) is None  # same weights: kept
    assert (folder / "analysis.csv").read_text() == "of a"
    note = claim_output_folder(folder, b, products=["analysis.csv"])
    assert "step-00000001" in note and "step-00000002" in note and "\n" not in note
    moved = tmp_path / "analysis-step-00000001-aaaaaaaaaaaa"
    assert (moved / "analysis.csv").read_text() == "of a" and not (folder / "analysis.csv").exists()
    assert (folder / "notes.txt").read_text() == "the user's"
    assert json.loads((folder / "weights.json").read_text())["weights"] == "b" * 64
    # outputs nobody recorded (an older sipo) are not trusted either
    unrecorded = tmp_path / "images" / "aligned"
    unrecorded.mkdir(parents=True)
    (unrecorded / "p00000_s0.png").write_bytes(b"old")
    assert "did not record" in claim_output_folder(unrecorded, a)
    assert (tmp_path / "images" / "aligned-unrecorded" / "p00000_s0.png").read_bytes() == b"old"


# ----------------------------------------------------------------------------- item 3: analyze beside its checkpoint
def test_analyze_checkpoint_of_run_b_writes_beside_run_b_not_into_the_configs_run(trained_run, tmp_path, capsys):
    config_path, run_b = trained_run
    run_a = tmp_path / "run_a"
    (run_a / "analysis").mkdir(parents=True)
    (run_a / "analysis" / "analysis.json").write_text('{"mine": "run A"}')
    config = tmp_path / "a.yaml"
    text = config_path.read_text().replace(str(run_b), str(run_a))
    assert str(run_a) in text
    config.write_text(text)
    out_b = tmp_path / "b_copy"
    shutil.copytree(run_b, out_b)
    assert cli_main(["analyze", "--config", str(config), "--checkpoint", str(out_b), "--pairs", "2",
                     "--buckets", "2"]) == 0, capsys.readouterr().err
    assert (run_a / "analysis" / "analysis.json").read_text() == '{"mine": "run A"}'  # run A untouched
    document = json.loads((out_b / "analysis" / "analysis.json").read_text())
    checkpoint = out_b / "checkpoints" / "step-00000001"
    assert document["model"]["weights_sha256"] == _sha256(checkpoint / "trainable.safetensors")
    assert document["model"]["checkpoint_step"] == "step-00000001"


# ----------------------------------------------------------------------------- item 9: lora_alpha
@pytest.mark.parametrize("alpha, effect", [(0, "zero, so the trained adapters would change nothing"), (-4, "negative")])
def test_lora_alpha_that_makes_the_update_zero_or_negative_stops_at_validation(alpha, effect):
    with pytest.raises(SipoError) as refused:
        load_config(None, [f"train.lora_alpha={alpha}", "train.lora_rank=4"])
    assert str(refused.value) == (f"train.lora_alpha={alpha} makes the LoRA scale alpha/rank {effect}; "
                                  "set a positive alpha, e.g. train.lora_alpha=4 (the rank)")
    load_config(None, ["train.lora_alpha=0", "train.finetune=full"])  # no adapters: alpha is unused


# ----------------------------------------------------------------------------- item 14: YAML, guidance, max-prompts
def test_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("objective:\n  beta: 1000\n  tau: 0.5\n  beta: 5000\ntrain:\n  seed: 1\n")
    sentence = _cli_error(capsys, ["config", "--config", str(path)])
    assert sentence == (f"config file {path} sets objective.beta twice (line 2 and line 4), and YAML would "
                        "silently keep the last; delete one of them")


def test_find_duplicate_key_walks_nesting_and_allows_merge_overrides():
    assert find_duplicate_key("a: 1\nb: {c: 1, c: 2}\n") == ("b.c", 2, 2)
    assert find_duplicate_key("x:\n- {e: 1}\n- {e: 2, e: 3}\n") == ("x.e", 3, 3)
    assert find_duplicate_key("base: &b {k: 1}\nrun:\n  <<: *b\n  k: 2\n") is None  # YAML's own override
    assert find_duplicate_key("model: {}\ndata: {}\n") is None


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_guidance_scale_that_no_sampler_uses_is_refused_before_anything_loads(value, tmp_path, capsys, monkeypatch):
    import sipo.models

    monkeypatch.setattr(sipo.models, "adapter_from_config", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    sentence = _cli_error(capsys, ["eval", "--config", "demo", "--base", "--prompts", str(prompts),
                                   "--scorers", "digits-classifier", "--guidance-scale", value])
    assert sentence.startswith(f"--guidance-scale {float(value)} is not a finite number >= 0")


def test_max_prompts_zero_is_refused_not_ignored(tmp_path, capsys):
    """0 would mean evaluating nothing; taken as "all" (the old behaviour) it silently did the opposite
    of what was typed, so it stops and names both ways to say what was meant."""
    from sipo.evaluate import read_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    assert read_prompts(prompts, limit=2) == ["a", "b"]
    sentence = _cli_error(capsys, ["eval", "--config", "demo", "--base", "--prompts", str(prompts),
                                   "--scorers", "digits-classifier", "--max-prompts", "0"])
    assert sentence == "--max-prompts 0 would evaluate no prompt; pass a positive number, or leave it out to use every prompt"


# ----------------------------------------------------------------------------- item 17: another family's component
def _sd15_with(tiny_sd15_dir: Path, target: Path, unet=None, text_hidden: int | None = None) -> Path:
    shutil.copytree(tiny_sd15_dir, target)
    if unet is not None:
        shutil.rmtree(target / "unet")
        unet.save_pretrained(target / "unet", safe_serialization=True)
    if text_hidden is not None:
        config = json.loads((target / "text_encoder" / "config.json").read_text())
        config["hidden_size"] = text_hidden
        (target / "text_encoder" / "config.json").write_text(json.dumps(config))
    return target


def test_sdxl_unet_inside_an_sd15_directory_is_named_before_it_loads(tiny_sd15_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from sipo.models import load_adapter

    config = dict(UNet2DConditionModel.load_config(tiny_sd15_dir / "unet"))
    # SDXL's conditioning (diffusers' UNet2DConditionModel "text_time"): pooled text (32) + 6 time ids x 8
    sdxl_unet = UNet2DConditionModel.from_config({**config, "addition_embed_type": "text_time",
                                                  "addition_time_embed_dim": 8,
                                                  "projection_class_embeddings_input_dim": 32 + 6 * 8})
    mixed = _sd15_with(tiny_sd15_dir, tmp_path / "mixed", unet=sdxl_unet)
    with pytest.raises(SipoError) as refused:  # before: TypeError in get_aug_embed at the first step
        load_adapter("sd15", str(mixed))
    assert str(refused.value).startswith(f"{mixed / 'unet'} is not a sd15 unet (its config.json has "
                                         "addition_embed_type='text_time', every sd15 model has None)")
    assert "set model.family" in str(refused.value)


def test_denoiser_and_text_encoder_of_different_widths_are_named(tiny_sd15_dir, tmp_path):
    from sipo.models.sd15 import SD15Adapter

    mixed = _sd15_with(tiny_sd15_dir, tmp_path / "mixed_width", text_hidden=48)
    with pytest.raises(SipoError, match=r"expects text states 32 wide \(cross_attention_dim\), but the text "
                                        r"encoders give 48 \(text_encoder/ 48\)"):
        SD15Adapter.check_family(mixed)
    SD15Adapter.check_family(tiny_sd15_dir)  # the intact directory passes


def test_component_of_another_class_than_model_index_declares_is_named(tiny_sd15_dir, tmp_path):
    from sipo.models.sd15 import SD15Adapter

    mixed = _sd15_with(tiny_sd15_dir, tmp_path / "mixed_class")
    config = json.loads((mixed / "unet" / "config.json").read_text())
    (mixed / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(SipoError, match="holds a UNet2DModel, but model_index.json declares a UNet2DConditionModel"):
        SD15Adapter.check_family(mixed)


# ----------------------------------------------------------------------------- item 18: fp16 without a GPU
def test_precision_check_follows_the_device():
    from sipo.performance import check_precision_for_device

    with pytest.raises(SipoError, match=r"^train.mixed_precision=fp16 needs a GPU.*set train.mixed_precision=bf16"):
        check_precision_for_device("fp16", "cpu")
    for precision, device in (("fp16", "cuda"), ("bf16", "cpu"), ("no", "cpu"), ("bf16", "cuda")):
        check_precision_for_device(precision, device)


def test_fp16_training_on_this_machine(tiny_sd15_dir, manifest, tmp_path, capsys, test_device):
    """Without a GPU: one sentence naming bf16, and nothing written. With one, fp16 is accepted."""
    from accelerate import PartialState

    if PartialState().device.type != "cpu":
        pytest.skip("fp16 is accepted where accelerate trains on a GPU (checked in test_precision_check_follows_the_device)")
    output = tmp_path / "run"
    sentence = _cli_error(capsys, ["train", "--config", "demo", "--no-progress",
                                   *tiny_overrides(tiny_sd15_dir, manifest, output), "train.mixed_precision=fp16"])
    assert "bf16" in sentence and "needs a GPU" in sentence
    assert not output.exists()


# ----------------------------------------------------------------------------- item 22: offline, and checks before sampling
def test_hub_id_without_network_fails_at_once_naming_the_network(monkeypatch):
    import diffusers

    import sipo.models.base as base
    from sipo.models import load_adapter

    monkeypatch.setattr(base, "hub_reachable", lambda timeout=5.0: False)  # this machine, deterministically
    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config",
                        classmethod(lambda *a, **k: pytest.fail("the hub loader ran (and would retry ~28 s)")))
    with pytest.raises(SipoError) as refused:
        load_adapter("sd15", "someorg/somemodel")
    text = str(refused.value)
    assert "cannot be reached from this machine (no network)" in text and "HF_HUB_OFFLINE=1" in text
    assert text.startswith("model.pretrained_path someorg/somemodel is a hub id") and "\n" not in text


def test_hub_id_in_offline_mode_without_a_cached_copy(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from sipo.models import load_adapter

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(SipoError, match=r"not in the local hub cache, and HF_HUB_OFFLINE=1 keeps sipo off the network"):
        load_adapter("sd15", "someorg/somemodel")


def test_eval_checks_a_hub_scorer_before_sampling_anything(monkeypatch, tmp_path, capsys):
    import sipo.models
    import sipo.models.base as base

    monkeypatch.setattr(base, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setattr(sipo.models, "adapter_from_config", lambda *a, **k: pytest.fail("sampling began"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    sentence = _cli_error(capsys, ["eval", "--config", "demo", "--base", "--prompts", str(prompts),
                                   "--scorers", "pickscore"])
    assert sentence.startswith("the pickscore scorer's checkpoint yuvalkirstain/PickScore_v1 is a hub id")
    assert "--scorer-path pickscore=DIR" in sentence and "HF_HUB_OFFLINE=1" in sentence
    # a scorer with no published default stops just as early, with its loader's own sentence
    sentence = _cli_error(capsys, ["eval", "--config", "demo", "--base", "--prompts", str(prompts), "--scorers", "hpsv2"])
    assert "--scorer-path hpsv2=DIR" in sentence


def test_eval_of_a_run_without_a_checkpoint_stops_before_the_base_half(trained_run, tiny_clip, tmp_path, capsys,
                                                                        monkeypatch):
    import sipo.models

    config, run = trained_run
    empty = tmp_path / "no_checkpoint"
    empty.mkdir()
    shutil.copy(run / "config.yaml", empty / "config.yaml")  # a run that failed before its first checkpoint
    monkeypatch.setattr(sipo.models, "adapter_from_config", lambda *a, **k: pytest.fail("the base half was sampled"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    sentence = _cli_error(capsys, ["eval", "--config", str(config), "--checkpoint", str(empty), "--prompts",
                                   str(prompts), "--scorers", "pickscore", "--scorer-path", f"pickscore={tiny_clip}"])
    assert sentence == (f"{empty} holds no checkpoint (checkpoints/step-*), so there are no trained weights to use; "
                        "pass the train.output_dir of a run that has written a checkpoint")


# ----------------------------------------------------------------------------- item 23: ~ in every path
def test_tilde_is_expanded_in_every_path_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    overrides = [f"{key}=~/{key}" for key in PATH_KEYS]
    config = load_config(None, overrides)
    for key in PATH_KEYS:
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) == f"{tmp_path}/{key}"
    assert load_config(None, ["model.pretrained_path=org/name"]).model.pretrained_path == "org/name"  # a hub id


def test_every_path_valued_field_is_in_path_keys():
    """A new ``*path`` / ``*_dir`` field must join PATH_KEYS, or ``~`` in it would name a folder ``~``."""
    found = set()
    for section in dataclasses.fields(SipoConfig):
        for item in dataclasses.fields(section.type if not isinstance(section.type, str)
                                       else typing.get_type_hints(SipoConfig)[section.name]):
            if item.name.endswith(("path", "_dir")):
                found.add(f"{section.name}.{item.name}")
    assert found == set(PATH_KEYS)


def test_tilde_is_expanded_in_cli_path_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["eval", "--config", "demo", "--prompts", "p", "--output-dir=~/e",
                                      "--checkpoint=~/run", "--pickapic-path=~/pap"])
    assert (args.output_dir, args.checkpoint, args.pickapic_path) == (f"{tmp_path}/e", f"{tmp_path}/run", f"{tmp_path}/pap")
    args = build_parser().parse_args(["analyze", "--config", "demo", "--output-dir=~/a"])
    assert args.output_dir == f"{tmp_path}/a"
    from sipo.evaluate import parse_scorer_paths

    assert parse_scorer_paths(["pickscore=~/ps"]) == {"pickscore": f"{tmp_path}/ps"}


# ----------------------------------------------------------------------------- item 25: deterministic hypothesis
def test_hypothesis_runs_under_the_fixed_profile():
    from hypothesis import settings

    current = settings.default
    assert current.derandomize is True and current.database is None and current.deadline is None
    assert current.max_examples == 100


# ----------------------------------------------------------------------------- a new user's pass over eval/analyze
def test_eval_and_analyze_output_dir_that_is_a_file(trained_run, tmp_path, capsys):
    config, run = trained_run
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    sentence = _cli_error(capsys, ["eval", "--config", "demo", "--base", "--prompts", str(prompts), "--scorers",
                                   "digits-classifier", "--output-dir", str(blocker)])
    assert sentence == f"--output-dir {blocker} is a file; set --output-dir to a directory path"  # was FileExistsError
    sentence = _cli_error(capsys, ["analyze", "--config", str(config), "--checkpoint", str(run), "--pairs", "2",
                                   "--output-dir", str(blocker)])
    assert sentence == f"--output-dir {blocker} is a file; set --output-dir to a directory path"


@pytest.mark.parametrize("text", ["-1", str(2**63), "99999999999999999999999"])
def test_seeds_torch_cannot_take_or_that_alias_others_are_refused(text):
    """torch.Generator().manual_seed(2**64) raises ValueError mid-sampling; manual_seed(-1) is 2**64 - 1."""
    from sipo.evaluate import parse_seeds

    with pytest.raises(SipoError, match=rf"^--seeds {text} is outside \[0, 2\*\*63\); pass seeds from 0 up"):
        parse_seeds(text)
    assert parse_seeds(str(2**63 - 1)) == [2**63 - 1]


def test_scorer_path_without_a_directory_is_refused():
    """``pickscore=`` read as "" is the working directory (it exists), and the loader then fell back to the hub."""
    from sipo.evaluate import parse_scorer_paths

    with pytest.raises(SipoError, match=r"^--scorer-path 'pickscore=' names no directory; write e.g. --scorer-path pickscore="):
        parse_scorer_paths(["pickscore="])


def test_analyze_checkpoint_of_another_family_stops_before_the_model_loads(trained_run, tmp_path, monkeypatch):
    import sipo.analysis

    _, run = trained_run
    monkeypatch.setattr(sipo.analysis, "prepare_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = load_config(None, ["model.family=sdxl"])
    with pytest.raises(SipoError, match="was trained on a sd15 model but --config loads a sdxl model"):
        sipo.analysis.run_analysis(config, checkpoint=run, output_dir=tmp_path / "out", progress=False)


def test_empty_or_blank_path_values_are_refused(tmp_path, monkeypatch):
    """``train.output_dir=`` trained into the working directory (checkpoints/, logs/, config.yaml among the
    user's files); a blank path is never meant."""
    with pytest.raises(SipoError, match=r"^train.output_dir is empty, which would write the run into the working "
                                        r"directory; set it to a directory of its own"):
        load_config(None, ["train.output_dir="])
    for key in PATH_KEYS:
        with pytest.raises(SipoError, match=rf"^{key}=' ' is only blanks; set a path"):
            load_config(None, [f"{key}=' '"])


def test_more_inference_steps_than_training_timesteps(tiny_sd15_dir, trained_run, tmp_path, capsys, monkeypatch):
    """The tiny SD1.5 has 1000 training timesteps (SD1.5's scheduler config): 5000 steps raised a bare
    ValueError in the schedule (train, analyze) or in the DDIM scheduler (eval)."""
    import sipo.models
    from sipo.config import check_against_model
    from sipo.rundir import model_numbers

    config = load_config(None, [f"model.pretrained_path={tiny_sd15_dir}", "model.num_inference_steps=5000",
                                "model.resolution=32"])
    with pytest.raises(SipoError, match=r"^model.num_inference_steps=5000 is more than the model's 1000 training "
                                        r"timesteps, so its inference grid has no previous step; set it to at most 1000"):
        check_against_model(config, *model_numbers(tiny_sd15_dir))
    config_path, run = trained_run
    monkeypatch.setattr(sipo.models, "adapter_from_config", lambda *a, **k: pytest.fail("a model was loaded"))
    sentence = _cli_error(capsys, ["analyze", "--config", str(config_path), "--checkpoint", str(run),
                                   "--output-dir", str(tmp_path / "a"), "model.num_inference_steps=5000"])
    assert sentence.startswith("model.num_inference_steps=5000 is more than the model's 1000 training timesteps")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    sentence = _cli_error(capsys, ["eval", "--config", str(config_path), "--base", "--prompts", str(prompts),
                                   "--scorers", "digits-classifier", "--output-dir", str(tmp_path / "e"),
                                   "--num-inference-steps", "5000"])
    assert sentence == ("--num-inference-steps 5000 is more than the model's 1000 training timesteps, which no "
                        "sampler can take; pass at most 1000 (50 is the usual)")


def test_pickapic_path_that_does_not_exist_is_named_as_the_option(tmp_path):
    """It was reported as "data.path /nonexist does not exist; set data.path ...", a key eval has not got."""
    from sipo.evaluate import read_prompts

    for missing in (tmp_path / "nope", tmp_path / "nope" / "test-*.parquet"):
        with pytest.raises(SipoError, match="^" + re.escape(f"--pickapic-path {missing} does not exist or matches no file; pass")):
            read_prompts("pickapic-test", str(missing))


def test_no_scorer_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import sipo.models

    monkeypatch.setattr(sipo.models, "adapter_from_config", lambda *a, **k: pytest.fail("sampling began"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    sentence = _cli_error(capsys, ["eval", "--config", "demo", "--base", "--prompts", str(prompts), "--scorers", ","])
    assert sentence == "--scorers names no scorer, so nothing would be scored; pass e.g. --scorers pickscore"


def test_hub_id_in_offline_mode_with_a_cached_copy_goes_on_to_the_loader(monkeypatch, tmp_path):
    """The offline check only refuses what the cache lacks: a cached repo (one file written the way
    huggingface_hub lays out its cache) passes it."""
    from huggingface_hub import constants

    from sipo.models.base import require_hub_access

    cache = tmp_path / "cache"
    snapshot = cache / "models--someorg--somemodel" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer_config.json").write_text("{}")
    (cache / "models--someorg--somemodel" / "refs").mkdir()
    (cache / "models--someorg--somemodel" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    require_hub_access("someorg/somemodel", "the x scorer's checkpoint", "pass --scorer-path x=DIR")
    with pytest.raises(SipoError, match="not in the local hub cache"):
        require_hub_access("someorg/other", "the x scorer's checkpoint", "pass --scorer-path x=DIR")
