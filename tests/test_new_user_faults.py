"""Issue 30's new-user faults, one test each where no topic file holds it (items 4, 7, 8, 13-20):
each reproduces the fault first (it failed on 10c1de3), then checks the sentence or behaviour now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sipo.config import load_config
from sipo.errors import SipoError
from train_fixtures import tiny_overrides, write_jsonl_pairs


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=8)


# ----------------------------------------------------------------------------- item 4
def test_a_model_index_component_without_its_folder_stops_in_one_sentence(tmp_path, tiny_sd15_dir):
    """A Wan2.2-A14B folder whose transformer_2/ an interrupted download lost trained as one expert."""
    from sipo.rundir import check_model_dir

    folder = tmp_path / "Wan2.2-T2V-A14B"
    components = {"transformer": "WanTransformer3DModel", "transformer_2": "WanTransformer3DModel",
                  "vae": "AutoencoderKLWan", "text_encoder": "UMT5EncoderModel", "tokenizer": "T5TokenizerFast",
                  "scheduler": "UniPCMultistepScheduler"}
    libraries = {"text_encoder": "transformers", "tokenizer": "transformers"}
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "boundary_ratio": 0.875,
        **{name: [libraries.get(name, "diffusers"), cls] for name, cls in components.items()}}))
    for name in components:
        if name != "transformer_2":
            (folder / name).mkdir()
    config = load_config(None, ["model.family=wan", f"model.pretrained_path={folder}"])
    with pytest.raises(SipoError) as stopped:
        check_model_dir(config.model)
    assert str(stopped.value) == (
        f"{folder}/model_index.json lists transformer_2 (WanTransformer3DModel), but {folder} has no transformer_2/ "
        "folder (an interrupted download?), and diffusers refuses such a directory too; download transformer_2/ "
        "again or point model.pretrained_path at a complete pipeline directory")
    # a complete directory, whose model_index.json lists [null, null] components, passes
    check_model_dir(load_config(None, [f"model.pretrained_path={tiny_sd15_dir}"]).model)


def _fake_run(folder: Path, *overrides: str, checkpoint: str | None = "step-00000003") -> Path:
    """A run directory as a run stopped before its end leaves it: config.yaml and a checkpoint, no final weights."""
    from sipo.config import save_config

    folder.mkdir(parents=True)
    save_config(load_config(None, [f"train.output_dir={folder}", *overrides]), folder / "config.yaml")
    if checkpoint:
        (folder / "checkpoints" / checkpoint).mkdir(parents=True)
        (folder / "checkpoints" / checkpoint / "manifest.json").write_text('{"files": {}}')
    return folder


# ----------------------------------------------------------------------------- item 7
def test_export_diffusers_names_only_files_that_exist(tmp_path, capsys):
    """It printed "wrote RUN/pytorch_lora_weights.safetensors" (exit 0) for a file that did not exist."""
    from sipo.cli import main

    run = _fake_run(tmp_path / "run")
    assert main(["export", "--run", str(run), "--format", "diffusers"]) == 2
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    assert captured.err.strip() == (
        f"sipo: error: {run} holds no pytorch_lora_weights.safetensors (it stopped before its end, and its newest "
        f"checkpoint step-00000003 holds the weights in sipo's resume layout); finish the run with `sipo train "
        f"--config {run / 'config.yaml'} --resume`; or add train.max_steps=3 to write it from step-00000003 without "
        "training further")
    (run / "best").mkdir()
    (run / "best" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert main(["export", "--run", str(run), "--format", "diffusers"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'best' / 'pytorch_lora_weights.safetensors'}"


# ----------------------------------------------------------------------------- item 13
def test_the_comfyui_refusal_of_an_export_names_the_runs_diffusers_file(tmp_path):
    """It ended "set train.lora_format=diffusers", a training key, to a user exporting a finished run."""
    from sipo.export import export_run

    run = _fake_run(tmp_path / "run", "model.family=wan")
    with pytest.raises(SipoError) as stopped:
        export_run(run, "comfyui")
    assert str(stopped.value).endswith(
        f"which sipo does not map); use the run's diffusers file {run / 'pytorch_lora_weights.safetensors'} (`sipo "
        f"export --run {run} --format diffusers` names it), which diffusers' wan pipeline loads with pipe.load_lora_weights")
    assert "train.lora_format" not in str(stopped.value)


# ----------------------------------------------------------------------------- item 10
def test_best_is_a_checkpoint_every_command_takes_and_run_says_which_weights(tiny_sd15_dir, manifest, tmp_path,
                                                                               capsys):
    """`--checkpoint RUN/best` stopped ("not a sipo run directory"); `--checkpoint RUN` measured the newest
    checkpoint without a word."""
    from safetensors.torch import load_file

    from sipo.checkpoints import load_run_weights, run_weights
    from sipo.cli import main
    from sipo.models import load_adapter
    from sipo.train import train

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_sd15_dir, manifest, run, **{
        "data.validation_fraction": 0.5, "train.keep_best": "held_out_accuracy", "train.validate_every": 1,
        "train.batch_size": 1, "train.report_to": "none"})), progress=False)
    best_step = json.loads((run / "best" / "best.json").read_text())["step"]
    weights = run_weights(run / "best")
    assert weights.checkpoint == run / "best"
    adapter = load_adapter("sd15", str(tiny_sd15_dir))
    load_run_weights(adapter, run / "best")
    params = dict(adapter.denoiser.named_parameters())
    if best_step:  # the tensors of best/ are those of the checkpoint of its step
        saved = load_file(str(run / "checkpoints" / f"step-{best_step:08d}" / "trainable.safetensors"))
        assert saved.keys() and all(torch_equal(params[k], v) for k, v in saved.items())
    config = tmp_path / "run.yaml"
    config.write_text((run / "config.yaml").read_text())
    assert main(["analyze", "--config", str(config), "--checkpoint", str(run / "best"), "--pairs", "2",
                 "--buckets", "2"]) == 0
    out = capsys.readouterr().out
    assert f"sipo: measuring {run / 'best'}: best (weights sha256 {weights.sha256[:12]}), the weights train.keep_best kept" in out
    assert (run / "analysis-best" / "weights.json").is_file() and not (run / "best" / "analysis").exists()
    assert main(["export", "--run", str(run / "best"), "--format", "diffusers"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'best' / 'pytorch_lora_weights.safetensors'}"
    from sipo.evaluate import measuring, weights_key

    assert measuring(run, weights_key(None, run)).startswith(f"measuring {run}: step-00000002 (weights sha256 ")
    assert "its newest checkpoint" in measuring(run, weights_key(None, run))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.detach().cpu().to(b.dtype), b)


# ----------------------------------------------------------------------------- item 8
def test_dspo_sdxl_takes_its_own_launchers_beta_and_trains(tiny_sd15_dir, manifest, tmp_path):
    """dspo_variant=sdxl kept the SD1.5 launcher's beta 0.001: loss 0.25 at every step, grad norm ~1e-6."""
    from sipo.config import ObjectiveConfig
    from sipo.train import train

    assert ObjectiveConfig(name="dspo", dspo_variant="sdxl").beta == 5000.0  # DSPO's SDXL launcher
    assert ObjectiveConfig(name="dspo").beta == 0.001  # its SD1.5 launcher
    assert ObjectiveConfig(name="dspo", dspo_variant="sdxl", beta=7.0).beta == 7.0  # a set beta stays
    run = tmp_path / "run"
    result = train(load_config(None, tiny_overrides(tiny_sd15_dir, manifest, run, **{
        "objective.name": "dspo", "objective.dspo_variant": "sdxl", "objective.beta": "null", "train.max_steps": 3,
        "train.checkpoint_every": 0, "train.report_to": "none"})), progress=False)
    assert "beta: 5000.0" in (run / "config.yaml").read_text()
    grad_norms = [record["grad_norm"] for record in result.history]
    assert min(grad_norms) > 1e-3  # 0.001 gave ~1e-6: nothing learned


