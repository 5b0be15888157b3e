"""Stable Diffusion 3.5 medium and large (``StableDiffusion3Pipeline`` / ``SD3Transformer2DModel``).

Followed: diffusers pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py (prompts, the
transformer call) and examples/dreambooth/train_dreambooth_lora_sd3.py (latents, noise levels,
target, LoRA targets).

- ``x0``: the VAE posterior mean, ``(latent - shift_factor) * scaling_factor`` (0.0609 and 1.5305
  for SD3's 16-channel VAE), ``[B, 16, H/8, W/8]``; the transformer patchifies it itself.
- conditioning: ``StableDiffusion3Pipeline.encode_prompt`` (no clip skip): the penultimate hidden
  states of CLIP-L and CLIP-G concatenated along the features (768 + 1280), zero-padded to T5's 4096
  and followed along the sequence by T5-XXL's states (77 + 256 tokens), and the pooled projections
  of both CLIPs concatenated (``pooled_projections``, 2048).
- schedule: rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``, target ``u = eps - x0``, on the
  scheduler's shifted grid (``shift`` 3.0 for SD3.5): training index ``t`` has
  ``sigma = shift s / (1 + (shift - 1) s)``, ``s = (t + 1) / T``, the grid the training script
  draws from; the transformer is given ``timestep = sigma * 1000``, as pipeline and script pass it.
  The previous step ``s`` of the importance weight is the next sigma of the grid
  ``StableDiffusion3Pipeline`` samples on (``sipo.schedules.shifted_grid_flow_schedule``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning
from sipo.models.flow_image import FlowImageAdapter
from sipo.schedules import shifted_grid_flow_schedule

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in blocks 0-12).
FULL_MEDIUM_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
#: stabilityai/stable-diffusion-3.5-large transformer/config.json.
FULL_LARGE_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm",
)
#: scheduler/scheduler_config.json of both.
FULL_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)
#: vae/config.json of both: 16 latent channels, SD3's shift and scale.
FULL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
#: text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (OpenCLIP ViT-bigG/14), both with projection.
FULL_CLIP_L_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
FULL_CLIP_G_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5,
)
#: Toy sizes: 32-px pictures -> VAE factor 4 -> latents [4, 8, 8] -> 16 patches; the two CLIPs' 16-d
#: states fill the tiny T5's 32 features exactly (as 768 + 1280 <= 4096), pooled 16 + 16.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
    pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
TINY_CLIP_CONFIG: dict[str, Any] = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
    hidden_act="gelu", projection_dim=16, layer_norm_eps=1e-5,
)
TINY_T5_D_MODEL = 32
TINY_MAX_SEQUENCE_LENGTH = 16
VARIANTS = ("medium", "large")


class SD3Adapter(FlowImageAdapter):
    """SD3.5 medium / large: the transformer trains; the VAE, both CLIPs and T5 stay frozen."""

    family = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    pipeline_class_name = "StableDiffusion3Pipeline"
    default_num_inference_steps = 28  # the SD3.5 model cards' sampler
    default_guidance_scale = 7.0
    # train_dreambooth_lora_sd3.py's default --lora_layers: the joint attention's projections of both streams.
    lora_target_modules = (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    )
    components = {
        "transformer": "SD3Transformer2DModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModelWithProjection (CLIP-L)",
        "text_encoder_2": "CLIPTextModelWithProjection (CLIP-G)",
        "text_encoder_3": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "tokenizer_3": "T5 tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler config",
    }
    component_classes = {
        "transformer": ("diffusers", "SD3Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "tokenizer_3": ("transformers", "AutoTokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    #: StableDiffusion3Pipeline.__call__'s max_sequence_length default
    default_max_sequence_length = 256
    t5_tokenizer_name = "tokenizer_3"

    def __init__(self, parts: dict[str, Any], *, num_inference_steps: int = 50, resolution: int | None = None,
                 text_encoder_device: str = "auto") -> None:
        super().__init__(parts, num_inference_steps=num_inference_steps, resolution=resolution,
                         text_encoder_device=text_encoder_device)
        config = self.scheduler.config
        if not type(self.scheduler).__name__.startswith("FlowMatch") or config.get("use_dynamic_shifting"):
            raise SipoError(
                f"the scheduler is a {type(self.scheduler).__name__} (dynamic shifting "
                f"{bool(config.get('use_dynamic_shifting'))}); the sd3 family trains SD3.5's rectified flow: use "
                "the model's own FlowMatchEulerDiscreteScheduler config (shift 3.0)"
            )
        self.flow_shift = float(config.get("shift", 1.0))
        self.schedule = shifted_grid_flow_schedule(int(config.num_train_timesteps), self.flow_shift, num_inference_steps)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``{"encoder_hidden_states": [N, 77 + L, 4096], "pooled_projections": [N, 2048]}``
        through ``StableDiffusion3Pipeline.encode_prompt`` (no classifier-free guidance, no clip skip)."""
        if self._prompt_pipeline is None:
            self._prompt_pipeline = self.pipeline()
        states, _, pooled, _ = self._prompt_pipeline.encode_prompt(
            list(prompts), prompt_2=None, prompt_3=None, device=self.text_device(),
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        device = self.device
        return {"encoder_hidden_states": states.float().to(device), "pooled_projections": pooled.float().to(device)}

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> ``sigma_t * T``: the scheduler's own timestep, what the pipeline passes."""
        return self.sigmas(timesteps) * self.schedule.num_train_timesteps

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` ``[B, C, h, w]``, called as ``StableDiffusion3Pipeline`` calls the transformer."""
        model = self.denoiser if denoiser is None else denoiser
        return model(
            hidden_states=x_t,
            timestep=self.model_timesteps(timesteps.to(x_t.device)),
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            return_dict=False,
        )[0]

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
        negative_prompt: str = "",
        **pipeline_options: Any,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` through ``StableDiffusion3Pipeline`` (Euler, classifier-free guidance).

        Sides default to the run's ``model.resolution``; prompts (and the empty negative prompt) are
        encoded by `encode_prompts`, so CPU-resident text encoders work.
        """
        prompts = list(prompts)
        positive = self.encode_prompts(prompts)
        negative = self.encode_prompts([negative_prompt] * len(prompts))
        dtype = next(self.denoiser.parameters()).dtype
        images = self.pipeline()(
            prompt_embeds=positive["encoder_hidden_states"].to(dtype),
            pooled_prompt_embeds=positive["pooled_projections"].to(dtype),
            negative_prompt_embeds=negative["encoder_hidden_states"].to(dtype),
            negative_pooled_prompt_embeds=negative["pooled_projections"].to(dtype),
            height=height or self.resolution,
            width=width or self.resolution,
            num_inference_steps=num_inference_steps or self.default_num_inference_steps,
            guidance_scale=self.default_guidance_scale if guidance_scale is None else guidance_scale,
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
        variant: str = "medium",
        with_text_encoder: bool = True,
    ) -> Path:
        """Save a random-weight ``StableDiffusion3Pipeline``; ``scale="full"`` is SD3.5 ``variant``'s
        published configs (medium or large). Tokenizers: the offline tiny CLIP and T5 vocabularies;
        ``with_text_encoder=False`` leaves out T5-XXL for benchmarks that feed embeddings."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from sipo.models.cogvideox import FULL_T5_CONFIG
        from sipo.models.random_init import TINY_T5_ENCODER_CONFIG, tiny_clip_tokenizer, tiny_t5_tokenizer

        if scale not in ("tiny", "full") or variant not in VARIANTS:
            raise ValueError(f"scale must be tiny or full, variant one of {VARIANTS}")
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as vocab_dir:
            tokenizer = tiny_clip_tokenizer(vocab_dir)
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        if scale == "full":
            t5_tokenizer = tiny_t5_tokenizer(None, model_max_length=256)
            config = FULL_MEDIUM_TRANSFORMER_CONFIG if variant == "medium" else FULL_LARGE_TRANSFORMER_CONFIG
            transformer = SD3Transformer2DModel(**config)
            vae = AutoencoderKL(**FULL_VAE_CONFIG)
            clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**FULL_CLIP_L_CONFIG, **special))
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**FULL_CLIP_G_CONFIG, **special))
            t5_config = T5Config(**FULL_T5_CONFIG)
        else:
            t5_tokenizer = tiny_t5_tokenizer(None, model_max_length=TINY_MAX_SEQUENCE_LENGTH)
            transformer = SD3Transformer2DModel(**TINY_TRANSFORMER_CONFIG)
            vae = AutoencoderKL(**TINY_VAE_CONFIG)
            clip_l = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_CLIP_CONFIG, **special))
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_CLIP_CONFIG, **special))
            t5_config = T5Config(vocab_size=len(t5_tokenizer), **{**TINY_T5_ENCODER_CONFIG, "d_model": TINY_T5_D_MODEL})
        parts = dict(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG), vae=vae,
            text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer,
            text_encoder_3=T5EncoderModel(t5_config) if with_text_encoder else None, tokenizer_3=t5_tokenizer,
        )
        return cls.save_random_pipeline(directory, parts, torch_dtype)
