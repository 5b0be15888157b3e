"""Qwen-Image-Edit-Plus (``QwenImageEditPlusPipeline``): Qwen-Image's transformer, VAE and schedule, conditioned
on an input image that both sides of a pair edit.

Conventions followed: diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py (how the input image reaches
the transformer; its ``__call__`` and ``_get_qwen_prompt_embeds``), and for everything it shares with Qwen-Image
the `QwenImageAdapter` this class extends (latent normalisation, 2x2 packing, ``timestep = sigma``, the dynamic
shift of the sigma grid from the OUTPUT image's token count, as the pipeline's ``calculate_shift(latents.shape[1])``).
diffusers ships no LoRA training script for the edit pipelines; the LoRA targets and file layout are those of
its Qwen-Image script (train_dreambooth_lora_qwen_image.py), which QwenImageEditPlusPipeline loads with the same
``QwenImageLoraLoaderMixin``.

The input image conditions twice, as in the pipeline:

- its VAE latents (posterior mode, normalised as the pipeline's ``_encode_vae_image``), packed into 2x2 patches
  and concatenated along the sequence AFTER the noisy latents' tokens, with a second entry in ``img_shapes`` for
  their RoPE positions; only the first (output) tokens of the transformer's answer are the prediction (the
  pipeline's ``noise_pred[:, : latents.size(1)]``). They are conditioning (``image_latents``), never noised and
  never in the loss. The pipeline encodes the input at the 1024x1024-pixel area (``VAE_IMAGE_SIZE``); the
  adapter at the run's ``model.resolution`` (default 1024: the same picture).
- the image itself, resized to the 384x384-pixel area (``CONDITION_IMAGE_SIZE``, the pipeline's
  ``calculate_dimensions`` and ``image_processor.resize``), goes with the prompt through Qwen2.5-VL's processor
  and the edit template (``"Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + prompt``; the pipeline's
  ``encode_prompt``, called here), so the text states depend on the image: the latent cache stores them per pair.

Every pair's states are padded with zeros to ``prompt_length`` (512) tokens with their mask (the image's 196
vision tokens at 384 px plus the instruction), so the cache stacks them; a longer instruction stops with one
sentence. SIPO's ``s`` is the next sigma of the pipeline's own n-step grid (``linspace(1, 1/n, n)`` shifted
with ``mu``), exactly as for Qwen-Image (`shifted_flow_sigmas`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning
from sipo.models.qwenimage import (
    FULL_TEXT_ENCODER_CONFIG,
    FULL_TRANSFORMER_CONFIG,
    SCHEDULER_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_TRANSFORMER_CONFIG,
    TINY_VAE_CONFIG,
    QwenImageAdapter,
)

#: Qwen/Qwen-Image-Edit-2509 transformer/config.json: Qwen-Image's 60-block MMDiT (20.43B parameters)
FULL_EDIT_TRANSFORMER_CONFIG: dict[str, Any] = dict(FULL_TRANSFORMER_CONFIG)
#: its processor's image side: Qwen2.5-VL's 14-pixel patches merged 2x2, 2 frames per temporal patch
FULL_IMAGE_PROCESSOR_CONFIG: dict[str, Any] = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
#: the tiny vision tower of TINY_TEXT_ENCODER_CONFIG: 2-pixel patches; a 32-px picture gives 64 vision tokens
TINY_IMAGE_PROCESSOR_CONFIG: dict[str, Any] = dict(patch_size=2, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=16 * 16, max_pixels=64 * 64)
#: text + vision tokens every pair's states are padded to (an instruction past it stops with one sentence)
EDIT_PROMPT_LENGTH = 512
#: the vision markers of Qwen2.5-VL's vocabulary the edit template uses
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


class VisionLanguageProcessor:
    """``Qwen2VLProcessor``'s ``__call__`` for text and still images, without its video half.

    transformers 5 builds a ``Qwen2VLProcessor`` only with its video processor, which needs torchvision; the
    edit pipeline calls ``processor(text=..., images=..., padding=True, return_tensors="pt")`` with pictures
    only. This does what that call does (transformers/models/qwen2_vl/processing_qwen2_vl.py): the image
    processor's ``pixel_values`` and ``image_grid_thw``, each ``<|image_pad|>`` of the text repeated
    ``prod(grid_thw) / merge_size^2`` times in order, then the tokenizer. Used where torchvision is absent; the
    folder it reads (``processor/``: tokenizer + ``preprocessor_config.json``) is the one ``Qwen2VLProcessor``
    reads, so a machine with torchvision loads the real processor from the same files.
    """

    image_token = "<|image_pad|>"

    def __init__(self, image_processor, tokenizer) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, source: str, subfolder: str = "processor") -> "VisionLanguageProcessor":
        import transformers
        from transformers import Qwen2Tokenizer

        return cls(transformers.Qwen2VLImageProcessorPil.from_pretrained(source, subfolder=subfolder),
                   Qwen2Tokenizer.from_pretrained(source, subfolder=subfolder))

    def __call__(self, text: list[str], images=None, padding: bool = True, return_tensors: str = "pt", **options: Any):
        from transformers import BatchFeature

        image_inputs = dict(self.image_processor(images=images, return_tensors=return_tensors)) if images else {}
        counts = iter((image_inputs["image_grid_thw"].prod(dim=-1) // self.image_processor.merge_size**2).tolist()
                      if images else [])
        expanded = []
        for line in text:
            while self.image_token in line:
                line = line.replace(self.image_token, "<|placeholder|>" * int(next(counts)), 1)
            expanded.append(line.replace("<|placeholder|>", self.image_token))
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**encoded, **image_inputs})

    def save_pretrained(self, directory: str | Path) -> None:
        self.image_processor.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))


def load_processor(source: str):
    """``processor/`` of a Qwen-Image-Edit directory: transformers' ``Qwen2VLProcessor`` where torchvision is
    installed (it needs it), else `VisionLanguageProcessor` over the same files."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return VisionLanguageProcessor.from_pretrained(source, subfolder="processor")
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor.from_pretrained(source, subfolder="processor")


