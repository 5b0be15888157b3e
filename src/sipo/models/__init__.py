"""Model families: a closed registry, one adapter module per family."""

from __future__ import annotations

import importlib

from sipo.errors import SipoError
from sipo.models.base import DiffusionAdapter, EncodedPairs, add_lora, lora_disabled

# family name -> "module:class" inside sipo.models; imported on use so `sipo --help` stays fast.
FAMILIES: dict[str, str] = {
    "sd15": "sipo.models.sd15:SD15Adapter",
    "digits": "sipo.models.digits:DigitsAdapter",
    "sdxl": "sipo.models.sdxl:SDXLAdapter",
    "cogvideox": "sipo.models.cogvideox:CogVideoXAdapter",
    "wan": "sipo.models.wan:WanAdapter",
    "wan_i2v": "sipo.models.wan_i2v:WanI2VAdapter",
    "flux": "sipo.models.flux:FluxAdapter",
    "sd3": "sipo.models.sd3:SD3Adapter",
    "qwenimage": "sipo.models.qwenimage:QwenImageAdapter",
    "flux2": "sipo.models.flux2:Flux2Adapter",
    "zimage": "sipo.models.zimage:ZImageAdapter",
    "qwenimage_edit": "sipo.models.qwenimage_edit:QwenImageEditPlusAdapter",
    "ltx2": "sipo.models.ltx2:LTX2Adapter",
    "hunyuanvideo15": "sipo.models.hunyuanvideo15:HunyuanVideo15Adapter",
}


def quiet_libraries() -> None:
    """sipo shows its own progress; the libraries' per-file loading bars and notices are noise here (the
    CLI, and every process a sweep or the demo spawns, which starts without the CLI's setting)."""
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


def adapter_class(family: str) -> type[DiffusionAdapter]:
    """The adapter class of ``family``; an unknown name stops with the list of known ones."""
    if family not in FAMILIES:
        raise SipoError(
            f"unknown model family {family!r}; set model.family to one of {sorted(FAMILIES)}"
        )
    module_name, class_name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_adapter(family: str, path: str, **options) -> DiffusionAdapter:
    """Load ``family`` from ``path`` after checking the directory holds that family."""
    cls = adapter_class(family)
    return cls.from_pretrained(path, **options)


def adapter_from_config(model_config, data_config=None) -> DiffusionAdapter:
    """Load the adapter a ``ModelConfig`` names, its encoders frozen: what train and analyze start from.

    ``data_config`` (the run's ``DataConfig``): the clip size a video family trains and samples at, for a
    family whose inference grid depends on it (ltx2: the shift grows with the token count); others ignore it.
    """
    clip = {}
    if data_config is not None:
        clip = dict(num_frames=data_config.num_frames, height=data_config.height or model_config.resolution,
                    width=data_config.width or model_config.resolution)
    adapter = load_adapter(
        model_config.family,
        model_config.pretrained_path,
        num_inference_steps=model_config.num_inference_steps,
        trust_remote_code=model_config.trust_remote_code,
        vae_path=model_config.vae_path or None,
        # video families: where T5/UMT5 lives and how many prompt embeddings to remember
        text_encoder_device=model_config.text_encoder_device,
        prompt_cache_size=model_config.prompt_cache_size,
        # flux, qwenimage: the inference grid of s depends on the run's resolution; flux: the distilled guidance value
        resolution=model_config.resolution,
        guidance=model_config.guidance,
        # flow families whose scheduler shifts only at inference (flux, qwenimage): train on the shifted grid
        training_sigmas=model_config.training_sigmas,
        **clip,
    )
    adapter.freeze_encoders()
    return adapter


def sampler_settings(model_config, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None) -> dict:
    """``{"num_inference_steps", "guidance_scale"}`` to sample ``model_config``'s family with: the family's
    own defaults (``DiffusionAdapter.sampler_defaults``: FLUX 28 steps at ``model.guidance``, SD3.5 28 at
    7.0, SDXL 5.0, Qwen-Image true_cfg 4.0, CogVideoX 6, Wan 5, SD1.5 50 at 7.5) where a value is None;
    a value the user gave wins."""
    settings = adapter_class(model_config.family).sampler_defaults(model_config)
    if num_inference_steps is not None:
        settings["num_inference_steps"] = int(num_inference_steps)
    if guidance_scale is not None:
        settings["guidance_scale"] = float(guidance_scale)
    return settings


__all__ = ["adapter_from_config", "quiet_libraries", "sampler_settings", "add_lora", "FAMILIES", "DiffusionAdapter", "EncodedPairs", "adapter_class", "load_adapter", "lora_disabled"]