# ----------------------------------------------------------------------------- item 18
def test_the_advice_reads_as_the_caller_calls_sipo(tiny_sd15_dir, manifest, tmp_path, capsys):
    """From Python, errors advised --resume / --overwrite, flags the function does not take."""
    from sipo.cli import main
    from sipo.train import check_run
    from train_fixtures import write_tiny_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # what an earlier run leaves
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, run))
    with pytest.raises(SipoError) as stopped:
        check_run(config, resume=False, overwrite=False)
    assert "pass resume=True to continue it, overwrite=True to replace it" in str(stopped.value)
    assert "pass --resume to continue it, --overwrite to replace it" in stopped.value.cli_message
    assert main(["train", "--config", str(write_tiny_config(tmp_path / "c.yaml", tiny_sd15_dir, manifest, run))]) == 2
    err = capsys.readouterr().err
    assert "pass --resume to continue it, --overwrite to replace it" in err and "=True" not in err


# ----------------------------------------------------------------------------- item 16
def test_one_string_is_one_override_and_one_scorer_list(tmp_path):
    """load_config(name, "train.max_steps=3") and evaluate(..., scorers="pickscore") iterated the string
    ("override 't' is not key=value")."""
    from sipo.evaluate import EvalOptions

    assert load_config(None, "train.max_steps=3").train.max_steps == 3
    options = EvalOptions(prompts="p.txt", scorers="pickscore, hpsv2", seeds="0-2",
                          scorer_paths="pickscore=/m/PickScore_v1")
    assert options.scorers == ["pickscore", "hpsv2"] and options.seeds == [0, 1, 2]
    assert options.scorer_paths == {"pickscore": "/m/PickScore_v1"}
    assert EvalOptions(prompts="p.txt", seeds=3).seeds == [3]
    with pytest.raises(SipoError, match="overrides must be key=value strings"):
        load_config(None, [("train.max_steps", 3)])


