"""Run directories and checkpoints: write atomically, list, load, and put a run's weights into a model.

A checkpoint is ``<output_dir>/checkpoints/step-NNNNNNNN/`` holding ``trainable.safetensors``,
``optimizer.pt`` and ``lr_scheduler.pt`` (tensors only, read with ``weights_only=True``),
``rng_and_ema.safetensors``, ``state.json``, ``fingerprint.json`` (the config and data the run was
started with) and ``manifest.json`` (size and sha256 of every other file, written last). It is
filled under a ``.tmp-`` name and renamed, so a crash never leaves a half-written checkpoint under a
listed name; the manifest catches what the rename cannot (a truncated or bit-rotten file).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sipo.config import SipoConfig, config_from_dict
from sipo.errors import SipoError
from sipo.models.base import DiffusionAdapter, add_lora

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    micro_batches: int = 0  # global micro-batches consumed: the data position
    consecutive_bad_steps: int = 0
    bad_steps: int = 0
    all_masked_batches: int = 0
    skipped_rows: int = 0
    ema: Tensor | None = None
    ema_seen: Tensor | None = None
    # objective.beta_mode=auto: EMA of mean |delta| (docs/spec.md section 9); None until the first step.
    # A Python float in state.json: JSON round-trips floats exactly, so a resume continues exactly.
    auto_beta_ema: float | None = None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint directory is named for."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory name")
    return int(match.group(1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their manifest written), oldest step first.

    Half-written ones live under a ``.tmp-`` name, or lack the manifest that is written last.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=checkpoint_step)


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete ``checkpoints/.tmp-*`` left by a crash or a full disk; returns what was removed."""
    root = Path(output_dir) / "checkpoints"
    stale = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size and sha256 of every file in ``directory`` in ``manifest.json`` (call it last)."""
    files = {
        child.name: {"size": child.stat().st_size, "sha256": _sha256(child)}
        for child in sorted(directory.iterdir()) if child.is_file() and child.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def verify_checkpoint(path: Path) -> str | None:
    """``None`` when every file matches the manifest, else why not (one short phrase)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            return "its manifest.json lists no files"
        for name, expected in files.items():
            child = Path(path) / name
            if not child.is_file():
                return f"{name} is missing"
            if child.stat().st_size != expected["size"]:
                return f"{name} has {child.stat().st_size} bytes, not {expected['size']}"
            if _sha256(child) != expected["sha256"]:
                return f"{name} fails its sha256 check"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its manifest.json is unreadable ({error.__class__.__name__})"
    return None


