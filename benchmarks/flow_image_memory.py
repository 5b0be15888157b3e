"""Peak memory (and, on a GPU, time) of one LoRA preference step of the flow image transformers.

    # CPU: measure full-width transformers with 1-2 block units at two token counts, fit, extrapolate
    OMP_NUM_THREADS=2 python benchmarks/flow_image_memory.py scan [--families flux-dev sd35-medium sd35-large]
    # GPU: the real thing, the full config at 1024 px (random weights, no download); prints s/step too
    python benchmarks/flow_image_memory.py step --family flux-dev --device cuda --full
    # issue 28: FLUX.2 [klein] 4B / 9B, [dev] and Z-Image (their own units, below); --frozen-dtype fp8 on a GPU
    OMP_NUM_THREADS=2 python benchmarks/flow_image_memory.py scan --families flux2-klein-4b flux2-klein-9b flux2-dev zimage

The method of benchmarks/video_memory.py (docs/models.md), on FLUX.1-dev and SD3.5: one step is what
the trainer does for one pair -- the policy (LoRA on) on winner and loser with gradients, the
reference (LoRA off) on both under no_grad, the SIPO weights, backward through the LoRA weights with
gradient checkpointing, AdamW. Frozen weights bf16, LoRA weights and AdamW state fp32, activations
under bf16 autocast; latents and text embeddings are given (the latent cache), so neither the VAE
nor CLIP/T5 is in the step. The scan fits ``activation bytes = c0 + N (c1 + c2 L)`` (``N`` tokens of
the joint image + text sequence, ``L`` block units: FLUX one double-stream + two single-stream blocks,
its 19 + 38 being 19 units; SD3.5 one joint block; FLUX.2 one double-stream block + its model's ratio of
single-stream ones: [klein] 4B 5 x (1 + 4), 9B 8 x (1 + 3), [dev] 8 x (1 + 6); Z-Image one main block, its
two noise and two context refiners kept) and extrapolates to the full model. SD3.5 medium's
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
    # 1024 px -> 128 x 128 latents -> patchified 64 x 64 = 4096 tokens; 512 text tokens (both pipelines pad to 512)
    "flux2-klein-4b": Target("flux2", 128, 512, 5, 4),
    "flux2-klein-9b": Target("flux2", 128, 512, 8, 4),
    "flux2-dev": Target("flux2", 128, 512, 8, 4),
    # 1024 px -> 4096 patches; the caption's real tokens only (<= 512): 512 is the bound the estimate takes
    "zimage": Target("zimage", 128, 512, 30, 4),
}
#: FLUX.2 single-stream blocks per double-stream block of the full models
FLUX2_SINGLE_PER_DOUBLE = {"flux2-klein-4b": 4, "flux2-klein-9b": 3, "flux2-dev": 6}
#: FLUX.2 scan points (double, single blocks): the fit separates the two kinds, whose ratio differs per model
FLUX2_SCAN_BLOCKS = [(1, 1), (1, 2), (2, 1)]
#: [klein] 9B's and [dev]'s scan blocks (4096 and 6144 wide: 3.5 to 16 GB per scan point in fp32) are past
#: the memory of the 23 GB CPU machine these estimates come from: their activation coefficients are
#: [klein] 4B's measured ones (3072 wide) times the width ratio (every tensor a block saves is
#: [tokens, k x width]); weights, LoRA and fp8 bytes are counted exactly on the full models.
#: `step --family flux2-klein-9b --units 1 --single-layers 1` measures one 9B point to check the scaling.
FLUX2_WIDTH_SCALED = {"flux2-klein-9b": ("flux2-klein-4b", 4096 / 3072), "flux2-dev": ("flux2-klein-4b", 6144 / 3072)}
#: latent side and text tokens of the CPU scan points
SCAN_POINTS = [(16, 64), (24, 96)]
SCAN_UNITS = [1, 2]


def transformer_config(name: str, units: int | None, single: int | None = None) -> dict:
    if name in FLUX2_SINGLE_PER_DOUBLE:
        from sipo.models.flux2 import FULL_TRANSFORMER_CONFIGS

        config = dict(FULL_TRANSFORMER_CONFIGS[name.removeprefix("flux2-")])
        if units is not None:
            config.update(num_layers=units,
                          num_single_layers=FLUX2_SINGLE_PER_DOUBLE[name] * units if single is None else single)
        return config
    if name == "zimage":
        from sipo.models.zimage import FULL_TRANSFORMER_CONFIG

        return dict(FULL_TRANSFORMER_CONFIG, **({} if units is None else {"n_layers": units}))
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


def transformer_class(name: str):
    import diffusers

    family = TARGETS[name].family
    return getattr(diffusers, {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel",
                               "flux2": "Flux2Transformer2DModel", "zimage": "ZImageTransformer2DModel"}[family])


def build_adapter(name: str, units: int | None, device: torch.device, dtype: torch.dtype, single: int | None = None):
    """The family adapter around a random full-width transformer; the VAE exists on the meta device
    (only its config is read); no text encoder."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    family = TARGETS[name].family
    if family in ("flux2", "zimage"):
        if family == "flux2":
            from sipo.models.flux2 import SCHEDULER_CONFIG, Flux2Adapter as cls

            vae_cls, vae_config = AutoencoderKLFlux2, {}
        else:
            from sipo.models.zimage import FULL_VAE_CONFIG, SCHEDULER_CONFIG, ZImageAdapter as cls

            vae_cls, vae_config = AutoencoderKL, FULL_VAE_CONFIG
        default = torch.get_default_dtype()
        try:  # built in the step's dtype: [dev] in fp32 would be 128 GB
            torch.set_default_dtype(dtype)
            with torch.device(device):
                transformer = transformer_class(name)(**transformer_config(name, units, single)).to(dtype)
        finally:
            torch.set_default_dtype(default)
        with torch.device("meta"):
            vae = vae_cls(**vae_config)
        parts = {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                 "text_encoder": None, "tokenizer": None}
        return cls(parts, resolution=1024)
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


