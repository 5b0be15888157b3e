"""What held-out validation adds to a run with default settings (issue 20), as a ratio.

The same tiny SD1.5 run (random weights, 64 JSONL pairs, batch 2, 100 steps) with and without
``data.validation_fraction=0.05`` (validation at step 0 and at the end: the default
``train.validate_every=100``), rounds interleaved so the machine's load hits both alike. Prints
each round's wall times and the ratio with a bootstrap interval over rounds.

    python benchmarks/validation_cost.py [--rounds 3] [--steps 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    import numpy as np
    from tiny_models import make_tiny_sd15
    from train_fixtures import tiny_overrides, write_jsonl_pairs

    from sipo.config import load_config
    from sipo.evaluate import bootstrap_ci
    from sipo.train import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_sd15(root / "model")
        manifest = write_jsonl_pairs(root / "data", num_pairs=64)
        variants = {"plain": {}, "validation": {"data.validation_fraction": 0.05}}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, extra in variants.items():
                overrides = {"train.max_steps": args.steps, "train.checkpoint_every": 0, "train.log_every": 50,
                             "train.report_to": "none", **extra}
                config = load_config(None, tiny_overrides(model, manifest, root / f"{name}-{round_}", **overrides))
                start = time.perf_counter()
                train(config, progress=False)
                times[name].append(time.perf_counter() - start)
            print(f"round {round_}: plain {times['plain'][-1]:.1f} s, with validation {times['validation'][-1]:.1f} s",
                  flush=True)
        ratios = np.array(times["validation"]) / np.array(times["plain"])
        low, high = bootstrap_ci(ratios)
        print(f"validation/plain wall time = {ratios.mean():.3f} [{low:.3f}, {high:.3f}] over {args.rounds} rounds "
              f"({args.steps} steps, 64 pairs, 5% held out, validate_every=100)")


if __name__ == "__main__":
    main()
