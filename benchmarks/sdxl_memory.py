"""Estimate the memory of one SDXL LoRA training step at 1024 px from CPU measurements at small scale.

What one point measures (``--point WIDTH LATENT``, in a fresh process): the SDXL UNet architecture
at full depth (SDXL base 1.0's blocks, transformer depths 1/2/10, 2048-d cross-attention, text_time
embedding) with every channel count scaled by WIDTH, LoRA rank 8 on to_q/to_k/to_v/to_out.0,
gradient checkpointing on, one preference pair (winner + loser in one batch of 2) at a latent of
LATENT x LATENT: sipo's own ``compute_pair_terms`` (policy forward with grad, LoRA-disabled
reference forward, importance weight) and ``loss.backward()``. Peak memory is the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs just before the step) minus the resident
set before it: the step's activations, gradients and temporaries, in float32. glibc is told to
serve every allocation above 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave
the resident set at once and the peak is the peak of live tensors.

The driver (no arguments) measures a grid of widths and latent sizes, fits
``activations = N * (a * WIDTH + b) + c`` (N = latent pixels) by least squares, checks the fit on a
held-out point, and extrapolates to WIDTH 1, 1024 px (N = 128^2). Weights and optimizer state are
counted exactly from the real configs (meta device). Run:

    OMP_NUM_THREADS=1 python benchmarks/sdxl_memory.py            # minutes on one CPU core

On a GPU, the measurement itself (full-size random weights, nothing downloaded; ~7 GB on disk):

    python -c "import torch; from sipo.models.sdxl import SDXLAdapter; SDXLAdapter.build_random_pipeline('/tmp/sdxl_full', scale='full', dtype=torch.float16)"
    python benchmarks/sdxl_memory.py --pipeline /tmp/sdxl_full 1024
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
GRID = [(0.125, 32), (0.125, 48), (0.125, 64), (0.25, 32), (0.25, 48)]
HELD_OUT = (0.25, 64)
VAE_GRID = [128, 256, 384]
VAE_HELD_OUT = 512
GiB = 2**30


def scaled_unet_config(width: float) -> dict:
    from sipo.models.sdxl import sdxl_component_configs

    config = sdxl_component_configs("full")["unet"]
    channels = tuple(int(round(c * width)) for c in config["block_out_channels"])
    # 32 groups need channels divisible by 32; heads (5, 10, 20) must divide the channels too
    groups = 32 if all(c % 32 == 0 for c in channels) else 8
    return {**config, "block_out_channels": channels, "norm_num_groups": groups}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_point(width: float, latent: int) -> dict:
    """One training step's peak memory above the loaded model (bytes), fresh process."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from sipo.models.base import EncodedPairs, lora_disabled
    from sipo.models.sdxl import SDXL_SCHEDULER, SDXLAdapter
    from sipo.preference import compute_pair_terms, draw_pair_noise

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**scaled_unet_config(width))
    unet.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
    unet.enable_gradient_checkpointing()
    unet.train()
    scheduler = DDPMScheduler(**{k: v for k, v in SDXL_SCHEDULER.items() if k not in ("interpolation_type", "use_karras_sigmas")})
    adapter = SDXLAdapter(unet, None, None, None, None, None, scheduler)
    generator = torch.Generator().manual_seed(0)

    def reference_predict(x_t, t, cond):
        with lora_disabled(unet):
            return adapter.predict(x_t, t, cond)

    def step(size: int) -> Tensor:
        x0 = torch.randn(2, 4, size, size, generator=generator)
        conditioning = {
            "encoder_hidden_states": torch.randn(1, 77, 2048, generator=generator),
            "text_embeds": torch.randn(1, 1280, generator=generator),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]),
        }
        encoded = EncodedPairs(x0_winner=x0[:1], x0_loser=x0[1:], conditioning=conditioning)
        noise = draw_pair_noise(encoded.x0_winner.shape, 1000, generator)
        terms = compute_pair_terms(adapter, encoded, noise, beta=1000.0, reference_predict=reference_predict)
        loss = terms.loss_pair.mean()  # plain DPO: every objective backpropagates through the same terms
        loss.backward()
        return loss.detach()

    step(8)  # warm-up: one-time library and autograd allocations (and the LoRA .grad tensors) happen here
    before = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    start = time.perf_counter()
    loss = step(latent)
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in unet.parameters())
    return {"width": width, "latent": latent, "step_bytes": _peak_rss_bytes() - before, "weights_bytes": parameters * 4,
            "seconds": round(seconds, 2), "loss": float(loss)}