def step_inputs(name: str, model_config, latent_side: int, text_tokens: int, generator, device, dtype):
    """``(x0 shape, conditioning)`` of one pair as the family's latent cache holds them."""
    family = TARGETS[name].family
    if family == "flux2":  # patchified latents [128, side / 2, side / 2]; 512 stacked text states
        return ((1, model_config.in_channels, latent_side // 2, latent_side // 2),
                {"encoder_hidden_states": torch.randn(1, text_tokens, model_config.joint_attention_dim,
                                                      generator=generator).to(device, dtype)})
    if family == "zimage":  # latents [16, side, side]; the caption's tokens and their mask
        return ((1, model_config.in_channels, latent_side, latent_side),
                {"encoder_hidden_states": torch.randn(1, text_tokens, model_config.cap_feat_dim, generator=generator).to(device, dtype),
                 "encoder_hidden_states_mask": torch.ones(1, text_tokens, dtype=torch.long, device=device)})
    channels = model_config.in_channels // 4 if name == "flux-dev" else model_config.in_channels
    return ((1, channels, latent_side, latent_side),
            {"encoder_hidden_states": torch.randn(1, text_tokens, model_config.joint_attention_dim, generator=generator).to(device, dtype),
             "pooled_projections": torch.randn(1, model_config.pooled_projection_dim, generator=generator).to(device, dtype)})


def measure_step(name: str, units: int | None, latent_side: int, text_tokens: int, device: torch.device,
                 dtype: torch.dtype, frozen_dtype: str = "bf16", single: int | None = None) -> dict:
    """Peak bytes of one LoRA DPO step on one pair (the SIPO weights computed too) (on a GPU: after one warm-up step, and its seconds)."""
    from sipo.config import load_config
    from sipo.models import add_lora, lora_disabled
    from sipo.models.base import EncodedPairs
    from sipo.preference import compute_pair_terms, draw_pair_noise

    target = TARGETS[name]
    adapter = build_adapter(name, units, device, dtype, single)
    config = load_config(None, [f"train.lora_rank={target.rank}", f"train.lora_alpha={target.rank}"])
    add_lora(adapter, config)
    for param_name, param in adapter.denoiser.named_parameters():
        if "lora_" in param_name:
            param.data = param.data.float()  # trainable weights stay fp32, as under accelerate's autocast
    adapter.denoiser.enable_gradient_checkpointing()
    adapter.denoiser.train()
    if frozen_dtype == "fp8":  # the trainer's model.frozen_dtype=fp8 (sipo.models.base.store_frozen_base_in)
        from sipo.models.base import store_frozen_base_in

        store_frozen_base_in(adapter, "fp8", dtype)
    model_config = adapter.denoiser.config
    generator = torch.Generator().manual_seed(0)
    shape, conditioning = step_inputs(name, model_config, latent_side, text_tokens, generator, device, dtype)
    encoded = EncodedPairs(
        torch.randn(shape, generator=generator).to(device), torch.randn(shape, generator=generator).to(device), conditioning)
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
        "frozen_dtype": frozen_dtype, "single": adapter.denoiser.config.get("num_single_layers"),
        "tokens": image_tokens + text_tokens, "device": device.type, "loss": loss, "seconds_per_step": seconds,
        "frozen_weight_bytes": frozen, "lora_parameters": sum(p.numel() for p in trainable),
        "before_step_bytes": before, "peak_bytes": peak_total, "step_bytes": peak_total - before,
        "peak_gib": peak_total / GIB,
    }


