"""Does mixed precision flip the sign of the DPO logit z? fp32 vs bf16/fp16 autocast, tiny models.

    .venv/bin/python benchmarks/z_precision.py [--pairs 256] [--digits-path runs/demo/base]

For the tiny SD1.5 (random weights, tests/tiny_models.py) and the digits model (the demo's
pretrained base when ``--digits-path`` is given, else random weights), with a LoRA whose B
matrices are set to N(0, scale^2) (a small policy-reference difference, as early in fine-tuning),
on fixed pairs, timesteps and noise, it computes z (SPEC 2) once in float32 and again under
autocast, and prints the fraction of pairs whose sign agrees with float32's. sign(z) does not
depend on beta. Variants:

- ``autocast``: what the trainer does under train.mixed_precision (predictions in the compute dtype,
  errors then computed in float32 by ``objectives.per_sample_error``);
- ``autocast+fp32 out``: the same, with the denoiser's last layer (``conv_out``) run in float32.

The device is the environment's (CUDA when available, else CPU). Timings are median milliseconds of
one policy+reference forward of the 2N batch; on a shared CPU they are indicative only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sipo import objectives  # noqa: E402
from sipo.models import add_lora, lora_disabled  # noqa: E402
from sipo.schedules import add_noise, training_target  # noqa: E402


@contextlib.contextmanager
def fp32_last_layer(denoiser: torch.nn.Module, device_type: str):
    """Run ``denoiser.conv_out`` in float32, outside autocast, for the duration of the block."""
    layer = denoiser.conv_out
    original = layer.forward

    def forward(x):
        with torch.autocast(device_type, enabled=False):
            return original(x.float())

    layer.forward = forward
    try:
        yield
    finally:
        layer.forward = original


def perturb_lora(denoiser: torch.nn.Module, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def build(family: str, directory: Path, digits_path: str | None, device):
    from sipo.config import load_config

    if family == "sd15":
        from tiny_models import make_tiny_sd15

        from sipo.models.sd15 import SD15Adapter

        adapter = SD15Adapter.from_pretrained(make_tiny_sd15(directory / "sd15"))
        prompts = ["a photo of a cat", "a red car", "a tree", "two dogs"]
        size = 32
    else:
        from sipo.models.digits import DigitsAdapter, build_digits_scheduler, build_digits_unet, digit_prompt

        if digits_path:
            adapter = DigitsAdapter.from_pretrained(digits_path)
        else:
            torch.manual_seed(0)
            adapter = DigitsAdapter(build_digits_unet(), build_digits_scheduler())
        prompts = [digit_prompt(i) for i in range(10)]
        size = adapter.resolution
    config = load_config(None, [f"model.family={family}", "train.lora_rank=4", "train.lora_alpha=4"])
    add_lora(adapter, config)
    return adapter.to(device), prompts, size


def logits(adapter, x_t, timesteps, conditioning, target, autocast_dtype, fp32_out, device_type):
    context = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    out = fp32_last_layer(adapter.denoiser, device_type) if fp32_out else contextlib.nullcontext()
    with torch.no_grad(), context, out:
        prediction = adapter.predict(x_t, timesteps, conditioning)
        with lora_disabled(adapter.denoiser):
            reference = adapter.predict(x_t, timesteps, conditioning)
    err_w, err_l = objectives.per_sample_error(prediction, target).chunk(2)
    ref_w, ref_l = objectives.per_sample_error(reference, target).chunk(2)
    return objectives.dpo_logits(err_w, err_l, ref_w, ref_l, beta=1.0)


def measure(family: str, pairs: int, scales, digits_path, device, repeats: int = 3, report=print,
            dtypes=("bf16", "fp16")):
    device_type = torch.device(device).type
    with tempfile.TemporaryDirectory() as tmp:
        adapter, prompts, size = build(family, Path(tmp), digits_path, device)
        generator = torch.Generator().manual_seed(0)
        batch_prompts = [prompts[i % len(prompts)] for i in range(pairs)]
        images = torch.rand((2, pairs, 3, size, size), generator=generator) * 2 - 1
        encoded = adapter.encode(batch_prompts, images[0].to(device), images[1].to(device))
        x0 = torch.cat([encoded.x0_winner, encoded.x0_loser]).float()
        timesteps = torch.randint(0, adapter.schedule.num_train_timesteps, (pairs,), generator=generator).repeat(2)
        eps = torch.randn(x0[:pairs].shape, generator=generator).to(device).repeat(2, *([1] * (x0.ndim - 1)))
        a_t, b_t = (c.to(device) for c in adapter.schedule.coefficients(timesteps))
        x_t = add_noise(x0, eps, a_t, b_t)
        target = training_target(x0, eps, a_t, b_t, adapter.schedule.prediction_type)
        conditioning = {k: torch.cat([v, v]) for k, v in encoded.conditioning.items()}
        timesteps = timesteps.to(device)
        rows = []
        variants = [(f"{name} autocast{' + fp32 conv_out' if out else ''}", dtype, out)
                    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)) if name in dtypes
                    for out in (False, True)]
        for scale in scales:
            perturb_lora(adapter.denoiser, scale, seed=1)
            z32 = logits(adapter, x_t, timesteps, conditioning, target, None, False, device_type)
            for name, dtype, fp32_out in variants:
                try:
                    z = logits(adapter, x_t, timesteps, conditioning, target, dtype, fp32_out, device_type)
                except RuntimeError as error:  # a dtype the device's autocast does not support
                    rows.append((family, scale, name, float("nan"), float("nan"), str(error).splitlines()[0][:60]))
                    report(rows[-1])
                    continue
                agree = float((torch.sign(z) == torch.sign(z32)).float().mean())
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    logits(adapter, x_t, timesteps, conditioning, target, dtype, fp32_out, device_type)
                    if device_type == "cuda":
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - start) * 1000)
                rows.append((family, scale, name, agree, statistics.median(times) if times else float("nan"),
                             f"median |z/beta| {z32.abs().median():.2e}"))
                report(rows[-1])
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--scales", default="1e-4,1e-3,1e-2")
    parser.add_argument("--digits-path", default=None, help="a saved digits model (e.g. runs/demo/base); default: random weights")
    parser.add_argument("--families", default="digits,sd15")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant")
    parser.add_argument("--variants", default="bf16,fp16", help="autocast dtypes to try (fp16 autocast on CPU is slow)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scales = [float(s) for s in args.scales.split(",")]
    print(f"device {device}, {args.pairs} pairs, LoRA B ~ N(0, scale^2); sign(z) agreement with float32")
    print(f"{'model':7} {'scale':>7}  {'variant':32} {'agree':>6} {'ms':>8}  note")
    def report(row):
        family_name, scale, name, agree, ms, note = row
        print(f"{family_name:7} {scale:7.0e}  {name:32} {agree:6.3f} {ms:8.1f}  {note}", flush=True)

    for family in args.families.split(","):
        measure(family, args.pairs, scales, args.digits_path if family == "digits" else None, device,
                repeats=args.repeats, report=report, dtypes=tuple(args.variants.split(",")))


if __name__ == "__main__":
    main()
