"""FLUX.2: [klein] 4B / 9B base (``Flux2KleinPipeline``, Qwen3) and [dev] (``Flux2Pipeline``, Mistral Small 3.1).

Followed (diffusers 0.42.1): pipelines/flux2/pipeline_flux2_klein.py and pipeline_flux2.py (prompts,
patchify, packing, position ids, the empirical ``mu`` of the inference grid, guidance), and
examples/dreambooth/train_dreambooth_lora_flux2_klein.py / train_dreambooth_lora_flux2.py
(latent normalisation, noise levels, guidance, target, LoRA targets).

- ``x0``: the VAE posterior mean ``[B, 32, H/8, W/8]`` (``AutoencoderKLFlux2``), patchified into 2x2
  patches along the channels (``_patchify_latents``: ``[B, 128, H/16, W/16]``) and normalised with the
  VAE's batch-norm running statistics, ``(z - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)``:
  exactly what both scripts noise (and the inverse of what the pipelines do before decoding). The
  noise, target and error are per element of that tensor.
- the transformer sees it flattened into tokens ``[B, (H/16)(W/16), 128]`` (``_pack_latents``, a
  reshape) with 4-axis position ids ``(t=0, row, column, l=0)`` (``_prepare_latent_ids``) and text ids
  ``(0, 0, 0, k)`` (``_prepare_text_ids``); its output is reshaped back (``_unpack_latents_with_ids``
  on the same ids).
- conditioning: the pipeline's own ``encode_prompt``: hidden states of three layers of the text
  model stacked along the features (klein: Qwen3 layers 9, 18, 27 of the chat-templated prompt;
  dev: Mistral Small 3.1 layers 10, 20, 30 after the system message), padded to 512 tokens. The
  transformer gets no attention mask, so the padding is part of the input and the length must be
  the pipeline's 512 (``max_sequence_length``). The text model stays off the GPU with
  ``model.text_encoder_device=cpu``, or out of the run entirely with ``sipo cache``.
- guidance: only where the transformer's config has ``guidance_embeds`` ([dev]): the scripts pass
  ``--guidance_scale`` (default 3.5) to every sample, here ``model.guidance``. [klein] base has no
  guidance embedding and gets ``None`` (its sampler uses true classifier-free guidance instead).
- schedule: rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``, target ``u = eps - x0``; the
  transformer is given ``timestep = sigma`` (both pass ``t / 1000``). The scheduler has
  ``use_dynamic_shifting``: the training sigmas the scripts draw are unshifted, ``(t + 1) / 1000``;
  the pipelines sample on ``linspace(1, 1/n, n)`` shifted exponentially by
  ``mu = compute_empirical_mu(image_seq_len, n)`` (a fit in the token count *and* the step count,
  not FLUX.1's linear ``calculate_shift``), so ``s`` of the SIPO weight (SPEC 10) is one step of
  that grid below ``t`` at ``model.resolution`` and ``model.num_inference_steps``
  (``sipo.schedules.dynamic_shift_flow_schedule``).
- LoRA: the scripts' default targets: ``to_k/to_q/to_v/to_out.0`` (double-stream attention),
  ``to_qkv_mlp_proj`` and ``single_transformer_blocks.{i}.attn.to_out`` (single-stream blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning, require_flow_match_scheduler
from sipo.models.flow_image import FlowImageAdapter
from sipo.schedules import dynamic_shift_flow_schedule, flow_schedule

#: transformer/config.json of black-forest-labs/FLUX.2-klein-base-4B (as mirrored on the hub); the 9B base
#: from its described architecture (8 double, 24 single blocks, 4096 wide, Qwen3-8B states 3 x 4096; its
#: file was not available to read: the count lands at 9.08B); FLUX.2-dev: diffusers' Flux2Transformer2DModel defaults.
_FULL_COMMON: dict[str, Any] = dict(
    patch_size=1, in_channels=128, out_channels=None, attention_head_dim=128, timestep_guidance_channels=256,
    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
)
FULL_TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "klein-4b": dict(_FULL_COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24,
                     joint_attention_dim=7680, guidance_embeds=False),
    "klein-9b": dict(_FULL_COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32,
                     joint_attention_dim=12288, guidance_embeds=False),
    "dev": dict(_FULL_COMMON, num_layers=8, num_single_layers=48, num_attention_heads=48,
                joint_attention_dim=15360, guidance_embeds=True),
}
#: published sizes: "4B", "9B" (BFL's [klein] announcement, diffusers' README_flux2.md) and
#: "32 billion parameter rectified flow transformer" (the FLUX.2-dev model card)
PUBLISHED_PARAMETERS = {"klein-4b": 4e9, "klein-9b": 9e9, "dev": 32e9}
#: scheduler/scheduler_config.json of FLUX.2-dev (klein's is the same dynamic exponential shift)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)
#: text_encoder/config.json essentials: Qwen3-4B (klein 4B), Qwen3-8B (klein 9B)
FULL_QWEN3_CONFIGS: dict[str, dict[str, Any]] = {
    "klein-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),
    "klein-9b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),
}
#: Toy sizes: 32-px pictures -> VAE factor 4 -> latents [4, 8, 8] -> patchified [16, 4, 4] -> 16 tokens.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
)
#: text models deep enough for the pipelines' layer choices (27 and 30), 16 wide
TINY_TEXT_HIDDEN = 16
TINY_MAX_SEQUENCE_LENGTH = 64
#: the scripts' --guidance_scale default, given to [dev]'s guidance embedding
DEFAULT_GUIDANCE = 3.5
#: Flux2KleinPipeline's default classifier-free guidance for the base models
KLEIN_GUIDANCE_SCALE = 4.0


def _diffusers_pipeline(name: str):
    import diffusers

    return getattr(diffusers, name)


class Flux2Adapter(FlowImageAdapter):
    """FLUX.2 [klein] base and [dev]: the transformer trains; the VAE and the text model stay frozen."""

    family = "flux2"
    pipeline_class_names = ("Flux2KleinPipeline", "Flux2Pipeline")
    pipeline_class_name = "Flux2KleinPipeline"
    default_guidance_scale = 4.0  # Flux2Pipeline's and Flux2KleinPipeline's default (50 steps)
    components = {
        "transformer": "Flux2Transformer2DModel",
        "vae": "AutoencoderKLFlux2",
        "text_encoder": "Qwen3ForCausalLM ([klein]) or Mistral3ForConditionalGeneration ([dev])",
        "tokenizer": "Qwen2 tokenizer ([klein]) or Pixtral processor ([dev])",
        "scheduler": "FlowMatchEulerDiscreteScheduler config",
    }
    component_classes = {
        "transformer": ("diffusers", "Flux2Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
        "text_encoder": ("transformers", "Qwen3ForCausalLM"),
        "tokenizer": ("transformers", "AutoTokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    default_max_sequence_length = 512
    t5_tokenizer_name = "tokenizer"

    def __init__(self, parts: dict[str, Any], *, num_inference_steps: int = 50, resolution: int | None = None,
                 text_encoder_device: str = "auto", guidance: float = DEFAULT_GUIDANCE,
                 training_sigmas: str = "scheduler") -> None:
        super().__init__(parts, num_inference_steps=num_inference_steps, resolution=resolution,
                         text_encoder_device=text_encoder_device)
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        # [dev] pairs the transformer with Mistral Small 3.1 (behind a Pixtral processor), [klein] with Qwen3;
        # without a text model (benchmarks), [dev] is the one with a guidance embedding
        encoder = parts.get("text_encoder")
        dev = ("Mistral" in type(encoder).__name__ or "Pixtral" in type(parts.get("tokenizer")).__name__
               or encoder is None and bool(parts["transformer"].config.get("guidance_embeds")))
        self.pipeline_class_name = "Flux2Pipeline" if dev else "Flux2KleinPipeline"
        self.guidance = float(guidance)
        self.has_guidance_embedding = bool(self.denoiser.config.get("guidance_embeds", False))
        single = int(self.denoiser.config.num_single_layers)
        self.lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                                    *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(single)))
        config = self.scheduler.config
        require_flow_match_scheduler(self.family, self.scheduler)
        num_train_timesteps = int(config.num_train_timesteps)
        if config.get("use_dynamic_shifting"):
            if config.get("time_shift_type", "exponential") != "exponential":
                raise SipoError("the flux2 scheduler config has a linear time shift; FLUX.2's is exponential: "
                                "use the model's own scheduler config")
            self.mu = compute_empirical_mu(self.image_seq_len(self.resolution, self.resolution), num_inference_steps)
            # model.training_sigmas=shifted: train on the grid's shifted sigmas instead (docs/models.md)
            self.schedule = dynamic_shift_flow_schedule(num_train_timesteps, self.mu, num_inference_steps,
                                                        shifted_training=training_sigmas == "shifted")
        else:
            self.mu = None
            self.schedule = flow_schedule(num_train_timesteps, float(config.get("shift", 1.0)), num_inference_steps)

    @classmethod
    def family_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        chosen = {"training_sigmas": options.get("training_sigmas") or "scheduler"}
        if options.get("guidance") is not None:
            chosen["guidance"] = float(options["guidance"])
        return chosen

    @property
    def is_dev(self) -> bool:
        return self.pipeline_class_name == "Flux2Pipeline"

    def default_resolution(self) -> int:
        """The pipelines' default size: 128 latent pixels times the VAE factor (1024 px)."""
        return 128 * self.vae_scale_factor

    def image_seq_len(self, height: int, width: int) -> int:
        """Packed tokens of a ``height`` x ``width`` picture: ``(H / 16) * (W / 16)`` (4096 at 1024 px)."""
        return (height // self.spatial_multiple) * (width // self.spatial_multiple)

    @property
    def max_sequence_length(self) -> int:
        """512 (both pipelines' default), or fewer where the tokenizer is shorter (tiny models)."""
        tokenizer = self.parts.get("tokenizer")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # [dev]: the processor's tokenizer
        limit = int(getattr(tokenizer, "model_max_length", 512) or 512)
        return min(self.default_max_sequence_length, limit)

    # ------------------------------------------------------------------ encoding
    def normalize_latents(self, latents: Tensor) -> Tensor:
        """``[N, 32, h, w]`` posterior means -> patchified ``[N, 128, h/2, w/2]``, batch-norm normalised."""
        pipeline = _diffusers_pipeline(self.pipeline_class_name)
        patches = pipeline._patchify_latents(latents)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches.device, torch.float32)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + self.vae.config.batch_norm_eps).to(patches.device)
        return (patches.float() - mean) / std

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``{"encoder_hidden_states": [N, 512, 3 * hidden]}`` through the pipeline's ``encode_prompt``."""
        if self._prompt_pipeline is None:
            self._prompt_pipeline = self.pipeline()
        states, _ = self._prompt_pipeline.encode_prompt(
            list(prompts), device=self.text_device(), max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": states.float().to(self.device)}

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> ``sigma_t`` (the pipelines pass their timestep / 1000)."""
        return self.sigmas(timesteps)

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` ``[B, 128, h, w]``: flattened to tokens, called as the pipeline calls its
        transformer (ids, ``timestep = sigma``, guidance where embedded), reshaped back."""
        pipeline = _diffusers_pipeline(self.pipeline_class_name)
        model = self.denoiser if denoiser is None else denoiser
        batch, channels, height, width = x_t.shape
        states = conditioning["encoder_hidden_states"]
        guidance = None
        if self.has_guidance_embedding:
            guidance = torch.full((batch,), self.guidance, device=x_t.device, dtype=torch.float32)
        tokens = model(
            hidden_states=pipeline._pack_latents(x_t),
            encoder_hidden_states=states,
            timestep=self.model_timesteps(timesteps.to(x_t.device)),
            guidance=guidance,
            txt_ids=pipeline._prepare_text_ids(states).to(x_t.device),
            img_ids=pipeline._prepare_latent_ids(x_t).to(x_t.device),
            return_dict=False,
        )[0]
        return tokens.permute(0, 2, 1).reshape(batch, channels, height, width)

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
        **pipeline_options: Any,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` through the family's pipeline, sides defaulting to ``model.resolution``.

        ``guidance_scale``: [dev]'s embedded guidance (default ``model.guidance``); [klein] base's
        classifier-free guidance (default 4.0, the pipeline's; 1 or less: none), its negative
        prompt the empty one as in the pipeline. Prompts are encoded by `encode_prompts`.
        """
        prompts = list(prompts)
        states = self.encode_prompts(prompts)["encoder_hidden_states"]
        dtype = next(self.denoiser.parameters()).dtype
        extra: dict[str, Any] = {}
        if self.is_dev:
            scale = self.guidance if guidance_scale is None else guidance_scale
        else:
            scale = KLEIN_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
            if scale > 1:
                extra["negative_prompt_embeds"] = self.encode_prompts([""] * len(prompts))["encoder_hidden_states"].to(dtype)
        images = self.pipeline()(
            prompt_embeds=states.to(dtype), height=height or self.resolution, width=width or self.resolution,
            num_inference_steps=num_inference_steps or self.default_num_inference_steps, guidance_scale=scale,
            generator=generator, output_type="pt",
            max_sequence_length=self.max_sequence_length, **extra, **pipeline_options,
        ).images
        return images.float().clamp(0, 1)

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(
        cls,
        directory: str | Path,
        scale: str = "tiny",
        seed: int = 0,
        torch_dtype: torch.dtype = torch.float32,
        variant: str = "klein-4b",
        with_text_encoder: bool = True,
    ) -> Path:
        """Save a random-weight ``Flux2KleinPipeline`` (``variant`` ``klein-4b`` / ``klein-9b``) or
        ``Flux2Pipeline`` (``dev``); ``scale="full"`` is the published transformer and VAE configs.

        The VAE's batch-norm statistics are drawn too (a trained VAE has them; zero mean and unit
        variance would hide a missing normalisation). Text models and tokenizers are offline toys
        (``sipo.models.random_init``) deep enough for the layers the pipelines read;
        ``with_text_encoder=False`` leaves the text model out (benchmarks that feed embeddings; such a
        directory is not loadable by the adapter).
        """
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        if scale not in ("tiny", "full") or variant not in FULL_TRANSFORMER_CONFIGS:
            raise ValueError(f"scale must be tiny or full, variant one of {sorted(FULL_TRANSFORMER_CONFIGS)}")
        torch.manual_seed(seed)
        dev = variant == "dev"
        if scale == "full":
            transformer = Flux2Transformer2DModel(**FULL_TRANSFORMER_CONFIGS[variant])
            vae = AutoencoderKLFlux2()
        else:
            transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER_CONFIG, joint_attention_dim=3 * TINY_TEXT_HIDDEN,
                                                  guidance_embeds=dev)
            vae = AutoencoderKLFlux2(**TINY_VAE_CONFIG)
        generator = torch.Generator().manual_seed(seed)
        channels = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
        vae.bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        text_encoder, tokenizer = (_tiny_mistral3 if dev else _tiny_qwen3)(with_text_encoder)
        parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
                     tokenizer=tokenizer, transformer=transformer)
        return cls.save_random_pipeline(directory, parts, torch_dtype, "Flux2Pipeline" if dev else "Flux2KleinPipeline")


def _tiny_qwen3(with_text_encoder: bool):
    """A 28-layer, 16-wide Qwen3 (the pipeline reads layers 9, 18 and 27) and a chat-templated tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sipo.models.random_init import tiny_qwen3_chat_tokenizer

    tokenizer = tiny_qwen3_chat_tokenizer(model_max_length=TINY_MAX_SEQUENCE_LENGTH)
    if not with_text_encoder:
        return None, tokenizer
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=TINY_TEXT_HIDDEN, intermediate_size=32,
                         num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen3ForCausalLM(config), tokenizer


def _tiny_mistral3(with_text_encoder: bool):
    """A 31-layer, 16-wide Mistral3 (the pipeline reads layers 10, 20 and 30) and a chat-templated tokenizer."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from sipo.models.random_init import tiny_mistral_chat_tokenizer

    tokenizer = tiny_mistral_chat_tokenizer(model_max_length=TINY_MAX_SEQUENCE_LENGTH)
    if not with_text_encoder:
        return None, tokenizer
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=TINY_TEXT_HIDDEN,
                         intermediate_size=32, num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=256, sliding_window=None, **special),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=32, patch_size=8, num_channels=3),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1, **special,
    )
    return Mistral3ForConditionalGeneration(config), tokenizer
