"""ComfyUI LoRA files (train.lora_format=comfyui, sipo export): the keys ComfyUI's loader reads, and a
round trip through diffusers' own kohya converter (``load_lora_weights`` of the ComfyUI file), which
must give the same LoRA as sipo's diffusers file; the scale checked by hand, W + alpha/r * up @ down."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sipo.cli import main
from sipo.config import load_config
from sipo.errors import SipoError
from sipo.export import COMFYUI_FILE, DIFFUSERS_FILE, comfyui_state_dict, write_comfyui
from sipo.models import add_lora, load_adapter
from sipo.models.sdxl import SDXLAdapter
from train_fixtures import tiny_overrides, write_jsonl_pairs

RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2: a file that lost alpha would load at scale 1


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return SDXLAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), scale="tiny", seed=0)


def _trained_lora_dir(family: str, model_dir: Path, out: Path) -> Path:
    """A LoRA with random (non-zero) up and down matrices, saved by the family's own save_lora."""
    from peft.utils import get_peft_model_state_dict

    adapter = load_adapter(family, str(model_dir))
    add_lora(adapter, load_config(None, [f"model.family={family}", f"model.pretrained_path={model_dir}",
                                         f"train.lora_rank={RANK}", f"train.lora_alpha={ALPHA}"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in adapter.denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    out.mkdir(parents=True, exist_ok=True)
    adapter.save_lora(out, get_peft_model_state_dict(adapter.denoiser))
    return out


def _pipeline(family: str, model_dir: Path):
    import diffusers

    name = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[family]
    return getattr(diffusers, name).from_pretrained(str(model_dir))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_comfyui_file_loads_through_diffusers_kohya_converter_as_the_same_lora(family, tiny_sd15_dir, tiny_sdxl_dir,
                                                                               tmp_path):
    model_dir = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    lora_dir = _trained_lora_dir(family, model_dir, tmp_path / "lora")
    comfy = load_file(str(write_comfyui(lora_dir / DIFFUSERS_FILE, family)))
    diffusers_file = load_file(str(lora_dir / DIFFUSERS_FILE))

    # the layout ComfyUI reads: lora_unet_<diffusers path, "." -> "_">.lora_down/.lora_up/.alpha
    assert len(comfy) == len(diffusers_file) // 2 * 3
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in comfy)
    module = f"down_blocks.{0 if family == 'sd15' else 1}.attentions.0.transformer_blocks.0.attn1.to_q"
    name = f"lora_unet_down_blocks_{0 if family == 'sd15' else 1}_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(comfy[f"{name}.alpha"]) == ALPHA
    assert torch.equal(comfy[f"{name}.lora_down.weight"], diffusers_file[f"unet.{module}.lora.down.weight"])
    assert torch.equal(comfy[f"{name}.lora_up.weight"], diffusers_file[f"unet.{module}.lora.up.weight"])

    # diffusers' kohya converter (an independent reader) loads the ComfyUI file as the same adapter
    from_diffusers, from_comfy = _pipeline(family, model_dir), _pipeline(family, model_dir)
    from_diffusers.load_lora_weights(str(lora_dir), weight_name=DIFFUSERS_FILE)
    from_comfy.load_lora_weights(str(lora_dir), weight_name=COMFYUI_FILE)
    base = _pipeline(family, model_dir).unet
    for pipe in (from_diffusers, from_comfy):
        pipe.fuse_lora(lora_scale=1.0)
    fused_a, fused_b = from_diffusers.unet.state_dict(), from_comfy.unet.state_dict()
    by_hand = base.state_dict()[f"{module}.weight"] + ALPHA / RANK * (
        comfy[f"{name}.lora_up.weight"] @ comfy[f"{name}.lora_down.weight"])
    for fused in (fused_a, fused_b):
        weight = fused.get(f"{module}.base_layer.weight", fused.get(f"{module}.weight"))
        torch.testing.assert_close(weight, by_hand, rtol=1e-5, atol=1e-6)
    changed = 0
    for key, value in fused_a.items():
        if "lora_" in key:
            continue
        torch.testing.assert_close(fused_b[key], value, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, base.state_dict().get(key.replace(".base_layer", ""), value))
    assert changed == len(comfy) // 3  # every adapted module changed, and only those


def test_transformer_families_use_the_lora_transformer_prefix():
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora.down.weight": torch.ones(2, 3),
            "transformer.transformer_blocks.0.attn.to_q.lora.up.weight": torch.ones(3, 2)}
    assert sorted(comfyui_state_dict(lora, "flux", 2.0)) == [
        "lora_transformer_transformer_blocks_0_attn_to_q.alpha",
        "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight",
        "lora_transformer_transformer_blocks_0_attn_to_q.lora_up.weight"]
    # peft's own names, as a checkpoint's trainable.safetensors holds them
    peft = {"single_transformer_blocks.1.proj_out.lora_A.default.weight": torch.ones(2, 3),
            "single_transformer_blocks.1.proj_out.lora_B.default.weight": torch.ones(3, 2)}
    assert "lora_transformer_single_transformer_blocks_1_proj_out.lora_up.weight" in comfyui_state_dict(peft, "sd3", 2.0)


def test_families_without_a_comfyui_layout_are_refused_in_one_sentence(tmp_path):
    from sipo.train import check_run

    config = load_config(None, ["model.family=wan", "model.pretrained_path=x", "train.lora_format=comfyui",
                                f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(SipoError, match="not wan .*set train.lora_format=diffusers"):
        check_run(config, resume=False, overwrite=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SipoError, match="train.lora_format"):
        load_config(None, ["train.lora_format=kohya"])


def test_training_writes_the_comfyui_file_at_every_save_and_export_rebuilds_it(tiny_sd15_dir, tmp_path, capsys):
    from sipo.train import train

    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=8)
    extra = {"train.max_steps": 2, "train.report_to": "none", "data.validation_fraction": 0.25,
             "train.keep_best": "held_out_accuracy", "train.validate_every": 1, "train.keep_last": 5}
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny_sd15_dir, manifest, run, **extra, **{"train.lora_format": "comfyui"})),
          progress=False)
    for folder in (run, run / "best", run / "checkpoints" / "step-00000001", run / "checkpoints" / "step-00000002"):
        assert (folder / COMFYUI_FILE).is_file(), folder
    final = load_file(str(run / COMFYUI_FILE))
    # the final checkpoint's file (built from peft's parameter names) equals the run's (from the diffusers file)
    last = load_file(str(run / "checkpoints" / "step-00000002" / COMFYUI_FILE))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
    # sipo export on a run trained without it writes the same file
    plain = tmp_path / "plain"
    train(load_config(None, tiny_overrides(tiny_sd15_dir, manifest, plain, **extra)), progress=False)
    assert not (plain / COMFYUI_FILE).exists()
    assert main(["export", "--run", str(plain)]) == 0
    assert "wrote" in capsys.readouterr().out
    exported = load_file(str(plain / COMFYUI_FILE))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert (plain / "best" / COMFYUI_FILE).is_file()
    # a checkpoint's file (built from peft's parameter names) equals the one built from the diffusers file
    last = load_file(str(plain / "checkpoints" / "step-00000002" / COMFYUI_FILE))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
    during = load_file(str(run / "checkpoints" / "step-00000001" / COMFYUI_FILE))
    after = load_file(str(plain / "checkpoints" / "step-00000001" / COMFYUI_FILE))
    assert all(torch.equal(during[k], after[k]) for k in final) and not all(torch.equal(during[k], final[k]) for k in final)
    assert main(["export", "--run", str(tmp_path / "pairs")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