def fit_and_extrapolate(points: list[dict], name: str, width_scale: float = 1.0) -> dict:
    """Least squares ``step_bytes = c0 + N (c1 + c2 L)`` (FLUX.2: ``c0 + N (c1 + c_d D + c_s S)`` over its
    double and single blocks); then the full model at its published size. ``width_scale`` multiplies the
    per-token coefficients (``points`` measured at another width, `FLUX2_WIDTH_SCALED`)."""
    target = TARGETS[name]
    flux2 = target.family == "flux2"
    if flux2:
        rows = torch.tensor([[1.0, p["tokens"], p["tokens"] * p["units"], p["tokens"] * p["single"]] for p in points],
                            dtype=torch.float64)
    else:
        rows = torch.tensor([[1.0, p["tokens"], p["tokens"] * p["units"]] for p in points], dtype=torch.float64)
    values = torch.tensor([float(p["step_bytes"]) for p in points], dtype=torch.float64)
    coefficients = torch.linalg.lstsq(rows, values.unsqueeze(1)).solution.squeeze(1)
    residual = (rows @ coefficients - values).abs().max().item()
    coefficients[1:] *= width_scale
    full_tokens = (target.latent_side // 2) ** 2 + target.text_tokens
    full_config = transformer_config(name, None)
    if flux2:
        blocks = coefficients[2] * full_config["num_layers"] + coefficients[3] * full_config["num_single_layers"]
        activations = float(coefficients[0] + full_tokens * (coefficients[1] + blocks))
    else:
        activations = float(coefficients[0] + full_tokens * (coefficients[1] + coefficients[2] * target.units))
    with torch.device("meta"):
        model = transformer_class(name)(**transformer_config(name, None)).to(torch.bfloat16)
        parameters = sum(p.numel() for p in model.parameters())
        # model.frozen_dtype=fp8: the trainer's cast (diffusers' layerwise casting) leaves norms and embeddings bf16
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        fp8_weights = sum(p.numel() * p.element_size() for p in model.parameters())
        # the largest block of the model (bf16): what a checkpointed block keeps upcast until its backward under fp8
        largest_block = 2 * max(sum(p.numel() for p in block.parameters())
                                for blocks in model.children() if isinstance(blocks, torch.nn.ModuleList) for block in blocks)
    weights = parameters * 2  # bf16 frozen weights
    if flux2:  # counted on the full model: its single blocks are not a fixed multiple of the double ones
        lora_parameters = full_lora_parameters(name, target.rank)
    else:
        lora_parameters = points[-1]["lora_parameters"] / points[-1]["units"] * target.units
    lora = lora_parameters * 16  # fp32 weight, grad, 2 AdamW moments
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
        "weights_fp8_gib": fp8_weights / GIB,
        # layerwise casting upcasts one layer at a time, but autograd keeps a checkpointed unit's upcast
        # weights until its backward: one unit in bf16 comes on top (as benchmarks/video_memory.py)
        "total_fp8_gib": (activations * scale + fp8_weights + lora + largest_block) / GIB,
        "width_scale": width_scale,
    }


