"""`sipo` command line: parse arguments, load the config, call the library. Nothing else lives here.

A ``SipoError`` (something the user can fix) is printed as one sentence, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sipo.errors import SipoError, TrainingInterrupted


def _user_path(value: str) -> str:
    """A path argument with a leading ``~`` expanded (``--output-dir=~/x`` reaches us unexpanded by the shell)."""
    import os

    return os.path.expanduser(value)


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, type=_user_path,
                        help="YAML config file, or the name of a packaged one (see `sipo config --list`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. objective.beta=2500")


def build_parser() -> argparse.ArgumentParser:
    from sipo import __version__

    parser = argparse.ArgumentParser(prog="sipo", description="Diffusion-DPO, DPO-C&M and SIPO for diffusion models.")
    parser.add_argument("--version", action="version", version=f"sipo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="preference-tune a model")
    _add_config_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--strict", action="store_true", help="stop at the first malformed data row (same as data.strict=true)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in train.output_dir (its checkpoints, weights, logs) instead of stopping")

    config = commands.add_parser("config", help="print the resolved config: every key with its value, default and help")
    _add_config_arguments(config, required=False)
    config.add_argument("--list", action="store_true", help="list the configs shipped with sipo and exit")
    config.add_argument("--list-objectives", action="store_true",
                        help="every objective.name preset with its formula, defaults and source, and exit")

    demo = commands.add_parser("demo", help="the embedded digits task: DPO vs DPO-C&M vs SIPO on CPU")
    demo.add_argument("--quick", action="store_true", help="a small variant that finishes in about a minute")
    demo.add_argument("--full", action="store_true", help="every claim for every method and pair source (about 3x the default's time)")
    demo.add_argument("--output-dir", default="runs/demo", type=_user_path, help="where the report and plots go")

    analyze = commands.add_parser("analyze", help="per-timestep importance weights and gradient variance (docs/spec.md section 6)")
    _add_config_arguments(analyze)
    analyze.add_argument("--checkpoint", default=None, type=_user_path,
                         help="a trained run directory (LoRA or full) to analyse instead of the base model")
    analyze.add_argument("--pairs", type=int, default=64, help="preference pairs to analyse")
    analyze.add_argument("--buckets", type=int, default=20, help="timestep buckets over [0, T)")
    analyze.add_argument("--output-dir", default=None, type=_user_path,
                         help="default: <checkpoint>/analysis, or <train.output_dir>/analysis for the base model")

    evaluate = commands.add_parser("eval", help="sample base and aligned model, score with reward models, win rates")
    _add_config_arguments(evaluate)
    evaluate.add_argument("--checkpoint", default=None, type=_user_path, help="the trained run directory (train.output_dir) to compare with its base")
    evaluate.add_argument("--base", action="store_true", help="score the base model only (no --checkpoint needed)")
    evaluate.add_argument("--prompts", default=None, help="text file, one prompt per line, pickapic-test, or hf:DATASET[:SPLIT[:COLUMN]]")
    evaluate.add_argument("--inputs", default=None, type=_user_path,
                          help="families that edit or animate an input image: JSONL of {prompt, input_image} (instead of --prompts)")
    evaluate.add_argument("--pickapic-path", default=None, type=_user_path, help="Pick-a-Pic v2 test parquet (file, folder or glob) for --prompts pickapic-test")
    evaluate.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    evaluate.add_argument("--seeds", default="0", help="comma-separated seeds (or a range 0-3); one image per prompt and seed")
    evaluate.add_argument("--scorers", default="pickscore", help="comma-separated: pickscore,hpsv2,imagereward,aesthetic,clipscore")
    evaluate.add_argument("--scorer-path", action="append", default=[], metavar="NAME=DIR",
                          help="local checkpoint directory of a scorer (repeatable); default: its hub id where online")
    evaluate.add_argument("--output-dir", default=None, type=_user_path, help="default: <checkpoint>/eval")
    evaluate.add_argument("--batch-size", type=int, default=4, help="images per sampling and scoring batch")
    evaluate.add_argument("--num-inference-steps", type=int, default=None,
                          help="sampler steps (the same for both models; default: the family's, docs/models.md)")
    evaluate.add_argument("--guidance-scale", type=float, default=None,
                          help="classifier-free guidance, FLUX's distilled guidance, Qwen-Image's true_cfg (the same for "
                               "both models; default: the family's, FLUX model.guidance)")
    evaluate.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                          help="model weights while sampling (fp16 halves memory and time on a GPU); scorers stay fp32")
    evaluate.add_argument("--vbench", default=None, metavar="DIM,DIM",
                          help="video families: also run VBench on these dimensions (pip install vbench; downloads its models)")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    compare = commands.add_parser("compare", help="sample runs (and the base) on the same prompts and seeds: win-rate "
                                  "matrix, ranking and one HTML page with the pictures side by side")
    compare.add_argument("items", nargs="*", metavar="RUN_DIR | key=value",
                         help="the run directories to compare (two or more, or one and --base), and config overrides")
    compare.add_argument("--config", default=None, type=_user_path,
                         help="YAML config or a packaged one's name (default: the first run's config.yaml)")
    compare.add_argument("--base", action="store_true", help="compare the base model too (sampled once, reused)")
    compare.add_argument("--labels", default=None, help="comma-separated names of the runs (default: their folder names)")
    _add_sampling_arguments(compare, default_output="<first run's folder>/../compare")
    _add_tie_tolerance(compare)

    sweep = commands.add_parser("sweep", help="one run per cell of a grid of overrides and seeds, resumable, then "
                                "sipo compare of every cell with seeds pooled")
    _add_config_arguments(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a config key and its values (repeatable; every combination is one cell)")
    sweep.add_argument("--seeds", default="0", help="training seeds (train.seed): each cell is trained once per seed")
    sweep.add_argument("--output-dir", required=True, type=_user_path, help="the sweep's folder: one run folder per cell")
    sweep.add_argument("--print-commands", action="store_true",
                       help="print one `sipo train` line per unfinished cell (for a scheduler) and exit")
    sweep.add_argument("--no-base", action="store_true", help="leave the base model out of the compare")
    sweep.add_argument("--workers", type=int, default=1,
                       help="cells trained at once, each in its own process with cores/N torch threads (small models on "
                            "CPUs; on GPUs give each cell its own device with --print-commands and a scheduler)")
    _add_sampling_arguments(sweep, None, prompts_flag="--compare-prompts", required=False, seeds_flag="--compare-seeds")
    _add_tie_tolerance(sweep)
    pairs = commands.add_parser("pairs", help="sample K pictures per prompt, score them, write the best/worst as pairs sipo train reads")
    _add_config_arguments(pairs)
    _add_pairs_arguments(pairs)
    pairs.add_argument("--checkpoint", default=None, type=_user_path, help="sample from this run's weights (default: the base model)")
    pairs.add_argument("--out", required=True, type=_user_path, help="the output folder (pairs.jsonl, pictures, report); rerun to resume")

    iterate = commands.add_parser("iterate", help="rounds of sipo pairs -> sipo train --resume -> sipo eval on one run")
    _add_config_arguments(iterate)
    _add_pairs_arguments(iterate)
    iterate.add_argument("--rounds", type=int, required=True, help="rounds to run (a rerun continues where it stopped)")
    iterate.add_argument("--steps-per-round", type=int, required=True, help="optimizer steps each round adds to the run")
    iterate.add_argument("--reference", default="base", choices=("base", "previous"),
                         help="reference model of each round's training: the base, or the previous round's weights")
    iterate.add_argument("--eval-prompts", default=None, help="held-out prompts of each round's evaluation (default: --prompts)")
    iterate.add_argument("--eval-seeds", default="0", help="seeds of each round's evaluation (comma list or range)")
    iterate.add_argument("--out", required=True, type=_user_path, help="the folder of the run and of every round")

    cache = commands.add_parser("cache", help="encode every pair once into a latent cache that sipo train reads")
    _add_config_arguments(cache)
    cache.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    relabel = commands.add_parser("relabel", help="label every pair again with a reward model, with the agreement")
    _add_config_arguments(relabel)
    relabel.add_argument("--scorer", required=True, help="pickscore, hpsv2, imagereward, aesthetic or clipscore")
    relabel.add_argument("--scorer-path", default=None, type=_user_path,
                         help="the scorer's local checkpoint directory, DIR or NAME=DIR (default: its hub id where online)")
    relabel.add_argument("--out", default=None, type=_user_path,
                         help="the new manifest (default: <data.path stem>.<scorer>.jsonl beside data.path)")
    relabel.add_argument("--batch-size", type=int, default=8, help="pairs per scoring batch")
    relabel.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    export = commands.add_parser("export", help="write a run's LoRA in another tool's layout (ComfyUI)")
    export.add_argument("--run", required=True, type=_user_path, help="the run directory (its train.output_dir)")
    export.add_argument("--format", default="comfyui", choices=("comfyui", "diffusers"),
                        help="comfyui: pytorch_lora_weights_comfyui.safetensors beside the run's, best/'s and each checkpoint's weights")
    return parser


def _add_sampling_arguments(parser: argparse.ArgumentParser, default_output: str | None, prompts_flag: str = "--prompts",
                            required: bool = True, seeds_flag: str | None = "--seeds") -> None:
    """What `sipo compare`, sweep's compare, `sipo pairs` and `sipo iterate` take as `sipo eval` does: prompts,
    seeds (``seeds_flag=None``: the command numbers its own), scorers, sampler."""
    parser.add_argument(prompts_flag, dest="prompts", required=required,
                        help="text file, one prompt per line, pickapic-test, or hf:DATASET[:SPLIT[:COLUMN]]")
    if seeds_flag is not None:
        parser.add_argument(seeds_flag, dest="sample_seeds", default="0", metavar="SEEDS",
                            help="comma-separated seeds (or a range 0-3) of the pictures; one per prompt and seed")
    parser.add_argument("--pickapic-path", default=None, type=_user_path, help="Pick-a-Pic v2 test parquet for pickapic-test")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--scorers", default="pickscore",
                        help="comma-separated: pickscore,hpsv2,hpsv3,imagereward,aesthetic,clipscore")
    parser.add_argument("--scorer-path", action="append", default=[], metavar="NAME=DIR",
                        help="local checkpoint directory of a scorer (repeatable); default: its hub id where online")
    if default_output is not None:
        parser.add_argument("--output-dir", default=None, type=_user_path, help=f"default: {default_output}")
    parser.add_argument("--batch-size", type=int, default=4, help="pictures per sampling and scoring batch")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="sampler steps (default: the family's)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="guidance (default: the family's; FLUX model.guidance, Qwen-Image's true_cfg 4.0)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="model weights while sampling")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_tie_tolerance(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tie-tolerance", type=float, default=0.0,
                        help="two scores closer than this are a tie, half a win each (default 0: only equal scores)")


def _add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `sipo pairs` and `sipo iterate` share: sampling as `sipo eval` samples, then the pairing."""
    _add_sampling_arguments(parser, None, seeds_flag=None)
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="pictures sampled per prompt (K), each from its own seed")
    parser.add_argument("--seed", type=int, default=0, help="picture k of prompt i is sampled from seed SEED + i*K + k")
    parser.add_argument("--scorer-weights", default=None,
                        help="comma-separated weights, one per scorer (default: 1 each); the score is the weighted sum "
                             "of each scorer's standardised scores")
    parser.add_argument("--pairing", default="best-worst", choices=("best-worst", "all", "margin"),
                        help="best-worst: one pair per prompt; all: every two pictures; margin: disjoint pairs, widest first")
    parser.add_argument("--min-margin", type=float, default=0.0, help="keep pairs whose standardised score margin is above this")


