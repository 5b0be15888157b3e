"""FLUX.1 [dev] (and [schnell]) text-to-image (``FluxPipeline`` / ``FluxTransformer2DModel``).

Followed: diffusers pipelines/flux/pipeline_flux.py (prompts, packing, position ids, the
resolution-dependent shift) and examples/dreambooth/train_dreambooth_lora_flux.py (latents,
noise levels, guidance, target, LoRA targets).

- ``x0``: the VAE posterior mean, ``(latent - shift_factor) * scaling_factor`` (0.1159 and 0.3611
  for FLUX.1's 16-channel VAE), kept in the VAE's layout ``[B, 16, H/8, W/8]``: the noise, the
  target and the error are per latent element, as the training script computes them after unpacking.
- the transformer sees 2x2 patches packed into tokens ``[B, (H/16)(W/16), 64]`` (``FluxPipeline._pack_latents``)
  with their position ids ``img_ids[k] = (0, row, column)`` and text ids all zero; its output is
  unpacked back (``_unpack_latents``).
- conditioning: ``FluxPipeline.encode_prompt``: the pooled output of CLIP ViT-L (``pooled_projections``,
  77 tokens) and the T5-XXL states (``encoder_hidden_states``, 512 tokens for dev).
- guidance: FLUX.1-dev is guidance-distilled; its transformer embeds a guidance value, which the
  training script sets to ``--guidance_scale`` (default 3.5) for every sample: ``model.guidance``.
  [schnell] has no guidance embedding and gets none.
- schedule: rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``, target ``u = eps - x0``; the
  transformer is given ``timestep = sigma`` (the pipeline and the script pass ``t / 1000``).
  FLUX.1-dev's scheduler has ``use_dynamic_shifting``: its training sigmas are unshifted,
  ``sigma = (t + 1) / 1000`` (what the script draws from), and its inference grid is shifted by
  ``mu`` linear in the image's token count (0.5 at 256 tokens, 1.15 at 4096 = 1024 px), so the
  previous step ``s`` of the importance weight follows that grid at ``model.resolution``
  (``sipo.schedules.dynamic_shift_flow_schedule``). [schnell]: no dynamic shift, ``shift`` 1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.models.base import Conditioning, require_flow_match_scheduler
from sipo.models.flow_image import FlowImageAdapter
from sipo.schedules import dynamic_shift_flow_schedule, flow_schedule, resolution_shift_mu

#: black-forest-labs/FLUX.1-dev transformer/config.json as published (schnell: guidance_embeds false).
FULL_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: its scheduler/scheduler_config.json (schnell: shift 1.0, use_dynamic_shifting false).
FULL_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
#: its vae/config.json: the 16-channel AutoencoderKL with FLUX's shift and scale, no quant convs.
FULL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
#: text_encoder/config.json: openai/clip-vit-large-patch14's text tower (FLUX uses its pooled output).
FULL_CLIP_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
#: Toy sizes: 32-px pictures -> VAE factor 4 -> latents [4, 8, 8] -> 16 tokens of 16 channels.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
TINY_CLIP_CONFIG: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
    hidden_act="gelu", projection_dim=32, layer_norm_eps=1e-5,
)
#: T5 prompt length of the tiny tokenizer (FLUX.1-dev: 512)
TINY_MAX_SEQUENCE_LENGTH = 32
#: train_dreambooth_lora_flux.py's --guidance_scale default
DEFAULT_GUIDANCE = 3.5


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``: each 2x2 patch one token, channels outermost (``_pack_latents``)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack_latents` for a latent of ``height`` x ``width`` (``_unpack_latents``)."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[(H/2)(W/2), 3]`` position ids of the packed tokens: ``(0, row, column)`` (``_prepare_latent_image_ids``)."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    columns = torch.arange(width // 2).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=1).to(device=device, dtype=dtype)


class FluxAdapter(FlowImageAdapter):
    """FLUX.1: the transformer trains; the VAE, CLIP and T5 stay frozen."""

    family = "flux"
    pipeline_class_names = ("FluxPipeline",)
    pipeline_class_name = "FluxPipeline"
    default_num_inference_steps = 28  # FluxPipeline's example for FLUX.1-dev
    default_guidance_scale = DEFAULT_GUIDANCE  # the distilled guidance; a run's own is model.guidance

    @classmethod
    def sampler_defaults(cls, model_config=None) -> dict[str, Any]:
        """FLUX.1-dev samples at the distilled guidance the run trained with, ``model.guidance``."""
        guidance = getattr(model_config, "guidance", None)
        return {**super().sampler_defaults(model_config),
                **({"guidance_scale": float(guidance)} if guidance is not None else {})}
    # train_dreambooth_lora_flux.py's default --lora_layers: attention and feed-forward of the
    # double-stream blocks (image and context streams), and the attention of the single-stream ones.
    lora_target_modules = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    components = {
        "transformer": "FluxTransformer2DModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "T5 tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler config",
    }
    component_classes = {
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "AutoTokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    default_max_sequence_length = 512
    t5_tokenizer_name = "tokenizer_2"

    def __init__(self, parts: dict[str, Any], *, num_inference_steps: int = 50, resolution: int | None = None,
                 text_encoder_device: str = "auto", guidance: float = DEFAULT_GUIDANCE,
                 training_sigmas: str = "scheduler") -> None:
        super().__init__(parts, num_inference_steps=num_inference_steps, resolution=resolution,
                         text_encoder_device=text_encoder_device)
        config = self.scheduler.config
        require_flow_match_scheduler(self.family, self.scheduler)
        self.guidance = float(guidance)
        self.has_guidance_embedding = bool(self.denoiser.config.get("guidance_embeds", False))
        num_train_timesteps = int(config.num_train_timesteps)
        if config.get("use_dynamic_shifting"):
            self.mu = resolution_shift_mu(
                self.image_seq_len(self.resolution, self.resolution),
                int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096)),
                float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15)),
            )
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

    def default_resolution(self) -> int:
        """FluxPipeline's default size: 128 latent pixels times the VAE factor (1024 px for FLUX.1)."""
        return 128 * self.vae_scale_factor

    def image_seq_len(self, height: int, width: int) -> int:
        """Packed tokens of a ``height`` x ``width`` picture: ``(H / 2f) * (W / 2f)`` (4096 at 1024 px)."""
        return (height // self.spatial_multiple) * (width // self.spatial_multiple)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``{"encoder_hidden_states": [N, L, 4096], "pooled_projections": [N, 768]}``
        through ``FluxPipeline.encode_prompt`` (T5 states, CLIP pooled output), on the denoiser's device."""
        if self._prompt_pipeline is None:
            self._prompt_pipeline = self.pipeline()
        states, pooled, _ = self._prompt_pipeline.encode_prompt(
            list(prompts), prompt_2=None, device=self.text_device(), max_sequence_length=self.max_sequence_length,
        )
        device = self.device
        return {"encoder_hidden_states": states.float().to(device), "pooled_projections": pooled.float().to(device)}

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> ``sigma_t``: the pipeline passes ``timestep / 1000`` (the transformer scales it back)."""
        return self.sigmas(timesteps)

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` ``[B, C, h, w]``: packed in, called as ``FluxPipeline`` calls the transformer, unpacked out."""
        model = self.denoiser if denoiser is None else denoiser
        batch, _, height, width = x_t.shape
        states = conditioning["encoder_hidden_states"]
        guidance = None
        if self.has_guidance_embedding:
            guidance = torch.full((batch,), self.guidance, device=x_t.device, dtype=torch.float32)
        tokens = model(
            hidden_states=pack_latents(x_t),
            timestep=self.model_timesteps(timesteps.to(x_t.device)),
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=states,
            txt_ids=torch.zeros(states.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=latent_image_ids(height, width, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, height, width)

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
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` through ``FluxPipeline`` (its dynamic-shift Euler sampler).

        Sides default to the run's ``model.resolution``; ``guidance_scale`` is FLUX.1-dev's distilled
        guidance (default ``model.guidance``; schnell ignores it). Prompts are encoded by
        `encode_prompts`, so CPU-resident text encoders work.
        """
        conditioning = self.encode_prompts(list(prompts))
        dtype = next(self.denoiser.parameters()).dtype
        images = self.pipeline()(
            prompt_embeds=conditioning["encoder_hidden_states"].to(dtype),
            pooled_prompt_embeds=conditioning["pooled_projections"].to(dtype),
            height=height or self.resolution,
            width=width or self.resolution,
            num_inference_steps=num_inference_steps or self.default_num_inference_steps,
            guidance_scale=self.guidance if guidance_scale is None else guidance_scale,
            generator=generator,
            output_type="pt",
            max_sequence_length=self.max_sequence_length,
            **pipeline_options,
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
        variant: str = "dev",
        with_text_encoder: bool = True,
    ) -> Path:
        """Save a random-weight ``FluxPipeline``; ``scale="full"`` is FLUX.1-dev's published configs
        (``variant="schnell"``: no guidance embedding, unshifted scheduler).

        Tokenizers are the offline tiny CLIP and T5 vocabularies of ``sipo.models.random_init``;
        ``with_text_encoder=False`` leaves out T5-XXL (4.7B parameters) for benchmarks that feed
        embeddings (such a directory is not loadable by the adapter).
        """
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from sipo.models.cogvideox import FULL_T5_CONFIG
        from sipo.models.random_init import TINY_T5_ENCODER_CONFIG, tiny_clip_tokenizer, tiny_t5_tokenizer

        if scale not in ("tiny", "full") or variant not in ("dev", "schnell"):
            raise ValueError("scale must be tiny or full, variant dev or schnell")
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as vocab_dir:
            tokenizer = tiny_clip_tokenizer(vocab_dir)
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        guidance = variant == "dev"
        if scale == "full":
            t5_tokenizer = tiny_t5_tokenizer(None, model_max_length=512 if guidance else 256)
            transformer = FluxTransformer2DModel(**{**FULL_TRANSFORMER_CONFIG, "guidance_embeds": guidance})
            vae = AutoencoderKL(**FULL_VAE_CONFIG)
            clip = CLIPTextModel(CLIPTextConfig(**FULL_CLIP_CONFIG, **special))
            t5_config = T5Config(**FULL_T5_CONFIG)
        else:
            t5_tokenizer = tiny_t5_tokenizer(None, model_max_length=TINY_MAX_SEQUENCE_LENGTH)
            transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "guidance_embeds": guidance})
            vae = AutoencoderKL(**TINY_VAE_CONFIG)
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_CLIP_CONFIG, **special))
            t5_config = T5Config(vocab_size=len(t5_tokenizer), **TINY_T5_ENCODER_CONFIG)
        scheduler = FlowMatchEulerDiscreteScheduler(**(FULL_SCHEDULER_CONFIG if guidance else SCHNELL_SCHEDULER_CONFIG))
        parts = dict(
            scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(t5_config) if with_text_encoder else None, tokenizer_2=t5_tokenizer,
            transformer=transformer,
        )
        return cls.save_random_pipeline(directory, parts, torch_dtype)