# ----------------------------------------------------------------------------- item 17
def test_keep_best_by_a_scorer_says_scorers_are_allowed():
    """It said "choose one of ['none', 'held_out_accuracy']", hiding that a scorer name is allowed."""
    with pytest.raises(SipoError) as stopped:
        load_config(None, ["train.keep_best=pickscore"])
    assert str(stopped.value) == (
        "train.keep_best='pickscore' is neither none, held_out_accuracy nor a scorer of train.validation_scorers (none "
        "set); to keep the best samples by a scorer, add it to train.validation_scorers and set "
        "train.validation_prompts, or choose none or held_out_accuracy")
    config = load_config(None, ["train.keep_best=pickscore", "train.validation_scorers=[pickscore]",
                                "train.validation_prompts=[a red square]"])
    assert config.train.keep_best == "pickscore"


# ----------------------------------------------------------------------------- item 20
def test_every_family_config_and_module_is_named_where_a_new_user_looks():
    """README and model.family's help omitted Qwen-Image and Wan2.2 (qwenimage, qwenimage_lora, wan22_*)."""
    from sipo.config import ModelConfig, describe_config, packaged_config_names
    from sipo.models import FAMILIES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    families = readme[readme.index("### Model families"):readme.index("## Layout")]
    help_text = describe_config(load_config(None, []))
    family_help = ModelConfig.__dataclass_fields__["family"].metadata["help"]
    for family in FAMILIES:
        assert f"`{family}`" in families or f"family: {family}`" in families, family
        assert family in family_help, family
    assert family_help in help_text
    for name in packaged_config_names():
        if name != "demo":
            assert name in families or name.replace("_lora", "[_lora]") in families, name
    layout = readme[readme.index("## Layout"):]
    for module in sorted((Path(__file__).resolve().parents[1] / "src" / "sipo").glob("*.py")):
        if not module.name.startswith("_") and module.stem not in ("plotting",):
            assert f"  {module.name}" in layout, module.name
    assert "Wan2.2-TI2V-5B" in families and "Wan2.2-T2V-A14B" in families and "Qwen-Image" in families


# ----------------------------------------------------------------------------- item 14
def test_errors_about_the_validation_set_name_data_validation_path(manifest, tmp_path):
    """They named data.path, the training set's key."""
    from sipo.data import open_preference_dataset
    from sipo.validation import open_held_out

    config = load_config(None, [f"data.path={manifest}", "data.format=jsonl", "model.resolution=32",
                                f"data.validation_path={tmp_path / 'missing.jsonl'}"])
    dataset = open_preference_dataset(config.data, 32, seed=0)
    with pytest.raises(SipoError) as stopped:
        open_held_out(config, dataset)
    assert "data.validation_path" in str(stopped.value) and "data.path" not in str(stopped.value)
    assert str(tmp_path / "missing.jsonl") in str(stopped.value)


