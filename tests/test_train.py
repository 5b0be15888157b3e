"""End-to-end trainer tests on the tiny SD1.5 pipeline (random weights, built from configs)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sipo.cli import main as cli_main
from sipo.config import OBJECTIVE_PRESETS, load_config
from sipo.errors import SipoError
from sipo.checkpoints import list_checkpoints
from sipo.train import train
from train_fixtures import tiny_overrides, write_jsonl_pairs, write_tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"))


def _lora_b(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if "lora_B" in k}


@pytest.mark.parametrize("objective", list(OBJECTIVE_PRESETS))
def test_each_objective_trains_with_finite_loss_and_changes_lora(objective, tiny_sd15_dir, manifest, tmp_path):
    # tau=0.05 keeps most pairs at this model's weights (mean w ~ 0.8), so every preset takes steps.
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path, **{"objective.name": objective, "objective.tau": 0.05}))
    result = train(config, progress=False)
    assert result.steps == 2
    assert all(math.isfinite(record["loss"]) for record in result.history)
    # peft's "gaussian" init starts every LoRA B matrix at zero; training must move them.
    lora_b = _lora_b(list_checkpoints(tmp_path)[-1] / "trainable.safetensors")
    assert lora_b and any(v.abs().max() > 0 for v in lora_b.values())
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert load_config(tmp_path / "config.yaml") == config


def test_saved_lora_loads_into_stable_diffusion_pipeline(tiny_sd15_dir, manifest, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path, **{"objective.name": "dpo"}))
    result = train(config, progress=False)
    # the trainer put the model on the run's device; the pipeline and the inputs go there too
    device = result.adapter.device
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, safety_checker=None).to(device)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.tensor([500], device=device)
    with torch.no_grad():
        base = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(str(tmp_path))
        tuned = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
        trained = result.adapter.denoiser(latents, t, encoder_hidden_states=hidden).sample
    assert not torch.allclose(base, tuned)
    torch.testing.assert_close(tuned, trained, rtol=1e-4, atol=1e-5)


def test_full_finetune_writes_a_diffusers_unet(tiny_sd15_dir, manifest, tmp_path):
    from diffusers import UNet2DConditionModel

    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path, **{"train.finetune": "full", "train.max_steps": 1, "train.learning_rate": 1e-4}))
    train(config, progress=False)
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters()))
    assert list((tmp_path / "unet").glob("*.safetensors"))


def test_all_masked_batches_are_counted_not_hidden(tiny_sd15_dir, manifest, tmp_path):
    # tau above any weight masks every pair: the run stops as useless (issue 17, item 10) after
    # logging the masked steps, so they stay counted in metrics.jsonl and TensorBoard.
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path, **{
        "objective.name": "sipo", "objective.tau": 1.0e9, "train.batch_size": 8, "train.max_steps": 10}))
    with pytest.raises(SipoError, match=r"objective.tau=1000000000.0 .* masked all 64 pairs of the first 8 steps"):
        train(config, progress=False)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["all_masked_batches"] == 8
    assert last["masked_fraction"] == 1.0
    assert last["loss"] == 0.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = set()
    for events in (tmp_path / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"loss", "implicit_acc", "reward_margin", "masked_fraction", "mean_weight", "grad_norm", "all_masked_batches"} <= scalars


def test_resume_after_interruption_continues_exactly(tiny_sd15_dir, manifest, tmp_path):
    """An uninterrupted 4-step run and a run interrupted after step 2 then resumed end identical."""
    extra = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.batch_size": 3, "objective.weight_source": "timestep_ema",
             "objective.weight_placement": "outside", "train.deterministic": True}  # exact on CUDA too
    straight = train(load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path / "a", **extra)), progress=False)

    def crash(step, adapter):
        if step == 3:
            raise RuntimeError("simulated crash")

    interrupted = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path / "b", **extra))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(interrupted, step_callback=crash, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000002"]
    resumed = train(interrupted, resume=True, progress=False)
    assert resumed.steps == 4
    final_a = list_checkpoints(tmp_path / "a")[-1]
    final_b = list_checkpoints(tmp_path / "b")[-1]
    weights_a, weights_b = load_file(final_a / "trainable.safetensors"), load_file(final_b / "trainable.safetensors")
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-6)
    assert json.loads((final_a / "state.json").read_text()) == json.loads((final_b / "state.json").read_text())
    assert [r["loss"] for r in straight.history] == pytest.approx([r["loss"] for r in resumed.history], abs=1e-6)


def test_divergence_guard_stops_with_step_and_keeps_last_good_checkpoint(tiny_sd15_dir, manifest, tmp_path):
    def poison(step, adapter):
        if step == 3:  # after the step-2 checkpoint; steps 4 and 5 then fail
            with torch.no_grad():
                for name, param in adapter.denoiser.named_parameters():
                    if "lora_A" in name:
                        param.fill_(float("nan"))

    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path, **{"train.max_steps": 10, "train.max_bad_steps": 2, "train.checkpoint_every": 2}))
    with pytest.raises(SipoError) as info:
        train(config, step_callback=poison, progress=False)
    message = str(info.value)
    assert "stopped at step 5" in message and "timesteps" in message and "beta" in message
    last_good = list_checkpoints(tmp_path)[-1]
    assert last_good.name == "step-00000002"
    assert all(torch.isfinite(v).all() for v in load_file(last_good / "trainable.safetensors").values())


def test_half_written_checkpoints_are_never_picked_up(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step-00000009").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000008").mkdir()  # no manifest.json (written last): incomplete
    (tmp_path / "checkpoints" / "step-00000008" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-00000004").mkdir()
    (tmp_path / "checkpoints" / "step-00000004" / "manifest.json").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]


def test_cli_trains_in_a_subprocess(tiny_sd15_dir, manifest, tmp_path):
    config_path = write_tiny_config(tmp_path / "tiny.yaml", tiny_sd15_dir, manifest, tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "sipo", "train", "--config", str(config_path), "train.max_steps=2", "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 2 steps" in done.stdout
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def _cli_error(capsys, argv: list[str]) -> str:
    status = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2
    last = err.splitlines()[-1]
    assert last.startswith("sipo: error: ") and "Traceback" not in err
    return last


def test_user_errors_are_one_sentence(tiny_sd15_dir, other_family_dir, manifest, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # missing config file
    assert "does not exist" in _cli_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml")])
    config_path = write_tiny_config(tmp_path / "tiny.yaml", tiny_sd15_dir, manifest, tmp_path / "run")
    run = ["train", "--config", str(config_path), "--no-progress"]
    # unknown objective name
    assert "objective.name='ppo' is not valid" in _cli_error(capsys, run + ["objective.name=ppo"])
    # missing data file
    assert "does not exist" in _cli_error(capsys, run + [f"data.path={tmp_path / 'nope.jsonl'}"])
    # parquet without label_0
    no_label = tmp_path / "no_label.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"a"], "jpg_1": [b"b"]}), no_label)
    assert "label_0" in _cli_error(capsys, run + ["data.format=pickapic", f"data.path={no_label}"])
    # only ties
    ties = tmp_path / "ties.parquet"
    pq.write_table(pa.table({"caption": ["x", "y"], "jpg_0": [b"a", b"c"], "jpg_1": [b"b", b"d"], "label_0": [0.5, 0.5]}), ties)
    assert "tie" in _cli_error(capsys, run + ["data.format=pickapic", f"data.path={ties}"])
    # a model directory of another family
    assert "not a sd15 model" in _cli_error(capsys, run + [f"model.pretrained_path={other_family_dir}"])


def test_strict_mode_error_from_a_worker_process_is_still_one_sentence(tiny_sd15_dir, tmp_path, capsys):
    """PyTorch re-raises a worker's SipoError with the worker's traceback in its message; the CLI strips it."""
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=4)
    (tmp_path / "pairs" / "000_chosen.png").write_bytes(b"not a png")
    config = write_tiny_config(tmp_path / "c.yaml", tiny_sd15_dir, manifest, tmp_path / "run",
                               **{"data.num_workers": 1, "train.batch_size": 4})
    err = _cli_error(capsys, ["train", "--config", str(config), "--no-progress", "--strict"])
    assert "malformed" in err and "data.strict" in err


def test_trains_from_pickapic_parquet_with_ties_dropped(tiny_sd15_dir, tmp_path):
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((40, 48, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    table = pa.table({
        "caption": [f"caption {i}" for i in range(6)],
        "jpg_0": [png(20 * i) for i in range(6)],
        "jpg_1": [png(255 - 20 * i) for i in range(6)],
        "label_0": [1.0, 0.0, 0.5, 1.0, 0.0, 0.5],
    })
    pq.write_table(table, tmp_path / "shard-000.parquet", row_group_size=2)
    overrides = tiny_overrides(tiny_sd15_dir, tmp_path / "unused.jsonl", tmp_path / "run",
                               **{"data.format": "pickapic", "data.path": str(tmp_path), "train.max_steps": 3})
    result = train(load_config(None, overrides), progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["ties_dropped"] == 2 and report["pairs"] == 4
    assert result.steps == 3 and all(math.isfinite(r["loss"]) for r in result.history)


def test_bf16_mixed_precision_trains_on_cpu(tiny_sd15_dir, manifest, tmp_path):
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path, **{"train.mixed_precision": "bf16", "objective.tau": 0.05}))
    result = train(config, progress=False)
    assert result.steps == 2 and all(math.isfinite(r["loss"]) and r["finite"] == 1.0 for r in result.history)


def test_malformed_rows_are_skipped_counted_and_reported(tiny_sd15_dir, tmp_path):
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=4)
    (tmp_path / "pairs" / "001_rejected.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "pairs" / "002_chosen.png").unlink()
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path / "run", **{"train.batch_size": 4, "train.max_steps": 1}))
    result = train(config, progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped_total"] == 2 and report["used"] == 2
    assert result.history[-1]["skipped_rows"] == 2


@pytest.mark.parametrize("precision", ["bf16", "no", pytest.param("fp16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 autocast is a CUDA mode"))])
def test_full_finetune_reference_is_the_initial_policy(tiny_sd15_dir, manifest, tmp_path, precision):
    """Issue 26 item 6: at step 1 of a full fine-tune the policy IS the reference, so every pair's policy and
    reference errors are equal and z = 0 exactly (the logged margin and KL proxy are 0, the loss ln 2). The
    reference cast to bf16 while the policy kept float32 norm weights gave z up to -2.3 at beta 5000."""
    import math
    import shutil

    from diffusers import UNet2DConditionModel

    # the tiny UNet's norms start at weight 1, bias 0, which bf16 holds exactly: give them values it rounds
    model = shutil.copytree(tiny_sd15_dir, tmp_path / "model")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=generator))
    unet.save_pretrained(model / "unet")
    config = load_config(None, tiny_overrides(model, manifest, tmp_path / "run", **{
        "train.finetune": "full", "train.max_steps": 1, "train.mixed_precision": precision, "objective.name": "dpo"}))
    record = train(config, progress=False).history[0]
    assert record["err_winner"] == record["ref_err_winner"] and record["err_loser"] == record["ref_err_loser"]
    assert record["reward_margin"] == 0.0 and record["kl_proxy"] == 0.0
    assert record["loss"] == pytest.approx(math.log(2.0), rel=1e-6)