def newest_intact_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes :func:`verify_checkpoint`, and the newer ones that failed (with why)."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def read_fingerprint(path: Path) -> dict[str, Any]:
    """The fingerprint a checkpoint recorded (empty for checkpoints written before fingerprints)."""
    file = Path(path) / FINGERPRINT
    return json.loads(file.read_text()) if file.is_file() else {}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    output_dir: Path, trainable: dict[str, Tensor], optimizer, lr_scheduler, state: TrainState,
    generator: torch.Generator | None, keep_last: int, fingerprint: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> Path:
    """Write a checkpoint atomically: fill ``.tmp-step-N``, fsync, then rename to ``step-N``.

    A failed write (a full disk, a lost mount) removes the temporary directory, so it neither holds
    the space nor confuses the next resume, and stops with one sentence.
    """
    root = output_dir / "checkpoints"
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _fill_checkpoint(tmp, trainable, optimizer, lr_scheduler, state, generator, fingerprint, device)
    except Exception as error:
        if not is_write_failure(error):
            raise
        full = disk_is_full(error, root)
        shutil.rmtree(tmp, ignore_errors=True)
        then = "run again with --resume" if list_checkpoints(output_dir) else "run again with --overwrite"
        raise write_error(error, f"checkpoint {final}", full, then) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    # Newest steps survive by step number; the checkpoint just written always survives.
    for old in list_checkpoints(output_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_write_failure(error: BaseException) -> bool:
    """An OSError, or what torch.save / safetensors raise when the bytes cannot reach the disk."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    return any(marker in text for marker in ("iostream error", "PytorchStreamWriter", "No space left", "os error 28",
                                             "StorageFull", "IoError"))


def disk_is_full(error: BaseException, directory: Path) -> bool:
    """ENOSPC, or (torch.save hides the errno) less than 16 MiB left where the file was going."""
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or "os error 28" in str(error):
        return True
    with contextlib.suppress(OSError):
        return shutil.disk_usage(directory).free < (16 << 20)
    return False


def write_error(error: BaseException, what: str, full: bool, then: str = "run again") -> SipoError:
    """One sentence for a failed write: a full disk says to free space, anything else names the cause."""
    if full:
        return SipoError(f"the disk filled up while writing {what} (the partial files are removed); free space "
                         f"there or lower train.keep_last, then {then}")
    reason = getattr(error, "strerror", None) or error.__class__.__name__
    return SipoError(f"could not write {what} ({reason}); make train.output_dir a writable directory")


def _fill_checkpoint(tmp: Path, trainable, optimizer, lr_scheduler, state: TrainState, generator,
                     fingerprint: dict[str, Any] | None, device: torch.device | None) -> None:
    from sipo.performance import save_device_rng
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    # sipo's trainer keys every pair's noise by (seed, step, place) and passes no generator
    tensors = {"generator_state": generator.get_state()} if generator is not None else {}
    if state.ema is not None:
        tensors["ema"] = state.ema.cpu()
        tensors["ema_seen"] = state.ema_seen.cpu().to(torch.uint8)
    save_file(tensors, tmp / "rng_and_ema.safetensors")
    plain = {k: v for k, v in state.__dict__.items() if k not in ("ema", "ema_seen")}
    (tmp / "state.json").write_text(json.dumps(plain, indent=2))
    if fingerprint is not None:
        (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    if device is not None:
        save_device_rng(tmp, device)
    write_manifest(tmp)  # written last: marks completeness and lets a resume verify every byte
    for child in tmp.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)


def load_checkpoint(path: Path, trainable_module_params: dict[str, nn.Parameter], optimizer, lr_scheduler,
                    generator: torch.Generator | None = None) -> TrainState:
    """Restore weights, optimizer, lr schedule, RNG, EMA and counters; loads tensors only (no pickle code).

    ``generator``: restored from the checkpoint's ``generator_state`` when both exist. The trainer passes
    none: its noise is keyed by (seed, step, place), so a checkpoint of an older sipo that holds a noise
    stream resumes too, with the noise of its step numbers."""
    weights = load_file(path / "trainable.safetensors")
    missing = set(trainable_module_params) - set(weights)
    if missing:
        raise SipoError(
            f"checkpoint {path} does not match this model ({len(missing)} trainable tensors missing); "
            "resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, param in trainable_module_params.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    tensors = load_file(path / "rng_and_ema.safetensors")
    if generator is not None and "generator_state" in tensors:
        generator.set_state(tensors["generator_state"])
    state = TrainState(**json.loads((path / "state.json").read_text()))
    if "ema" in tensors:
        state.ema = tensors["ema"]
        state.ema_seen = tensors["ema_seen"].bool()
    return state


def load_run_weights(adapter: DiffusionAdapter, run_dir: str | Path, checkpoint: str | Path | None = None) -> SipoConfig:
    """Put a finished or interrupted run's trained weights into ``adapter`` (LoRA injected if needed).

    Reads the run's saved config and its latest intact checkpoint, or ``checkpoint`` (the one
    :func:`run_weights` named, so the weights loaded are the ones a digest was taken of; safetensors
    only). Returns that config.
    """
    import yaml

    weights_path = Path(checkpoint) if checkpoint is not None else run_weights(run_dir).checkpoint
    run_dir = run_directory_of(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise SipoError(f"{run_dir} is not a sipo run directory (needs config.yaml and checkpoints/step-*); pass the train.output_dir of a run")
    run_config = config_from_dict(yaml.safe_load(saved.read_text()))
    checkpoints = [weights_path]
    if run_config.model.family != adapter.family:
        raise SipoError(f"{run_dir} was trained on a {run_config.model.family} model, not {adapter.family}; pass a matching config")
    if run_config.train.finetune == "lora" and not any("lora_" in n for n, _ in adapter.denoiser.named_parameters()):
        add_lora(adapter, run_config)
    weights = load_file(checkpoints[-1] / "trainable.safetensors")
    params = dict(adapter.denoiser.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise SipoError(f"{checkpoints[-1]} holds weights this model lacks (e.g. {unknown[0]}); pass the config the run was trained with")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return run_config


def reference_with_weights(denoiser: nn.Module, checkpoint: str | Path) -> nn.Module:
    """A frozen copy of ``denoiser`` (LoRA already injected for a LoRA run) holding the trainable
    weights of ``checkpoint``'s ``trainable.safetensors``: ``train.reference_checkpoint``, the
    previous round's policy as the reference (sipo iterate --reference previous)."""
    import copy

    path = Path(checkpoint) / "trainable.safetensors"
    if not path.is_file():
        raise SipoError(f"train.reference_checkpoint {checkpoint} holds no trainable.safetensors; pass a checkpoint "
                        "folder of a run (checkpoints/step-N)")
    reference = copy.deepcopy(denoiser)
    weights = load_file(path)
    params = dict(reference.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise SipoError(f"train.reference_checkpoint {checkpoint} holds weights this model lacks (e.g. {unknown[0]}); "
                        "pass a checkpoint of a run of this config")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return reference.requires_grad_(False).eval()


@dataclass(frozen=True)
class RunWeights:
    """The trained weights a run holds now: its newest intact checkpoint and the sha256 of that
    checkpoint's ``trainable.safetensors`` (read from its verified manifest), which is what
    evaluation and analysis outputs are keyed by."""

    checkpoint: Path
    sha256: str

    @property
    def label(self) -> str:
        """``step-00000004-3fa9c2d1e0b7``: the checkpoint and the first 12 hex digits of its digest."""
        return f"{self.checkpoint.name}-{self.sha256[:12]}"


#: the folder ``train.keep_best`` keeps inside a run (sipo.validation.BEST_DIR)
BEST_DIR = "best"


def is_best_dir(path: str | Path) -> bool:
    """``RUN/best``: the weights keep_best chose (best.json beside trainable.safetensors), inside a run."""
    path = Path(path)
    return (path / "best.json").is_file() and (path.parent / "config.yaml").is_file()


def run_directory_of(path: str | Path) -> Path:
    """The run a ``--checkpoint`` names: ``RUN`` itself, or ``RUN`` for ``RUN/best``."""
    path = Path(path)
    return path.parent if is_best_dir(path) else path


def run_weights(run_dir: str | Path) -> RunWeights:
    """The weights :func:`load_run_weights` would load from ``run_dir``, with their digest; stops with one
    sentence when the directory holds no checkpoint (before anything is sampled or analysed).

    The rule every command follows (``sipo eval/analyze --checkpoint``, docs/evaluation.md): ``RUN``
    means the run's newest intact checkpoint (for a finished run, the final weights: the final
    checkpoint is written with them); ``RUN/best`` means the weights ``train.keep_best`` kept there."""
    run_dir = Path(run_dir)
    if is_best_dir(run_dir):
        trainable = run_dir / "trainable.safetensors"
        if not trainable.is_file():
            raise SipoError(f"{run_dir} was kept by an older sipo without trainable.safetensors, so its weights cannot "
                            f"be loaded as a checkpoint; load its {run_dir.name}/ LoRA with pipe.load_lora_weights, or "
                            "pass the run directory (its newest checkpoint)")
        return RunWeights(run_dir, _sha256(trainable))
    if not list_checkpoints(run_dir):
        raise SipoError(f"{run_dir} holds no checkpoint (checkpoints/step-*), so there are no trained weights to "
                        "use; pass the train.output_dir of a run that has written a checkpoint")
    newest, _ = newest_intact_checkpoint(run_dir)
    if newest is None:
        raise SipoError(f"every checkpoint under {run_dir}/checkpoints fails its manifest check; pass another run directory")
    entry = json.loads((newest / MANIFEST).read_text())["files"].get("trainable.safetensors")  # verified just now
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        entry = {"sha256": _sha256(newest / "trainable.safetensors")}
    return RunWeights(newest, entry["sha256"])


# ----------------------------------------------------------------------------- run fingerprints
#: keys a resumed run may change: they neither change what loads nor the data stream. Each change
#: is listed when the run resumes; any other difference stops the resume before anything is written.
RESUME_MAY_CHANGE = frozenset({
    "train.max_steps", "train.checkpoint_every", "train.log_every", "train.keep_last", "train.report_to",
    "train.max_bad_steps", "train.output_dir", "data.num_workers",
    "train.lora_format",  # which extra LoRA files are written beside the weights (sipo.export)
    # what validation looks at and when; it draws nothing from the training stream (sipo.validation)
    "train.validate_every", "train.sample_every", "train.sample_steps", "train.sample_guidance_scale",
    "train.validation_prompts", "train.validation_seeds", "train.validation_scorers", "train.validation_scorer_paths",
    "train.keep_best",
    # data moved or copied elsewhere: data.files (the files' digest) still has to match
    "data.path",
    # read afresh every step: the way out of a divergence stop is to lower these and resume
    "objective.beta", "objective.mask", "objective.tau", "objective.t_min", "objective.t_max", "train.max_grad_norm",
    # how the same computation runs, not what it computes (docs/performance.md): a resume may, e.g.,
    # switch the latent cache on or keep the text encoder on the CPU
    "train.compile", "train.deterministic", "data.use_cache", "data.cache_dir", "model.encode_chunk_size",
    "model.text_encoder_device", "model.prompt_cache_size", "train.compile_scope", "train.channels_last",
    "train.cudnn_benchmark", "data.prefetch_factor", "model.offload_frozen",
})
#: what else a resume may change with ``train.resume_new_data`` (sipo iterate: each round its own pairs and reference)
NEW_DATA_MAY_CHANGE = frozenset({"data.files", "train.resume_new_data", "train.reference_checkpoint"})
_HASH_WHOLE_FILE_BELOW = 16 << 20


def _file_signature(path: Path) -> str:
    """sha256 of a small file; of size + first and last MiB of a large one (shards can be GBs)."""
    size = path.stat().st_size
    if size <= _HASH_WHOLE_FILE_BELOW:
        return _sha256(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(size - (1 << 20))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def data_signature(data_path: str) -> str:
    """A short digest of the data files ``data.path`` names (a file, a directory, or a glob)."""
    import glob

    path = Path(data_path).expanduser()
    if "{" in data_path and not path.exists():  # a WebDataset brace list: the shards it names
        from sipo.data.webdataset import expand_braces

        files, root = sorted({Path(p) for item in expand_braces(str(path)) for p in glob.glob(item, recursive=True)
                              if Path(p).is_file()}), Path(".")
    elif path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        # hidden files and folders are not data: .sipo-cache/ (which `sipo cache` writes beside the data)
        files, root = sorted(p for p in path.rglob("*") if p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(path).parts)), path
    else:
        files, root = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()), Path(".")
    digest = hashlib.sha256()
    for file in files:
        with contextlib.suppress(OSError):
            digest.update(f"{file.relative_to(root) if file.is_relative_to(root) else file.name}:".encode())
            digest.update(_file_signature(file).encode())
    return f"{len(files)} files, sha256 {digest.hexdigest()[:16]}"


