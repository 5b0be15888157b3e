"""``model.frozen_dtype: fp8``: the frozen base of a LoRA run stored in float8_e4m3fn through diffusers'
layerwise casting, on the tiny two-expert Wan2.2-A14B (so both experts of one denoiser are cast).

Checked: which weights are fp8 in storage (the attention and feed-forward Linears, written out here;
norms, embeddings, ``proj_out`` and LoRA not), that policy and reference both compute with the same
fp8-rounded base (against a copy whose weights were rounded by hand), that a bf16 training step runs
and is finite, and the one-sentence errors.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from family_contract import inject_lora
from video_contract import video_overrides
from video_fixtures import write_video_pairs

from sipo.config import load_config
from sipo.errors import SipoError
from sipo.models import load_adapter, lora_disabled
from sipo.models.base import store_frozen_base_in
from sipo.models.wan import WanAdapter

#: the Linears of a Wan block (diffusers' WanTransformerBlock): self- and cross-attention projections and the
#: feed-forward; with LoRA injected the attention ones hold their weight in ``base_layer``
CAST = re.compile(r"^transformer(_2)?\.blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)\.base_layer|ffn\.net\.(0\.proj|2))\.(weight|bias)$")


@pytest.fixture(scope="module")
def a14b_dir(tmp_path_factory):
    return WanAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_a14b_fp8"), variant="2.2-t2v-a14b")


def _lora_adapter(model_dir):
    adapter = load_adapter("wan", str(model_dir))
    inject_lora(adapter)
    for name, param in adapter.denoiser.named_parameters():
        param.requires_grad_("lora_" in name)
    return adapter


def test_fp8_stores_exactly_the_blocks_linears_in_float8(a14b_dir):
    adapter = _lora_adapter(a14b_dir)
    assert store_frozen_base_in(adapter, "fp8", torch.float32) == ["WanTransformer3DModel"] * 2
    dtypes = {name: p.dtype for name, p in adapter.denoiser.named_parameters()}
    fp8 = {name for name, dtype in dtypes.items() if dtype == torch.float8_e4m3fn}
    expected = {name for name in dtypes if CAST.match(name)}
    assert fp8 == expected and len(fp8) == 2 * (8 + 2) * 2  # 2 experts x (8 attention + 2 ffn Linears) x (weight, bias)
    for name, param in adapter.denoiser.named_parameters():
        if "lora_" in name:
            assert param.dtype == torch.float32 and param.requires_grad
    assert not any("norm" in n or "condition_embedder" in n or "patch_embedding" in n or "proj_out" in n for n in fp8)


def test_policy_and_reference_compute_with_the_same_fp8_rounded_base(a14b_dir):
    """The cast adapter == a copy whose Linears were rounded to float8 by hand and back, with LoRA on and off."""
    cast, rounded, plain = _lora_adapter(a14b_dir), _lora_adapter(a14b_dir), _lora_adapter(a14b_dir)
    lora = {n: p for n, p in cast.denoiser.named_parameters() if "lora_" in n}
    with torch.no_grad():  # one LoRA for all three (peft draws A from the global generator)
        for other in (rounded, plain):
            for name, param in other.denoiser.named_parameters():
                if name in lora:
                    param.copy_(lora[name])
    store_frozen_base_in(cast, "fp8", torch.float32)
    with torch.no_grad():
        for name, param in rounded.denoiser.named_parameters():
            if CAST.match(name):
                param.copy_(param.to(torch.float8_e4m3fn).float())
    x = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 990])  # one sample per expert
    cond = cast.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        policy, by_hand, unrounded = (a.predict(x, t, cond) for a in (cast, rounded, plain))
        with lora_disabled(cast.denoiser), lora_disabled(rounded.denoiser):
            reference, reference_by_hand = cast.predict(x, t, cond), rounded.predict(x, t, cond)
    torch.testing.assert_close(policy, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference, reference_by_hand, rtol=1e-5, atol=1e-6)
    assert (policy - reference).abs().max() > 1e-3  # the LoRA acts on top of the one cast base
    assert (policy - unrounded).abs().max() > 1e-4  # the rounding is real


def test_a_bf16_training_step_on_an_fp8_base_is_finite(a14b_dir, tmp_path):
    from sipo.train import train

    manifest = write_video_pairs(tmp_path / "pairs", num_pairs=2)
    config = load_config(None, video_overrides("wan", a14b_dir, manifest, tmp_path / "run", **{
        "model.frozen_dtype": "fp8", "train.mixed_precision": "bf16", "train.max_steps": 1, "objective.name": "sipo"}))
    result = train(config, progress=False)
    assert result.steps == 1 and all(math.isfinite(r["loss"]) for r in result.history)
    params = dict(result.adapter.denoiser.named_parameters())
    assert any(p.dtype == torch.float8_e4m3fn for n, p in params.items() if CAST.match(n))
    lora = [p for n, p in params.items() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert any(p.abs().max() > 0 for n, p in params.items() if "lora_B" in n)  # the step moved a LoRA B


def test_fp8_with_a_full_finetune_is_one_sentence(a14b_dir):
    adapter = load_adapter("wan", str(a14b_dir))
    adapter.denoiser.requires_grad_(True)
    with pytest.raises(SipoError, match="train.finetune=lora"):
        store_frozen_base_in(adapter, "fp8", torch.bfloat16)


def test_bf16_changes_nothing_and_other_values_are_refused(a14b_dir):
    adapter = _lora_adapter(a14b_dir)
    assert store_frozen_base_in(adapter, "bf16", torch.bfloat16) == []
    assert all(p.dtype == torch.float32 for p in adapter.denoiser.parameters())
    with pytest.raises(SipoError, match="model.frozen_dtype='fp16' is not valid"):
        load_config(None, ["model.frozen_dtype=fp16"])
