"""A run directory belongs to one run: checks that run before a trainer writes anything.

``train()`` calls, in order: :func:`check_output_dir` (a directory sipo can write), then either
:func:`refuse_foreign_run` (a new run must not mix with another run's files) or
:func:`choose_resume_checkpoint` (a resume continues only the run it names, from an intact
checkpoint, with a config that can load it); :func:`remove_previous_run` runs for ``--overwrite``.
:func:`model_numbers` reads the model directory's JSON configs so values can be checked against
the model before it is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sipo.checkpoints import (
    fingerprint_differences,
    list_checkpoints,
    newest_intact_checkpoint,
    read_fingerprint,
    remove_stale_temporaries,
)
from sipo.errors import SipoError

#: what a sipo run writes into its output_dir; --overwrite removes these and nothing else, so an
#: output_dir pointed at a folder with the user's own files never loses them
RUN_FILES = ("config.yaml", "metrics.jsonl", "data_report.json", "README.md", "pytorch_lora_weights.safetensors",
             "adapter_config.json", "pytorch_lora_weights_transformer_2.safetensors")  # the last: Wan2.2-A14B's low-noise expert
RUN_FOLDERS = ("checkpoints", "logs", "unet", "transformer", "transformer_2", "analysis")
#: any of these marks the directory as holding a run
RUN_MARKERS = ("checkpoints", "config.yaml", "pytorch_lora_weights.safetensors", "unet", "transformer", "metrics.jsonl")


def check_output_dir(output_dir: Path, name: str = "train.output_dir") -> None:
    """``output_dir`` is, or can become, a directory this process can write into (``name``: its setting)."""
    for parent in [output_dir, *output_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == output_dir else f"is under {parent}, which is a file"
                raise SipoError(f"{name} {output_dir} {where}; set {name} to a directory path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise SipoError(f"{name} {output_dir} cannot be written ({parent} is read-only for this user); "
                                f"set {name} to a writable directory")
            break
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".sipo-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SipoError(f"{name} {output_dir} cannot be written ({error.strerror or error}); "
                        f"set {name} to a writable directory") from None


def check_model_dir(model_config) -> None:
    """A local model directory holds the configured family's pipeline (its model_index.json reads).

    Runs before anything is written, so a wrong path does not leave a config.yaml that would make
    the directory look like a run. Hub ids (``owner/name``, not on disk) are left to the loader.
    """
    from sipo.models import adapter_class

    path = Path(model_config.pretrained_path).expanduser()
    looks_local = path.exists() or path.is_absolute() or str(model_config.pretrained_path).startswith((".", "~"))
    if looks_local or not model_config.pretrained_path:
        adapter_class(model_config.family).check_family(path)


def check_reporting(config) -> None:
    """``train.report_to`` names a tracker whose package is installed."""
    import importlib.util

    target = config.train.report_to
    if target != "none" and importlib.util.find_spec(target) is None:
        package = "tensorboard" if target == "tensorboard" else "wandb"
        raise SipoError(f"train.report_to={target} needs the {package} package; pip install {package}, "
                        "or set train.report_to=none")


def holds_a_run(output_dir: Path) -> bool:
    return any((output_dir / marker).exists() for marker in RUN_MARKERS)


def refuse_foreign_run(output_dir: Path) -> None:
    """A new run stops if ``output_dir`` already holds a run (its checkpoints, config or weights)."""
    if holds_a_run(output_dir):
        newest = list_checkpoints(output_dir)
        what = f"checkpoints up to {newest[-1].name}" if newest else "files of an earlier run"
        raise SipoError(f"{output_dir} already holds another run ({what}); pass --resume to continue it, "
                        "--overwrite to replace it, or set another train.output_dir")


def remove_previous_run(output_dir: Path) -> list[str]:
    """``--overwrite``: delete the files an earlier run wrote (and only those); returns their names."""
    removed = []
    for name in RUN_FILES:
        if (output_dir / name).is_file():
            (output_dir / name).unlink()
            removed.append(name)
    for name in RUN_FOLDERS:
        if (output_dir / name).is_dir():
            shutil.rmtree(output_dir / name)
            removed.append(f"{name}/")
    return removed


def choose_resume_checkpoint(output_dir: Path, fingerprint: dict) -> tuple[Path, list[Path], list[str]]:
    """The checkpoint ``--resume`` continues from, the damaged newer ones, and lines to print.

    Verifies the newest checkpoint against its manifest and falls back to the newest intact one;
    compares the run's fingerprint and refuses any change outside ``RESUME_MAY_CHANGE``. Reads
    only: :func:`discard_damaged` then removes what cannot be loaded (main process, after every
    process has checked).
    """
    if not list_checkpoints(output_dir):
        raise SipoError(f"--resume found no checkpoint under {output_dir}/checkpoints; start without --resume "
                        "(add --overwrite if the directory holds an unfinished run)")
    chosen, damaged = newest_intact_checkpoint(output_dir)
    if chosen is None:
        problems = "; ".join(f"{path.name}: {why}" for path, why in damaged[:3])
        raise SipoError(f"no intact checkpoint under {output_dir}/checkpoints ({problems}); start again with --overwrite")
    saved = read_fingerprint(chosen)
    allowed, refused = fingerprint_differences(saved, fingerprint) if saved else ([], [])
    if refused:
        raise SipoError(f"--resume refused: the run in {output_dir} was started with other settings or data "
                        f"({'; '.join(refused)}); undo these changes, or start a new run with --overwrite "
                        "or another train.output_dir")
    lines = []
    for path, why in damaged:
        lines.append(f"checkpoint {path.name} is damaged ({why}); deleting it")
    if damaged:
        lines.append(f"resuming from {chosen.name}, the newest intact checkpoint")
    if allowed:
        lines.append("changed since the checkpoint: " + "; ".join(allowed))
    if not saved:
        lines.append(f"{chosen.name} has no fingerprint (written by an older sipo); settings not compared")
    return chosen, [path for path, _ in damaged], lines


def discard_damaged(output_dir: Path, damaged: list[Path]) -> list[str]:
    """Delete damaged checkpoints (nothing can load them; pruning must not keep them over intact
    ones) and stale ``.tmp-*`` directories; returns lines to print."""
    for path in damaged:
        shutil.rmtree(path, ignore_errors=True)
    return [f"removed {stale.name}, a checkpoint that was never finished" for stale in remove_stale_temporaries(output_dir)]


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def model_numbers(pretrained_path: str) -> tuple[int | None, int | None, int | None]:
    """``(num_train_timesteps, latent_factor, native_resolution)`` from a pipeline directory's JSON.

    Best effort and read-only: what the directory does not state comes back ``None`` (its check is
    skipped); the adapter's own loading reports a broken directory.
    """
    root = Path(pretrained_path)
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json")
    timesteps = scheduler.get("num_train_timesteps")
    vae = _read_json(root / "vae" / "config.json")
    factor = None
    if isinstance(vae.get("scale_factor_spatial"), int):
        factor = vae["scale_factor_spatial"]
    elif isinstance(vae.get("block_out_channels"), list) and vae["block_out_channels"]:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    denoiser = _read_json(root / "unet" / "config.json") or _read_json(root / "transformer" / "config.json")
    sample_size = denoiser.get("sample_size")
    native = None
    if isinstance(sample_size, int) and not isinstance(sample_size, bool):
        native = sample_size * (factor or 1) if vae or not (root / "vae").exists() else None
    return (timesteps if isinstance(timesteps, int) else None), factor, native