def to_pil(picture: Tensor):
    """``[3, H, W]`` in ``[-1, 1]`` -> an 8-bit RGB PIL image (exact for pictures the data decoder made)."""
    from PIL import Image

    pixels = ((picture.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


class QwenImageEditPlusAdapter(QwenImageAdapter):
    """Qwen-Image-Edit-Plus: the transformer trains; VAE, Qwen2.5-VL and its processor stay frozen."""

    family = "qwenimage_edit"
    pipeline_class_names = ("QwenImageEditPlusPipeline",)
    needs_input_image = True
    components = {**QwenImageAdapter.components, "processor": "Qwen2VLProcessor (Qwen2.5-VL's image + text processor)"}
    prompt_length = EDIT_PROMPT_LENGTH
    default_guidance_scale = 4.0  # the pipeline's true_cfg_scale in its example

    def __init__(self, transformer, vae, text_encoder, tokenizer, processor, scheduler, **options: Any):
        self.processor = processor
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, **options)

    @classmethod
    def from_pretrained(cls, path: str | Path, num_inference_steps: int = 50, trust_remote_code: bool = False,
                        resolution: int | None = None, text_encoder_device: str = "auto",
                        training_sigmas: str = "scheduler", **ignored: Any) -> "QwenImageEditPlusAdapter":
        """Load a ``QwenImageEditPlusPipeline`` directory (or hub id where online); nothing executes code from it."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        source, _ = cls.locate_pipeline(path)
        try:
            parts = dict(
                transformer=QwenImageTransformer2DModel.from_pretrained(source, subfolder="transformer"),
                vae=AutoencoderKLQwenImage.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32),
                text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(source, subfolder="text_encoder"),
                tokenizer=Qwen2Tokenizer.from_pretrained(source, subfolder="tokenizer"),
                processor=load_processor(source),
                scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler"),
            )
        except OSError as error:
            raise SipoError(f"could not load the qwenimage_edit model from {source}: {error}") from error
        return cls(**parts, num_inference_steps=num_inference_steps, resolution=resolution,
                   text_encoder_device=text_encoder_device, training_sigmas=training_sigmas)

    def pipeline(self, **overrides: Any):
        """``QwenImageEditPlusPipeline`` over this adapter's components (no copy of any weight)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

        parts = dict(transformer=self.denoiser, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                     processor=self.processor,
                     scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config))
        parts.update(overrides)
        pipe = QwenImageEditPlusPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ encoding
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise SipoError("the qwenimage_edit family reads every prompt with its input image; give each pair an "
                        "input_image (docs/data.md)")

    @staticmethod
    def condition_image(picture: Tensor):
        """What the pipeline shows Qwen2.5-VL: the input at the ``CONDITION_IMAGE_SIZE`` area (its own resize)."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module
        from diffusers.image_processor import VaeImageProcessor

        image = to_pil(picture)
        width, height = module.calculate_dimensions(module.CONDITION_IMAGE_SIZE, image.width / image.height)
        return VaeImageProcessor().resize(image, height, width)

    def prompt_states(self, prompt: str, picture: Tensor) -> tuple[Tensor, Tensor]:
        """``(states [L, dim], mask [L])`` of one instruction with its input image, by the pipeline's ``encode_prompt``."""
        if self._pipeline is None:
            self._pipeline = self.pipeline()
        device = next(self.text_encoder.parameters()).device
        states, mask = self._pipeline.encode_prompt(prompt=[prompt], image=[self.condition_image(picture)], device=device)
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        if states.shape[1] > self.prompt_length:
            raise SipoError(f"the instruction {prompt[:60]!r} and its input image make {states.shape[1]} text tokens, more "
                            f"than the {self.prompt_length} qwenimage_edit pads to; shorten the instruction")
        return states[0], mask[0]

    @torch.no_grad()
    def encode_inputs(self, prompts: list[str], input_images: Tensor, num_frames: int | None = None) -> Conditioning:
        """Instructions + input images -> ``encoder_hidden_states`` ``[N, prompt_length, dim]`` (zero-padded),
        ``encoder_hidden_states_mask`` ``[N, prompt_length]`` and ``image_latents`` ``[N, 16, H/8, W/8]``
        (the input's normalised VAE latents), on the denoiser's device."""
        if input_images.ndim != 4 or input_images.shape[0] != len(prompts):
            raise ValueError(f"expected one input image [N, 3, H, W] per prompt, got {tuple(input_images.shape)}")
        states, masks = [], []
        for prompt, picture in zip(prompts, input_images):
            state, mask = self.prompt_states(prompt, picture)
            padding = self.prompt_length - state.shape[0]
            states.append(torch.nn.functional.pad(state.float(), (0, 0, 0, padding)))
            masks.append(torch.nn.functional.pad(mask.long(), (0, padding)))
        return {"encoder_hidden_states": torch.stack(states).to(self.device),
                "encoder_hidden_states_mask": torch.stack(masks).to(self.device),
                "image_latents": self.encode_images(input_images).to(self.device)}

    # ------------------------------------------------------------------ denoiser
    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` ``[B, 16, h, w]`` of the output image: noisy tokens then the input's tokens, as
        QwenImageEditPlusPipeline calls its transformer; the answer's first ``h/2 * w/2`` tokens, unpacked."""
        from diffusers import QwenImagePipeline

        model = self.denoiser if denoiser is None else denoiser
        batch, channels, height, width = x_t.shape
        image_latents = conditioning["image_latents"].to(x_t.dtype)
        input_height, input_width = image_latents.shape[-2:]
        packed = QwenImagePipeline._pack_latents(x_t, batch, channels, height, width)
        packed_input = QwenImagePipeline._pack_latents(image_latents, batch, channels, input_height, input_width)
        output = model(
            hidden_states=torch.cat([packed, packed_input], dim=1),
            timestep=self.model_timesteps(timesteps),
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            encoder_hidden_states_mask=conditioning["encoder_hidden_states_mask"],
            img_shapes=[[(1, height // 2, width // 2), (1, input_height // 2, input_width // 2)]] * batch,
            return_dict=False,
        )[0][:, : packed.shape[1]]
        pixels = (height * self.vae_scale_factor, width * self.vae_scale_factor)
        return QwenImagePipeline._unpack_latents(output, *pixels, self.vae_scale_factor)[:, :, 0]

    # ------------------------------------------------------------------ saving
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """``pytorch_lora_weights.safetensors`` for ``QwenImageEditPlusPipeline.load_lora_weights`` (the Qwen-Image
        loader, peft key names), with the ``LoraConfig`` in the file's metadata."""
        from diffusers import QwenImageEditPlusPipeline

        from sipo.models.base import check_lora_state_dict

        check_lora_state_dict(lora_state_dict)
        QwenImageEditPlusPipeline.save_lora_weights(
            save_directory=str(output_dir), transformer_lora_layers=lora_state_dict,
            transformer_lora_adapter_metadata=self.lora_config_dict(), safe_serialization=True,
        )

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str = " ",
        input_images: Tensor | None = None,
        **pipeline_options: Any,
    ) -> Tensor:
        """Edited images ``[B, 3, H, W]`` in ``[0, 1]``, one QwenImageEditPlusPipeline call per instruction (the
        pipeline takes one at a time) with its input image (``input_images`` ``[B, 3, h, w]`` in ``[-1, 1]``);
        sides default to the run's resolution, ``guidance_scale`` is the pipeline's ``true_cfg_scale``."""
        self.check_input_images(input_images)
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        dtype = next(self.denoiser.parameters()).dtype
        pipe = self.pipeline()
        images = []
        for prompt, picture, one_generator in zip(prompts, input_images, generators):
            state, mask = self.prompt_states(prompt, picture)
            extra: dict[str, Any] = {}
            if scale > 1:
                negative, negative_mask = self.prompt_states(negative_prompt, picture)
                extra = dict(negative_prompt_embeds=negative[None].to(dtype), negative_prompt_embeds_mask=negative_mask[None])
            images.append(pipe(
                image=to_pil(picture), prompt_embeds=state[None].to(dtype), prompt_embeds_mask=mask[None],
                true_cfg_scale=scale, height=height or self.resolution, width=width or self.resolution,
                num_inference_steps=num_inference_steps or self.default_num_inference_steps, generator=one_generator, output_type="pt",
                **extra, **pipeline_options,
            ).images)
        return torch.cat(images).float().clamp(0, 1)

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(cls, directory: str | Path, scale: str = "tiny", seed: int = 0,
                              torch_dtype: torch.dtype = torch.float32, with_text_encoder: bool = True) -> Path:
        """Save a random-weight ``QwenImageEditPlusPipeline``; ``scale="full"`` is Qwen/Qwen-Image-Edit-2509's configs.

        The tokenizer is the offline tiny Qwen2 vocabulary plus Qwen2.5-VL's vision markers; the processor pairs
        it with a ``Qwen2VLImageProcessor`` whose patches fit the vision tower.
        """
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
        from diffusers import QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from sipo.models.random_init import tiny_qwen2_tokenizer

        if scale not in ("tiny", "full"):
            raise ValueError("scale must be tiny or full")
        torch.manual_seed(seed)
        tokenizer = tiny_qwen2_tokenizer()
        tokenizer.add_tokens(list(VISION_TOKENS), special_tokens=True)
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(
            ("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id"), VISION_TOKENS)}
        if scale == "full":
            transformer = QwenImageTransformer2DModel(**FULL_EDIT_TRANSFORMER_CONFIG)
            vae = AutoencoderKLQwenImage()
            text_config = dict(FULL_TEXT_ENCODER_CONFIG)
            processor_config = FULL_IMAGE_PROCESSOR_CONFIG
        else:
            transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
            vae = AutoencoderKLQwenImage(**TINY_VAE_CONFIG)
            text_config = dict(TINY_TEXT_ENCODER_CONFIG)
            special = dict(vocab_size=len(tokenizer), bos_token_id=None,
                           eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
            text_config["text_config"] = dict(text_config["text_config"], **special)
            text_config.update(bos_token_id=None, eos_token_id=special["eos_token_id"],
                               pad_token_id=special["pad_token_id"], **ids)
            processor_config = TINY_IMAGE_PROCESSOR_CONFIG
        processor = VisionLanguageProcessor(_image_processor(processor_config), tokenizer)
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text_config)) if with_text_encoder else None
        if torch_dtype != torch.float32:
            transformer.to(torch_dtype)
            if text_encoder is not None:
                text_encoder.to(torch_dtype)
        pipe = QwenImageEditPlusPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                         processor=None, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
        pipe.save_pretrained(str(directory), safe_serialization=True)
        # the processor's files, declared as the Qwen2VLProcessor the published model_index.json names
        processor.save_pretrained(Path(directory) / "processor")
        index_file = Path(directory) / "model_index.json"
        index = json.loads(index_file.read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        index_file.write_text(json.dumps(index, indent=2))
        return Path(directory)


def _image_processor(config: dict[str, Any]):
    """Qwen2.5-VL's image processor: transformers' torchvision one where torchvision is installed, else its PIL
    twin (the same resize, normalisation and patches)."""
    import transformers

    try:
        import torchvision  # noqa: F401
    except ImportError:
        return transformers.Qwen2VLImageProcessorPil(**config)
    return transformers.Qwen2VLImageProcessor(**config)
