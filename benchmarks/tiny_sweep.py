"""A 3-objective x 2-seed `sipo sweep` and its compare on the tiny random-weight SD1.5, timed (issue 29).

    python benchmarks/tiny_sweep.py runs/tiny --setup-only    # only write the tiny model, pairs, scorers, config, prompts
    python benchmarks/tiny_sweep.py runs/tiny [--screenshot docs/figures/compare-page.png] [--workers 2]

Writes under DIR: ``sd15/`` (the tiny SD1.5 of tests/tiny_models.py), ``data/pairs.jsonl`` (8 pairs),
``pickscore/`` and ``aesthetic/`` (tiny random scorers of tests/tiny_scorers.py), ``tiny.yaml`` (4
steps, batch 2) and ``prompts.txt`` (4 prompts). Then runs, as a subprocess, the command it prints
(dpo, dpo-cm, sipo x seeds 0, 1; the compare of the 6 runs and the base on 4 prompts x 2 seeds at 4
sampler steps) and prints its wall time and the CPU time of the process. The numbers say what the
machinery costs, not which objective wins: the weights and scorers are random.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = "a photo of a cat\na red dog on the grass\nthe blue painting of a harbour\nan astronaut riding a horse\n"


def set_up(root: Path) -> None:
    from tiny_models import make_tiny_sd15
    from tiny_scorers import make_tiny_aesthetic, make_tiny_clip
    from train_fixtures import write_jsonl_pairs, write_tiny_config

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "sd15" / "model_index.json").is_file():
        make_tiny_sd15(root / "sd15")
    manifest = write_jsonl_pairs(root / "data")
    if not (root / "pickscore").is_dir():
        make_tiny_clip(root / "pickscore")
    if not (root / "aesthetic").is_dir():
        make_tiny_aesthetic(root / "aesthetic")
    write_tiny_config(root / "tiny.yaml", root / "sd15", manifest, root / "run",
                      **{"train.max_steps": 4, "train.learning_rate": 0.01, "train.checkpoint_every": 2})
    (root / "prompts.txt").write_text(PROMPTS)


def sweep_command(root: Path, workers: int = 1) -> list[str]:
    return ["sipo", "sweep", "--workers", str(workers), "--config", f"{root}/tiny.yaml", "--grid", "objective.name=dpo,dpo-cm,sipo",
            "--seeds", "0,1", "--output-dir", f"{root}/sweep", "--compare-prompts", f"{root}/prompts.txt",
            "--compare-seeds", "0,1", "--scorers", "pickscore,aesthetic", "--scorer-path", f"pickscore={root}/pickscore",
            "--scorer-path", f"aesthetic={root}/aesthetic", "--num-inference-steps", "4", "--no-progress"]


def screenshot(page: Path, out: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = page.parent / ".chromium-profile"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={out.resolve()}", "--window-size=1280,1500",
                    "--hide-scrollbars", page.resolve().as_uri()], check=True, capture_output=True, timeout=300)
    shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--setup-only", action="store_true")
    parser.add_argument("--screenshot", type=Path, default=None, help="save a screenshot of the compare's report.html")
    parser.add_argument("--workers", type=int, default=1, help="sipo sweep --workers: cells trained at once")
    args = parser.parse_args()
    set_up(args.root)
    if args.setup_only:
        print(f"tiny model, pairs, scorers, tiny.yaml and prompts.txt in {args.root}")
        return
    if (args.root / "sweep").exists():
        raise SystemExit(f"{args.root}/sweep exists: delete it to time a sweep from scratch")
    command = sweep_command(args.root, args.workers)
    print("$ " + " ".join(command))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *command[0:1], *command[1:]], check=True)
    wall = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"sweep and compare: wall {wall:.1f} s, CPU (user + system) {children.ru_utime + children.ru_stime:.1f} s")
    if args.screenshot is not None:
        screenshot(args.root / "sweep" / "compare" / "report.html", args.screenshot)
        print(f"screenshot in {args.screenshot}")


if __name__ == "__main__":
    main()
