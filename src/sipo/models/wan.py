"""Wan2.1 text-to-video (``WanPipeline``): Wan VAE latents, UMT5 text states, a flow transformer.

- ``x0``: the VAE posterior mean of a clip ``[1, 3, F, H, W]``, normalised per channel with the
  VAE config's ``latents_mean`` / ``latents_std`` (the inverse of what ``WanPipeline`` does before
  decoding), in the transformer's layout ``[B, C, F', H/8, W/8]``, ``F' = (F - 1) / 4 + 1``
  (81 frames -> 21).
- conditioning: ``WanPipeline.encode_prompt`` (UMT5-XXL, 512 tokens; states past each prompt's
  length are zeroed, as the pipeline does).
- schedule: rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``, target ``u = eps - x0``
  (SPEC 1), with the checkpoint's shift (``flow_shift`` of its UniPC scheduler config, or
  ``shift`` of a FlowMatchEulerDiscreteScheduler config): training index ``t`` has
  ``sigma = shift s / (1 + (shift - 1) s)``, ``s = (t + 1) / T``, the same grid as diffusers'
  FlowMatchEulerDiscreteScheduler, and the transformer receives ``timestep = sigma * T`` (a float),
  which is what the pipeline passes at inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning
from sipo.models.video import VideoAdapter, load_component
from sipo.schedules import flow_schedule

#: Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json as published.
FULL_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
#: its scheduler/scheduler_config.json (UniPC on flow sigmas, shift 3.0 for 480p).
FULL_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    timestep_spacing="linspace", beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
)
#: text_encoder/config.json: google/umt5-xxl's encoder.
FULL_UMT5_CONFIG: dict[str, Any] = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
)
#: The VAE: diffusers' AutoencoderKLWan defaults are Wan2.1's VAE (base_dim 96, z_dim 16, mean/std).
#: Toy sizes: 9 frames of 32x32 -> 3 latent frames of 16x4x4 -> 12 tokens of width 32.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)
#: WanPipeline's default prompt length (its __call__'s max_sequence_length).
MAX_SEQUENCE_LENGTH = 512


def flow_shift_of(scheduler_config: Any) -> float:
    """The checkpoint's flow shift: UniPC/DPM++ configs call it ``flow_shift``, FlowMatchEuler ``shift``."""
    config = dict(scheduler_config)
    if config.get("use_flow_sigmas") or "flow_shift" in config and "shift" not in config:
        return float(config.get("flow_shift", 1.0))
    return float(config.get("shift", 1.0))


class WanAdapter(VideoAdapter):
    """Wan2.1 T2V: the transformer trains; VAE and UMT5 stay frozen."""

    family = "wan"
    pipeline_class_names = ("WanPipeline",)
    pipeline_class_name = "WanPipeline"
    components = {
        "transformer": "WanTransformer3DModel",
        "vae": "AutoencoderKLWan",
        "text_encoder": "UMT5EncoderModel",
        "tokenizer": "T5/UMT5 tokenizer",
        "scheduler": "UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler config",
    }
    default_num_frames = 81
    default_height = 480
    default_width = 832
    default_guidance_scale = 5.0

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, num_inference_steps: int = 50, **options: Any):
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, **options)
        prediction_type = scheduler.config.get("prediction_type", "flow_prediction")
        if not (prediction_type == "flow_prediction" or type(scheduler).__name__.startswith("FlowMatch")):
            raise SipoError(
                f"the scheduler predicts {prediction_type!r}; the wan family trains rectified-flow models: "
                "use the model's own scheduler config (flow_prediction)"
            )
        self.flow_shift = flow_shift_of(scheduler.config)
        self.schedule = flow_schedule(
            int(scheduler.config.num_train_timesteps), self.flow_shift, num_inference_steps
        )
        self.temporal_compression = 2 ** sum(vae.config.temperal_downsample)
        self.vae_scale_spatial = 2 ** len(vae.config.temperal_downsample)
        self.spatial_multiple = self.vae_scale_spatial * int(transformer.config.patch_size[1])
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
        self._latents_mean, self._latents_std = mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    @property
    def max_sequence_length(self) -> int:
        return MAX_SEQUENCE_LENGTH

    def keep_fp32_modules(self) -> list[nn.Module]:
        """Wan's VAE stays float32 when frozen weights are cast (diffusers' Wan examples load it so)."""
        return [self.vae]

    @classmethod
    def load_components(cls, path: Path, index: dict[str, Any]) -> dict[str, Any]:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        return dict(
            transformer=WanTransformer3DModel.from_pretrained(str(path), subfolder="transformer"),
            # Wan's VAE runs in float32, as diffusers' Wan examples load it.
            vae=AutoencoderKLWan.from_pretrained(str(path), subfolder="vae", torch_dtype=torch.float32),
            text_encoder=UMT5EncoderModel.from_pretrained(str(path), subfolder="text_encoder"),
            tokenizer=AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer"),
            scheduler=load_component(path, "scheduler", index, UniPCMultistepScheduler),
        )

    # ------------------------------------------------------------------ encoding
    def encode_clip(self, clip: Tensor) -> Tensor:
        """``[1, F, 3, H, W]`` -> ``[1, 16, (F-1)/4+1, H/8, W/8]`` normalised latents."""
        posterior = self.vae.encode(clip.permute(0, 2, 1, 3, 4)).latent_dist
        latents = posterior.mode().float()
        mean, std = self._latents_mean.to(latents.device), self._latents_std.to(latents.device)
        return (latents - mean) / std

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> the float timestep the transformer sees: ``sigma_t * T``."""
        sigma = self.schedule.b[timesteps.long().cpu()].float()
        return (sigma * self.schedule.num_train_timesteps).to(timesteps.device)

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` ``[B, C, F, h, w]``, called as ``WanPipeline`` calls the transformer."""
        model = self.denoiser if denoiser is None else denoiser
        return model(
            hidden_states=x_t,
            timestep=self.model_timesteps(timesteps),
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            return_dict=False,
        )[0]

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
        """Save a random-weight ``WanPipeline``; ``scale="full"`` is Wan2.1-T2V-1.3B's published configs.

        The tokenizer is the offline tiny T5 vocabulary (valid ids for any vocab size);
        ``with_text_encoder=False`` skips UMT5-XXL (5.7B parameters) for benchmarks that feed
        embeddings directly (such a directory is not loadable by the adapter).
        """
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from sipo.models.random_init import TINY_T5_ENCODER_CONFIG, tiny_t5_tokenizer

        if scale not in ("tiny", "full"):
            raise ValueError("scale must be tiny or full")
        directory = Path(directory)
        torch.manual_seed(seed)
        tokenizer = tiny_t5_tokenizer(None, model_max_length=MAX_SEQUENCE_LENGTH)
        if scale == "full":
            transformer = WanTransformer3DModel(**FULL_TRANSFORMER_CONFIG)
            vae = AutoencoderKLWan()
            text_config = UMT5Config(**FULL_UMT5_CONFIG)
        else:
            transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
            vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
            text_config = UMT5Config(vocab_size=len(tokenizer), **TINY_T5_ENCODER_CONFIG)
        text_encoder = UMT5EncoderModel(text_config) if with_text_encoder else None
        scheduler = UniPCMultistepScheduler(**FULL_SCHEDULER_CONFIG)
        parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
        # The VAE stays float32, as the adapter loads and holds it.
        return cls.save_random_pipeline(directory, parts, torch_dtype, cast=("transformer", "text_encoder"))
