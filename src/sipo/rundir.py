"""A run directory belongs to one run: checks that run before a trainer writes anything.

``train()`` calls, in order: :func:`check_output_dir` (a directory sipo can write), then either
:func:`refuse_foreign_run` (a new run must not mix with another run's files) or
:func:`choose_resume_checkpoint` (a resume continues only the run it names, from an intact
checkpoint, with a config that can load it), then :func:`claim`: the directory's lock (one run at a
time), ``--overwrite`` (which removes only what the run's manifest, ``.sipo-run.json``, says sipo
wrote) and the clean-up of a run that fails before its first step. :func:`model_numbers` reads the
model directory's JSON configs so values can be checked against the model before it is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sipo.checkpoints import (
    LAYOUT_KEYS,
    check_global_batch,
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
             "adapter_config.json", "validation.jsonl", "validation.png",
             "pytorch_lora_weights_transformer_2.safetensors")  # the last: Wan2.2-A14B's low-noise expert
RUN_FOLDERS = ("checkpoints", "logs", "unet", "transformer", "transformer_2", "analysis", "eval", "best", "samples")
#: any of these marks the directory as holding a run
RUN_MARKERS = ("checkpoints", "config.yaml", "pytorch_lora_weights.safetensors", "unet", "transformer", "metrics.jsonl")
#: the run's manifest: the names in output_dir that sipo runs wrote (and that did not exist before the first)
RUN_MANIFEST = ".sipo-run.json"
#: held while a trainer works in the directory: pid and host of the process holding it
LOCK_FILE = ".sipo-lock"


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
    else:  # a hub id: without network, one sentence now rather than half a minute of retries at loading
        from sipo.models.base import require_hub_access

        require_hub_access(str(model_config.pretrained_path), "model.pretrained_path",
                           "set model.pretrained_path to a local pipeline directory", filename="model_index.json")


def check_reporting(config) -> None:
    """``train.report_to`` names a tracker whose package is installed."""
    import importlib.util

    target = config.train.report_to
    if target != "none" and importlib.util.find_spec(target) is None:
        package = "tensorboard" if target == "tensorboard" else "wandb"
        raise SipoError(f"train.report_to={target} needs the {package} package; pip install {package}, "
                        "or set train.report_to=none")


def holds_a_run(output_dir: Path) -> bool:
    return (output_dir / RUN_MANIFEST).exists() or any((output_dir / marker).exists() for marker in RUN_MARKERS)


def refuse_model_dir(output_dir: Path, pretrained_path: str) -> None:
    """``train.output_dir`` must not be a model directory: a run's files would mix with the model's."""
    model = Path(pretrained_path).expanduser()
    same = model.exists() and output_dir.exists() and model.resolve() == output_dir.resolve()
    if same or (output_dir / "model_index.json").is_file():
        raise SipoError(f"train.output_dir {output_dir} is a diffusers model directory (it holds model_index.json), "
                        "and a run must not write among a model's files; set train.output_dir to another directory")


def refuse_foreign_run(output_dir: Path) -> None:
    """A new run stops if ``output_dir`` already holds a run (its checkpoints, config or weights)."""
    if holds_a_run(output_dir):
        newest = list_checkpoints(output_dir)
        what = f"checkpoints up to {newest[-1].name}" if newest else "files of an earlier run"
        raise SipoError(f"{output_dir} already holds another run ({what}); pass --resume to continue it, "
                        "--overwrite to replace it, or set another train.output_dir")


def read_run_manifest(output_dir: Path) -> list[str] | None:
    """The names the run's manifest says sipo wrote; ``None`` when there is no readable manifest."""
    values = _read_json(output_dir / RUN_MANIFEST)
    owned = values.get("owned")
    if not isinstance(owned, list) or not all(isinstance(name, str) for name in owned):
        return None
    return [name for name in owned if name and "/" not in name and name not in (".", "..")]


def _write_run_manifest(output_dir: Path, owned: list[str]) -> None:
    tmp = output_dir / f"{RUN_MANIFEST}.tmp"
    tmp.write_text(json.dumps({"owned": sorted(set(owned))}, indent=2))
    os.replace(tmp, output_dir / RUN_MANIFEST)


