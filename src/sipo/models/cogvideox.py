"""CogVideoX-2B / 5B (``CogVideoXPipeline``): 3D VAE latents, T5 text states, a 3D transformer.

- ``x0``: the VAE posterior mean of a clip ``[1, 3, F, H, W]`` times ``vae.config.scaling_factor``
  (1.15258426 for 2B, 0.7 for 5B), permuted to the transformer's layout ``[B, F', C, H/8, W/8]``
  with ``F' = (F - 1) / 4 + 1`` latent frames (49 frames -> 13).
- conditioning: ``CogVideoXPipeline.encode_prompt`` (T5-v1.1-XXL, 226 tokens, no attention mask).
- schedule: v-prediction with the scheduler's own ``alphas_cumprod`` (zero terminal SNR and the
  ``snr_shift_scale`` shift already applied by CogVideoX's schedulers) in the VP view of SPEC 1.
- 5B uses rotary position embeddings (``use_rotary_positional_embeddings``); they are built by
  the pipeline's own ``_prepare_rotary_positional_embeddings`` from the latent grid, as in sampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning
from sipo.models.video import VideoAdapter, load_component
from sipo.schedules import vp_schedule

#: CogVideoX-2b / -5b transformer/config.json as published (THUDM/CogVideoX-2b, -5b, diffusers format).
FULL_TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "2b": dict(
        num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
        flip_sin_to_cos=True, freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30,
        dropout=0.0, attention_bias=True, sample_width=90, sample_height=60, sample_frames=49,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
        activation_fn="gelu-approximate", timestep_activation_fn="silu", norm_elementwise_affine=True,
        norm_eps=1e-5, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
        use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False,
    ),
}
FULL_TRANSFORMER_CONFIGS["5b"] = dict(
    FULL_TRANSFORMER_CONFIGS["2b"], num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True
)
#: vae/config.json: diffusers' AutoencoderKLCogVideoX defaults are the published 2B VAE; 5B differs in scale.
FULL_VAE_SCALING = {"2b": 1.15258426, "5b": 0.7}
#: scheduler/scheduler_config.json (CogVideoXDDIMScheduler); 5B has no SNR shift.
FULL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
    rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=3.0,
)
FULL_SNR_SHIFT = {"2b": 3.0, "5b": 1.0}
#: text_encoder/config.json: google/t5-v1_1-xxl's encoder.
FULL_T5_CONFIG = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
)
#: Toy sizes: 9 frames of 32x32 -> 3 latent frames of 4x4x4 -> 12 tokens of width 32.
TINY_TRANSFORMER_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
    text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=16,
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
    temporal_compression_ratio=4, sample_height=32, sample_width=32,
)


class CogVideoXAdapter(VideoAdapter):
    """CogVideoX-2B/5B: the transformer trains; VAE and T5 stay frozen."""

    family = "cogvideox"
    pipeline_class_names = ("CogVideoXPipeline",)
    pipeline_class_name = "CogVideoXPipeline"
    components = {
        "transformer": "CogVideoXTransformer3DModel",
        "vae": "AutoencoderKLCogVideoX",
        "text_encoder": "T5EncoderModel",
        "tokenizer": "T5Tokenizer",
        "scheduler": "CogVideoXDDIMScheduler or CogVideoXDPMScheduler config",
    }

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, num_inference_steps: int = 50, **options: Any):
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, **options)
        config = transformer.config
        if getattr(config, "patch_size_t", None) is not None:
            raise SipoError(
                "this is a CogVideoX1.5 transformer (temporal patches), which sipo does not train yet; "
                "use CogVideoX-2b or CogVideoX-5b"
            )
        if scheduler.config.prediction_type != "v_prediction":
            raise SipoError(
                f"the scheduler's prediction_type is {scheduler.config.prediction_type!r}; CogVideoX trains "
                "v_prediction: use the model's own scheduler config"
            )
        self.schedule = vp_schedule(scheduler.alphas_cumprod, "v_prediction", num_inference_steps)
        self.vae_scale_spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        self.temporal_compression = int(vae.config.temporal_compression_ratio)
        self.spatial_multiple = self.vae_scale_spatial * config.patch_size
        self.default_num_frames = int(config.sample_frames)
        self.default_height = int(config.sample_height) * self.vae_scale_spatial
        self.default_width = int(config.sample_width) * self.vae_scale_spatial
        self._rotary_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def max_sequence_length(self) -> int:
        return int(self.denoiser.config.max_text_seq_length)

    @classmethod
    def load_components(cls, path: Path, index: dict[str, Any]) -> dict[str, Any]:
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
        from transformers import AutoTokenizer, T5EncoderModel

        return dict(
            transformer=CogVideoXTransformer3DModel.from_pretrained(str(path), subfolder="transformer"),
            vae=AutoencoderKLCogVideoX.from_pretrained(str(path), subfolder="vae"),
            text_encoder=T5EncoderModel.from_pretrained(str(path), subfolder="text_encoder"),
            tokenizer=AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer"),
            scheduler=load_component(path, "scheduler", index, CogVideoXDDIMScheduler),
        )

    # ------------------------------------------------------------------ encoding
    def encode_clip(self, clip: Tensor) -> Tensor:
        """``[1, F, 3, H, W]`` -> ``[1, (F-1)/4+1, C, H/8, W/8]`` scaled latents (the transformer's layout)."""
        posterior = self.vae.encode(clip.permute(0, 2, 1, 3, 4)).latent_dist
        # The posterior mean (see SD15Adapter.encode_images): x0 is a function of the clip.
        latents = posterior.mode() * self.vae.config.scaling_factor
        return latents.permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------ denoiser
    def rotary_embedding(self, x_t: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(cos, sin)`` for the latent grid of ``x_t`` ``[B, F, C, h, w]``, or None (2B: no RoPE)."""
        if not self.denoiser.config.use_rotary_positional_embeddings:
            return None
        frames, height, width = x_t.shape[1], x_t.shape[3], x_t.shape[4]
        key = (frames, height, width, x_t.device)
        if key not in self._rotary_cache:
            pipe = self.pipeline()
            self._rotary_cache[key] = pipe._prepare_rotary_positional_embeddings(
                height=height * self.vae_scale_spatial, width=width * self.vae_scale_spatial,
                num_frames=frames, device=x_t.device,
            )
        return self._rotary_cache[key]

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """v-prediction ``[B, F, C, h, w]`` at integer timesteps, exactly as the pipeline calls it."""
        model = self.denoiser if denoiser is None else denoiser
        return model(
            hidden_states=x_t,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            timestep=timesteps,
            image_rotary_emb=self.rotary_embedding(x_t),
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(
        cls,
        directory: str | Path,
        scale: str = "tiny",
        seed: int = 0,
        variant: str = "2b",
        torch_dtype: torch.dtype = torch.float32,
        with_text_encoder: bool = True,
    ) -> Path:
        """Save a random-weight ``CogVideoXPipeline`` in diffusers format; returns ``directory``.

        ``scale="full"`` uses the published CogVideoX-2b/-5b configs (``variant``) written above;
        ``"tiny"`` the toy sizes. The tokenizer is the offline tiny T5 vocabulary (its ids are
        valid for any vocab size). ``with_text_encoder=False`` skips T5-XXL's 4.7B parameters at
        full scale (a benchmark that feeds embeddings directly does not need them); such a
        directory is not loadable by the adapter.
        """
        from diffusers import (
            AutoencoderKLCogVideoX,
            CogVideoXDDIMScheduler,
            CogVideoXTransformer3DModel,
        )
        from transformers import T5Config, T5EncoderModel

        from sipo.models.random_init import TINY_T5_ENCODER_CONFIG, tiny_t5_tokenizer

        if scale not in ("tiny", "full") or variant not in FULL_TRANSFORMER_CONFIGS:
            raise ValueError(f"scale must be tiny or full and variant one of {list(FULL_TRANSFORMER_CONFIGS)}")
        directory = Path(directory)
        torch.manual_seed(seed)
        rotary = variant == "5b"
        if scale == "full":
            transformer = CogVideoXTransformer3DModel(**FULL_TRANSFORMER_CONFIGS[variant])
            vae = AutoencoderKLCogVideoX(scaling_factor=FULL_VAE_SCALING[variant])
            t5_config = T5Config(**FULL_T5_CONFIG)
            max_length = 226
        else:
            transformer = CogVideoXTransformer3DModel(**TINY_TRANSFORMER_CONFIG, use_rotary_positional_embeddings=rotary)
            vae = AutoencoderKLCogVideoX(**TINY_VAE_CONFIG, scaling_factor=FULL_VAE_SCALING[variant])
            max_length = TINY_TRANSFORMER_CONFIG["max_text_seq_length"]
        tokenizer = tiny_t5_tokenizer(None, model_max_length=max_length)
        if scale == "tiny":
            t5_config = T5Config(vocab_size=len(tokenizer), **TINY_T5_ENCODER_CONFIG)
        text_encoder = T5EncoderModel(t5_config) if with_text_encoder else None
        scheduler = CogVideoXDDIMScheduler(**dict(FULL_SCHEDULER_CONFIG, snr_shift_scale=FULL_SNR_SHIFT[variant]))
        parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
        return cls.save_random_pipeline(directory, parts, torch_dtype, cast=("transformer", "vae", "text_encoder"))
