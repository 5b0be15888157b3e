"""Timing behind the demo's design choices (docs/demo.md): torch threads, and 8x8 vs 16x16 pixels.

    python -m sipo.demo.bench

Times ``steps`` pretraining steps (batch 128, forward + backward + AdamW) of the demo's UNet at
8x8 and at 16x16 (the digits upsampled), and ``steps`` DDIM sampling calls on 200 images, with 1
and with 2 torch threads, each in a fresh subprocess (the thread pool is fixed per process). The
machine's load average is printed next to the figures: the ratios depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _measure(resolution: int, threads: int, steps: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    from sipo.models.digits import build_digits_unet

    torch.manual_seed(0)
    unet = build_digits_unet(resolution)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    x = torch.randn(128, 1, resolution, resolution)
    t = torch.randint(0, 1000, (128,))
    c = torch.randint(0, 10, (128,))

    def train_step():
        loss = F.mse_loss(unet(x, t, class_labels=c).sample, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        train_step()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    train_ms = (time.perf_counter() - start) / steps * 1000
    x200 = torch.randn(200, 1, resolution, resolution)
    t200 = torch.full((200,), 500)
    c200 = torch.arange(200) % 10
    with torch.no_grad():
        unet(x200, t200, class_labels=c200)
        start = time.perf_counter()
        for _ in range(steps):
            unet(x200, t200, class_labels=c200)
    forward_ms = (time.perf_counter() - start) / steps * 1000
    return {"resolution": resolution, "threads": threads, "train_step_ms": train_ms, "forward_200_ms": forward_ms,
            "parameters": sum(p.numel() for p in unet.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sipo.demo.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "resolution,threads": child mode
    args = parser.parse_args(argv)
    if args.one:
        resolution, threads = (int(v) for v in args.one.split(","))
        print(json.dumps(_measure(resolution, threads, args.steps)))
        return 0
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    rows = []
    load_start = os.getloadavg()[0]
    for resolution in (8, 16):
        for threads in (1, 2):
            out = subprocess.run([sys.executable, "-m", "sipo.demo.bench", "--steps", str(args.steps),
                                  "--one", f"{resolution},{threads}"], env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"python -m sipo.demo.bench --steps {args.steps}  (OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; "
          f"load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; {os.cpu_count()} CPUs)")
    print("| pixels | threads | parameters | train step, batch 128 (ms) | forward, 200 images (ms) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['resolution']}x{row['resolution']} | {row['threads']} | {row['parameters']:,} | "
              f"{row['train_step_ms']:.0f} | {row['forward_200_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
