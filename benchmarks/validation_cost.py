"""What held-out validation adds to a run with default settings (issue 20), as a ratio.

The same tiny SD1.5 run (random weights, 64 JSONL pairs, batch 2, 100 steps) with and without
``data.validation_fraction=0.05`` (validation at step 0 and at the end: the default
``train.validate_every=100``), rounds interleaved so the machine's load hits both alike, and the
order inside a round alternated (plain first in even rounds, validation first in odd ones) so a
load that drifts within a round does not favour either. Prints each round's wall times and the
ratio of the round's pair, and the mean ratio with a bootstrap interval over rounds, of wall time
and of the process's CPU time (one torch thread: CPU time is the work itself, which other
processes on a shared machine disturb far less than the wall clock).

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
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                extra = variants[name]
                overrides = {"train.max_steps": args.steps, "train.checkpoint_every": 0, "train.log_every": 50,
                             "train.report_to": "none", **extra}
                config = load_config(None, tiny_overrides(model, manifest, root / f"{name}-{round_}", **overrides))
                start, start_cpu = time.perf_counter(), time.process_time()
                train(config, progress=False)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            print(f"round {round_}: plain {times['plain'][-1]:.1f} s, with validation {times['validation'][-1]:.1f} s, "
                  f"ratio {times['validation'][-1] / times['plain'][-1]:.3f}; CPU plain {cpu['plain'][-1]:.1f} s, "
                  f"with validation {cpu['validation'][-1]:.1f} s, ratio {cpu['validation'][-1] / cpu['plain'][-1]:.3f}",
                  flush=True)
        for label, measured in (("wall time", times), ("CPU time", cpu)):
            ratios = np.array(measured["validation"]) / np.array(measured["plain"])
            low, high = bootstrap_ci(ratios)
            print(f"validation/plain {label} = {ratios.mean():.3f} [95% bootstrap CI {low:.3f}, {high:.3f}] over "
                  f"{args.rounds} rounds ({args.steps} steps, 64 pairs, 5% held out, validate_every=100)")


if __name__ == "__main__":
    main()
