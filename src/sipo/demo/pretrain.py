"""Pretraining the demo's base model: a tiny class-conditional DDPM on scikit-learn's digits.

Plain epsilon-prediction DDPM training (T = 1000, linear betas) of :func:`build_digits_unet` on all
1797 8x8 digits of ``sklearn.datasets.load_digits`` (shipped inside scikit-learn: no download),
pixels mapped from [0, 16] to [-1, 1]. Two models come out:

- ``base/``: the exponential moving average of the weights at the last step, the model the
  preference methods fine-tune;
- ``early/``: the raw weights after ``early_step`` steps, an under-trained *other* policy that
  generates the off-policy half of the preference pairs.

Everything is a function of :class:`PretrainSettings` (seeded init, batches, timesteps, noise),
and the result is cached under ``cache_root()/pretrain-<hash of the settings>``, so a second
``sipo demo`` skips this step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sipo.demo.cache import cache_root, settings_key
from sipo.models.digits import DigitsAdapter, build_digits_scheduler, build_digits_unet


@dataclass(frozen=True)
class PretrainSettings:
    resolution: int = 8
    block_out_channels: tuple[int, ...] = (32, 64)
    attention: bool = True
    steps: int = 1200
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    early_step: int = 150
    seed: int = 0
    #: bump when this module changes what a given setting produces (invalidates old caches)
    version: int = 1


@dataclass
class PretrainResult:
    base_dir: Path
    early_dir: Path
    info: dict
    cached: bool


def load_digit_images(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All of scikit-learn's digits as ``([1797, 1, r, r]`` in ``[-1, 1]``, labels ``[1797]``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    if resolution != images.shape[-1]:
        images = F.interpolate(images, size=resolution, mode="bilinear", align_corners=False).clamp(-1, 1)
    return images, torch.tensor(digits.target, dtype=torch.long)


def pretrain(settings: PretrainSettings = PretrainSettings(), progress: bool = True) -> PretrainResult:
    """Train (or fetch from the cache) the base and early models; returns their directories."""
    if not 0 < settings.early_step < settings.steps:
        raise ValueError("early_step must lie inside (0, steps)")
    root = cache_root() / f"pretrain-{settings_key(settings)}"
    done = root / "pretrain.json"
    if done.is_file():
        return PretrainResult(root / "base", root / "early", json.loads(done.read_text()), cached=True)

    started = time.perf_counter()
    images, labels = load_digit_images(settings.resolution)
    torch.manual_seed(settings.seed)
    unet = build_digits_unet(settings.resolution, settings.block_out_channels, settings.attention)
    scheduler = build_digits_scheduler()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    lr_at = lambda step: min(1.0, (step + 1) / settings.warmup_steps)  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(settings.seed)
    alphas_cumprod = scheduler.alphas_cumprod.float()

    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc="pretrain base model", disable=not progress, dynamic_ncols=True)
    running = float("nan")
    for step in bar:
        index = torch.randint(0, images.shape[0], (settings.batch_size,), generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch_size,), generator=generator)
        eps = torch.randn((settings.batch_size, *images.shape[1:]), generator=generator)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * images[index] + (1 - abar).sqrt() * eps
        loss = F.mse_loss(unet(x_t, t, class_labels=labels[index]).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        value = loss.detach().item()
        running = value if math.isnan(running) else 0.98 * running + 0.02 * value
        if step % 50 == 0 or step == settings.steps - 1:
            losses.append(running)
            bar.set_postfix(loss=f"{running:.4f}")
        if step + 1 == settings.early_step:
            DigitsAdapter(copy.deepcopy(unet).eval(), scheduler).save_pretrained(tmp / "early")
    DigitsAdapter(ema.eval(), scheduler).save_pretrained(tmp / "base")
    info = {
        "settings": asdict(settings),
        "loss_every_50_steps": losses,
        "wall_seconds": time.perf_counter() - started,
        "num_parameters": sum(p.numel() for p in unet.parameters()),
        "num_images": int(images.shape[0]),
    }
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
    if root.exists():  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, root)
    return PretrainResult(root / "base", root / "early", json.loads(done.read_text()), cached=False)