def check_overwrite(output_dir: Path) -> None:
    """``--overwrite`` replaces only a run whose manifest says which files are sipo's."""
    if holds_a_run(output_dir) and read_run_manifest(output_dir) is None:
        raise SipoError(f"--overwrite refused: {output_dir} has no readable {RUN_MANIFEST}, so sipo cannot tell its "
                        "files from yours; delete what you want replaced yourself, or set another train.output_dir")


def remove_previous_run(output_dir: Path) -> list[str]:
    """``--overwrite``: delete what the run's manifest lists (and only that); returns the names removed."""
    removed = []
    for name in read_run_manifest(output_dir) or []:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(f"{name}/")
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(name)
    (output_dir / RUN_MANIFEST).unlink(missing_ok=True)
    return removed


# ----------------------------------------------------------------------------- the lock and the claim
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _launch_id() -> str | None:
    """What the processes of one live ``accelerate launch`` / ``torchrun`` share, and no other launch
    does (two cannot listen on one address at once); None for a plain process."""
    if "MASTER_PORT" not in os.environ:
        return None
    return ":".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))


def launch_state():
    """This process's accelerate ``PartialState``, in the group its launcher started.

    accelerate's torchrun launcher (``distributed_type: MULTI_GPU`` or ``FSDP``: ``launch_command`` ->
    ``multi_gpu_launcher`` in accelerate/commands/launch.py) passes no ``use_cpu`` on to the processes,
    and ``PartialState._prepare_backend`` (accelerate/state.py) groups launched processes only through
    an accelerator's backend (nccl, xccl, ...) or when told ``cpu=True``: on a machine without one,
    each process would get a world of one. Such processes are joined here as CPU processes (gloo).
    """
    from accelerate import PartialState

    state = PartialState()
    if _launched_processes() > 1 and state.num_processes == 1 and state.device.type == "cpu":
        PartialState._reset_state()
        state = PartialState(cpu=True)
    return state


def _launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_launch(num_processes: int, device_type: str = "cpu") -> None:
    """The processes a launcher started form one group, and the sharding the accelerate config asks
    for can start. (Processes accelerate left apart would each train alone on all the data and
    write the same files; FSDP or DeepSpeed asked for on the CPU would silently be plain DDP.)"""
    launched = _launched_processes()
    if launched > 1 and num_processes == 1:
        raise SipoError(f"the launcher started {launched} processes (WORLD_SIZE={launched}), but accelerate gave each a "
                        "world of one, so they would train apart and write the same files twice; launch one process, "
                        "or see docs/distributed.md for launches whose processes form one group")
    if device_type != "cpu":
        return
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "false").lower() == "true":
            raise SipoError(f"the accelerate config asks for {name}, which accelerate starts only on GPUs (on the CPU its "
                            "processes would run plain DDP); on the CPU use a config with distributed_type: MULTI_GPU "
                            "and use_cpu: true (DDP over gloo, docs/distributed.md), or run on GPUs")


def _lock_holder(output_dir: Path) -> dict | None:
    """Who holds the directory's lock; ``None`` when nobody does, its holder has died on this host, or
    it is this launch's own main process (the other ranks check while it holds the lock)."""
    lock = output_dir / LOCK_FILE
    if not lock.exists():
        return None
    holder = _read_json(lock)
    if holder.get("launch") is not None and holder.get("launch") == _launch_id():
        return None
    pid, host = holder.get("pid"), holder.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return None  # stale: its process is gone
    return holder or {"pid": "unknown", "host": "unknown"}


def refuse_if_locked(output_dir: Path) -> None:
    """Another live sipo process is training in ``output_dir``."""
    holder = _lock_holder(output_dir)
    if holder is not None:
        raise SipoError(f"{output_dir} is in use by another sipo run (pid {holder.get('pid')} on {holder.get('host')}); "
                        f"wait for it to finish, or set another train.output_dir (delete {output_dir / LOCK_FILE} "
                        "only if no such run is alive)")


def _acquire_lock(output_dir: Path) -> None:
    lock = output_dir / LOCK_FILE
    if lock.exists() and _lock_holder(output_dir) is None:
        lock.unlink(missing_ok=True)  # left by a process that died
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        refuse_if_locked(output_dir)
        raise SipoError(f"{output_dir} was claimed by another sipo run a moment ago; set another train.output_dir") from None
    with os.fdopen(fd, "w") as handle:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "launch": _launch_id()}, handle)


