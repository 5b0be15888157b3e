"""LoRA files in the layouts other tools read (``train.lora_format``, ``sipo export``).

sipo's own LoRA file is diffusers': ``pytorch_lora_weights.safetensors``, keys
``<component>.<module path>.lora.down.weight`` / ``.lora.up.weight`` and the peft ``LoraConfig``
(rank, ``lora_alpha``) in its metadata. ComfyUI's LoRA loader reads the kohya layout instead:
one name per adapted module, ``<prefix><module path with "." -> "_">``, holding
``.lora_down.weight`` (rank x in), ``.lora_up.weight`` (out x rank) and ``.alpha`` (a scalar;
the update is scaled by alpha / rank, as peft scales by lora_alpha / r). Which prefix ComfyUI maps
to which model is its loader's business (comfy/lora.py, ``model_lora_keys_unet``):

- UNet families (sd15, sdxl): ``lora_unet_`` + the diffusers UNet path, which ComfyUI maps through
  its diffusers->UNet key table (the same names kohya's SD1.5 trainer writes);
- MMDiT / Flux (sd3, flux): ``lora_transformer_`` + the diffusers transformer path (OneTrainer's
  layout, mapped through ComfyUI's diffusers->MMDiT and diffusers->Flux tables, fused qkv included).

The other families (wan, qwenimage, cogvideox, digits) are refused: ComfyUI reads their LoRA in the
original model's own module names, and sipo holds no tested map from diffusers' names to those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from sipo.errors import SipoError

#: sipo's diffusers LoRA file (every family's ``save_lora`` writes it)
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
#: the ComfyUI file written beside it
COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"
LORA_FORMATS = ("diffusers", "comfyui")
#: family -> the key prefix ComfyUI's loader maps to that family's denoiser
COMFYUI_PREFIX = {"sd15": "lora_unet_", "sdxl": "lora_unet_", "sd3": "lora_transformer_", "flux": "lora_transformer_"}

# the down (A) and up (B) matrices as each writer names them: diffusers' file, and peft's own names
_DOWN = (".lora.down.weight", ".lora_A.weight", ".lora_A.default.weight")
_UP = (".lora.up.weight", ".lora_B.weight", ".lora_B.default.weight")


def check_comfyui_family(family: str, fix: str = "set train.lora_format=diffusers") -> None:
    """``train.lora_format=comfyui`` / ``sipo export --format comfyui`` stop here for a family without a
    layout; ``fix`` is the way out where the call comes from (a training key, or the run's own file)."""
    if family not in COMFYUI_PREFIX:
        raise SipoError(f"a ComfyUI LoRA layout is written for {sorted(COMFYUI_PREFIX)} only, not {family} (ComfyUI reads "
                        f"{family} LoRA in the original model's module names, which sipo does not map); {fix}")


def comfyui_state_dict(lora: Mapping[str, Tensor], family: str, lora_alpha: float) -> dict[str, Tensor]:
    """``lora`` (diffusers file keys, or peft's ``named_parameters`` / ``get_peft_model_state_dict`` keys)
    in ComfyUI's key layout, with one ``.alpha`` per module (``lora_alpha``: the scale is alpha / rank)."""
    check_comfyui_family(family)
    prefix = COMFYUI_PREFIX[family]
    out: dict[str, Tensor] = {}
    for key, tensor in lora.items():
        path, kind = _module_path(key)
        name = prefix + path.replace(".", "_")
        out[f"{name}.lora_{kind}.weight"] = tensor.detach().cpu().contiguous()
        out.setdefault(f"{name}.alpha", torch.tensor(float(lora_alpha)))
    downs = {k[: -len(".lora_down.weight")] for k in out if k.endswith(".lora_down.weight")}
    ups = {k[: -len(".lora_up.weight")] for k in out if k.endswith(".lora_up.weight")}
    if downs != ups or not downs:
        raise SipoError("the LoRA file holds down and up matrices that do not pair up (or none at all); "
                        "write it again with sipo train")
    return out


def _module_path(key: str) -> tuple[str, str]:
    """(module path inside the denoiser, "down" or "up") of one LoRA tensor's key."""
    for suffixes, kind in ((_DOWN, "down"), (_UP, "up")):
        for suffix in suffixes:
            if key.endswith(suffix):
                path = key[: -len(suffix)]
                for component in ("unet.", "transformer."):  # the diffusers file's component prefix
                    if path.startswith(component):
                        return path[len(component):], kind
                return path, kind
    raise SipoError(f"LoRA tensor {key!r} is neither a down nor an up matrix; only plain LoRA (no DoRA, no bias) "
                    "is exported to ComfyUI")


def lora_alpha_of(lora_file: Path, fallback: float | None = None) -> float:
    """``lora_alpha`` from the diffusers file's stored ``LoraConfig`` (``fallback``, then the rank, without one)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as handle:
        metadata = handle.metadata() or {}
        rank = None
        for key in handle.keys():
            if key.endswith(_DOWN):
                rank = handle.get_slice(key).get_shape()[0]
                break
    stored = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    for key, value in stored.items():
        if key.split(".")[-1] in ("use_dora", "use_rslora") and value:
            raise SipoError(f"{lora_file} is a {key.split('.')[-1][4:]} LoRA, which ComfyUI's lora_up/lora_down layout "
                            "cannot express; export a plain LoRA")
    for key, value in stored.items():
        if key.split(".")[-1] == "lora_alpha" and value is not None:
            return float(value)
    if fallback is not None:
        return float(fallback)
    return float(rank) if rank is not None else 1.0


def write_comfyui(lora_file: str | Path, family: str, out: str | Path | None = None,
                  lora_alpha: float | None = None) -> Path:
    """Write the ComfyUI file of the diffusers LoRA file ``lora_file`` (default: beside it, ``COMFYUI_FILE``)."""
    from safetensors.torch import load_file, save_file

    lora_file = Path(lora_file)
    if not lora_file.is_file():
        raise SipoError(f"{lora_file} does not exist; export a run that finished (or pass its best/ folder)")
    alpha = lora_alpha_of(lora_file, lora_alpha)
    tensors = comfyui_state_dict(load_file(str(lora_file)), family, alpha)
    target = Path(out) if out is not None else lora_file.with_name(COMFYUI_FILE)
    return _save_atomically(tensors, target, family, alpha, save_file)


def write_checkpoint_comfyui(checkpoint_dir: Path, trainable: Mapping[str, Tensor], family: str,
                             lora_alpha: float) -> Path:
    """The ComfyUI file of a checkpoint's trainable LoRA tensors, inside the checkpoint folder.

    Written after the checkpoint's manifest, which it is not part of: a resume never reads it."""
    from safetensors.torch import save_file

    tensors = comfyui_state_dict(trainable, family, lora_alpha)
    return _save_atomically(tensors, Path(checkpoint_dir) / COMFYUI_FILE, family, lora_alpha, save_file)


def _save_atomically(tensors: dict[str, Tensor], target: Path, family: str, alpha: float, save_file) -> Path:
    import os

    tmp = target.with_name(f".tmp-{target.name}")
    save_file(tensors, str(tmp), metadata={"format": "pt", "sipo_family": family, "ss_network_alpha": f"{alpha:g}",
                                           "ss_network_module": "networks.lora"})
    os.replace(tmp, target)
    return target


def write_lora_formats(output_dir: str | Path, config: Any) -> list[Path]:
    """After a ``save_lora`` into ``output_dir``: the extra files ``train.lora_format`` asks for."""
    if not _wants_comfyui(config):
        return []
    return [write_comfyui(Path(output_dir) / DIFFUSERS_FILE, config.model.family, lora_alpha=config.train.lora_alpha)]


def write_checkpoint_formats(checkpoint_dir: str | Path, trainable: Mapping[str, Tensor], config: Any) -> list[Path]:
    """After a ``save_checkpoint``: the extra files ``train.lora_format`` asks for, in the checkpoint."""
    if not _wants_comfyui(config):
        return []
    return [write_checkpoint_comfyui(Path(checkpoint_dir), trainable, config.model.family, config.train.lora_alpha)]


def _wants_comfyui(config: Any) -> bool:
    tc = config.train
    return tc.finetune == "lora" and getattr(tc, "lora_format", "diffusers") == "comfyui"


def export_run(run_dir: str | Path, lora_format: str = "comfyui") -> list[Path]:
    """``sipo export``: the ``lora_format`` files of a finished run (its final weights and best/),
    and of each of its checkpoints (from their trainable tensors and the run's config)."""
    from safetensors.torch import load_file

    from sipo.checkpoints import checkpoint_step, list_checkpoints
    from sipo.config import load_config

    from sipo.checkpoints import is_best_dir

    run_dir = Path(run_dir).expanduser()
    if lora_format not in LORA_FORMATS:
        raise SipoError(f"--format {lora_format} is not known; choose one of {list(LORA_FORMATS)}")
    if is_best_dir(run_dir):  # RUN/best: its own files only, with the run's config
        return _export_best(run_dir, lora_format)
    if not (run_dir / "config.yaml").is_file():
        raise SipoError(f"{run_dir} holds no config.yaml, so it is no sipo run; pass the run's train.output_dir")
    config = load_config(str(run_dir / "config.yaml"))
    if config.train.finetune != "lora":
        raise SipoError(f"{run_dir} is a full fine-tune (train.finetune=full), which has no LoRA file to export")
    if lora_format == "diffusers":  # what sipo writes anyway: name the files that exist, never one that does not
        present = [folder / DIFFUSERS_FILE for folder in (run_dir, run_dir / "best") if (folder / DIFFUSERS_FILE).is_file()]
        if not present:
            newest = list_checkpoints(run_dir)
            where = (f"it stopped before its end, and its newest checkpoint {newest[-1].name} holds the weights in "
                     "sipo's resume layout" if newest else "it has written no weights yet")
            hold = (f"; or add train.max_steps={checkpoint_step(newest[-1])} to write it from {newest[-1].name} without "
                    "training further") if newest else ""
            raise SipoError(f"{run_dir} holds no {DIFFUSERS_FILE} ({where}); finish the run with `sipo train --config "
                            f"{run_dir / 'config.yaml'} --resume`{hold}")
        return present
    family, alpha = config.model.family, config.train.lora_alpha
    check_comfyui_family(family, f"use the run's diffusers file {run_dir / DIFFUSERS_FILE} (`sipo export --run "
                                 f"{run_dir} --format diffusers` names it), which diffusers' {family} "
                                 "pipeline loads with pipe.load_lora_weights")
    written = [write_comfyui(folder / DIFFUSERS_FILE, family, lora_alpha=alpha)
               for folder in (run_dir, run_dir / "best") if (folder / DIFFUSERS_FILE).is_file()]
    for checkpoint in list_checkpoints(run_dir):
        trainable = load_file(str(checkpoint / "trainable.safetensors"))
        written.append(write_checkpoint_comfyui(checkpoint, trainable, family, alpha))
    if not written:
        raise SipoError(f"{run_dir} holds no LoRA weights yet ({DIFFUSERS_FILE} or a checkpoint); export it after "
                        "training")
    return written


def _export_best(best: Path, lora_format: str) -> list[Path]:
    """``sipo export --run RUN/best``: the ``lora_format`` file of the weights train.keep_best kept."""
    from sipo.config import load_config

    config = load_config(str(best.parent / "config.yaml"))
    if config.train.finetune != "lora":
        raise SipoError(f"{best} holds a full fine-tune (train.finetune=full), which has no LoRA file to export")
    if not (best / DIFFUSERS_FILE).is_file():
        raise SipoError(f"{best} holds no {DIFFUSERS_FILE}; pass the run directory {best.parent} instead")
    if lora_format == "diffusers":
        return [best / DIFFUSERS_FILE]
    check_comfyui_family(config.model.family, f"use {best / DIFFUSERS_FILE} (diffusers' layout)")
    return [write_comfyui(best / DIFFUSERS_FILE, config.model.family, lora_alpha=config.train.lora_alpha)]