def _sampling_options(args) -> dict:
    """The fields of sipo.compare.CompareOptions that _add_sampling_arguments parsed."""
    from sipo.evaluate import parse_scorer_paths, parse_seeds

    seeds_flag = "--compare-seeds" if args.command == "sweep" else "--seeds"
    return dict(prompts=args.prompts, seeds=parse_seeds(args.sample_seeds, seeds_flag), pickapic_path=args.pickapic_path, max_prompts=args.max_prompts,
                scorers=[s.strip() for s in args.scorers.split(",") if s.strip()],
                scorer_paths=parse_scorer_paths(args.scorer_path),
                batch_size=args.batch_size, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, dtype=args.dtype, progress=not args.no_progress)


def _runs_and_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """`sipo compare`'s positional words: an existing folder is a run (sweep cells are named key=value
    too), a word ``section.key=value`` is a config override, the rest are runs (a missing one is reported)."""
    import os

    runs, overrides = [], []
    for item in items:
        path = os.path.expanduser(item)
        key = item.split("=", 1)[0]
        if Path(path).is_dir() or "=" not in item or "/" in key:  # no config key holds a '/': a missing run's path
            runs.append(path)
        else:
            overrides.append(item)
    return runs, overrides


def _compare_config(config_path: str | None, runs: list[str], overrides: list[str]):
    from sipo.config import load_config

    if config_path is None:
        if not runs or not (Path(runs[0]) / "config.yaml").is_file():
            raise SipoError("sipo compare needs the model's config: pass --config, or a run directory first "
                            "(its config.yaml is used)")
        config_path = str(Path(runs[0]) / "config.yaml")
    return load_config(config_path, overrides)


