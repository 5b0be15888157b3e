"""Cost of one training micro-step, DPO vs SIPO, on a random-weight SD1.5-shaped UNet.

    .venv/bin/python benchmarks/step_cost.py [--size tiny|small] [--steps 20] [--batch 2]

Prints a table of median milliseconds per micro-step (forward of policy and reference on winner
and loser, importance weights, reduction, backward) and the SIPO/DPO ratio, plus the share of the
step spent computing importance weights. Not part of `make test`: timings are machine-specific,
the ratio is the figure to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sipo import objectives  # noqa: E402
from sipo.config import OBJECTIVE_PRESETS, load_config  # noqa: E402
from sipo.models import load_adapter, lora_disabled  # noqa: E402
from sipo.preference import compute_pair_terms, draw_pair_noise, objective_loss  # noqa: E402
from sipo.models import add_lora  # noqa: E402


def build_model(size: str, directory: Path) -> Path:
    from tiny_models import make_tiny_sd15

    if size == "tiny":
        return make_tiny_sd15(directory)
    # "small": SD1.5's UNet layout at reduced width, for a less overhead-dominated figure.
    from diffusers import UNet2DConditionModel

    path = make_tiny_sd15(directory)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256), cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32,
    )
    unet.save_pretrained(path / "unet")
    return path


def time_steps(adapter, objective: str, steps: int, batch: int) -> list[float]:
    config = load_config(None, [f"objective.name={objective}", "objective.tau=0.05"])
    oc = config.objective
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, 16, 16, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, 32, generator=generator)}
    from sipo.models.base import EncodedPairs

    encoded = EncodedPairs(x0, x0.flip(0), cond)

    def reference(x_t, t, c):
        with lora_disabled(adapter.denoiser):
            return adapter.predict(x_t, t, c)

    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        noise = draw_pair_noise(x0.shape, 1000, generator)
        terms = compute_pair_terms(adapter, encoded, noise, beta=oc.beta, reference_predict=reference,
                                   weight_norm=oc.weight_norm, pair_weight=oc.pair_weight,
                                   weight_model=oc.weight_model, weight_step=oc.weight_step,
                                   objective=oc.pair_settings())
        # the trainer's own reduction (sipo.train.training_step): objective_loss with the config's settings
        loss, _, _ = objective_loss(terms, terms.log_w_pair.exp(), **oc.loss_settings())
        loss.backward()
        for p in params:
            p.grad = None
        if step >= 2:  # two warm-up steps
            times.append((time.perf_counter() - start) * 1000)
    return times


def time_weights_only(adapter, steps: int, batch: int) -> float:
    """Milliseconds of the weight computation alone (posterior, x0_hat, log w) for 2B samples."""
    from sipo.schedules import predicted_x0_and_eps

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2 * batch, 4, 16, 16, generator=generator)
    t = torch.randint(0, 1000, (2 * batch,), generator=generator)
    a_t, b_t = adapter.schedule.coefficients(t)
    a_s, b_s = adapter.schedule.previous_coefficients(t)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        x0_hat, _ = predicted_x0_and_eps(x, x, a_t, b_t, "epsilon")
        mean, var = objectives.gaussian_posterior(x, x, a_t, b_t, a_s, b_s)
        objectives.log_importance_weight(mean, x, x, x0_hat, a_t, b_t, a_s, b_s)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = load_adapter("sd15", str(build_model(args.size, Path(tmp))))
        add_lora(adapter, load_config(None, ["train.lora_rank=4"]))
        params = sum(p.numel() for p in adapter.denoiser.parameters())
        rows = {name: statistics.median(time_steps(adapter, name, args.steps, args.batch)) for name in ("dpo", "dpo-cm", "sipo")}
        weights_ms = time_weights_only(adapter, args.steps, args.batch)
    print(f"UNet {args.size}: {params / 1e6:.2f}M parameters, batch {args.batch} pairs, {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'objective':<10} {'ms/step':>9} {'vs dpo':>7}")
    for name, ms in rows.items():
        print(f"{name:<10} {ms:9.1f} {ms / rows['dpo']:7.3f}")
    print(f"importance-weight computation alone: {weights_ms:.2f} ms ({weights_ms / rows['dpo']:.1%} of a DPO step)")
    assert set(rows) <= set(OBJECTIVE_PRESETS)


if __name__ == "__main__":
    main()
