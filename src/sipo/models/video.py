"""Plumbing shared by the video families (CogVideoX, Wan2.1); no math lives here.

Both load a transformer, a 3D VAE, a T5-family text encoder and its tokenizer from a local
diffusers directory; both encode a batch of clips one clip at a time (a 49-frame 480x720 clip is
already a large VAE pass); both encode prompts through their own diffusers pipeline's
``encode_prompt``, so the conditioning is exactly what the pipeline would feed the transformer.

The text encoders of these families are T5-XXL / UMT5-XXL (4.7B / 5.7B parameters, 19 / 23 GB in
float32). Two things keep them off the training step's critical path without the latent cache:
``text_encoder_device="cpu"`` leaves the encoder in host memory when the adapter moves to the GPU,
and ``prompt_cache_size > 0`` remembers the embedding of each recently seen prompt (LRU), so a
prompt is encoded once however many pairs share it. ``sipo cache`` (when present) goes further and
stores every embedding on disk through `encode_prompts`.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning, DiffusionAdapter, check_lora_state_dict, read_model_index

TEXT_ENCODER_DEVICES = ("auto", "cpu")


def load_component(path: str | Path, subfolder: str, index: dict[str, Any], default: type) -> Any:
    """Load ``subfolder`` with the class ``model_index.json`` names (a library + class pair).

    Only classes of ``diffusers`` and ``transformers`` are accepted (closed dispatch: a model
    directory never names arbitrary code); others fall back to ``default``.
    """
    library, class_name = (index.get(subfolder) or [None, None])[:2]
    cls = default
    if library in ("diffusers", "transformers") and class_name:
        cls = getattr(importlib.import_module(library), class_name, default)
    return cls.from_pretrained(str(path), subfolder=subfolder)


class VideoAdapter(DiffusionAdapter):
    """What CogVideoX and Wan share: components, prompt memo, text-encoder placement, saving."""

    #: the diffusers pipeline class (a name in ``diffusers``) used for prompts, sampling and LoRA files
    pipeline_class_name: ClassVar[str]
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        *,
        text_encoder_device: str = "auto",
        prompt_cache_size: int = 0,
    ) -> None:
        if text_encoder_device not in TEXT_ENCODER_DEVICES:
            raise SipoError(
                f"model.text_encoder_device={text_encoder_device!r} is not valid; choose one of {list(TEXT_ENCODER_DEVICES)}"
            )
        self.denoiser = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.text_encoder_device = text_encoder_device
        self.prompt_cache_size = max(0, int(prompt_cache_size))
        self._prompt_memo: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._prompt_pipeline = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_inference_steps: int = 50,
        trust_remote_code: bool = False,
        text_encoder_device: str = "auto",
        prompt_cache_size: int = 0,
        **ignored: Any,
    ) -> "VideoAdapter":
        """Load a local directory of the family's pipeline; nothing executes code from it."""
        path = cls.check_pipeline_directory(path)
        index = read_model_index(path)
        try:
            parts = cls.load_components(path, index)
        except OSError as error:
            raise SipoError(f"could not load the {cls.family} model from {path}: {error}") from error
        return cls(
            **parts, num_inference_steps=num_inference_steps,
            text_encoder_device=text_encoder_device, prompt_cache_size=prompt_cache_size,
        )

    @classmethod
    def load_components(cls, path: Path, index: dict[str, Any]) -> dict[str, Any]:
        """``transformer``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` from ``path``."""
        raise NotImplementedError

    def pipeline(self, **overrides: Any):
        """The family's diffusers pipeline over this adapter's components (no copy of any weight)."""
        import diffusers

        parts = dict(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
            transformer=self.denoiser, scheduler=self.scheduler,
        )
        parts.update(overrides)
        pipe = getattr(diffusers, self.pipeline_class_name)(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder]

    def to(self, device: torch.device | str) -> "VideoAdapter":
        self.denoiser.to(device)
        self.vae.to(device)
        if self.text_encoder_device == "auto":
            self.text_encoder.to(device)
        return self

    # ------------------------------------------------------------------ encoding
    @property
    def max_sequence_length(self) -> int:
        raise NotImplementedError

    def _encode_prompts_uncached(self, prompts: list[str]) -> Tensor:
        """``[N, L, dim]`` through the pipeline's own ``encode_prompt``, on the text encoder's device."""
        if self._prompt_pipeline is None:
            self._prompt_pipeline = self.pipeline()
        device = next(self.text_encoder.parameters()).device
        embeds, _ = self._prompt_pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=device,
        )
        return embeds

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``{"encoder_hidden_states": [N, L, dim]}`` on the denoiser's device.

        A family whose ``_encode_prompts_uncached`` returns a dict of ``[N, ...]`` tensors (LTX-2, HunyuanVideo
        1.5: states and attention masks) gets that dict. With ``prompt_cache_size > 0`` each prompt is encoded
        once while it stays among the ``prompt_cache_size`` most recently used ones (kept in host memory).
        """
        device = self.device
        if self.prompt_cache_size == 0:
            encoded = self._encode_prompts_uncached(prompts)
            if isinstance(encoded, dict):
                return {name: value.to(device) for name, value in encoded.items()}
            return {"encoder_hidden_states": encoded.to(device)}
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_memo))
        if missing:
            encoded = self._encode_prompts_uncached(missing)
            if not isinstance(encoded, dict):
                encoded = {"encoder_hidden_states": encoded}
            for index, prompt in enumerate(missing):
                self._prompt_memo[prompt] = {name: value[index].cpu() for name, value in encoded.items()}
        for prompt in prompts:
            self._prompt_memo.move_to_end(prompt)
        names = self._prompt_memo[prompts[0]].keys()
        stacked = {name: torch.stack([self._prompt_memo[p][name] for p in prompts]).to(device) for name in names}
        while len(self._prompt_memo) > self.prompt_cache_size:
            self._prompt_memo.popitem(last=False)
        return stacked

    def check_video_shape(self, videos: Tensor) -> None:
        """Frames ``1 + k * temporal_ratio`` and sides divisible by the VAE's and patch's factors."""
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"expected videos [N, F, 3, H, W] in [-1, 1], got {tuple(videos.shape)}")
        frames, height, width = videos.shape[1], videos.shape[3], videos.shape[4]
        ratio, side = self.temporal_compression, self.spatial_multiple
        if (frames - 1) % ratio:
            raise SipoError(
                f"{self.family} needs 1 + {ratio}k frames per clip, got {frames}; set data.num_frames to "
                f"{(frames - 1) // ratio * ratio + 1} (or e.g. {self.default_num_frames})"
            )
        if height % side or width % side:
            raise SipoError(
                f"{self.family} needs frame sides divisible by {side}, got {height}x{width}; set data.height "
                f"and data.width to multiples of {side} (default {self.default_height}x{self.default_width})"
            )

    @torch.no_grad()
    def encode_images(self, videos: Tensor) -> Tensor:
        """``[N, F, 3, H, W]`` in ``[-1, 1]`` -> float32 model-space ``x0``, one clip per VAE pass."""
        self.check_video_shape(videos)
        param = next(self.vae.parameters())
        latents = [
            self.encode_clip(clip.unsqueeze(0).to(device=param.device, dtype=param.dtype)).float()
            for clip in videos
        ]
        return torch.cat(latents, dim=0)

    # ------------------------------------------------------------------ family specifics
    temporal_compression: int = 4
    spatial_multiple: int = 16
    default_num_frames: int = 49
    default_height: int = 480
    default_width: int = 720
    default_guidance_scale: float = 6.0

    def encode_clip(self, clip: Tensor) -> Tensor:
        """One clip ``[1, F, 3, H, W]`` -> its ``x0`` ``[1, ...]`` in the transformer's layout."""
        raise NotImplementedError

    # ------------------------------------------------------------------ saving
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """``pytorch_lora_weights.safetensors`` for the family pipeline's ``load_lora_weights``.

        peft's key names are what the transformer LoRA loaders of diffusers read (their own
        training examples save them unconverted); the ``LoraConfig`` (rank, alpha) goes into the
        file's metadata so the loader restores the trained scale.
        """
        import diffusers

        check_lora_state_dict(lora_state_dict)
        getattr(diffusers, self.pipeline_class_name).save_lora_weights(
            save_directory=str(output_dir),
            transformer_lora_layers=lora_state_dict,
            transformer_lora_adapter_metadata=self.lora_config_dict(),
            safe_serialization=True,
        )

    def save_full(self, output_dir: str | Path) -> None:
        """The fine-tuned transformer in diffusers format, where the pipeline looks for it."""
        self.denoiser.save_pretrained(Path(output_dir) / "transformer", safe_serialization=True)

    # ------------------------------------------------------------------ random-weight builders
    @classmethod
    def save_random_pipeline(
        cls, directory: str | Path, parts: dict[str, Any], torch_dtype: torch.dtype, cast: tuple[str, ...]
    ) -> Path:
        """Save ``parts`` as the family's pipeline in diffusers format; returns ``directory``.

        The modules named in ``cast`` (when present: a builder may leave out the text encoder)
        are held in ``torch_dtype`` first; the rest stay as built.
        """
        import diffusers

        if torch_dtype != torch.float32:
            for name in cast:
                if parts.get(name) is not None:
                    parts[name].to(torch_dtype)
        pipe = getattr(diffusers, cls.pipeline_class_name)(**parts)
        pipe.save_pretrained(str(directory), safe_serialization=True)
        return Path(directory)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        negative_prompt: str = "",
        **pipeline_options: Any,
    ) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` through the family's diffusers pipeline.

        Prompts are encoded by `encode_prompts` (so a CPU-resident text encoder works) and passed
        to the pipeline as embeddings; the family's defaults fill unset sizes and guidance.
        """
        prompts = list(prompts)
        positive = self.encode_prompts(prompts)["encoder_hidden_states"]
        negative = self.encode_prompts([negative_prompt] * len(prompts))["encoder_hidden_states"]
        dtype = next(self.denoiser.parameters()).dtype
        pipe = self.pipeline()
        frames = pipe(
            prompt_embeds=positive.to(dtype),
            negative_prompt_embeds=negative.to(dtype),
            num_frames=num_frames or self.default_num_frames,
            height=height or self.default_height,
            width=width or self.default_width,
            num_inference_steps=num_inference_steps or self.default_num_inference_steps,
            guidance_scale=self.default_guidance_scale if guidance_scale is None else guidance_scale,
            generator=generator,
            output_type="pt",
            max_sequence_length=self.max_sequence_length,
            **pipeline_options,
        ).frames
        return frames.float().clamp(0, 1)
