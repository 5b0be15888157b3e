"""Peak memory (and, on a GPU, time) of one LoRA preference step of the flow image transformers.

    # CPU: measure full-width transformers with 1-2 block units at two token counts, fit, extrapolate
    OMP_NUM_THREADS=2 python benchmarks/flow_image_memory.py scan [--families flux-dev sd35-medium sd35-large]
    # GPU: the real thing, the full config at 1024 px (random weights, no download); prints s/step too
    python benchmarks/flow_image_memory.py step --family flux-dev --device cuda --full

The method of benchmarks/video_memory.py (docs/models.md), on FLUX.1-dev and SD3.5: one step is what
the trainer does for one pair -- the policy (LoRA on) on winner and loser with gradients, the
reference (LoRA off) on both under no_grad, the SIPO weights, backward through the LoRA weights with
gradient checkpointing, AdamW. Frozen weights bf16, LoRA weights and AdamW state fp32, activations
under bf16 autocast; latents and text embeddings are given (the latent cache), so neither the VAE
nor CLIP/T5 is in the step. The scan fits ``activation bytes = c0 + N (c1 + c2 L)`` (``N`` tokens of
the joint image + text sequence, ``L`` block units: FLUX one double-stream + two single-stream blocks,
its 19 + 38 being 19 units; SD3.5 one joint block) and extrapolates to the full model. SD3.5 medium's
scan blocks all carry its second (dual) attention, which only 13 of its 24 blocks have: its figure is
an upper bound.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from video_memory import GIB, SCAN_ENV, peak_resident_bytes, reset_peak_resident, resident_bytes  # noqa: E402


@dataclass(frozen=True)
class Target:
    """A family at its published resolution: the latent side (pixels / 8) and the text tokens in the joint sequence."""

    family: str
    latent_side: int
    text_tokens: int
    units: int
    rank: int


TARGETS = {
    # 1024 px -> 128 x 128 latents -> 64 x 64 = 4096 packed tokens; T5 512 tokens (FluxPipeline's default)
    "flux-dev": Target("flux", 128, 512, 19, 4),
    # 1024 px -> 128 x 128 latents -> 2x2 patches: 4096 tokens; 77 CLIP + 256 T5 tokens
    "sd35-medium": Target("sd3", 128, 333, 24, 4),
    "sd35-large": Target("sd3", 128, 333, 38, 4),
}
#: latent side and text tokens of the CPU scan points
SCAN_POINTS = [(16, 64), (24, 96)]
SCAN_UNITS = [1, 2]


def transformer_config(name: str, units: int | None) -> dict:
    if name == "flux-dev":
        from sipo.models.flux import FULL_TRANSFORMER_CONFIG

        config = dict(FULL_TRANSFORMER_CONFIG)
        if units is not None:
            config.update(num_layers=units, num_single_layers=2 * units)
        return config
    from sipo.models.sd3 import FULL_LARGE_TRANSFORMER_CONFIG, FULL_MEDIUM_TRANSFORMER_CONFIG

    config = dict(FULL_MEDIUM_TRANSFORMER_CONFIG if name == "sd35-medium" else FULL_LARGE_TRANSFORMER_CONFIG)
    if units is not None:
        config["num_layers"] = units
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < units)
    return config


def build_adapter(name: str, units: int | None, device: torch.device, dtype: torch.dtype):
    """The family adapter around a random full-width transformer; the VAE exists on the meta device
    (only its config is read); no text encoder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if name == "flux-dev":
        from sipo.models.flux import FULL_SCHEDULER_CONFIG, FULL_VAE_CONFIG, FluxAdapter as cls

        transformer_cls = FluxTransformer2DModel
    else:
        from sipo.models.sd3 import FULL_SCHEDULER_CONFIG, FULL_VAE_CONFIG, SD3Adapter as cls

        transformer_cls = SD3Transformer2DModel
    with torch.device(device):
        transformer = transformer_cls(**transformer_config(name, units)).to(dtype)
    with torch.device("meta"):
        vae = AutoencoderKL(**FULL_VAE_CONFIG)
    parts = {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG)}
    return cls(parts, resolution=1024)