def run_fingerprint(config: SipoConfig, num_processes: int = 1) -> dict[str, Any]:
    """What identifies a run: every resolved config key, flat, plus digests of its data files and of
    the model's files (``model.files``: configs' contents, weight files' sizes and mtimes, the same
    description the latent cache's key uses), so base weights replaced in place stop a ``--resume``;
    and ``train.num_processes``, the third factor of the global batch (:func:`check_global_batch`)."""
    from sipo.data.cache import model_files_digest

    flat: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    flat["train.num_processes"] = int(num_processes)
    flat["data.files"] = data_signature(config.data.path)
    flat["model.files"] = model_files_digest(config.model)
    return json.loads(json.dumps(flat, default=str))  # the form it takes after a JSON round trip


#: the three factors of the global batch: a resume may change them when their product stays
LAYOUT_KEYS = ("train.batch_size", "train.gradient_accumulation_steps", "train.num_processes")


def _layout(values: dict[str, Any]) -> str:
    batch, accumulation, processes = (values[key] for key in LAYOUT_KEYS)
    return f"{batch} x {accumulation} x {processes} process{'es' if processes != 1 else ''}"


def check_global_batch(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str | None, str | None]:
    """``--resume``'s check of the global batch ``batch_size x gradient_accumulation_steps x processes``:
    ``(line, refusal)``.

    Another layout of the same global batch continues the run exactly (a pair's t and noise depend on its
    place in the step's batch, not on the layout): ``line`` says so (None when nothing changed). Another
    global batch gives ``refusal``, a phrase naming both and the fix. A checkpoint written before sipo
    recorded the processes (no ``train.num_processes``) gives neither: its keys are compared one by one.
    """
    if not all(key in saved for key in LAYOUT_KEYS) or not all(key in current for key in LAYOUT_KEYS):
        return None, None
    if all(saved[key] == current[key] for key in LAYOUT_KEYS):
        return None, None
    old, new = (math.prod(int(values[key]) for key in LAYOUT_KEYS) for values in (saved, current))
    if old != new:
        per_micro = int(current["train.batch_size"]) * int(current["train.num_processes"])
        fix = (f"train.gradient_accumulation_steps={old // per_micro} with this batch_size and these processes"
               if old % per_micro == 0 else f"a train.batch_size and train.gradient_accumulation_steps whose product "
               f"with the {current['train.num_processes']} processes is {old}")
        return None, (f"the global batch changed from {old} pairs per step (batch_size x gradient_accumulation_steps x "
                      f"processes = {_layout(saved)}) to {new} ({_layout(current)}), which would re-read or skip pairs "
                      f"and change what every step optimises: keep {old} with {fix}")
    return (f"the layout changed from {_layout(saved)} to {_layout(current)} (batch_size x gradient_accumulation_steps "
            f"x processes), the same global batch of {new} pairs per step; a pair's t and noise depend only on its "
            "place in that batch, so the run continues as it would have (to float rounding)"), None


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(allowed, refused)``: ``"key: old -> new"`` for each key that differs, split by ``RESUME_MAY_CHANGE``."""
    allowed, refused = [], []
    may_change = RESUME_MAY_CHANGE | (NEW_DATA_MAY_CHANGE if current.get("train.resume_new_data") else frozenset())
    for key in sorted(set(saved) | set(current)):
        if key in saved and key in current and saved[key] == current[key]:
            continue
        change = f"{key}: {saved.get(key, '(unset)')!r} -> {current.get(key, '(unset)')!r}"
        # a key sipo gained after the checkpoint was written cannot have been changed by the user
        (allowed if key in may_change or key not in saved else refused).append(change)
    return allowed, refused
