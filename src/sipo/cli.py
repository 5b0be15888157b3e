"""`sipo` command line: parse arguments, load the config, call the library. Nothing else lives here.

A ``SipoError`` (something the user can fix) is printed as one sentence, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sipo.errors import SipoError


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. objective.beta=2500")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipo", description="Diffusion-DPO, DPO-C&M and SIPO for diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="preference-tune a model")
    _add_config_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--strict", action="store_true", help="stop at the first malformed data row (same as data.strict=true)")

    demo = commands.add_parser("demo", help="the embedded digits task: DPO vs DPO-C&M vs SIPO on CPU")
    demo.add_argument("--quick", action="store_true", help="a small variant that finishes in about a minute")
    demo.add_argument("--full", action="store_true", help="every claim for every method and pair source (about 3x the default's time)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the report and plots go")

    analyze = commands.add_parser("analyze", help="per-timestep importance weights and gradient variance (SPEC 6)")
    _add_config_arguments(analyze)
    analyze.add_argument("--checkpoint", default=None, help="a trained run directory (LoRA or full) to analyse instead of the base model")
    analyze.add_argument("--pairs", type=int, default=64, help="preference pairs to analyse")
    analyze.add_argument("--buckets", type=int, default=20, help="timestep buckets over [0, T)")
    analyze.add_argument("--output-dir", default=None, help="default: <train.output_dir>/analysis")
    return parser


def _one_sentence(error: SipoError) -> str:
    """The user's sentence, also when a DataLoader worker re-raised it wrapped in its traceback text."""
    text = str(error).strip()
    marker = "SipoError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return " ".join(text.split())


def _quiet_libraries() -> None:
    """sipo shows its own progress; the libraries' per-file loading bars and notices are noise here."""
    import logging

    for name in ("transformers", "diffusers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging
        from diffusers.utils import logging as diffusers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "train":
            from sipo.config import load_config
            from sipo.train import train

            config = load_config(args.config, args.overrides + (["data.strict=true"] if args.strict else []))
            result = train(config, resume=args.resume, progress=not args.no_progress)
            print(f"trained {result.steps} steps; weights, config and logs in {result.output_dir}")
        elif args.command == "demo":
            from sipo.demo import run_demo

            run_demo(Path(args.output_dir), quick=args.quick, full=args.full)
        elif args.command == "analyze":
            from sipo.analysis import run_analysis
            from sipo.config import load_config

            config = load_config(args.config, args.overrides)
            output_dir = Path(args.output_dir) if args.output_dir else Path(config.train.output_dir) / "analysis"
            run_analysis(config, checkpoint=args.checkpoint, num_pairs=args.pairs, num_buckets=args.buckets,
                         output_dir=output_dir)
    except SipoError as error:
        print(f"sipo: error: {_one_sentence(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sipo: interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