def _pairs_options(args):
    """`PairsOptions` from the shared arguments (``--out`` and ``--checkpoint`` filled by the caller)."""
    from sipo.evaluate import parse_scorer_paths
    from sipo.pairs import PairsOptions

    weights = None
    if args.scorer_weights is not None:
        try:
            weights = [float(w) for w in args.scorer_weights.split(",") if w.strip()]
        except ValueError:
            raise SipoError(f"--scorer-weights {args.scorer_weights!r} is not a list of numbers; write e.g. --scorer-weights 1,0.5") from None
    return PairsOptions(
        prompts=args.prompts, out=args.out, checkpoint=getattr(args, "checkpoint", None),
        samples_per_prompt=args.samples_per_prompt, scorers=[s.strip() for s in args.scorers.split(",") if s.strip()],
        scorer_weights=weights, scorer_paths=parse_scorer_paths(args.scorer_path), pairing=args.pairing,
        min_margin=args.min_margin, seed=args.seed, batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, dtype=args.dtype,
        pickapic_path=args.pickapic_path, max_prompts=args.max_prompts, progress=not args.no_progress,
    )


def _one_sentence(error: SipoError) -> str:
    """The user's sentence, also when a DataLoader worker re-raised it wrapped in its traceback text."""
    text = (error.cli_message if isinstance(error, SipoError) else str(error)).strip()
    marker = "SipoError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sipo.models import quiet_libraries

    quiet_libraries()
    config = None
    try:
        if args.command == "train":
            from sipo.config import load_config
            from sipo.train import train

            config = load_config(args.config, args.overrides + (["data.strict=true"] if args.strict else []))
            result = train(config, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
            if _main_process():  # under accelerate launch: one line, not one per process
                print(f"trained {result.steps} steps; weights, config and logs in {result.output_dir}")
        elif args.command == "config":
            from sipo.config import describe_config, load_config, packaged_config_names

            if args.list_objectives:
                from sipo.config import objectives_table

                print(objectives_table(), end="")
            elif args.list:
                print("\n".join(packaged_config_names()))
            else:
                print(describe_config(load_config(args.config, args.overrides)), end="")
        elif args.command == "demo":
            from sipo.demo import run_demo

            run_demo(_demo_output_dir(args.output_dir), quick=args.quick, full=args.full)
        elif args.command == "analyze":
            from sipo.api import analyze
            from sipo.config import load_config

            config = load_config(args.config, args.overrides)
            analyze(config, checkpoint=args.checkpoint, num_pairs=args.pairs, num_buckets=args.buckets,
                    output_dir=args.output_dir)
        elif args.command == "eval":
            from sipo.config import load_config
            from sipo.evaluate import EvalOptions, parse_scorer_paths, parse_seeds, run_eval

            config = load_config(args.config, args.overrides)
            video_benchmarks = []
            if args.vbench is not None:
                from sipo.rewards.vbench import VBench

                video_benchmarks.append(VBench([d.strip() for d in args.vbench.split(",") if d.strip()]))
            run_eval(config, EvalOptions(
                prompts=args.prompts, checkpoint=args.checkpoint, base_only=args.base, seeds=parse_seeds(args.seeds),
                scorers=[s.strip() for s in args.scorers.split(",") if s.strip()],
                scorer_paths=parse_scorer_paths(args.scorer_path),
                output_dir=Path(args.output_dir) if args.output_dir else None, batch_size=args.batch_size,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                pickapic_path=args.pickapic_path, max_prompts=args.max_prompts, progress=not args.no_progress,
                video_benchmarks=video_benchmarks, dtype=args.dtype, inputs=args.inputs,
            ))
        elif args.command == "compare":
            from sipo.compare import CompareOptions, run_compare

            runs, overrides = _runs_and_overrides(args.items)
            config = _compare_config(args.config, runs, overrides)
            run_compare(config, CompareOptions(
                runs=runs, base=args.base, output_dir=Path(args.output_dir) if args.output_dir else None,
                labels=[s.strip() for s in args.labels.split(",")] if args.labels else None,
                tie_tolerance=args.tie_tolerance, **_sampling_options(args)))
        elif args.command == "sweep":
            from sipo.evaluate import parse_seeds
            from sipo.sweep import parse_grid, run_sweep

            run_sweep(args.config, parse_grid(args.grid), parse_seeds(args.seeds), args.output_dir,
                      overrides=args.overrides, print_commands=args.print_commands,
                      compare_options=dict(_sampling_options(args), tie_tolerance=args.tie_tolerance) if args.prompts else None,
                      base=not args.no_base, progress=not args.no_progress, workers=args.workers)
        elif args.command == "pairs":
            from sipo.config import load_config
            from sipo.pairs import make_pairs

            config = load_config(args.config, args.overrides)
            result = make_pairs(config, _pairs_options(args))
            print(result.summary())
        elif args.command == "iterate":
            from sipo.config import load_config
            from sipo.evaluate import parse_seeds
            from sipo.iterate import IterateOptions, iterate

            config = load_config(args.config, args.overrides)
            iterate(config, IterateOptions(
                pairs=_pairs_options(args), out=args.out, rounds=args.rounds, steps_per_round=args.steps_per_round,
                reference=args.reference, eval_prompts=args.eval_prompts, eval_seeds=parse_seeds(args.eval_seeds, "--eval-seeds")))
        elif args.command == "cache":
            from sipo.config import load_config
            from sipo.data.cache import build_cache, read_manifest

            config = load_config(args.config, args.overrides)
            location = build_cache(config, progress=not args.no_progress)
            manifest = read_manifest(location)
            print(f"cached {manifest['pairs']} pairs in {manifest['shards']} shards at {location}; "
                  "sipo train uses it while the model, resolution and data stay the same")
        elif args.command == "relabel":
            from sipo.config import load_config
            from sipo.relabel import relabel

            config = load_config(args.config, args.overrides)
            scorer_path = args.scorer_path  # DIR, or NAME=DIR as sipo eval takes it
            if scorer_path is not None and scorer_path.startswith(f"{args.scorer}="):
                scorer_path = scorer_path[len(args.scorer) + 1:]
            result = relabel(config, args.scorer, out=args.out, batch_size=args.batch_size,
                             scorer_path=scorer_path, progress=not args.no_progress)
            print(f"relabelled {result.pairs} pairs into {result.out}; {result.summary()}")
        elif args.command == "export":
            from sipo.export import export_run

            for path in export_run(args.run, args.format):
                print(f"wrote {path}")
    except TrainingInterrupted as stopped:
        if _main_process():  # every process stopped at the same step with the same sentence
            print(f"sipo: {_one_sentence(stopped)}", file=sys.stderr)
        return 128 + stopped.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    except SipoError as error:
        print(f"sipo: error: {_one_sentence(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sipo: interrupted; {_after_interrupt(config if args.command == 'train' else None)}", file=sys.stderr)
        return 130
    except OSError as error:
        if not _caused_by_user(error):
            raise
        print(f"sipo: error: {_os_error_sentence(error)}", file=sys.stderr)
        return 2
    return 0


def _main_process() -> bool:
    """Whether this is the launch's main process (or the only one): accelerate's launcher sets RANK."""
    import os

    return os.environ.get("RANK", "0") in ("", "0")


def _after_interrupt(config) -> str:
    """What to run next: --resume only where a checkpoint exists to resume from."""
    if config is None:
        return "run the command again"
    from sipo.checkpoints import list_checkpoints

    checkpoints = list_checkpoints(Path(config.train.output_dir))
    if checkpoints:
        return f"continue with --resume (from {checkpoints[-1].name})"
    return "no checkpoint was written yet, so start again with --overwrite"


def _demo_output_dir(value: str) -> Path:
    """``sipo demo --output-dir``: a directory that exists or can be made, and can be written."""
    from sipo.rundir import check_output_dir

    path = Path(value)
    check_output_dir(path, name="--output-dir")
    return path


_USER_ERRNOS = {"ENOSPC", "EACCES", "EPERM", "EROFS", "ENOENT", "ENOTDIR", "EISDIR", "EDQUOT", "ENAMETOOLONG"}


def _caused_by_user(error: OSError) -> bool:
    """A missing, unreadable or unwritable path or a full disk: the user's to fix, not a bug."""
    import errno

    return error.errno is not None and errno.errorcode.get(error.errno) in _USER_ERRNOS


def _os_error_sentence(error: OSError) -> str:
    import errno

    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"the disk is full{where}; free space there and run again"
    return f"{error.strerror or error}{where}; fix that path or its permissions and run again"


if __name__ == "__main__":
    raise SystemExit(main())
