"""Peak memory of one LoRA preference step of the video transformers (and Qwen-Image's MMDiT), measured and extrapolated.

    # CPU: measure full-width transformers with 1-2 blocks at a few token counts, fit, extrapolate
    OMP_NUM_THREADS=2 python benchmarks/video_memory.py scan [--families cogvideox-2b wan]
    # GPU: the real thing, full configs at the paper's clip sizes (random weights, no download)
    python benchmarks/video_memory.py step --family cogvideox-2b --device cuda --full
    # Wan2.2 and Qwen-Image (issue 19): --families wan22-ti2v-5b wan22-a14b-480p wan22-a14b-720p qwenimage-1328
    # conditioned (issue 28): --families qwenimage-edit-1024 wan22-i2v-a14b-480p wan22-i2v-a14b-720p wan22-ti2v-5b-i2v
    # LTX-2 and HunyuanVideo 1.5 (issue 28): --families ltx2 hunyuanvideo15; or each point alone, then fit:
    #   for L in 1 2; do for g in "3 16 24" "5 24 32"; do python benchmarks/video_memory.py step --family ltx2 \
    #     --layers $L --grid $g | tail -1 >> ltx2_points.jsonl; done; done   (with MALLOC_MMAP_THRESHOLD_=65536)
    #   python benchmarks/video_memory.py fit --family ltx2 --points ltx2_points.jsonl

One step is what the trainer does for one pair: the policy (LoRA on) on winner and loser with
gradients, the reference (LoRA off) on both under no_grad, the SIPO weights, backward through
the LoRA weights with gradient checkpointing, AdamW. Frozen weights are bf16 (as the trainer's
mixed precision runs them), LoRA weights and their AdamW state fp32, activations under bf16
autocast. Latents and text embeddings are given (the latent cache / CPU text encoder path of the
configs), so neither the VAE nor T5/UMT5 is in the step.

CPU peak = the process's peak resident memory during the step (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before it) minus the resident memory just before it. GPU peak =
``torch.cuda.max_memory_allocated``. The scan fits ``activation bytes = c0 + N * (c1 + c2 * L)``
(``N`` tokens per sequence, ``L`` blocks) over its points and extrapolates to the full model: the
activations of checkpointed blocks grow linearly in tokens as long as attention never stores an
``N x N`` matrix (flash / memory-efficient SDPA on a GPU; the CPU's SDPA is the flash kernel too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 1024**3
#: glibc raises its mmap threshold after the first large free, after which freed activations stay
#: in the heap and the resident peak counts them again and again (measured: 0.375 vs 0.199 GiB for
#: one 514-token CogVideoX block). A fixed threshold maps every large tensor on its own and gives
#: it back on free, so the resident peak follows the live tensors.
SCAN_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass(frozen=True)
class Target:
    """A family at the paper's clip size: latent grid per sample and the text length."""

    family: str
    variant: str
    latent_frames: int
    latent_height: int
    latent_width: int
    text_tokens: int


