"""Qwen-Image (``QwenImagePipeline``): Qwen-Image VAE latents, Qwen2.5-VL states with their mask, a flow MMDiT.

Conventions followed: diffusers/pipelines/qwenimage/pipeline_qwenimage.py (prompt template, packing,
``img_shapes``, the timestep the transformer sees, the dynamic shift), its img2img sibling (how a
picture becomes normalised latents) and schedulers/scheduling_flow_match_euler_discrete.py (the
shifted sigma grid).

- ``x0``: the VAE posterior mean of a picture (``AutoencoderKLQwenImage`` takes ``[B, 3, 1, H, W]``),
  normalised per channel, ``(z - latents_mean) / latents_std`` (the inverse of what the pipeline
  does before decoding), held as ``[B, 16, H/8, W/8]``. `predict` packs it into 2x2 patches
  (``[B, H/16 * W/16, 64]``, the pipeline's ``_pack_latents``) with ``img_shapes`` for the RoPE and
  unpacks the output; packing is a permutation, so the squared errors are the same either way.
- conditioning: ``QwenImagePipeline.encode_prompt`` (the chat template, the last hidden state of
  Qwen2.5-VL past the template's 34 tokens) padded with zeros to ``prompt_length`` tokens, and
  ``encoder_hidden_states_mask`` (1 = token, 0 = padding): the transformer masks the padding in
  attention, so the prediction does not depend on the padding, and every pair's conditioning has
  one shape (the latent cache stacks them).
- schedule: rectified flow (SPEC 1, 10), target ``u = eps - x0``; the transformer receives
  ``timestep = sigma`` (the pipeline passes its scheduler timestep / 1000). The scheduler shifts
  its sigmas with the image's token count (``use_dynamic_shifting``: ``mu`` from ``schedules.resolution_shift_mu``
  on ``H/16 * W/16`` tokens, exponential time shift, then ``shift_terminal`` stretch: `QwenImageGrid`).
  Training sigmas are the scheduler's own unshifted table, ``sigma_t = (t + 1)/T``, which is what
  diffusers' train_dreambooth_lora_qwen_image.py draws from (its ``shift=3.0`` is inert under dynamic
  shifting), as the FLUX adapter does; ``s`` of SPEC 3 is one step of the pipeline's n-step grid
  lower in the grid's own coordinate (`sipo.schedules.inference_grid_flow_schedule`).
  ``model.training_sigmas=shifted`` trains on the grid's shifted sigmas instead (until this release
  the family's only choice: mean sigma 0.607 at 1024 px against the script's 0.501).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning, DiffusionAdapter, check_lora_state_dict, encode_in_chunks
from sipo.schedules import exponential_time_shift, inference_grid_flow_schedule, resolution_shift_mu

#: Qwen/Qwen-Image transformer/config.json as published (60 double-stream blocks, 3072 wide).
FULL_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
#: its scheduler/scheduler_config.json
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False,
)
#: text_encoder/config.json: Qwen2.5-VL-7B-Instruct (the text model and its vision tower).
FULL_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
)
#: Toy sizes: 32x32 pictures -> latents 16x4x4 -> 4 packed tokens of 64; text states 32 wide.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)
TINY_VAE_CONFIG: dict[str, Any] = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                       temperal_downsample=[False, True, True])
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=2048,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=4, fullatt_block_indexes=[0]),
)
#: text tokens every prompt is padded (or truncated) to; the pipeline keeps up to 1024, preference
#: datasets' prompts are far shorter (Pick-a-Pic's fit CLIP's 77 tokens), and padded tokens cost attention
PROMPT_LENGTH = 256


class QwenImageGrid:
    """The sigma grid ``QwenImagePipeline`` samples on, as a function of the uniform coordinate ``u``.

    ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/n, n), mu=mu)``: ``u_k = 1 - k/n``
    shifted by
    - dynamic shifting (``mu`` given): exponential ``e^mu / (e^mu + (1/u - 1))`` or linear
      ``mu / (mu + (1/u - 1))`` (``time_shift_type``); otherwise ``shift u / (1 + (shift - 1) u)``;
    - ``shift_terminal`` ``z``: ``1 - (1 - f(u)) / k`` with ``k = (1 - f(1/n)) / (1 - z)``, so the
      grid's last sigma ``f(1/n)`` lands on ``z``; below the grid's last point (``u < 1/n``, never an
      inference sigma) the table falls linearly to 0 (``z * n * u``), where the stretch would go negative.
    ``coordinate`` is the inverse (each piece has a closed form), for ``s`` of SPEC 3 off the grid.
    """

    def __init__(self, num_inference_steps: int, scheduler_config: dict[str, Any], mu: float | None = None) -> None:
        self.n = int(num_inference_steps)
        self.config = dict(scheduler_config)
        self.mu = mu
        self.dynamic = bool(self.config.get("use_dynamic_shifting"))
        if self.dynamic and mu is None:
            raise ValueError("a dynamically shifted schedule needs mu")
        self.terminal = self.config.get("shift_terminal")
        if self.terminal:
            last = self._shift(torch.tensor([1.0 / self.n], dtype=torch.float64))
            self.stretch = float((1 - last) / (1 - self.terminal))

    def _shift(self, u: Tensor) -> Tensor:
        if self.dynamic:
            if self.config.get("time_shift_type", "exponential") == "exponential":
                return exponential_time_shift(self.mu, u)
            return self.mu / (self.mu + (1 / u - 1))
        factor = float(self.config.get("shift", 1.0))
        return factor * u / (1 + (factor - 1) * u)

    def _unshift(self, y: Tensor) -> Tensor:
        if self.dynamic:
            scale = math.exp(self.mu) if self.config.get("time_shift_type", "exponential") == "exponential" else self.mu
            return 1.0 / (1.0 + scale * (1.0 / y - 1.0))
        factor = float(self.config.get("shift", 1.0))
        return y / (factor - (factor - 1) * y)

    def sigma(self, u: Tensor) -> Tensor:
        u = u.double()
        sigma = self._shift(u)
        if self.terminal:
            stretched = 1 - (1 - sigma) / self.stretch
            sigma = torch.where(u >= 1.0 / self.n - 1e-12, stretched, self.terminal * self.n * u)
        return sigma

    def coordinate(self, sigma: Tensor) -> Tensor:
        sigma = sigma.double().clamp(min=1e-12)
        if not self.terminal:
            return self._unshift(sigma)
        unstretched = (1 - self.stretch * (1 - sigma)).clamp(min=1e-12)
        return torch.where(sigma >= self.terminal - 1e-12, self._unshift(unstretched), sigma / (self.terminal * self.n))


def shifted_flow_sigmas(num_train_timesteps: int, num_inference_steps: int, scheduler_config: dict[str, Any],
                        mu: float | None = None) -> Tensor:
    """Sigma of training index ``t`` on the inference grid's shift: ``QwenImageGrid.sigma((t + 1) / T)``.
    At ``u = 1 - k/n`` (``t = T - 1 - k T/n``) this is sigma ``k`` of the pipeline's n-step grid. Float64, ``[T]``."""
    u = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return QwenImageGrid(num_inference_steps, scheduler_config, mu).sigma(u)


