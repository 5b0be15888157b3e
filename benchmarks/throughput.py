"""Throughput of `sipo train`: dpo vs sipo, latent cache off/on, gradient checkpointing off/on, the floor, the levers.

    python benchmarks/throughput.py --quick                   # CPU, tiny SD1.5, about two minutes
    python benchmarks/throughput.py --quick --floor --profile # + the bare DPO step and profiler traces
    python benchmarks/throughput.py --quick --levers channels_last,offload --only "dpo cache"
    python benchmarks/throughput.py --floor --profile --json out/throughput.json   # CUDA: full-size SD1.5, 512 px, bf16

Builds a random-weight pipeline from the family's real component configs (``scale="full"`` on CUDA,
``"tiny"`` on the CPU or with ``--quick``), writes synthetic preference pairs, builds the latent cache,
then sets up one sipo run per variant (``sipo.train.check_run`` + ``set_up``, as ``train`` does) and
advances them one optimizer step at a time, interleaved: every round runs one step of each variant
(the order rotated per round), so a change of the machine's load hits all variants alike. Times
are per step, the device synchronised around each. Per variant: median s/step with its 10-90%
spread, pairs/s, peak device memory (CUDA: the step's peak above what was allocated before it plus
the variant's resident weights; n/a on the CPU, where the process's RSS is shared by all
variants), FLOP per step (``torch.utils.flop_counter.FlopCounterMode`` over one real step),
TFLOP/s and MFU against the device's dense bf16 peak. Every ratio (sipo/dpo, lever on/off,
sipo/floor) is the median of the per-round ratios with a 95% bootstrap interval over rounds.

``--floor``: the bare DPO step of ``FloorStep`` (no sipo code) in the same rounds; the table gains
``vs floor``. ``--profile``: ``torch.profiler`` over 3 steps of ``dpo cache``, ``sipo cache`` and
the floor: top 25 ops by self device time and the device's idle fraction per step, written beside
``--json``. ``--levers``: each lever's variant timed against its base in the same rounds
(``LEVERS``). Timings are machine-specific; not part of `make test`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


class SipoStepper:
    """One configured sipo run, advanced one optimizer step per call, so runs can be interleaved step by step.

    Set up exactly as ``sipo.train.train`` sets a run up (``check_run`` + ``set_up``), and each call
    is the body of its loop without the validation and checkpoint hooks (off in these configs):
    ``training_step``, ``optimizer_step``, the guards, the metrics window and the log point.
    """

    def __init__(self, config, adapter) -> None:
        import importlib

        trainer = importlib.import_module("sipo.train")  # the module (``sipo.train`` the name is the function)
        self.trainer, self.config = trainer, config
        plan = trainer.check_run(config, resume=False, overwrite=False, check_model=False)
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        self.run = trainer.set_up(config, plan, adapter)

    def __call__(self) -> None:
        trainer, run = self.trainer, self.run
        step = trainer.training_step(run)
        trainer.optimizer_step(run, step)
        trainer.guard_divergence(run, step)
        run.metrics.add(run, step)
        if run.state.step % self.config.train.log_every == 0:
            trainer.log_metrics(run)
        trainer.guard_all_masked(run, step)


class FloorStep:
    """The bare DPO step sipo's step is measured against: no sipo code at all.

    Its own latents and text states in memory (random, of the shapes sipo's cached step sees: the
    cost does not depend on the values), peft LoRA on the same UNet, then per step: one draw of t
    and eps shared by winner and loser, the policy forward on the 2B latents, the reference forward
    with the adapters switched off under no_grad, the DPO loss, backward, clip, AdamW. Mixed
    precision as sipo does it: frozen base in the compute dtype, LoRA in fp32, autocast.
    """

    def __init__(self, model_dir: Path, latent_shape: tuple, text_shape: tuple, batch: int, num_pairs: int,
                 device: torch.device, dtype: torch.dtype | None, rank: int = 8, beta: float = 5000.0) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig, inject_adapter_in_model

        generator = torch.Generator().manual_seed(0)
        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]), self.unet)
        self.lora = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        if dtype is not None:
            self.unet.to(dtype)
        for p in self.lora:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.unet.to(device).train()
        self.latents = torch.randn((num_pairs, 2, *latent_shape), generator=generator).to(device)  # winner, loser
        self.text = torch.randn((num_pairs, *text_shape), generator=generator).to(device)
        alphas = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler").alphas_cumprod
        self.alphas_cumprod = alphas.to(device)
        self.optimizer = torch.optim.AdamW(self.lora, lr=1e-5, weight_decay=1e-2,
                                           **({"fused": True} if device.type == "cuda" else {"foreach": True}))
        self.batch, self.num_pairs, self.device, self.dtype, self.beta, self.index = batch, num_pairs, device, dtype, beta, 0
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]

    def __call__(self) -> None:
        pick = torch.arange(self.index, self.index + self.batch, device=self.device) % self.num_pairs
        self.index += self.batch
        x0 = torch.cat([self.latents[pick, 0], self.latents[pick, 1]])  # [2B]: winners, then losers
        text = self.text[pick].repeat(2, 1, 1)
        t = torch.randint(0, len(self.alphas_cumprod), (self.batch,), device=self.device).repeat(2)
        eps = torch.randn_like(x0[: self.batch]).repeat(2, 1, 1, 1)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)
        with autocast:
            pred = self.unet(x_t, t, encoder_hidden_states=text).sample
            with torch.no_grad():
                for layer in self.layers:
                    layer.enable_adapters(False)
                ref = self.unet(x_t, t, encoder_hidden_states=text).sample
                for layer in self.layers:
                    layer.enable_adapters(True)
        err = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))
        ref_err = (ref.float() - eps).pow(2).mean(dim=(1, 2, 3))
        delta = (err[: self.batch] - err[self.batch:]) - (ref_err[: self.batch] - ref_err[self.batch:])
        loss = -torch.nn.functional.logsigmoid(-0.5 * self.beta * delta).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lora, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):  # the host sync sipo's step also has (its finite check)
            raise RuntimeError("floor step: non-finite loss")


def bootstrap_ratio(numerator: list[float], denominator: list[float], draws: int = 2000, seed: int = 0
                    ) -> tuple[float, float, float]:
    """The median over rounds of numerator[i] / denominator[i], and its 95% percentile-bootstrap interval.

    Index i of both lists ran in the same round, seconds apart, so each round's ratio cancels the
    load the machine had then; the rounds are resampled. (On this shared 2-core machine this gave
    intervals a third as wide as a ratio of the two medians, from the same steps.)
    """
    a, b = np.asarray(numerator), np.asarray(denominator)
    n = min(len(a), len(b))
    ratios = a[:n] / b[:n]
    rng = np.random.default_rng(seed)
    resampled = np.median(ratios[rng.integers(0, n, size=(draws, n))], axis=1)
    return float(np.median(ratios)), float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: variants whose step raised: name -> the error (they leave the rounds; the others go on)
FAILED: dict[str, str] = {}


def time_interleaved(steppers: dict[str, Any], warmup: int, rounds: int, device: torch.device
                     ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-step times, one step of each variant per round (A, B, C, A, B, C, ...), the order rotated
    every round so no variant always follows the same one. Also each variant's peak device memory
    during its steps above what was allocated when they started (CUDA; 0 elsewhere). A variant
    whose step raises is reported and dropped, so one broken lever does not lose a GPU lease."""
    names = [name for name in steppers if name not in FAILED]
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks = {name: 0.0 for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in FAILED:
                continue
            synchronize(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            try:
                steppers[name]()
            except Exception as error:  # noqa: BLE001 - reported, and the other variants go on
                FAILED[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                print(f"variant {name!r} failed and is dropped: {FAILED[name]}", flush=True)
                times.pop(name, None)
                continue
            synchronize(device)
            elapsed = time.perf_counter() - start
            if device.type == "cuda":
                peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated(device) - before) / 1e9)
            if round_index >= warmup:
                times[name].append(elapsed)
    return times, peaks


def profile_steps(steppers: dict[str, Any], names: list[str], out_dir: Path, device: torch.device, steps: int = 3
                  ) -> dict[str, Any]:
    """torch.profiler over ``steps`` steps of each named variant: the top 25 ops by self device time
    (CUDA kernels; on the CPU, ops by self CPU time), a Chrome trace, and per step the device's
    idle fraction (1 - the union of kernel intervals / the step's wall time). On the CPU the host
    is the device, so there is no separate device to be idle: reported as n/a."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    summary: dict[str, Any] = {}
    for name in names:
        with profile(activities=activities) as prof:
            for index in range(steps):
                with record_function(f"step{index}"):
                    steppers[name]()
                    synchronize(device)
        safe = name.replace("/", "_").replace(" ", "_")
        prof.export_chrome_trace(str(out_dir / f"profile-{safe}.json.gz"))  # gzip: a full-size trace is large
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        (out_dir / f"profile-{safe}.txt").write_text(table)
        idle = []
        if device.type == "cuda":
            events = prof.events()
            step_names = {f"step{index}" for index in range(steps)}  # their device-side annotation is no kernel
            kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                             if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in step_names)
            for index in range(steps):
                window = [e for e in events if e.name == f"step{index}" and e.device_type == torch.autograd.DeviceType.CPU]
                if not window:
                    continue
                lo, hi = window[0].time_range.start, window[0].time_range.end
                busy, reach = 0.0, lo
                for start, end in kernels:
                    start, end = max(start, reach), min(end, hi)
                    if end > start:
                        busy += end - start
                        reach = end
                idle.append(1.0 - busy / max(hi - lo, 1e-9))
        summary[name] = {"top_ops": table, "idle_fraction_per_step": idle or "n/a on the CPU (the host is the device)",
                         "trace": str(out_dir / f"profile-{safe}.json.gz")}
        print(f"== profile {name} ({steps} steps; idle fraction per step: {summary[name]['idle_fraction_per_step']})")
        print(table)
    return summary


#: speed levers measured on/off: name -> (the variant it modifies, its key=value overrides). Each
#: lever variant is timed against that base variant in the same rounds.
LEVERS = {
    "channels_last": ("dpo cache", ["train.channels_last=true"]),
    "compile": ("dpo cache", ["train.compile=true"]),
    "cudnn_benchmark": ("dpo cache", ["train.cudnn_benchmark=true"]),
    "offload": ("dpo cache", ["model.offload_frozen=group"]),
    "fp8": ("dpo cache", ["model.frozen_dtype=fp8"]),
    "prefetch": ("dpo workers", ["data.prefetch_factor=4"]),
}


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
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU, about two minutes")
    parser.add_argument("--family", default="sd15", help="a registered family with build_random_pipeline")
    parser.add_argument("--scale", choices=("tiny", "full"), default=None, help="default: full on CUDA, tiny otherwise")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 8 full, 2 tiny)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (one step of every variant each)")
    parser.add_argument("--steps", type=int, default=None, help="alias of --rounds (older scripts)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None, help="default bf16 on CUDA, no on CPU")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4 on CUDA, 0 on CPU)")
    parser.add_argument("--floor", action="store_true", help="also time the bare DPO step (sd15 only): sipo/floor")
    parser.add_argument("--profile", action="store_true", help="torch.profiler traces of 3 steps of sipo and the floor")
    parser.add_argument("--levers", default="", help=f"comma list of levers to time on/off: {','.join(LEVERS)}")
    parser.add_argument("--only", default="", help="comma list of the base variants to time (default: all 8)")
    parser.add_argument("--work-dir", default=None, help="where the model, pairs and runs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (profiles beside it)")
    args = parser.parse_args(argv)

    from sipo.config import load_config
    from sipo.data.cache import build_cache
    from sipo.models import adapter_class, load_adapter
    from sipo.performance import compile_counts

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    scale = args.scale or ("full" if device.type == "cuda" else "tiny")
    full = scale == "full"
    batch = args.batch_size or (8 if full else 2)
    rounds = args.rounds or args.steps or (30 if full else 40)
    warmup = args.warmup if args.warmup is not None else (3 if full else 3)
    precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    levers = [name for name in args.levers.split(",") if name]
    for name in levers:
        if name not in LEVERS:
            parser.error(f"--levers: {name!r} is not one of {list(LEVERS)}")
    if args.floor and args.family != "sd15":
        parser.error("--floor is written for sd15 (a UNet with to_q/to_k/to_v/to_out.0)")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="sipo-throughput-"))
    out_dir = Path(args.json).parent if args.json else work
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = work / f"{args.family}-{scale}"
    if not (model_dir / "model_index.json").is_file():
        adapter_class(args.family).build_random_pipeline(model_dir, scale=scale, seed=0)
    base = load_adapter(args.family, str(model_dir))
    resolution = (getattr(base, "random_resolution", None) or {"full": 512, "tiny": 32})[scale]
    manifest = write_pairs(work / "pairs", num_pairs=batch * 4, size=resolution)
    runs = work / "runs" / time.strftime("%Y%m%d-%H%M%S")  # a reused --work-dir keeps earlier runs apart
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {args.family} {scale}, "
          f"{resolution} px, {batch} pairs/step, {precision}, {rounds} timed rounds after {warmup} warm-up, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (built in {time.perf_counter() - started:.0f} s)",
          flush=True)

    def config_for(objective: str, cache: bool, checkpointing: bool, tag: str, extra: list[str] = (),
                   loader_workers: int = workers):
        return load_config(None, [
            f"model.family={args.family}", f"model.pretrained_path={model_dir}", f"model.resolution={resolution}",
            "data.format=jsonl", f"data.path={manifest}", f"data.num_workers={loader_workers}",
            f"data.use_cache={'always' if cache else 'never'}",
            f"objective.name={objective}", "objective.tau=0.05",
            f"train.output_dir={runs / tag}", "train.max_steps=1000000",
            f"train.batch_size={batch}", "train.checkpoint_every=0", "train.log_every=10", "train.report_to=none",
            f"train.mixed_precision='{precision}'", f"train.gradient_checkpointing={str(checkpointing).lower()}",
            "train.lora_rank=8", "train.lora_alpha=8", *extra,
        ])

    build_cache(config_for("dpo", True, False, "cache"), progress=False)
    # base variants: name -> (objective, cache, checkpointing)
    bases = {f"{o} {'cache' if c else 'pictures'}{' ckpt' if k else ''}": (o, c, k)
             for c in (False, True) for k in (False, True) for o in ("dpo", "sipo")}
    chosen = [name for name in args.only.split(",") if name] or list(bases)
    configs = {name: config_for(*bases[name], name.replace(" ", "-")) for name in chosen}
    for lever in levers:
        base_name, extra = LEVERS[lever]
        if base_name == "dpo workers":  # the picture path with DataLoader workers, prefetch at PyTorch's 2
            configs.setdefault("dpo workers", config_for("dpo", False, False, "dpo-workers", loader_workers=max(workers, 2)))
            configs[f"dpo workers +{lever}"] = config_for("dpo", False, False, f"lever-{lever}", extra,
                                                          loader_workers=max(workers, 2))
            continue
        configs.setdefault(base_name, config_for(*bases[base_name], base_name.replace(" ", "-")))
        configs[f"{base_name} +{lever}"] = config_for(*bases[base_name], f"lever-{lever}", extra)

    steppers: dict[str, Any] = {}
    resident: dict[str, float] = {}
    for name, config in configs.items():
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        try:
            steppers[name] = SipoStepper(config, copy.deepcopy(base))
        except Exception as error:  # noqa: BLE001 - a lever that cannot be set up here is reported, not fatal
            FAILED[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"variant {name!r} could not be set up and is left out: {FAILED[name]}", flush=True)
            continue
        resident[name] = ((torch.cuda.memory_allocated(device) - before) / 1e9) if device.type == "cuda" else 0.0
    if args.floor:
        # the shapes sipo's cached step sees: the VAE's latent side, the text encoder's states
        factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
        latent = base.vae.config.latent_channels, resolution // factor, resolution // factor
        with torch.no_grad():
            text = tuple(base.encode_prompts(["a photo of a cat"])["encoder_hidden_states"].shape[1:])
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        steppers["floor"] = FloorStep(model_dir, latent, text, batch, batch * 4, device,
                                      {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision))
        resident["floor"] = ((torch.cuda.memory_allocated(device) - before) / 1e9) if device.type == "cuda" else 0.0
    del base
    gc.collect()

    compiled_before = compile_counts()
    times, step_peaks = time_interleaved(steppers, warmup, 0, device) if warmup else ({}, {})
    after_warmup = compile_counts()
    times, step_peaks = time_interleaved(steppers, 0, rounds, device)
    after_timing = compile_counts()
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    flops = {cache: count_step_flops(load_adapter(args.family, str(model_dir)),
                                     config_for("sipo", cache, False, f"flops-cache{int(cache)}")) for cache in (False, True)}

    peak = device_peak_tflops(device) if precision in ("bf16", "fp16") else None
    reference = "floor" if args.floor else None
    rows = []
    def weights_mb(name: str) -> float:
        """The denoiser's parameter storage on the training device now (fp8 halves it; offload moves it off)."""
        stepper = steppers[name]
        module = stepper.unet if name == "floor" else stepper.run.adapter.denoiser
        return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type == device.type) / 1e6

    print("| variant | s/step (median) | p10-p90 | pairs/s | peak GB | weights MB | TFLOP/step | TFLOP/s | MFU | vs base | vs floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, series in times.items():
        if not series:
            continue
        median = statistics.median(series)
        cached = name == "floor" or "cache" in name
        step_flops = flops[True] if cached else flops[False]
        achieved = step_flops / median / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
        peak_gb = resident[name] + step_peaks[name] if device.type == "cuda" else float("nan")
        partner = name.replace("sipo", "dpo", 1) if name.startswith("sipo") else None
        if "+" in name:
            partner = name.split(" +")[0]
        vs_dpo = bootstrap_ratio(series, times[partner]) if partner in times else None
        vs_floor = bootstrap_ratio(series, times[reference]) if reference and name != reference else None
        fmt = lambda r: f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]" if r else "-"  # noqa: E731
        weights = weights_mb(name)
        rows.append({"variant": name, "s_per_step": median, "p10": float(np.percentile(series, 10)), "weights_mb": weights,
                     "p90": float(np.percentile(series, 90)), "pairs_per_s": batch / median, "peak_gb": peak_gb,
                     "tflop_per_step": step_flops / 1e12, "tflops": achieved, "mfu": mfu,
                     "ratio_vs_base": vs_dpo, "base": partner if vs_dpo else None, "ratio_vs_floor": vs_floor,
                     "step_times": series})
        print(f"| {name} | {median:.4f} | {np.percentile(series, 10):.4f}-{np.percentile(series, 90):.4f} | "
              f"{batch / median:.1f} | {peak_gb:.2f} | {weights:.2f} | {step_flops / 1e12:.4g} | {achieved:.3g} | {mfu} | "
              f"{fmt(vs_dpo)} | {fmt(vs_floor)} |")
    recompiles = {"after_warmup": after_warmup["frames"] - compiled_before["frames"],
                  "during_timing": after_timing["frames"] - after_warmup["frames"],
                  "recompiles_during_timing": after_timing["recompiles"] - after_warmup["recompiles"]}
    print(f"graphs compiled in warm-up {recompiles['after_warmup']}, during the timed rounds "
          f"{recompiles['during_timing']} (recompiles {recompiles['recompiles_during_timing']})")
    profiles = None
    if args.profile:
        names = [n for n in ("dpo cache", "sipo cache", "floor") if n in steppers and n not in FAILED]
        profiles = profile_steps(steppers, names, out_dir, device)
    print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
          f"total {time.perf_counter() - started:.0f} s")
    if "dpo pictures" in times and "dpo cache" in times:
        speedup = bootstrap_ratio(times["dpo pictures"], times["dpo cache"])
        print(f"cache speed-up (dpo, no checkpointing): {speedup[0]:.2f}x [{speedup[1]:.2f}, {speedup[2]:.2f}]")
    if "sipo pictures" in times and "dpo pictures" in times:
        ratio = bootstrap_ratio(times["sipo pictures"], times["dpo pictures"])
        print(f"step time ratio sipo/dpo: {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]")
    if reference and "dpo cache" in times:
        ratio = bootstrap_ratio(times["dpo cache"], times[reference])
        print(f"step time ratio sipo/floor (dpo, cache): {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "scale": scale,
            "batch": batch, "rounds": rounds, "warmup": warmup, "load_average_start": load, "load_average_end": load_end,
            "compile": recompiles, "rows": rows, "failed": FAILED, "profiles": profiles}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