# 49 x 480 x 720 -> 13 x 60 x 90 latents; 81 x 480 x 832 -> 21 x 60 x 104 (VAE: 4x time, 8x space)
TARGETS = {
    "cogvideox-2b": Target("cogvideox", "2b", 13, 60, 90, 226),
    "cogvideox-5b": Target("cogvideox", "5b", 13, 60, 90, 226),
    "wan": Target("wan", "1.3b", 21, 60, 104, 512),
    # Wan2.2-TI2V-5B's published 704 x 1280 x 121 frames -> 31 x 44 x 80 latents (its VAE: 4x time, 16x space)
    "wan22-ti2v-5b": Target("wan", "2.2-ti2v-5b", 31, 44, 80, 512),
    # Wan2.2-T2V-A14B at 480p / 720p x 81 frames -> 21 x 60 x 104 / 21 x 90 x 160 (the Wan2.1 VAE); two experts resident
    "wan22-a14b-480p": Target("wan", "2.2-t2v-a14b", 21, 60, 104, 512),
    "wan22-a14b-720p": Target("wan", "2.2-t2v-a14b", 21, 90, 160, 512),
    # Qwen-Image at 1328 x 1328 -> one latent frame of 166 x 166 (8x VAE); 256 text tokens (the adapter's
    # prompt_length) share the joint attention sequence
    "qwenimage-1328": Target("qwenimage", "20b", 1, 166, 166, 256),
    # issue 28, pairs sharing an input image. Qwen-Image-Edit-Plus at 1024 x 1024: the output's 64 x 64 tokens, the
    # input image's 64 x 64 more and 512 text + vision tokens (the adapter's prompt_length) in one sequence
    "qwenimage-edit-1024": Target("qwenimage_edit", "20b", 1, 128, 128, 512),
    # Wan2.2-I2V-A14B: T2V-A14B's grid and experts, the mask and condition clip on channels (36 in, 16 out)
    "wan22-i2v-a14b-480p": Target("wan_i2v", "2.2-i2v-a14b", 21, 60, 104, 512),
    "wan22-i2v-a14b-720p": Target("wan_i2v", "2.2-i2v-a14b", 21, 90, 160, 512),
    # Wan2.2-TI2V-5B image-to-video at 704 x 1280 x 121: 31 latent frames in the sequence, the first one clean
    "wan22-ti2v-5b-i2v": Target("wan_i2v", "2.2-ti2v-5b", 31, 44, 80, 512),
    # LTX-2 at LTX2Pipeline's 121 x 512 x 768 -> 16 x 16 x 24 latents (its VAE: 8x time, 32x space; patch 1:
    # 6144 tokens); 1024 connector tokens by cross-attention; video only (one zero audio token, as the adapter)
    "ltx2": Target("ltx2", "2.0", 16, 16, 24, 1024),
    # HunyuanVideo 1.5 480p t2v at its pipeline's 121 x 480 x 848 -> 31 x 30 x 53 latents (VAE: 4x time, 16x
    # space; patch 1: 49290 tokens) in one joint sequence with the prompt: the adapter drops the padding, so a
    # 128-token Qwen prompt, one (masked) ByT5 and one (masked) image token
    "hunyuanvideo15": Target("hunyuanvideo15", "480p-t2v", 31, 30, 53, 128),
}
#: LoRA rank of the packaged config where it is not 64 (configs/ltx2_lora.yaml: 32, as Lightricks' t2v_lora.yaml)
LORA_RANKS = {"ltx2": 32}
#: latent (frames, height, width) of the CPU scan points: 2 token counts
SCAN_GRIDS = [(3, 16, 24), (5, 24, 32)]
#: Qwen-Image's scan points: one frame, 144 and 576 image tokens
IMAGE_SCAN_GRIDS = [(1, 24, 24), (1, 48, 48)]


def scan_grids(target: Target) -> list[tuple[int, int, int]]:
    return IMAGE_SCAN_GRIDS if target.family in ("qwenimage", "qwenimage_edit") else SCAN_GRIDS
SCAN_LAYERS = [1, 2]


def transformer_config(target: Target, layers: int | None) -> dict:
    if target.family == "cogvideox":
        from sipo.models.cogvideox import FULL_TRANSFORMER_CONFIGS

        config = dict(FULL_TRANSFORMER_CONFIGS[target.variant])
    elif target.family == "qwenimage":
        from sipo.models.qwenimage import FULL_TRANSFORMER_CONFIG

        config = dict(FULL_TRANSFORMER_CONFIG)
    elif target.family == "qwenimage_edit":
        from sipo.models.qwenimage_edit import FULL_EDIT_TRANSFORMER_CONFIG

        config = dict(FULL_EDIT_TRANSFORMER_CONFIG)
    elif target.variant == "2.2-i2v-a14b":
        from sipo.models.wan_i2v import FULL_I2V_A14B_TRANSFORMER_CONFIG

        config = dict(FULL_I2V_A14B_TRANSFORMER_CONFIG)
    elif target.family == "ltx2":
        from sipo.models.ltx2 import FULL_TRANSFORMER_CONFIG as LTX2_CONFIG

        config = dict(LTX2_CONFIG)
    elif target.family == "hunyuanvideo15":
        from sipo.models.hunyuanvideo15 import FULL_TRANSFORMER_CONFIG as HUNYUAN_CONFIG

        config = dict(HUNYUAN_CONFIG)
    else:
        from sipo.models.wan import WanAdapter

        config = dict(WanAdapter.variant_configs(_wan_variant(target), "full")[0][0])
    if layers is not None:
        config["num_layers"] = layers
    return config


