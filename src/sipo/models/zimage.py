"""Z-Image (``ZImagePipeline`` / ``ZImageTransformer2DModel``): a 6B single-stream DiT on Qwen3 states.

Followed (diffusers 0.42.1): pipelines/z_image/pipeline_z_image.py (prompt template, the list inputs
of the transformer, the timestep it is given, the sign of its output, the sigma grid) and
examples/dreambooth/train_dreambooth_lora_z_image.py (latents, noise levels, target, LoRA targets).

- ``x0``: the VAE posterior mean, ``(latent - shift_factor) * scaling_factor`` (FLUX.1's 16-channel
  ``AutoencoderKL``: 0.1159 and 0.3611), ``[B, 16, H/8, W/8]``, as the script computes it.
- the transformer takes lists: one ``[16, 1, h, w]`` latent per sample (it patchifies 2x2 itself)
  and one ``[L_i, 2560]`` caption per sample holding only the prompt's real tokens.
- conditioning: ``ZImagePipeline._encode_prompt``: the chat-templated prompt (thinking on, so no
  empty think block) through Qwen3-4B, its second-to-last hidden state, kept where the attention mask
  is 1. Stored here padded with zeros to ``max_sequence_length`` (512, the pipeline's and the
  script's) with ``encoder_hidden_states_mask`` (1 = token), so that every pair's conditioning has
  one shape for batches and the latent cache; `predict` drops the padding again, so the transformer
  sees exactly the pipeline's lists. The text model stays off the GPU with
  ``model.text_encoder_device=cpu``, or out of the run with ``sipo cache``.
- timestep and sign: the pipeline and the script feed the transformer ``(1000 - t) / 1000 = 1 - sigma``
  (Z-Image's time runs from noise 0 to data 1) and NEGATE its output before the Euler step / the
  loss: the transformer predicts ``x0 - eps``; `predict` returns ``-output``, the flow velocity
  ``u = eps - x0`` that the target, SPEC 1's conversions and the pipeline's scheduler use.
- schedule: rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``. Z-Image's scheduler has a constant
  ``shift`` (3.0 in Z-Image-Turbo's published scheduler_config.json) and no dynamic shifting: the
  script draws the shifted training sigmas ``shift(u)``, ``u = (t + 1) / 1000``, and the pipeline
  samples on ``shift(linspace(1, 1/n, n))`` (its ``mu`` is ignored without ``use_dynamic_shifting``),
  one inference step being ``1/n`` in ``u``: ``s`` of the SIPO weight (SPEC 10) is ``shift(u_t - 1/n)``,
  exactly the next smaller sigma of that grid (`constant_shift_grid_schedule`). Where a config turns
  on dynamic shifting, the grid is FLUX's (``calculate_shift`` on ``(H/16)(W/16)`` tokens) and
  handled as the flux family does.
- LoRA: the script's default targets ``to_k, to_q, to_v, to_out.0``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.models.base import Conditioning, require_flow_match_scheduler
from sipo.models.flow_image import FlowImageAdapter
from sipo.schedules import (
    GaussianSchedule,
    dynamic_shift_flow_schedule,
    exponential_time_shift,
    flow_schedule,
    resolution_shift_mu,
)

#: transformer/config.json of Tongyi-MAI/Z-Image (and -Turbo: the same architecture)
FULL_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
#: "a 6B-parameter" model (the Z-Image paper, arXiv 2511.22699)
PUBLISHED_PARAMETERS = 6e9
#: scheduler/scheduler_config.json of Tongyi-MAI/Z-Image-Turbo
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)
#: vae/config.json: FLUX.1's 16-channel AutoencoderKL
FULL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
#: text_encoder/config.json essentials: Qwen3-4B
FULL_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
)
#: Toy sizes: 32-px pictures -> VAE factor 4 -> latents [16, 8, 8] -> 16 patches; captions 16 wide.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
    n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, sample_size=32,
    block_out_channels=(16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
TINY_MAX_SEQUENCE_LENGTH = 64
#: ZImagePipeline's default classifier-free guidance
DEFAULT_GUIDANCE_SCALE = 5.0


def constant_shift_grid_schedule(num_train_timesteps: int, shift: float, num_inference_steps: int) -> GaussianSchedule:
    """Training sigmas ``shift(u_t)``, ``u_t = (t + 1) / T`` (`flow_schedule`), and ``s`` one step of
    ZImagePipeline's grid ``shift(linspace(1, 1/n, n))`` below: ``sigma_s = shift(u_t - 1/n)`` (0 past the
    grid's end), exact for any n (an index stride ``T // n`` is not where 1000 / n is fractional). The
    constant shift ``k u / (1 + (k - 1) u)`` is the exponential time shift with ``mu = ln k``."""
    schedule = flow_schedule(num_train_timesteps, shift, num_inference_steps)
    u = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    sigma_s = exponential_time_shift(math.log(shift), u - 1.0 / num_inference_steps).to(schedule.b.dtype)
    return GaussianSchedule(a=schedule.a, b=schedule.b, prediction_type="flow", num_inference_steps=num_inference_steps,
                            inference_previous_a=1.0 - sigma_s, inference_previous_b=sigma_s)


class ZImageAdapter(FlowImageAdapter):
    """Z-Image: the transformer trains; the VAE and Qwen3 stay frozen."""

    family = "zimage"
    pipeline_class_names = ("ZImagePipeline",)
    pipeline_class_name = "ZImagePipeline"
    default_guidance_scale = 5.0  # ZImagePipeline's default (50 steps)
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    components = {
        "transformer": "ZImageTransformer2DModel",
        "vae": "AutoencoderKL",
        "text_encoder": "Qwen3Model",
        "tokenizer": "Qwen2 tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler config",
    }
    component_classes = {
        "transformer": ("diffusers", "ZImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "Qwen3Model"),
        "tokenizer": ("transformers", "AutoTokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    default_max_sequence_length = 512
    t5_tokenizer_name = "tokenizer"

    def __init__(self, parts: dict[str, Any], *, num_inference_steps: int = 50, resolution: int | None = None,
                 text_encoder_device: str = "auto") -> None:
        super().__init__(parts, num_inference_steps=num_inference_steps, resolution=resolution,
                         text_encoder_device=text_encoder_device)
        config = self.scheduler.config
        require_flow_match_scheduler(self.family, self.scheduler)
        num_train_timesteps = int(config.num_train_timesteps)
        self.mu = None
        if config.get("use_dynamic_shifting"):
            tokens = (self.resolution // self.spatial_multiple) ** 2
            self.mu = resolution_shift_mu(tokens, int(config.get("base_image_seq_len", 256)),
                                          int(config.get("max_image_seq_len", 4096)),
                                          float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15)))
            self.schedule = dynamic_shift_flow_schedule(num_train_timesteps, self.mu, num_inference_steps)
        else:
            self.schedule = constant_shift_grid_schedule(num_train_timesteps, float(config.get("shift", 1.0)),
                                                         num_inference_steps)

    def default_resolution(self) -> int:
        """1024 px: 128 latent pixels times the VAE factor, as the other 16-channel flow families."""
        return 128 * self.vae_scale_factor

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``encoder_hidden_states`` ``[N, L, 2560]`` (zero-padded to ``max_sequence_length``) and
        ``encoder_hidden_states_mask`` ``[N, L]`` (int64, 1 = token), on the denoiser's device."""
        if self._prompt_pipeline is None:
            self._prompt_pipeline = self.pipeline()
        length = self.max_sequence_length
        captions = self._prompt_pipeline._encode_prompt(list(prompts), device=self.text_device(),
                                                        max_sequence_length=length)
        width = captions[0].shape[-1]
        states = torch.zeros(len(captions), length, width)
        mask = torch.zeros(len(captions), length, dtype=torch.long)
        for row, caption in enumerate(captions):
            states[row, : caption.shape[0]] = caption.float().cpu()
            mask[row, : caption.shape[0]] = 1
        return {"encoder_hidden_states": states.to(self.device), "encoder_hidden_states_mask": mask.to(self.device)}

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> what the transformer is given: ``(1000 - 1000 sigma) / 1000 = 1 - sigma``,
        computed in float32 as the script and the pipeline do from the scheduler's timestep ``1000 sigma``."""
        scheduler_timesteps = self.sigmas(timesteps) * 1000
        return (1000 - scheduler_timesteps) / 1000

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat = -transformer(...)`` ``[B, 16, h, w]``, the transformer called on the
        pipeline's lists (one latent frame and the unpadded caption per sample)."""
        model = self.denoiser if denoiser is None else denoiser
        states, mask = conditioning["encoder_hidden_states"], conditioning["encoder_hidden_states_mask"].bool()
        captions = [row[keep] for row, keep in zip(states, mask)]
        latents = list(x_t.unsqueeze(2).unbind(dim=0))
        outputs = model(latents, self.model_timesteps(timesteps.to(x_t.device)), captions, return_dict=False)[0]
        return -torch.stack(outputs, dim=0).squeeze(2)

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
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` through ``ZImagePipeline`` (sides default to ``model.resolution``).

        ``guidance_scale``: classifier-free guidance against the empty prompt as the pipeline does it,
        ``pos + scale (pos - neg)`` (default 5.0, the pipeline's; 0: none); prompts are encoded by
        `encode_prompts`.
        """
        prompts = list(prompts)
        scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        dtype = next(self.denoiser.parameters()).dtype

        def caption_list(texts: list[str]) -> list[Tensor]:
            encoded = self.encode_prompts(texts)
            rows = zip(encoded["encoder_hidden_states"], encoded["encoder_hidden_states_mask"].bool())
            return [row[keep].to(dtype) for row, keep in rows]

        negative = caption_list([""] * len(prompts)) if scale > 0 else None
        images = self.pipeline()(
            prompt_embeds=caption_list(prompts), negative_prompt_embeds=negative,
            guidance_scale=scale, height=height or self.resolution,
            width=width or self.resolution, num_inference_steps=num_inference_steps or self.default_num_inference_steps, generator=generator,
            output_type="pt", max_sequence_length=self.max_sequence_length, **pipeline_options,
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
        with_text_encoder: bool = True,
    ) -> Path:
        """Save a random-weight ``ZImagePipeline``; ``scale="full"`` is Z-Image's published transformer and
        VAE configs. The transformer's two pad tokens (left uninitialised by its constructor) are drawn
        too. ``with_text_encoder=False`` leaves out Qwen3 (benchmarks; such a directory does not load)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from sipo.models.random_init import tiny_qwen3_chat_tokenizer

        if scale not in ("tiny", "full"):
            raise ValueError("scale must be tiny or full")
        torch.manual_seed(seed)
        full = scale == "full"
        transformer = ZImageTransformer2DModel(**(FULL_TRANSFORMER_CONFIG if full else TINY_TRANSFORMER_CONFIG))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for token in (transformer.x_pad_token, transformer.cap_pad_token):
                if token.device.type != "meta":
                    token.copy_(torch.randn(token.shape, generator=generator) * 0.02)
        vae = AutoencoderKL(**(FULL_VAE_CONFIG if full else TINY_VAE_CONFIG))
        tokenizer = tiny_qwen3_chat_tokenizer(model_max_length=512 if full else TINY_MAX_SEQUENCE_LENGTH)
        text_encoder = None
        if with_text_encoder:
            sizes = FULL_TEXT_ENCODER_CONFIG if full else dict(
                hidden_size=TINY_TRANSFORMER_CONFIG["cap_feat_dim"], intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256)
            text_encoder = Qwen3Model(Qwen3Config(**{**sizes, "vocab_size": len(tokenizer)},
                                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                                                  eos_token_id=tokenizer.eos_token_id))
        parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
                     tokenizer=tokenizer, transformer=transformer)
        return cls.save_random_pipeline(directory, parts, torch_dtype)
