"""Throughput of `sipo train`: dpo vs sipo, latent cache off/on, gradient checkpointing off/on.

    python benchmarks/throughput.py --quick            # CPU, tiny SD1.5, under a minute
    python benchmarks/throughput.py                    # CUDA: full-size random SD1.5, 512 px, bf16
    python benchmarks/throughput.py --family sdxl      # any family with build_random_pipeline

Builds a random-weight pipeline from the family's real component configs (``scale="full"`` on CUDA,
``"tiny"`` on the CPU or with ``--quick``), writes synthetic preference pairs, builds the latent cache,
then runs the real trainer (``sipo.train.train``) once per variant and round, variants interleaved
in every round so drift of the machine hits them alike. Per variant: median s/step after warm-up
(from per-step timestamps, the device synchronised at each), pairs/s, peak memory (CUDA: max
allocated; CPU: the process's max RSS, which only grows), FLOP per step counted by
``torch.utils.flop_counter.FlopCounterMode`` over one real step, achieved TFLOP/s, and MFU against
the device's dense bf16 peak ('n/a' where unknown or on the CPU). The last line is
``step time ratio sipo/dpo: R`` (cache off, checkpointing off). Timings are machine-specific;
not part of `make test`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, by device-name fragment
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_BF16_TFLOPS.items():  # most specific first
        if fragment in name:
            return peak
    return None


def write_pairs(directory: Path, num_pairs: int, size: int, seed: int = 0) -> Path:
    """Synthetic Pick-a-Pic-like pairs as PNG files + a JSONL manifest (smooth winners, noisy losers)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    lines = []
    for i in range(num_pairs):
        tint = rng.uniform(0.3, 1.0, size=3)
        smooth = (ramp[None, :, None] * tint[None, None, :]).repeat(size, axis=0).astype(np.uint8)
        Image.fromarray(smooth).save(directory / f"{i:04d}_chosen.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(directory / f"{i:04d}_rejected.png")
        lines.append(json.dumps({"prompt": f"a photo of a cat number {i}", "chosen": f"{i:04d}_chosen.png",
                                 "rejected": f"{i:04d}_rejected.png"}))
    manifest = directory / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run_variant(base_adapter, config, steps: int, device: torch.device) -> dict:
    """One `sipo train` run; per-step times from a callback that synchronises the device."""
    from sipo.train import train

    stamps: list[float] = []

    def stamp(step, adapter):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    gc.collect()  # the previous run's model copy
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = train(config, progress=False, step_callback=stamp, adapter=copy.deepcopy(base_adapter))
    from sipo.performance import peak_memory_gb

    return {"step_times": list(np.diff(stamps)), "peak_gb": peak_memory_gb(device), "steps": result.steps}


def count_step_flops(base_adapter, config) -> float:
    """FLOP of one real training step (encoders included unless the cache is used)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sipo.train import train

    adapter = copy.deepcopy(base_adapter)
    single = copy.deepcopy(config)
    single.train.max_steps = 1
    single.train.output_dir = str(Path(config.train.output_dir).with_name(Path(config.train.output_dir).name + "-flops"))
    counter = FlopCounterMode(display=False)
    with counter:
        train(single, progress=False, adapter=adapter)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU, under a minute")
    parser.add_argument("--family", default="sd15", help="a registered family with build_random_pipeline")
    parser.add_argument("--scale", choices=("tiny", "full"), default=None, help="default: full on CUDA, tiny otherwise")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 8 full, 2 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=None, help="steps dropped at the start of each run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all variants, interleaved")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None, help="default bf16 on CUDA, no on CPU")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4 on CUDA, 0 on CPU)")
    parser.add_argument("--work-dir", default=None, help="where the model, pairs and runs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from sipo.config import load_config
    from sipo.data.cache import build_cache
    from sipo.models import adapter_class, load_adapter

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    scale = args.scale or ("full" if device.type == "cuda" else "tiny")
    full = scale == "full"
    batch = args.batch_size or (8 if full else 2)
    steps = args.steps or (10 if full else 4)
    warmup = args.warmup if args.warmup is not None else (3 if full else 1)
    rounds = args.rounds or 2
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="sipo-throughput-"))
    started = time.perf_counter()
    model_dir = work / f"{args.family}-{scale}"
    if not (model_dir / "model_index.json").is_file():
        adapter_class(args.family).build_random_pipeline(model_dir, scale=scale, seed=0)
    base = load_adapter(args.family, str(model_dir))
    # a family may name its pictures' side per scale (e.g. SDXL 1024): random_resolution = {"full": ..., "tiny": ...}
    resolution = (getattr(base, "random_resolution", None) or {"full": 512, "tiny": 32})[scale]
    manifest = write_pairs(work / "pairs", num_pairs=batch * 4, size=resolution)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {args.family} {scale}, "
          f"{resolution} px, {batch} pairs/step, {precision}, {steps} timed steps x {rounds} rounds "
          f"after {warmup} warm-up (built in {time.perf_counter() - started:.0f} s)", flush=True)

    def config_for(objective: str, cache: bool, checkpointing: bool, tag: str):
        return load_config(None, [
            f"model.family={args.family}", f"model.pretrained_path={model_dir}", f"model.resolution={resolution}",
            "data.format=jsonl", f"data.path={manifest}", f"data.num_workers={workers}",
            f"data.use_cache={'always' if cache else 'never'}",
            f"objective.name={objective}", "objective.tau=0.05",
            f"train.output_dir={work / 'runs' / tag}", f"train.max_steps={warmup + steps}",
            f"train.batch_size={batch}", "train.checkpoint_every=0", f"train.log_every={warmup + steps}",
            f"train.mixed_precision='{precision}'", f"train.gradient_checkpointing={str(checkpointing).lower()}",
            "train.lora_rank=8", "train.lora_alpha=8",
        ])

    build_cache(config_for("dpo", True, False, "cache"), progress=False)
    variants = [(objective, cache, ckpt) for cache in (False, True) for ckpt in (False, True) for objective in ("dpo", "sipo")]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    peaks: dict[tuple, float] = {v: 0.0 for v in variants}
    for round_index in range(rounds):
        for variant in variants:
            tag = f"{variant[0]}-cache{int(variant[1])}-ckpt{int(variant[2])}-r{round_index}"
            measured = run_variant(base, config_for(*variant, tag), steps, device)
            times[variant].extend(measured["step_times"][warmup - 1 if warmup else 0:])
            peaks[variant] = max(peaks[variant], measured["peak_gb"])
    flops = {cache: count_step_flops(base, config_for("sipo", cache, False, f"flops-cache{int(cache)}")) for cache in (False, True)}

    peak = device_peak_tflops(device) if precision in ("bf16", "fp16") else None
    rows = []
    header = "| objective | cache | grad ckpt | s/step | pairs/s | peak GB | TFLOP/step | TFLOP/s | MFU |"
    print(header + "\n|---|---|---|---|---|---|---|---|---|")
    for variant in variants:
        objective, cache, ckpt = variant
        median = statistics.median(times[variant])
        achieved = flops[cache] / median / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
        rows.append({"objective": objective, "cache": cache, "gradient_checkpointing": ckpt, "s_per_step": median,
                     "pairs_per_s": batch / median, "peak_gb": peaks[variant], "tflop_per_step": flops[cache] / 1e12,
                     "tflops": achieved, "mfu": mfu})
        print(f"| {objective} | {'on' if cache else 'off'} | {'on' if ckpt else 'off'} | {median:.4f} | {batch / median:.1f} | "
              f"{peaks[variant]:.2f} | {flops[cache] / 1e12:.4g} | {achieved:.3g} | {mfu} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "scale": scale, "batch": batch, "rows": rows}, indent=2))
    uncached = statistics.median(times[("dpo", False, False)])
    cached = statistics.median(times[("dpo", True, False)])
    print(f"cache speed-up (dpo, no checkpointing): {uncached / cached:.2f}x; total {time.perf_counter() - started:.0f} s")
    ratio = statistics.median(times[("sipo", False, False)]) / uncached
    print(f"step time ratio sipo/dpo: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