def measure_step(name: str, units: int | None, latent_side: int, text_tokens: int, device: torch.device,
                 dtype: torch.dtype) -> dict:
    """Peak bytes of one LoRA DPO step on one pair (the SIPO weights computed too) (on a GPU: after one warm-up step, and its seconds)."""
    from sipo.config import load_config
    from sipo.models import add_lora, lora_disabled
    from sipo.models.base import EncodedPairs
    from sipo.preference import compute_pair_terms, draw_pair_noise

    target = TARGETS[name]
    adapter = build_adapter(name, units, device, dtype)
    config = load_config(None, [f"train.lora_rank={target.rank}", f"train.lora_alpha={target.rank}"])
    add_lora(adapter, config)
    for param_name, param in adapter.denoiser.named_parameters():
        if "lora_" in param_name:
            param.data = param.data.float()  # trainable weights stay fp32, as under accelerate's autocast
    adapter.denoiser.enable_gradient_checkpointing()
    adapter.denoiser.train()
    model_config = adapter.denoiser.config
    channels = model_config.in_channels // 4 if name == "flux-dev" else model_config.in_channels
    shape = (1, channels, latent_side, latent_side)
    generator = torch.Generator().manual_seed(0)
    encoded = EncodedPairs(
        torch.randn(shape, generator=generator).to(device),
        torch.randn(shape, generator=generator).to(device),
        {"encoder_hidden_states": torch.randn(1, text_tokens, model_config.joint_attention_dim, generator=generator).to(device, dtype),
         "pooled_projections": torch.randn(1, model_config.pooled_projection_dim, generator=generator).to(device, dtype)},
    )
    trainable = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def reference(x_t, t, cond):
        with lora_disabled(adapter.denoiser):
            return adapter.predict(x_t, t, cond)

    def step():
        noise = draw_pair_noise(encoded.x0_winner.shape, 1000, generator, t_low=100, t_high=900)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            terms = compute_pair_terms(adapter, encoded, noise, beta=5000.0, reference_predict=reference)  # DPO: loss_pair
            loss = terms.loss_pair.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

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
    image_tokens = (latent_side // 2) ** 2
    return {
        "family": name, "units": units or target.units, "latent_side": latent_side, "dtype": str(dtype).removeprefix("torch."),
        "tokens": image_tokens + text_tokens, "device": device.type, "loss": loss, "seconds_per_step": seconds,
        "frozen_weight_bytes": frozen, "lora_parameters": sum(p.numel() for p in trainable),
        "before_step_bytes": before, "peak_bytes": peak_total, "step_bytes": peak_total - before,
        "peak_gib": peak_total / GIB,
    }


def fit_and_extrapolate(points: list[dict], name: str) -> dict:
    """Least squares ``step_bytes = c0 + N (c1 + c2 L)``; then the full model at its published size."""
    target = TARGETS[name]
    rows = torch.tensor([[1.0, p["tokens"], p["tokens"] * p["units"]] for p in points], dtype=torch.float64)
    values = torch.tensor([float(p["step_bytes"]) for p in points], dtype=torch.float64)
    coefficients = torch.linalg.lstsq(rows, values.unsqueeze(1)).solution.squeeze(1)
    residual = (rows @ coefficients - values).abs().max().item()
    full_tokens = (target.latent_side // 2) ** 2 + target.text_tokens
    activations = float(coefficients[0] + full_tokens * (coefficients[1] + coefficients[2] * target.units))
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if name == "flux-dev" else SD3Transformer2DModel
    with torch.device("meta"):
        parameters = sum(p.numel() for p in cls(**transformer_config(name, None)).parameters())
    weights = parameters * 2  # bf16 frozen weights
    lora = points[-1]["lora_parameters"] / points[-1]["units"] * target.units * 16  # fp32 weight, grad, 2 AdamW moments
    # The scan runs in fp32; under bf16 autocast the saved activations are mostly bf16: half of
    # them is the estimate, the fp32 figure an upper bound.
    scale = 0.5 if points[-1]["dtype"] == "float32" else 1.0
    return {
        "family": name, "tokens": full_tokens, "units": target.units, "parameters": parameters,
        "coefficients": [float(c) for c in coefficients], "fit_max_residual_gib": residual / GIB,
        "activations_measured_dtype_gib": activations / GIB, "activations_bf16_gib": activations * scale / GIB,
        "weights_bf16_gib": weights / GIB, "lora_gib": lora / GIB,
        "total_bf16_gib": (activations * scale + weights + lora) / GIB,
        "total_upper_gib": (activations + weights + lora) / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="CPU: measure small points in subprocesses, fit, extrapolate")
    scan.add_argument("--families", nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    scan.add_argument("--json", type=Path, default=None, help="also write the points and estimates here")
    one = commands.add_parser("step", help="measure one configuration in this process (prints JSON)")
    one.add_argument("--family", choices=sorted(TARGETS), required=True)
    one.add_argument("--units", type=int, default=None, help="block units (default: the full model's)")
    one.add_argument("--latent-side", type=int, default=16)
    one.add_argument("--text-tokens", type=int, default=64)
    one.add_argument("--full", action="store_true", help="the published resolution (1024 px) and every block")
    one.add_argument("--device", default="cpu")
    one.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda, float32 on cpu")
    args = parser.parse_args()

    if args.command == "step":
        target = TARGETS[args.family]
        side, text = (target.latent_side, target.text_tokens) if args.full else (args.latent_side, args.text_tokens)
        device = torch.device(args.device)
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        print(json.dumps(measure_step(args.family, None if args.full else args.units, side, text, device, dtype)))
        return

    report = {}
    for name in args.families:
        points = []
        for units in SCAN_UNITS:
            for side, text in SCAN_POINTS:
                command = [sys.executable, __file__, "step", "--family", name, "--units", str(units),
                           "--latent-side", str(side), "--text-tokens", str(text)]
                output = subprocess.run(command, check=True, capture_output=True, text=True, env=SCAN_ENV).stdout
                point = json.loads(output.strip().splitlines()[-1])
                points.append(point)
                print(f"{name:12s} L={units} tokens={point['tokens']:5d} step peak {point['step_bytes'] / GIB:6.3f} GiB", flush=True)
        estimate = fit_and_extrapolate(points, name)
        report[name] = {"points": points, "estimate": estimate}
        print(
            f"{name:12s} full: {estimate['units']} units x {estimate['tokens']} tokens: activations "
            f"{estimate['activations_bf16_gib']:.1f} GiB (fp32: {estimate['activations_measured_dtype_gib']:.1f}) + bf16 weights "
            f"{estimate['weights_bf16_gib']:.1f} GiB + LoRA/AdamW {estimate['lora_gib']:.3f} GiB = "
            f"{estimate['total_bf16_gib']:.1f} GiB (upper bound {estimate['total_upper_gib']:.1f}; fit residual "
            f"{estimate['fit_max_residual_gib']:.3f} GiB)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