class QwenImageAdapter(DiffusionAdapter):
    """Qwen-Image: the transformer trains; the VAE and Qwen2.5-VL stay frozen."""

    family = "qwenimage"
    pipeline_class_names = ("QwenImagePipeline",)
    # diffusers' train_dreambooth_lora_qwen_image.py default targets: the image stream's attention projections
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    components = {
        "transformer": "QwenImageTransformer2DModel",
        "vae": "AutoencoderKLQwenImage",
        "text_encoder": "Qwen2_5_VLForConditionalGeneration",
        "tokenizer": "Qwen2Tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler config",
    }
    #: QwenImagePipeline's default sides (default_sample_size 128 x 8)
    default_resolution = 1024
    default_guidance_scale = 4.0  # the pipeline's true_cfg_scale in its examples
    prompt_length = PROMPT_LENGTH

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, num_inference_steps: int = 50,
                 resolution: int | None = None, text_encoder_device: str = "auto", training_sigmas: str = "scheduler"):
        if text_encoder_device not in ("auto", "cpu"):
            raise SipoError(f"model.text_encoder_device={text_encoder_device!r} is not valid; choose one of ['auto', 'cpu']")
        self.denoiser: nn.Module = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.text_encoder_device = text_encoder_device
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample)
        self.resolution = int(resolution or self.default_resolution)
        self.check_sides(self.resolution, self.resolution)
        config = dict(scheduler.config)
        self.image_seq_len = (self.resolution // (2 * self.vae_scale_factor)) ** 2
        self.mu = None
        if config.get("use_dynamic_shifting"):
            self.mu = resolution_shift_mu(self.image_seq_len, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", 1.15))
        grid = QwenImageGrid(num_inference_steps, config, self.mu)
        self.schedule = inference_grid_flow_schedule(int(config["num_train_timesteps"]), num_inference_steps,
                                                     grid.sigma, grid.coordinate, training_sigmas == "shifted")
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
        self._latents_mean, self._latents_std = mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)
        self._pipeline = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, num_inference_steps: int = 50, trust_remote_code: bool = False,
                        resolution: int | None = None, text_encoder_device: str = "auto",
                        training_sigmas: str = "scheduler", **ignored: Any) -> "QwenImageAdapter":
        """Load a ``QwenImagePipeline`` directory (or hub id where online); nothing executes code from it.

        ``resolution`` (``model.resolution``) fixes the dynamic shift of the schedule (default 1024).
        """
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        source, _ = cls.locate_pipeline(path)
        try:
            parts = dict(
                transformer=QwenImageTransformer2DModel.from_pretrained(source, subfolder="transformer"),
                vae=AutoencoderKLQwenImage.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32),
                text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(source, subfolder="text_encoder"),
                tokenizer=Qwen2Tokenizer.from_pretrained(source, subfolder="tokenizer"),
                scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler"),
            )
        except OSError as error:
            raise SipoError(f"could not load the qwenimage model from {source}: {error}") from error
        return cls(**parts, num_inference_steps=num_inference_steps, resolution=resolution,
                   text_encoder_device=text_encoder_device, training_sigmas=training_sigmas)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder]

    def keep_fp32_modules(self) -> list[nn.Module]:
        """The VAE stays float32 when frozen weights are cast (as the Wan-family VAE it derives from)."""
        return [self.vae]

    def to(self, device: torch.device | str) -> "QwenImageAdapter":
        self.denoiser.to(device)
        self.vae.to(device)
        if self.text_encoder_device == "auto":
            self.text_encoder.to(device)
        return self

    def pipeline(self, **overrides: Any):
        """``QwenImagePipeline`` over this adapter's components (no copy of any weight)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        parts = dict(transformer=self.denoiser, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                     scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config))
        parts.update(overrides)
        pipe = QwenImagePipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ encoding
    def check_sides(self, height: int, width: int) -> None:
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple:
            raise SipoError(
                f"qwenimage needs picture sides divisible by {multiple} (8x VAE, 2x2 patches), got {height}x{width}; "
                f"set model.resolution to a multiple of {multiple} (e.g. 1024 or 1328)"
            )

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> normalised latents ``[B, 16, H/8, W/8]`` (float32), in chunks."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        self.check_sides(int(images.shape[2]), int(images.shape[3]))
        return encode_in_chunks(self._encode_image_chunk, images, self.encode_chunk_size)

    def _encode_image_chunk(self, images: Tensor) -> Tensor:
        param = next(self.vae.parameters())
        frames = images.to(device=param.device, dtype=param.dtype)[:, :, None]  # one-frame video
        latents = self.vae.encode(frames).latent_dist.mode().float()
        mean, std = self._latents_mean.to(latents.device), self._latents_std.to(latents.device)
        return ((latents - mean) / std)[:, :, 0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``encoder_hidden_states`` ``[N, prompt_length, dim]`` + ``encoder_hidden_states_mask``
        ``[N, prompt_length]`` (int64, 1 = token), on the denoiser's device."""
        if self._pipeline is None:
            self._pipeline = self.pipeline()
        device = next(self.text_encoder.parameters()).device
        states, mask = self._pipeline.encode_prompt(list(prompts), device=device, max_sequence_length=self.prompt_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        padding = self.prompt_length - states.shape[1]
        states = torch.nn.functional.pad(states.float(), (0, 0, 0, padding))
        mask = torch.nn.functional.pad(mask.long(), (0, padding))
        return {"encoder_hidden_states": states.to(self.device), "encoder_hidden_states_mask": mask.to(self.device)}

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> the timestep the transformer sees: ``sigma_t`` (the pipeline's ``t / 1000``)."""
        return self.schedule.b[timesteps.long().cpu()].float().to(timesteps.device)

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` ``[B, 16, h, w]``: packed, called as QwenImagePipeline calls its transformer, unpacked."""
        from diffusers import QwenImagePipeline

        model = self.denoiser if denoiser is None else denoiser
        batch, channels, height, width = x_t.shape
        packed = QwenImagePipeline._pack_latents(x_t, batch, channels, height, width)
        output = model(
            hidden_states=packed,
            timestep=self.model_timesteps(timesteps),
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            encoder_hidden_states_mask=conditioning["encoder_hidden_states_mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        pixels = (height * self.vae_scale_factor, width * self.vae_scale_factor)
        return QwenImagePipeline._unpack_latents(output, *pixels, self.vae_scale_factor)[:, :, 0]

    # ------------------------------------------------------------------ saving
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """``pytorch_lora_weights.safetensors`` for ``QwenImagePipeline.load_lora_weights`` (peft key names, as
        diffusers' Qwen-Image LoRA script saves them), with the ``LoraConfig`` in the file's metadata."""
        from diffusers import QwenImagePipeline

        check_lora_state_dict(lora_state_dict)
        QwenImagePipeline.save_lora_weights(
            save_directory=str(output_dir), transformer_lora_layers=lora_state_dict,
            transformer_lora_adapter_metadata=self.lora_config_dict(), safe_serialization=True,
        )

    def save_full(self, output_dir: str | Path) -> None:
        self.denoiser.save_pretrained(Path(output_dir) / "transformer", safe_serialization=True)

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
        **pipeline_options: Any,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` through QwenImagePipeline (sides default to the run's resolution).

        ``guidance_scale`` is Qwen-Image's classifier-free guidance (the pipeline's ``true_cfg_scale``,
        default 4.0; 1 or less: none); prompts are encoded by `encode_prompts` (a CPU text encoder works).
        """
        prompts = list(prompts)
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        positive = self.encode_prompts(prompts)
        dtype = next(self.denoiser.parameters()).dtype
        extra: dict[str, Any] = {}
        if scale > 1:
            negative = self.encode_prompts([negative_prompt] * len(prompts))
            extra = dict(negative_prompt_embeds=negative["encoder_hidden_states"].to(dtype),
                         negative_prompt_embeds_mask=negative["encoder_hidden_states_mask"])
        images = self.pipeline()(
            prompt_embeds=positive["encoder_hidden_states"].to(dtype),
            prompt_embeds_mask=positive["encoder_hidden_states_mask"],
            true_cfg_scale=scale, height=height or self.resolution, width=width or self.resolution,
            num_inference_steps=num_inference_steps or self.default_num_inference_steps, generator=generator, output_type="pt",
            max_sequence_length=self.prompt_length, **extra, **pipeline_options,
        ).images
        return images.float().clamp(0, 1)

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(cls, directory: str | Path, scale: str = "tiny", seed: int = 0,
                              torch_dtype: torch.dtype = torch.float32, with_text_encoder: bool = True) -> Path:
        """Save a random-weight ``QwenImagePipeline``; ``scale="full"`` is Qwen/Qwen-Image's published configs.

        The tokenizer is the offline tiny Qwen2 vocabulary of ``sipo.models.random_init`` (its ids are
        valid for any vocabulary size). ``with_text_encoder=False`` leaves out Qwen2.5-VL-7B (8.3B
        parameters) for benchmarks that feed embeddings directly (such a directory does not load).
        """
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
        from diffusers import QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from sipo.models.random_init import tiny_qwen2_tokenizer

        if scale not in ("tiny", "full"):
            raise ValueError("scale must be tiny or full")
        torch.manual_seed(seed)
        tokenizer = tiny_qwen2_tokenizer()
        if scale == "full":
            transformer = QwenImageTransformer2DModel(**FULL_TRANSFORMER_CONFIG)
            vae = AutoencoderKLQwenImage()
            text_config = FULL_TEXT_ENCODER_CONFIG
        else:
            transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
            vae = AutoencoderKLQwenImage(**TINY_VAE_CONFIG)
            text_config = dict(TINY_TEXT_ENCODER_CONFIG)
            # the tiny vocabulary's own ids (Qwen2.5's are past its end)
            special = dict(vocab_size=len(tokenizer), bos_token_id=None,
                           eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
            text_config["text_config"] = dict(text_config["text_config"], **special)
            text_config.update(bos_token_id=None, eos_token_id=special["eos_token_id"], pad_token_id=special["pad_token_id"])
        text_encoder = None
        if with_text_encoder:
            text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text_config))
        if torch_dtype != torch.float32:
            transformer.to(torch_dtype)
            if text_encoder is not None:
                text_encoder.to(torch_dtype)
        pipe = QwenImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                 scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
        pipe.save_pretrained(str(directory), safe_serialization=True)
        return Path(directory)