def full_lora_parameters(name: str, rank: int) -> int:
    """LoRA parameters of the full model on the adapter's default targets: ``r (in + out)`` per targeted Linear."""
    with torch.device("meta"):
        model = transformer_class(name)(**transformer_config(name, None))
    single = model.config.num_single_layers
    targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
               *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(single)))
    return sum(rank * (module.in_features + module.out_features) for module_name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and any(module_name == t or module_name.endswith("." + t) for t in targets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="CPU: measure small points in subprocesses, fit, extrapolate")
    scan.add_argument("--families", nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    scan.add_argument("--json", type=Path, default=None, help="also write the points and estimates here")
    scan.add_argument("--points", type=Path, default=None, help="a --json file of an earlier scan: reuse its points")
    one = commands.add_parser("step", help="measure one configuration in this process (prints JSON)")
    one.add_argument("--family", choices=sorted(TARGETS), required=True)
    one.add_argument("--units", type=int, default=None, help="block units (default: the full model's)")
    one.add_argument("--latent-side", type=int, default=16)
    one.add_argument("--text-tokens", type=int, default=64)
    one.add_argument("--full", action="store_true", help="the published resolution (1024 px) and every block")
    one.add_argument("--device", default="cpu")
    one.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda, float32 on cpu")
    one.add_argument("--frozen-dtype", choices=["bf16", "fp8"], default="bf16", help="model.frozen_dtype of the step")
    one.add_argument("--single-layers", type=int, default=None, help="FLUX.2: single-stream blocks (default: its ratio x units)")
    args = parser.parse_args()

    if args.command == "step":
        target = TARGETS[args.family]
        side, text = (target.latent_side, target.text_tokens) if args.full else (args.latent_side, args.text_tokens)
        device = torch.device(args.device)
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        print(json.dumps(measure_step(args.family, None if args.full else args.units, side, text, device, dtype,
                                      args.frozen_dtype, None if args.full else args.single_layers)))
        return

    report = {}
    earlier = json.loads(args.points.read_text()) if args.points else {}
    for name in args.families:
        if name in FLUX2_WIDTH_SCALED:  # measured at another width (after it, below)
            continue
        if name in earlier:
            report[name] = {"points": earlier[name]["points"]}
            continue
        points = []
        blocks = FLUX2_SCAN_BLOCKS if TARGETS[name].family == "flux2" else [(units, None) for units in SCAN_UNITS]
        for units, single in blocks:
            for side, text in SCAN_POINTS:
                command = [sys.executable, __file__, "step", "--family", name, "--units", str(units),
                           "--latent-side", str(side), "--text-tokens", str(text)]
                if single is not None:
                    command += ["--single-layers", str(single)]
                output = subprocess.run(command, check=True, capture_output=True, text=True, env=SCAN_ENV).stdout
                point = json.loads(output.strip().splitlines()[-1])
                points.append(point)
                print(f"{name:12s} L={units} S={single} tokens={point['tokens']:5d} step peak "
                      f"{point['step_bytes'] / GIB:6.3f} GiB", flush=True)
        report[name] = {"points": points}
        if args.json:  # each family's points as soon as they exist
            args.json.write_text(json.dumps(report, indent=2))
    for name in args.families:
        width_scale = 1.0
        if name in FLUX2_WIDTH_SCALED:
            source, width_scale = FLUX2_WIDTH_SCALED[name]
            if source not in report:
                raise SystemExit(f"{name} is estimated from {source}'s scan: list {source} too")
            report[name] = {"points": report[source]["points"], "scaled_from": source}
        points = report[name]["points"]
        estimate = fit_and_extrapolate(points, name, width_scale)
        report[name]["estimate"] = estimate
        print(
            f"{name:12s} full: {estimate['units']} units x {estimate['tokens']} tokens: activations "
            f"{estimate['activations_bf16_gib']:.1f} GiB (fp32: {estimate['activations_measured_dtype_gib']:.1f}) + bf16 weights "
            f"{estimate['weights_bf16_gib']:.1f} GiB + LoRA/AdamW {estimate['lora_gib']:.3f} GiB = "
            f"{estimate['total_bf16_gib']:.1f} GiB (upper bound {estimate['total_upper_gib']:.1f}; fit residual "
            f"{estimate['fit_max_residual_gib']:.3f} GiB); fp8 frozen base: weights {estimate['weights_fp8_gib']:.1f} GiB, "
            f"total {estimate['total_fp8_gib']:.1f} GiB",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
