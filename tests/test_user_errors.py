"""Every error a user can cause ends with `sipo: error: <one sentence naming the fix>`, exit 2
(issue 9): config files, model directories, output directories, demo paths, values checked at
start; plus `sipo --version` and `sipo config`."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sipo import __version__
from sipo.cli import main as cli_main
from sipo.config import check_against_model, describe_config, load_config, resolve_config_path
from sipo.errors import SipoError
from sipo.rundir import model_numbers
from train_fixtures import write_jsonl_pairs, write_tiny_config

REPO = Path(__file__).resolve().parents[1]


def _cli_error(capsys, argv: list[str]) -> str:
    status = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("sipo: error: ")
    sentence = last[len("sipo: error: "):]
    assert sentence.count("; ") >= 1, "the sentence names the fix after a semicolon"
    return sentence


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=2)


@pytest.fixture
def config_path(tiny_sd15_dir, manifest, tmp_path) -> Path:
    return write_tiny_config(tmp_path / "tiny.yaml", tiny_sd15_dir, manifest, tmp_path / "run")


# ----------------------------------------------------------------------------- config files
def test_config_with_non_utf8_bytes(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("objective:\n  name: sipo  # \u00e9\n".encode("latin-1"))
    sentence = _cli_error(capsys, ["train", "--config", str(path)])
    assert sentence == f"config file {path} is not UTF-8 text (byte 27); save it as UTF-8"


def test_config_that_is_a_directory(tmp_path, capsys):
    assert "is not a file; pass --config with a YAML file" in _cli_error(capsys, ["train", "--config", str(tmp_path)])


def test_mixed_precision_no_as_yaml_writes_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")  # YAML 1.1 reads the documented value as false
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(SipoError, match="train.mixed_precision=True has the wrong type"):
        load_config(None, ["train.mixed_precision=yes"])


@pytest.mark.parametrize("name", ["sd15_pickapic_lora", "sd15_pickapic_lora.yaml", "demo", "configs/demo.yaml"])
def test_packaged_configs_resolve_by_bare_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_config_path(name)
    assert path.is_file() and path.parent.name == "configs" and path.parent.parent.name == "sipo"
    load_config(name)


def test_a_folder_named_like_a_packaged_config_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. `sipo demo --output-dir demo` made it
    assert resolve_config_path("demo").parent.parent.name == "sipo"


def test_unknown_config_name_lists_the_packaged_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sentence = _cli_error(capsys, ["train", "--config", "sd15_pickapic_lorra"])
    assert "does not exist; pass --config with a YAML file or a packaged name (" in sentence
    listed = sentence.rsplit("(", 1)[1].rstrip(")").split(", ")
    assert {"demo", "sd15_pickapic", "sd15_pickapic_lora"} <= set(listed) and listed == sorted(listed)


# ----------------------------------------------------------------------------- model directory
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_model_index_that_is_not_json(tiny_sd15_dir, config_path, tmp_path, capsys, content):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd15_dir, model)
    (model / "model_index.json").write_bytes(content)
    sentence = _cli_error(capsys, ["train", "--config", str(config_path), f"model.pretrained_path={model}"])
    assert sentence.startswith(f"{model / 'model_index.json'} is not ")
    assert "restore it from the original pipeline" in sentence


# ----------------------------------------------------------------------------- output directories
def test_output_dir_that_is_a_file(config_path, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    sentence = _cli_error(capsys, ["train", "--config", str(config_path), f"train.output_dir={target}"])
    assert sentence == f"train.output_dir {target} is a file; set train.output_dir to a directory path"


def test_output_dir_under_a_file(config_path, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    target = tmp_path / "taken" / "run"
    sentence = _cli_error(capsys, ["train", "--config", str(config_path), f"train.output_dir={target}"])
    assert sentence == (f"train.output_dir {target} is under {tmp_path / 'taken'}, which is a file; "
                        "set train.output_dir to a directory path")


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write: a read-only folder, or /sys for root (root ignores modes)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked / "run"
    if not Path("/sys").is_dir():
        pytest.skip("root without /sys: no directory here refuses writes")
    return Path("/sys/sipo-test-run")


def test_output_dir_not_writable(config_path, tmp_path, capsys):
    target = _unwritable_dir(tmp_path)
    sentence = _cli_error(capsys, ["train", "--config", str(config_path), f"train.output_dir={target}"])
    assert sentence.startswith(f"train.output_dir {target} cannot be written (")
    assert sentence.endswith("set train.output_dir to a writable directory")


def test_demo_output_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert _cli_error(capsys, ["demo", "--quick", "--output-dir", str(tmp_path / "taken")]) == (
        f"--output-dir {tmp_path / 'taken'} is a file; set --output-dir to a directory path")
    assert "which is a file; set --output-dir" in _cli_error(
        capsys, ["demo", "--quick", "--output-dir", str(tmp_path / "taken" / "demo")])


def test_demo_output_dir_not_creatable(tmp_path, capsys):
    target = _unwritable_dir(tmp_path)
    sentence = _cli_error(capsys, ["demo", "--quick", "--output-dir", str(target)])
    assert "cannot be written" in sentence and sentence.endswith("set --output-dir to a writable directory")


def test_a_disk_full_oserror_anywhere_is_one_sentence(config_path, monkeypatch, capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/unet/model.safetensors")

    monkeypatch.setattr(importlib.import_module("sipo.train"), "train", full)  # sipo.train is the function
    sentence = _cli_error(capsys, ["train", "--config", str(config_path)])
    assert sentence == "the disk is full (/data/run/unet/model.safetensors); free space there and run again"


# ----------------------------------------------------------------------------- values checked at start
@pytest.mark.parametrize(
    "override, expected",
    [
        ("objective.tau=-0.1", "objective.tau=-0.1 is negative, and weights are never negative; set a threshold >= 0"),
        ("objective.tau=.nan", "objective.tau=nan is not a finite number; set a finite value"),
        ("objective.beta=.inf", "objective.beta=inf is not a finite number; set a finite value"),
        ("train.learning_rate=.nan", "train.learning_rate=nan is not a finite number; set a finite value"),
        ("objective.t_min=-1", "objective.t_min=-1 is negative; timesteps start at 0"),
        ("objective.clip_eps=-1", "objective.clip_eps must be positive, got -1.0"),
        ("train.adam_beta2=1.0", "train.adam_beta2=1.0 is outside [0, 1); use e.g. 0.9 / 0.999"),
        ("train.report_to=comet", "train.report_to='comet' is not valid; choose one of ['tensorboard', 'wandb', 'none']"),
    ],
)
def test_values_are_validated_at_load(override, expected):
    with pytest.raises(SipoError) as info:
        load_config(None, [override])
    assert str(info.value) == expected


def test_t_min_above_t_max_would_mask_every_pair(capsys, config_path):
    sentence = _cli_error(capsys, ["train", "--config", str(config_path), "objective.t_min=800", "objective.t_max=200"])
    assert sentence == "objective.t_min=800 is above objective.t_max=200, which would mask every pair; swap them"


def test_model_numbers_come_from_the_pipeline_json(tiny_sd15_dir):
    # tests/tiny_models.py: DDPM T=1000, VAE block_out_channels (32, 64) -> factor 2, UNet sample_size 16
    from tiny_models import TINY_SD15_LATENT_SHAPE

    timesteps, factor, native = model_numbers(str(tiny_sd15_dir))
    assert (timesteps, factor) == (1000, 2)
    assert native == TINY_SD15_LATENT_SHAPE[1] * 2


def test_values_are_checked_against_the_model(capsys, config_path):
    assert _cli_error(capsys, ["train", "--config", str(config_path), "objective.t_max=1000"]) == (
        "objective.t_max=1000 is outside the model's timesteps [0, 1000); set it to at most 999")
    assert _cli_error(capsys, ["train", "--config", str(config_path), "model.resolution=33"]) == (
        "model.resolution=33 is not divisible by the VAE's factor 2; use e.g. 32 or 34")


def test_a_resolution_far_from_the_models_is_a_warning():
    config = load_config(None, ["model.resolution=2048"])
    warnings = check_against_model(config, 1000, 8, 512)
    assert warnings == ["model.resolution=2048 is far from the model's own 512 pixels; it will train, but expect "
                        "poor samples (warning only)"]
    assert check_against_model(load_config(None, ["model.resolution=768"]), 1000, 8, 512) == []


# ----------------------------------------------------------------------------- finding your way
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sipo {__version__}"


def test_sipo_config_prints_every_key_with_value_default_and_help(capsys):
    packaged = resolve_config_path("sd15_pickapic_lora")
    assert cli_main(["config", "--config", "sd15_pickapic_lora", "objective.beta=1234"]) == 0
    text = capsys.readouterr().out
    resolved = load_config(packaged, ["objective.beta=1234"])
    assert yaml.safe_load(text) == json.loads(json.dumps(resolved.to_dict()))  # parses back to the same values
    # an unset beta takes the preset's (sipo: 1000, docs/method.md), so that is the default shown
    assert "beta: 1234.0  # " in text and "[default: 1000.0]" in text
    assert "train:" in text and "report_to: \"tensorboard\"  # where accelerate sends the scalars" in text
    lines = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(lines) == sum(len(section) for section in resolved.to_dict().values())
    assert all("  # " in line and line.endswith("]") for line in lines)


def test_sipo_config_without_a_file_shows_the_defaults(capsys):
    assert cli_main(["config"]) == 0
    text = capsys.readouterr().out
    assert "[default: " not in text
    assert describe_config(load_config(None)) == text


def test_sipo_config_list(capsys):
    assert cli_main(["config", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"demo", "sd15_pickapic", "sd15_pickapic_lora"} <= set(names)


def test_help_texts_cite_shipped_docs_not_spec_numbers():
    """Help that points at a docs/ file names one that exists in the checkout."""
    import re

    from sipo.cli import build_parser
    from sipo.config import SipoConfig

    texts = [describe_config(SipoConfig()), build_parser().format_help()]
    subparsers = build_parser()._subparsers._group_actions[0].choices
    texts += [p.format_help() for p in subparsers.values()]
    assert not re.search(r"\bSPEC \d", "\n".join(texts)), "cite the shipped docs/spec.md, not the SPEC"
    cited = set(re.findall(r"docs/[\w/.-]+\.md", "\n".join(texts)))
    assert cited, "help texts cite the docs"
    for path in cited:
        assert (REPO / path).is_file(), path


def test_errors_are_one_line_through_a_real_subprocess(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe")
    done = subprocess.run([sys.executable, "-m", "sipo", "config", "--config", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"sipo: error: config file {path} is not UTF-8 text (byte 0); save it as UTF-8"]


def test_report_to_a_tracker_that_is_not_installed(config_path, capsys, monkeypatch):
    import importlib.util

    # wandb is in the test extra now: hide it, as a machine without it would look
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert _cli_error(capsys, ["train", "--config", str(config_path), "train.report_to=wandb"]) == (
        "train.report_to=wandb needs the wandb package; pip install wandb, or set train.report_to=none")


def test_a_rectified_flow_family_stops_on_another_scheduler():
    """flux, flux2, zimage, hunyuanvideo15 and ltx2 share the check: a DDPM config stops in one sentence."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from sipo.models.base import require_flow_match_scheduler

    require_flow_match_scheduler("flux", FlowMatchEulerDiscreteScheduler())
    with pytest.raises(SipoError, match=r"^the scheduler is a DDPMScheduler; the zimage family trains rectified-flow "
                                        r"models: use the model's own FlowMatchEulerDiscreteScheduler config$"):
        require_flow_match_scheduler("zimage", DDPMScheduler())