@dataclass
class Claim:
    """A run's hold on its directory; see :func:`claim`."""

    output_dir: Path
    notes: list[str] = field(default_factory=list)
    watched: object = None
    start_step: int = 0

    def watch(self, run) -> None:
        """From here on ``run.state.step`` tells whether the run got past its first step."""
        self.watched, self.start_step = run, run.state.step


@contextlib.contextmanager
def claim(output_dir: Path, resume: bool, overwrite: bool, damaged: list[Path], created_dir: bool = False) -> Iterator[Claim]:
    """Hold ``output_dir`` for one run: lock it, apply ``--overwrite`` / drop damaged checkpoints, and
    record in the run's manifest every name sipo writes there.

    A run that fails before its first optimizer step leaves the directory as it found it (a fresh
    run's config, logs and metrics are removed, and ``output_dir`` itself when ``created_dir`` says the
    checks made it), so the corrected command needs no ``--overwrite``.
    Only the main process touches the directory; every process waits for it.
    """
    from accelerate import PartialState

    process = PartialState()
    holding = process.is_main_process
    # every process has finished its checks of the directory before the main process writes into it
    # (a rank still checking would read the lock half-written, or the manifest, as another run's)
    process.wait_for_everyone()
    before = set(os.listdir(output_dir)) if output_dir.is_dir() else set()
    result = Claim(output_dir)
    try:
        if holding:
            _acquire_lock(output_dir)
            if resume:
                result.notes += discard_damaged(output_dir, damaged)
            elif overwrite:
                removed = remove_previous_run(output_dir)
                before -= {name.rstrip("/") for name in removed} | {RUN_MANIFEST}
                if removed:
                    result.notes.append(f"--overwrite: removed the earlier run's {', '.join(removed)}")
            previous = read_run_manifest(output_dir) or []
            # What sipo may write here and the user did not have before: the run's from now on.
            owned = set(previous) | ({*RUN_FILES, *RUN_FOLDERS} - before)
            _write_run_manifest(output_dir, sorted(owned))
        process.wait_for_everyone()
        yield result
    except BaseException:
        run = result.watched
        if holding and not resume and (run is None or run.state.step == result.start_step):
            _remove_new_entries(output_dir, before)
            if created_dir:
                (output_dir / LOCK_FILE).unlink(missing_ok=True)
                remove_if_empty(output_dir)
        raise
    finally:
        if holding:
            (output_dir / LOCK_FILE).unlink(missing_ok=True)


def _remove_new_entries(output_dir: Path, before: set[str]) -> None:
    """Undo a run that never reached its first step: what it added goes, the directory too if it is empty."""
    for name in set(os.listdir(output_dir)) - before - {LOCK_FILE}:
        path = output_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()


# ----------------------------------------------------------------------------- metrics.jsonl
def read_metrics(path: Path, up_to_step: int) -> tuple[list[dict], int]:
    """The records of ``metrics.jsonl`` up to ``up_to_step`` and how many lines could not be read
    (a kill during a write leaves a partial last line; a disk error can leave bytes that are not UTF-8)."""
    if not path.is_file():
        return [], 0
    records, dropped = [], 0
    for raw in path.read_bytes().splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            dropped += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            dropped += 1
        elif record["step"] <= up_to_step:
            records.append(record)
    return records, dropped


def write_metrics(path: Path, records: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` atomically with ``records`` (a resume's history up to its checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(tmp, path)


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
    layout, other_batch = check_global_batch(saved, fingerprint) if saved else (None, None)
    if layout is not None:  # another layout of the same global batch: the keys of check_global_batch are settled
        saved = {k: v for k, v in saved.items() if k not in LAYOUT_KEYS}
        fingerprint = {k: v for k, v in fingerprint.items() if k not in LAYOUT_KEYS}
    allowed, refused = fingerprint_differences(saved, fingerprint) if saved else ([], [])
    refused += [other_batch] if other_batch is not None else []
    if refused:
        raise SipoError(f"--resume refused: the run in {output_dir} was started with other settings or data "
                        f"({'; '.join(refused)}); undo these changes, or start a new run with --overwrite "
                        "or another train.output_dir")
    lines = []
    for path, why in damaged:
        lines.append(f"checkpoint {path.name} is damaged ({why}); deleting it")
    if damaged:
        lines.append(f"resuming from {chosen.name}, the newest intact checkpoint")
    if layout is not None:
        lines.append(layout)
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