def _wan_variant(target: Target) -> str:
    return "2.1-t2v-1.3b" if target.variant == "1.3b" else target.variant


def experts(target: Target) -> int:
    """Transformers resident in the step: Wan2.2-A14B holds both experts (a pair uses one)."""
    return 2 if target.variant in ("2.2-t2v-a14b", "2.2-i2v-a14b") else 1


def tokens_per_sequence(target: Target, grid: tuple[int, int, int]) -> int:
    frames, height, width = grid
    if target.family == "ltx2":  # patch size 1: a token per latent voxel; text by cross-attention
        return frames * height * width
    if target.family == "hunyuanvideo15":  # patch size 1; the prompt, one ByT5 and one image token join the sequence
        return frames * height * width + target.text_tokens + 2
    patches = frames * (height // 2) * (width // 2)
    if target.family == "qwenimage_edit":  # the input image's tokens (as large as the output's) join the sequence
        patches *= 2
    # CogVideoX and Qwen-Image put the text into the same sequence; Wan attends to it by cross-attention.
    return patches + (target.text_tokens if target.family in ("cogvideox", "qwenimage", "qwenimage_edit") else 0)


def denoiser_config(adapter):
    """The (first) transformer's config: a two-expert denoiser has none of its own."""
    denoiser = adapter.denoiser
    return (denoiser.transformer if hasattr(denoiser, "transformer_2") else denoiser).config


def build_adapter(target: Target, layers: int | None, device: torch.device, dtype: torch.dtype):
    """The family adapter around a random full-width transformer (``dtype``) and a toy VAE (config only)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        AutoencoderKLWan,
        CogVideoXDDIMScheduler,
        CogVideoXTransformer3DModel,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
    )

    config = transformer_config(target, layers)
    torch.manual_seed(0)
    with torch.device(device):
        if target.family == "cogvideox":
            from sipo.models.cogvideox import FULL_SCHEDULER_CONFIG, TINY_VAE_CONFIG, CogVideoXAdapter

            transformer = CogVideoXTransformer3DModel(**config).to(dtype)
            vae = AutoencoderKLCogVideoX(**TINY_VAE_CONFIG)  # only its config is read (scale factors)
            adapter = CogVideoXAdapter(transformer, vae, None, None, CogVideoXDDIMScheduler(**FULL_SCHEDULER_CONFIG))
        elif target.family == "qwenimage":
            from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

            from sipo.models.qwenimage import SCHEDULER_CONFIG, TINY_VAE_CONFIG, QwenImageAdapter

            transformer = QwenImageTransformer2DModel(**config).to(dtype)
            vae = AutoencoderKLQwenImage(**TINY_VAE_CONFIG)
            adapter = QwenImageAdapter(transformer, vae, None, None, FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                                       resolution=8 * target.latent_height)  # 1328: mu of the dynamic shift
        elif target.family == "qwenimage_edit":
            from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

            from sipo.models.qwenimage import SCHEDULER_CONFIG, TINY_VAE_CONFIG
            from sipo.models.qwenimage_edit import QwenImageEditPlusAdapter

            transformer = QwenImageTransformer2DModel(**config).to(dtype)
            vae = AutoencoderKLQwenImage(**TINY_VAE_CONFIG)
            adapter = QwenImageEditPlusAdapter(transformer, vae, None, None, None, FlowMatchEulerDiscreteScheduler(
                **SCHEDULER_CONFIG), resolution=8 * target.latent_height)
        elif target.family == "wan_i2v":
            from sipo.models.wan import FULL_SCHEDULER_CONFIG, TINY_VAE_CONFIG, WanAdapter
            from sipo.models.wan_i2v import I2V_A14B_BOUNDARY_RATIO, I2V_A14B_FLOW_SHIFT, WanI2VAdapter

            if target.variant == "2.2-i2v-a14b":
                vae_config, extras = TINY_VAE_CONFIG, dict(flow_shift=I2V_A14B_FLOW_SHIFT, boundary_ratio=I2V_A14B_BOUNDARY_RATIO)
            else:
                _, vae_config, extras = WanAdapter.variant_configs(target.variant, "tiny")
            transformer = WanTransformer3DModel(**config).to(dtype)
            second = WanTransformer3DModel(**config).to(dtype) if experts(target) == 2 else None
            vae = AutoencoderKLWan(**vae_config)  # only its config is read (scale factors, z_dim)
            scheduler = UniPCMultistepScheduler(**dict(FULL_SCHEDULER_CONFIG, flow_shift=extras["flow_shift"]))
            adapter = WanI2VAdapter(transformer, vae, None, None, scheduler, transformer_2=second,
                                    boundary_ratio=extras.get("boundary_ratio"), expand_timesteps=extras.get("expand_timesteps", False))
        elif target.family == "ltx2":
            from diffusers import AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel

            from sipo.models.ltx2 import FULL_SCHEDULER_CONFIG, TINY_VAE_CONFIG, LTX2Adapter

            transformer = LTX2VideoTransformer3DModel(**config).to(dtype)
            vae = AutoencoderKLLTX2Video(**TINY_VAE_CONFIG)  # only its compression ratios are read
            adapter = LTX2Adapter(transformer, vae, None, None, FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG),
                                  connectors=None, audio_vae=None, vocoder=None)
        elif target.family == "hunyuanvideo15":
            from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel

            from sipo.models.hunyuanvideo15 import FULL_SCHEDULER_CONFIG, TINY_VAE_CONFIG, HunyuanVideo15Adapter

            transformer = HunyuanVideo15Transformer3DModel(**config).to(dtype)
            vae = AutoencoderKLHunyuanVideo15(**TINY_VAE_CONFIG)  # only its compression ratios are read
            adapter = HunyuanVideo15Adapter(transformer, vae, None, None, FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG),
                                            text_encoder_2=None, tokenizer_2=None)
        else:
            from sipo.models.wan import FULL_SCHEDULER_CONFIG, WanAdapter

            _, vae_config, extras = WanAdapter.variant_configs(_wan_variant(target), "tiny")
            transformer = WanTransformer3DModel(**config).to(dtype)
            second = WanTransformer3DModel(**config).to(dtype) if experts(target) == 2 else None
            vae = AutoencoderKLWan(**vae_config)  # only its config is read (scale factors)
            scheduler = UniPCMultistepScheduler(**dict(FULL_SCHEDULER_CONFIG, flow_shift=extras.get("flow_shift", 3.0)))
            adapter = WanAdapter(transformer, vae, None, None, scheduler, transformer_2=second,
                                 boundary_ratio=extras.get("boundary_ratio"), expand_timesteps=extras.get("expand_timesteps", False))
    return adapter


def resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_resident() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure_step(
    target: Target, layers: int | None, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype, rank: int = 64,
    frozen_dtype: str = "bf16",
) -> dict:
    """Peak bytes of one LoRA SIPO step on one pair (on a GPU: after one warm-up step).

    ``dtype`` bf16: frozen weights in bf16 and bf16 autocast (the GPU setting); float32: no
    autocast (the CPU scan: this CPU has no fast bf16 matmul, ~100x slower than fp32).
    """
    from sipo.config import load_config
    from sipo.models import add_lora, lora_disabled
    from sipo.models.base import EncodedPairs
    from sipo.preference import compute_pair_terms, draw_pair_noise

    adapter = build_adapter(target, layers, device, dtype)
    rank = LORA_RANKS.get(target.family, rank)
    config = load_config(None, [f"train.lora_rank={rank}", f"train.lora_alpha={rank}"])
    add_lora(adapter, config)
    for name, param in adapter.denoiser.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # trainable weights stay fp32, as under accelerate's autocast
    adapter.denoiser.enable_gradient_checkpointing()
    adapter.denoiser.train()
    if frozen_dtype == "fp8":  # the trainer's model.frozen_dtype=fp8 (sipo.models.base.store_frozen_base_in)
        from sipo.models.base import store_frozen_base_in

        store_frozen_base_in(adapter, "fp8", dtype)
    frames, height, width = grid
    model_config = denoiser_config(adapter)
    if target.family in ("qwenimage", "qwenimage_edit"):
        shape, text_dim = (1, model_config.out_channels, height, width), model_config.joint_attention_dim
    elif target.family == "wan_i2v":  # x0: the noisy latents only (TI2V: the frames after the clean first one)
        shape = (1, model_config.out_channels, frames - 1 if adapter.expand_timesteps else frames, height, width)
        text_dim = model_config.text_dim
    elif target.family == "ltx2":  # the connectors' output, caption_channels wide, before the caption projection
        shape, text_dim = (1, model_config.in_channels, frames, height, width), model_config.caption_channels
    elif target.family == "hunyuanvideo15":  # x0 has the 32 latent channels; the condition channels are added
        shape, text_dim = (1, model_config.out_channels, frames, height, width), model_config.text_embed_dim
    else:
        channels = model_config.in_channels
        shape = (1, frames, channels, height, width) if target.family == "cogvideox" else (1, channels, frames, height, width)
        text_dim = model_config.text_embed_dim if target.family == "cogvideox" else model_config.text_dim
    generator = torch.Generator().manual_seed(0)
    conditioning = {"encoder_hidden_states": torch.randn(1, target.text_tokens, text_dim, generator=generator).to(device, dtype)}
    if target.family == "qwenimage":  # a 40-token prompt padded to the adapter's 256
        conditioning["encoder_hidden_states_mask"] = (torch.arange(target.text_tokens) < 40).long()[None].to(device)
    if target.family == "qwenimage_edit":  # the input's 196 vision tokens (384 px) + a 40-token instruction, of 512
        conditioning["encoder_hidden_states_mask"] = (torch.arange(target.text_tokens) < 236).long()[None].to(device)
        conditioning["image_latents"] = torch.randn(shape, generator=generator).to(device)
    if target.family == "wan_i2v":  # the input image's latents: TI2V's clean first frame, I2V-A14B's condition clip
        condition = (1, shape[1], 1, height, width) if adapter.expand_timesteps else shape
        conditioning["first_frame" if adapter.expand_timesteps else "image_condition"] = torch.randn(
            condition, generator=generator).to(device)
    if target.family == "ltx2":  # LTX-2's connectors replace padding with registers: every token attends
        conditioning["encoder_attention_mask"] = torch.ones(1, target.text_tokens, device=device)
    if target.family == "hunyuanvideo15":  # the prompt's valid tokens; no quoted text: one masked ByT5 token
        conditioning["encoder_attention_mask"] = torch.ones(1, target.text_tokens, device=device)
        conditioning["encoder_hidden_states_2"] = torch.zeros(1, 1, model_config.text_embed_2_dim, device=device, dtype=dtype)
        conditioning["encoder_attention_mask_2"] = torch.zeros(1, 1, device=device)
    encoded = EncodedPairs(
        torch.randn(shape, generator=generator).to(device),
        torch.randn(shape, generator=generator).to(device),
        conditioning,
    )
    trainable = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def reference(x_t, t, cond):
        with lora_disabled(adapter.denoiser):
            return adapter.predict(x_t, t, cond)

    def step():
        noise = draw_pair_noise(encoded.x0_winner.shape, 1000, generator, t_low=100, t_high=900)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            terms = compute_pair_terms(adapter, encoded, noise, beta=20.0, reference_predict=reference)
            loss = terms.loss_pair.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    import time

    seconds = None
    if device.type == "cuda":
        step()  # warm-up: optimizer state and allocator caches exist from here on
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak_total = torch.cuda.max_memory_allocated()
    else:
        before = resident_bytes()
        reset_peak_resident()
        loss = step()
        peak_total = peak_resident_bytes()
    frozen = sum(p.numel() * p.element_size() for p in adapter.denoiser.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in trainable)
    return {
        "family": f"{target.family}-{target.variant}", "layers": model_config.num_layers, "grid": list(grid),
        "dtype": str(dtype).removeprefix("torch."), "frozen_dtype": frozen_dtype,
        "tokens": tokens_per_sequence(target, grid), "device": device.type, "loss": loss,
        "frozen_weight_bytes": frozen, "lora_parameters": lora,
        "before_step_bytes": before, "peak_bytes": peak_total, "step_bytes": peak_total - before,
        "seconds_per_step": seconds,
    }


def fit_and_extrapolate(points: list[dict], target: Target) -> dict:
    """Least squares ``step_bytes = c0 + N (c1 + c2 L)``; then the full model at the target grid."""
    rows = torch.tensor([[1.0, p["tokens"], p["tokens"] * p["layers"]] for p in points], dtype=torch.float64)
    values = torch.tensor([float(p["step_bytes"]) for p in points], dtype=torch.float64)
    coefficients = torch.linalg.lstsq(rows, values.unsqueeze(1)).solution.squeeze(1)
    residual = (rows @ coefficients - values).abs().max().item()
    full_layers = transformer_config(target, None)["num_layers"]
    full_tokens = tokens_per_sequence(target, (target.latent_frames, target.latent_height, target.latent_width))
    activations = float(coefficients[0] + full_tokens * (coefficients[1] + coefficients[2] * full_layers))
    with torch.device("meta"):
        adapter_params = _full_parameter_count(target) * experts(target)
        fp8_bytes = _fp8_weight_bytes(target) * experts(target)
    weights = adapter_params * 2  # bf16 frozen weights
    # LoRA of every resident expert (the scan points hold them all): fp32 weight, grad, 2 AdamW moments
    lora = points[-1]["lora_parameters"] / points[-1]["layers"] * full_layers * 16
    # The scan runs in fp32; under bf16 autocast the saved activations are mostly bf16: half of
    # them is the estimate, the fp32 figure an upper bound.
    scale = 0.5 if points[-1]["dtype"] == "float32" else 1.0
    return {
        "family": f"{target.family}-{target.variant}", "tokens": full_tokens, "layers": full_layers,
        "coefficients": [float(c) for c in coefficients], "fit_max_residual_gib": residual / GIB,
        "activations_measured_dtype_gib": activations / GIB, "activations_bf16_gib": activations * scale / GIB,
        "weights_bf16_gib": weights / GIB, "lora_gib": lora / GIB,
        "total_bf16_gib": (activations * scale + weights + lora) / GIB,
        "total_upper_gib": (activations + weights + lora) / GIB,
        "experts": experts(target), "weights_fp8_gib": fp8_bytes / GIB,
        # layerwise casting upcasts one layer at a time, but autograd keeps a checkpointed block's upcast
        # weights until that block's backward: one block of one expert in bf16 comes on top
        "total_fp8_gib": (activations * scale + fp8_bytes + lora + adapter_params / experts(target) / full_layers * 2) / GIB,
    }


def _transformer_class(target: Target):
    from diffusers import (
        CogVideoXTransformer3DModel, LTX2VideoTransformer3DModel, QwenImageTransformer2DModel, WanTransformer3DModel,
    )

    return {"cogvideox": CogVideoXTransformer3DModel, "qwenimage": QwenImageTransformer2DModel,
            "qwenimage_edit": QwenImageTransformer2DModel}.get(target.family, WanTransformer3DModel)
    from diffusers import HunyuanVideo15Transformer3DModel

    return {"cogvideox": CogVideoXTransformer3DModel, "qwenimage": QwenImageTransformer2DModel,
            "ltx2": LTX2VideoTransformer3DModel, "hunyuanvideo15": HunyuanVideo15Transformer3DModel}.get(
        target.family, WanTransformer3DModel)


def _full_parameter_count(target: Target) -> int:
    return sum(p.numel() for p in _transformer_class(target)(**transformer_config(target, None)).parameters())


def _fp8_weight_bytes(target: Target) -> int:
    """Frozen weight bytes of one transformer under ``model.frozen_dtype=fp8``: the trainer's own cast
    (diffusers' layerwise casting, on the meta device) leaves norms and embeddings bf16, the rest 1 byte."""
    model = _transformer_class(target)(**transformer_config(target, None)).to(torch.bfloat16)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="CPU: measure small points in subprocesses, fit, extrapolate")
    scan.add_argument("--families", nargs="+", default=["cogvideox-2b", "wan"], choices=sorted(TARGETS))
    scan.add_argument("--json", type=Path, default=None, help="also write the points and estimates here")
    fit = commands.add_parser("fit", help="fit and extrapolate from step outputs saved as JSON lines (points run one by one)")
    fit.add_argument("--family", choices=sorted(TARGETS), required=True)
    fit.add_argument("--points", type=Path, required=True, help="a file of `step` JSON outputs, one per line")
    one = commands.add_parser("step", help="measure one configuration in this process (prints JSON)")
    one.add_argument("--family", choices=sorted(TARGETS), required=True)
    one.add_argument("--layers", type=int, default=None, help="blocks (default: the full model's)")
    one.add_argument("--grid", type=int, nargs=3, default=None, metavar=("F", "H", "W"), help="latent grid")
    one.add_argument("--full", action="store_true", help="the paper's clip size and every block")
    one.add_argument("--device", default="cpu")
    one.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda, float32 on cpu")
    one.add_argument("--frozen-dtype", choices=["bf16", "fp8"], default="bf16", help="model.frozen_dtype of the step")
    args = parser.parse_args()

    if args.command == "step":
        target = TARGETS[args.family]
        grid = (target.latent_frames, target.latent_height, target.latent_width) if args.full else tuple(args.grid or scan_grids(target)[0])
        layers = None if args.full else args.layers
        device = torch.device(args.device)
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        print(json.dumps(measure_step(target, layers, grid, device, dtype, frozen_dtype=args.frozen_dtype)))
        return

    if args.command == "fit":
        points = [json.loads(line) for line in args.points.read_text().splitlines() if line.strip()]
        print(json.dumps(fit_and_extrapolate(points, TARGETS[args.family]), indent=2))
        return

    report = {}
    scanned: dict[tuple[str, str], list[dict]] = {}  # targets of one model (A14B at 480p and 720p) share a scan
    for name in args.families:
        key = (TARGETS[name].family, TARGETS[name].variant)
        points = scanned.get(key, [])
        for layers in SCAN_LAYERS if key not in scanned else []:
            for grid in scan_grids(TARGETS[name]):
                command = [sys.executable, __file__, "step", "--family", name, "--layers", str(layers), "--grid", *map(str, grid)]
                output = subprocess.run(command, check=True, capture_output=True, text=True, env=SCAN_ENV).stdout
                point = json.loads(output.strip().splitlines()[-1])
                points.append(point)
                print(f"{name:13s} L={layers} tokens={point['tokens']:5d} step peak {point['step_bytes'] / GIB:6.3f} GiB", flush=True)
        scanned[key] = points
        estimate = fit_and_extrapolate(points, TARGETS[name])
        report[name] = {"points": points, "estimate": estimate}
        print(
            f"{name:13s} full: {estimate['layers']} blocks x {estimate['tokens']} tokens: activations "
            f"{estimate['activations_bf16_gib']:.1f} GiB (fp32: {estimate['activations_measured_dtype_gib']:.1f}) + bf16 weights "
            f"{estimate['weights_bf16_gib']:.1f} GiB + LoRA/AdamW {estimate['lora_gib']:.2f} GiB = "
            f"{estimate['total_bf16_gib']:.1f} GiB (upper bound {estimate['total_upper_gib']:.1f}; fit residual "
            f"{estimate['fit_max_residual_gib']:.3f} GiB); fp8 frozen base: weights {estimate['weights_fp8_gib']:.1f} GiB, "
            f"total {estimate['total_fp8_gib']:.1f} GiB",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