# ----------------------------------------------------------------------------- item 15
def test_a_streamed_report_never_counts_fewer_pairs_than_it_loaded(tmp_path):
    """A streamed hf run's data report said "1 pairs, 2 loaded" (shards 0) on 8 valid rows."""
    from sipo.data import open_preference_dataset
    from test_data_hf import _stream_rows, hf, hub_folder

    folder = hub_folder(tmp_path / "s", _stream_rows(8), shards=2)
    stream = open_preference_dataset(hf(folder, streaming=True, shuffle_buffer=1), resolution=4)
    batch = next(stream.micro_batches(batch_size=2, start=0))
    stream.report.record(batch)  # as the trainer records each micro-batch
    report = stream.report
    assert (report.pairs, report.used, report.shards) == (2, 2, 2)
    assert str(report) == (f"hf {folder} (streamed from 2 files): 2 rows read so far, 0 ties dropped, 2 pairs, "
                           "2 loaded")


# ----------------------------------------------------------------------------- item 19
def test_offload_frozen_is_not_documented_as_saving_memory():
    """model.offload_frozen=group was documented as saving device memory, yet is refused wherever it would."""
    from sipo.config import ModelConfig

    help_text = ModelConfig.__dataclass_fields__["offload_frozen"].metadata["help"]
    performance = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    row = next(line for line in performance.splitlines() if line.startswith("| group offload of the frozen base"))
    for text in (help_text, row):
        assert "saves no" in text and "less device memory" not in text and "frozen_dtype=fp8" in text


# ----------------------------------------------------------------------------- docs/errors.md rows that had no test
def test_errors_md_rows_found_without_a_test(tmp_path):
    """Rows of docs/errors.md whose sentence no test checked: a config that is no YAML, an empty split,
    `sipo eval --prompts pickapic-test` on a folder of train shards only."""
    from sipo.evaluate import read_prompts

    broken = tmp_path / "broken.yaml"
    broken.write_text("objective: [beta\n")
    with pytest.raises(SipoError, match=r"^config file .*broken.yaml is not valid YAML \(ParserError\); fix its syntax$"):
        load_config(str(broken))
    with pytest.raises(SipoError, match=r"^data.split is empty; set it to train \(the default\), validation or test$"):
        load_config(None, ["data.split= "])
    folder = tmp_path / "testonly"
    folder.mkdir()
    (folder / "train-00000-of-00001.parquet").write_bytes(b"")
    with pytest.raises(SipoError) as stopped:
        read_prompts("pickapic-test", str(folder))
    assert str(stopped.value) == (f"data.path {folder} holds train shards but none of the test or test_unique split; "
                                  "pass --pickapic-path the test-*.parquet shards")


# ----------------------------------------------------------------------------- item 1, eval images
def test_eval_images_of_another_resolution_or_base_weights_are_never_reused(tiny_sd15_dir, tmp_path):
    """generation.json recorded the sampler settings but not the picture size nor the base model's files."""
    import shutil

    from sipo.evaluate import EvalOptions, check_generation_settings, generation_settings

    model = Path(shutil.copytree(tiny_sd15_dir, tmp_path / "model"))
    options = EvalOptions(prompts="p.txt", base_only=True)
    at = lambda resolution: load_config(None, [f"model.pretrained_path={model}", f"model.resolution={resolution}"])  # noqa: E731
    folder = tmp_path / "eval"
    folder.mkdir()
    check_generation_settings(folder, generation_settings(at(32), options, {}), ["a"])
    check_generation_settings(folder, generation_settings(at(32), options, {}), ["a"])  # the same: reused
    with pytest.raises(SipoError, match=r"holds images made with other settings \(resolution\)"):
        check_generation_settings(folder, generation_settings(at(64), options, {}), ["a"])
    config_file = model / "unet" / "config.json"
    config_file.write_text(config_file.read_text().replace('"norm_eps"', '"norm_eps" ', 1))  # the base replaced
    with pytest.raises(SipoError, match=r"other settings \(model_files\)"):
        check_generation_settings(folder, generation_settings(at(32), options, {}), ["a"])
