"""Step cost of the reference-free objectives (MaPO, SFT) against DPO: they skip the reference forward.

    PYTHONPATH=src python benchmarks/reference_free_cost.py [--size tiny|small] [--steps 20] [--batch 2]

One micro-step = ``preference.compute_pair_terms`` + ``preference.objective_loss`` + backward, the
trainer's code path, on a random-weight SD1.5-shaped UNet with LoRA. Objectives are timed in
interleaved rounds (so a slow patch of the shared machine hits them alike); prints the median
milliseconds per objective and the ratio to DPO. Not part of `make test`: timings are
machine-specific, the ratio is the figure to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_cost import build_model  # noqa: E402

from sipo.config import load_config  # noqa: E402
from sipo.models import add_lora, load_adapter, lora_disabled  # noqa: E402
from sipo.models.base import EncodedPairs  # noqa: E402
from sipo.preference import compute_pair_terms, draw_pair_noise, objective_loss  # noqa: E402


def one_step(adapter, encoded, oc, generator, reference) -> float:
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    start = time.perf_counter()
    noise = draw_pair_noise(encoded.x0_winner.shape, adapter.schedule.num_train_timesteps, generator)
    terms = compute_pair_terms(adapter, encoded, noise, beta=oc.beta, reference_predict=reference,
                               weight_norm=oc.weight_norm, pair_weight=oc.pair_weight, objective=oc.pair_settings())
    loss, _, _ = objective_loss(terms, terms.log_w_pair.exp(), **oc.loss_settings())
    loss.backward()
    for p in params:
        p.grad = None
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objectives", default="dpo,mapo,sft")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    names = args.objectives.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.size, Path(tmp))
        adapter = load_adapter("sd15", str(path))
        add_lora(adapter, load_config(None, ["train.lora_rank=4"]))
        adapter.denoiser.train()
        generator = torch.Generator().manual_seed(0)
        x0 = torch.randn(args.batch, 4, 16, 16, generator=generator)
        cond = {"encoder_hidden_states": torch.randn(args.batch, 77, 32, generator=generator)}
        encoded = EncodedPairs(x0, x0.flip(0), cond)

        def reference(x_t, t, c):
            with lora_disabled(adapter.denoiser):
                return adapter.predict(x_t, t, c)

        configs = {name: load_config(None, [f"objective.name={name}"]).objective for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.steps + 2):
            for name in names:
                elapsed = one_step(adapter, encoded, configs[name], generator, reference)
                if round_ >= 2:  # two warm-up rounds
                    times[name].append(elapsed)
    base = statistics.median(times[names[0]])
    print(f"{args.size} UNet, batch {args.batch} pairs, {args.steps} interleaved rounds, torch threads {torch.get_num_threads()}")
    print(f"| objective | median ms / micro-step | ratio to {names[0]} |")
    print("|---|---|---|")
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.1f} | {median / base:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