def measure_vae_point(pixels: int) -> dict:
    """Peak memory above the loaded model of encoding one pair (2 images) with the full-size SDXL VAE."""
    from diffusers import AutoencoderKL

    from sipo.models.sdxl import sdxl_component_configs

    torch.manual_seed(0)
    vae = AutoencoderKL(**sdxl_component_configs("full")["vae"]).requires_grad_(False).eval()
    with torch.no_grad():
        vae.encode(torch.zeros(2, 3, 64, 64))  # warm-up
        pictures = torch.rand(2, 3, pixels, pixels) * 2 - 1
        before = _rss_bytes()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        vae.encode(pictures).latent_dist.mode()
    return {"pixels": pixels, "encode_bytes": _peak_rss_bytes() - before}


def _run(*arguments: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    output = subprocess.run([sys.executable, __file__, *arguments], env=env,
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def vae_estimate() -> float:
    """Fit encode_bytes = a * pixels^2 + c on 128..384 px, check on 512 px, return the 1024-px value."""
    points = [_run("--vae-point", str(p)) for p in VAE_GRID]
    held_out = _run("--vae-point", str(VAE_HELD_OUT))
    for point in points + [held_out]:
        print(json.dumps(point))
    rows = lambda ps: torch.tensor([[p["pixels"] ** 2, 1.0] for p in ps], dtype=torch.float64)  # noqa: E731
    values = lambda ps: torch.tensor([[float(p["encode_bytes"])] for p in ps], dtype=torch.float64)  # noqa: E731
    a, c = torch.linalg.lstsq(rows(points), values(points)).solution[:, 0].tolist()
    guess = a * VAE_HELD_OUT**2 + c
    print(f"VAE held-out {VAE_HELD_OUT} px: measured {held_out['encode_bytes'] / GiB:.3f} GiB, fit {guess / GiB:.3f} GiB "
          f"({(guess / held_out['encode_bytes'] - 1) * 100:+.1f}%)")
    a, c = torch.linalg.lstsq(rows(points + [held_out]), values(points + [held_out])).solution[:, 0].tolist()
    return a * 1024**2 + c


def full_size_static_bytes() -> dict:
    """Exact parameter counts of SDXL base 1.0 (meta device) and the rank-8 LoRA on its UNet."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sipo.models.sdxl import sdxl_component_configs

    configs = sdxl_component_configs("full")
    with init_empty_weights():
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
        base = sum(p.numel() for p in unet.parameters())
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)
        lora = sum(p.numel() for p in unet.parameters()) - base
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"unet": base, "lora_rank8": lora, "vae": count(vae), "text_encoders": count(text) + count(text_2)}


def fit(points: list[dict]) -> torch.Tensor:
    """Least squares for step_bytes = N * (a * width + b) + c; returns (a, b, c)."""
    rows = torch.tensor([[p["latent"] ** 2 * p["width"], p["latent"] ** 2, 1.0] for p in points], dtype=torch.float64)
    target = torch.tensor([float(p["step_bytes"]) for p in points], dtype=torch.float64)
    return torch.linalg.lstsq(rows, target[:, None]).solution[:, 0]


def predict(coefficients: torch.Tensor, width: float, latent: int) -> float:
    a, b, c = coefficients.tolist()
    return latent**2 * (a * width + b) + c


def main() -> None:
    vae_encode = vae_estimate()
    print(f"SDXL VAE (fp32), encoding one pair at 1024 px, no grad: {vae_encode / GiB:.2f} GiB above its weights "
          "(transient, before the UNet step)")
    points = [_run("--point", str(w), str(n)) for w, n in GRID]
    held_out = _run("--point", *map(str, HELD_OUT))
    for point in points + [held_out]:
        print(json.dumps(point))
    coefficients = fit(points)
    guess = predict(coefficients, *HELD_OUT)
    print(f"held-out {HELD_OUT}: measured {held_out['step_bytes'] / GiB:.3f} GiB, fit {guess / GiB:.3f} GiB "
          f"({(guess / held_out['step_bytes'] - 1) * 100:+.1f}%)")
    coefficients = fit(points + [held_out])
    step_fp32 = predict(coefficients, 1.0, 128)
    static = full_size_static_bytes()
    print(json.dumps(static))
    print(f"SDXL, 1024 px, 1 pair, LoRA r8, checkpointing: step activations+temporaries {step_fp32 / GiB:.2f} GiB in fp32 "
          f"(~{step_fp32 / 2 / GiB:.2f} GiB if every saved activation were fp16)")
    lora_state = static["lora_rank8"] * 4 * 4  # fp32 weight, grad, 2 AdamW moments
    # The VAE encodes before the UNet step and frees its activations: the peak is the larger of the two.
    # sdxl encodes one image per VAE call (SDXLAdapter.encode_chunk_size = 1): half the pair's figure.
    encode_one = vae_encode / 2
    print(f"peak = weights + LoRA/AdamW + max(VAE encode of one image {encode_one / GiB:.2f}, UNet step)")
    for label, unet_bytes, text_bytes in (
        ("frozen weights fp16 (VAE fp32), text encoders resident", 2, 2),
        ("frozen weights fp16 (VAE fp32), prompt embeddings cached (no text encoders)", 2, 0),
        ("all weights fp32 (frozen weights not cast)", 4, 4),
    ):
        weights = static["unet"] * unet_bytes + static["text_encoders"] * text_bytes + static["vae"] * 4
        for name, step in (("fp16 activations", step_fp32 / 2), ("fp32 activations", step_fp32)):
            print(f"  {label}; {name}: {(weights + lora_state + max(step, encode_one)) / GiB:.1f} GiB "
                  f"(weights {weights / GiB:.1f} + LoRA/AdamW {lora_state / GiB:.2f} + max(encode "
                  f"{encode_one / GiB:.1f}, step {step / GiB:.1f}))")


def measure_pipeline(model_dir: str, resolution: int) -> dict:
    """The real thing on a GPU: a saved SDXL pipeline (``SDXLAdapter.build_random_pipeline(dir, "full")``),
    frozen weights in fp16 except the fp32 VAE, LoRA r8 in fp32, checkpointing, fp16 autocast; one
    pair encoded by the real VAE and text encoders, then one step. Reports the CUDA allocator's peak."""
    from peft import LoraConfig, inject_adapter_in_model

    from sipo.models import load_adapter
    from sipo.models.base import lora_disabled
    from sipo.preference import compute_pair_terms, draw_pair_noise

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    half = torch.float16 if device.type == "cuda" else torch.float32
    adapter = load_adapter("sdxl", model_dir)
    adapter.freeze_encoders()
    unet = adapter.denoiser.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=list(adapter.lora_target_modules)), unet)
    keep = {id(m) for m in adapter.keep_fp32_modules()}
    for module in [*adapter.frozen_modules(), unet]:
        module.to(dtype=torch.float32 if id(module) in keep else half)
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    unet.enable_gradient_checkpointing()
    unet.train()
    adapter.to(device)
    generator = torch.Generator().manual_seed(0)
    pictures = torch.rand(2, 3, resolution, resolution, generator=generator) * 2 - 1
    sizes = torch.tensor([[resolution, resolution, 0, 0]])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    encoded = adapter.encode(["a photo of a cat"], pictures[:1].to(device), pictures[1:].to(device), size_info=sizes)
    encode_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    noise = draw_pair_noise(encoded.x0_winner.shape, 1000, generator)

    def reference_predict(x_t, t, cond):
        with lora_disabled(unet):
            return adapter.predict(x_t, t, cond)

    start = time.perf_counter()
    with torch.autocast(device.type, dtype=half, enabled=device.type == "cuda"):
        terms = compute_pair_terms(adapter, encoded, noise, beta=1000.0, reference_predict=reference_predict)
    terms.loss_pair.mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"device": str(device), "resolution": resolution, "seconds": round(time.perf_counter() - start, 2),
            "encode_peak_gib": encode_peak / GiB,
            "step_peak_gib": (torch.cuda.max_memory_allocated() / GiB) if device.type == "cuda" else None}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--pipeline":
        print(json.dumps(measure_pipeline(sys.argv[2], int(sys.argv[3]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--vae-point":
        torch.set_num_threads(1)
        print(json.dumps(measure_vae_point(int(sys.argv[2]))))
    elif len(sys.argv) == 4 and sys.argv[1] == "--point":
        torch.set_num_threads(1)
        print(json.dumps(measure_point(float(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
