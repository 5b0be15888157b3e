"""Wan2.1 and Wan2.2 text-to-video (``WanPipeline``): Wan VAE latents, UMT5 text states, flow transformers.

Three published layouts load through the one adapter, told apart by the checkpoint's own files
(diffusers/pipelines/wan/pipeline_wan.py and scripts/convert_wan_to_diffusers.py are followed):

- Wan2.1-T2V-1.3B: one ``transformer``, the Wan2.1 VAE (z_dim 16, 8x spatial).
- Wan2.2-TI2V-5B: one ``transformer`` (48 latent channels), its own VAE (``AutoencoderKLWan`` with
  z_dim 48, ``patch_size`` 2 and ``scale_factor_spatial`` 16: 1280x704 -> 80x44 latents), and
  ``expand_timesteps`` in model_index.json: the pipeline gives the transformer one timestep per
  token (all equal for text-to-video), and so does `predict`.
- Wan2.2-T2V-A14B: two experts, ``transformer`` for high noise and ``transformer_2`` for low noise,
  split at ``boundary_ratio`` (model_index.json, 0.875): the pipeline runs ``transformer`` where its
  timestep ``t >= boundary_ratio * T``. Training routes each sample the same way (`WanExperts`, the
  adapter's one ``denoiser``): a pair's timestep decides which expert predicts and so which one
  trains; LoRA sits on both; the LoRA reference is both with adapters off.

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

#: Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/config.json (scripts/convert_wan_to_diffusers.py, "Wan2.2-TI2V-5B").
FULL_TI2V_5B_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    FULL_TRANSFORMER_CONFIG, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336,
)
#: Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer/ and transformer_2/config.json (the same 14B layout as Wan2.1-14B).
FULL_A14B_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    FULL_TRANSFORMER_CONFIG, num_attention_heads=40, ffn_dim=13824, num_layers=40,
)
#: The Wan2.2 VAE of TI2V-5B (convert_wan_to_diffusers.py's ``vae22_diffusers_config``): 48 latent channels,
#: 2x2 pixel patches before the encoder, 16x spatial and 4x temporal compression.
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]
FULL_WAN22_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
    latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
)
#: Toy Wan2.2 VAE: 9 frames of 32x32 -> 3 latent frames of 48x2x2 (16x spatial, as the real one).
TINY_WAN22_VAE_CONFIG: dict[str, Any] = dict(
    FULL_WAN22_VAE_CONFIG, base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
)
TINY_TI2V_TRANSFORMER_CONFIG: dict[str, Any] = dict(TINY_TRANSFORMER_CONFIG, in_channels=48, out_channels=48)
#: the published pipelines' scheduler shifts (convert_wan_to_diffusers.py): TI2V-5B 5.0, T2V-A14B 3.0
TI2V_FLOW_SHIFT, A14B_FLOW_SHIFT = 5.0, 3.0
#: Wan2.2-T2V-A14B's model_index.json: ``transformer`` runs where t >= 0.875 * T
A14B_BOUNDARY_RATIO = 0.875
#: the random-weight layouts `WanAdapter.build_random_pipeline` writes
VARIANTS = ("2.1-t2v-1.3b", "2.2-ti2v-5b", "2.2-t2v-a14b")


class WanExperts(nn.Module):
    """Wan2.2-A14B's two experts as ONE module: each sample goes to the expert its timestep selects.

    ``transformer`` (high noise) predicts where the transformer's timestep ``t >= boundary_timestep``
    (``boundary_ratio * T``), ``transformer_2`` (low noise) elsewhere, as ``WanPipeline.__call__``
    switches between them. A batch whose samples straddle the boundary is split, each part runs
    through its expert, and the outputs return in the batch's order, so gradients reach each
    expert only from its own samples. One module keeps the trainer unchanged: LoRA injection, the
    optimizer, ``accelerate.prepare``, ``lora_disabled`` and checkpoints see both experts at once.
    (Under DDP an expert that no sample of a step used has no gradient: the trainer turns on
    DDP's ``find_unused_parameters`` for such an adapter, ``some_parameters_sit_out_a_step``.)
    """

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_timestep: float) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = float(boundary_timestep)

    def high_noise(self, timestep: Tensor) -> Tensor:
        """``[B]`` bool: which samples the high-noise expert takes (per-token timesteps: the first token's)."""
        per_sample = timestep if timestep.ndim == 1 else timestep[:, 0]
        return per_sample >= self.boundary_timestep

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
        self.transformer_2.enable_gradient_checkpointing()

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                return_dict: bool = False, **kwargs: Any):
        high = self.high_noise(timestep)
        parts, rows = [], []
        for expert, chosen in ((self.transformer, high), (self.transformer_2, ~high)):
            index = chosen.nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            parts.append(expert(hidden_states=hidden_states[index], timestep=timestep[index],
                                encoder_hidden_states=encoder_hidden_states[index], return_dict=False, **kwargs)[0])
            rows.append(index)
        order = torch.cat(rows)
        # rows of the stacked outputs back into the batch's order (a permutation: differentiable indexing)
        output = torch.cat(parts, dim=0)[torch.argsort(order)]
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=output)
        return (output,)


def flow_shift_of(scheduler_config: Any) -> float:
    """The checkpoint's flow shift: UniPC/DPM++ configs call it ``flow_shift``, FlowMatchEuler ``shift``."""
    config = dict(scheduler_config)
    if config.get("use_flow_sigmas") or "flow_shift" in config and "shift" not in config:
        return float(config.get("flow_shift", 1.0))
    return float(config.get("shift", 1.0))


class WanAdapter(VideoAdapter):
    """Wan2.1 / Wan2.2 T2V: the transformer (or both experts) trains; VAE and UMT5 stay frozen."""

    family = "wan"
    pipeline_class_names = ("WanPipeline",)
    pipeline_class_name = "WanPipeline"
    #: WanPipeline draws its starting noise in float32 whatever the weights (sipo pairs records it per row)
    starting_noise_dtype = torch.float32
    listed_components = ("transformer_2",)  # Wan2.2-A14B's low-noise expert
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

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, num_inference_steps: int = 50,
                 transformer_2=None, boundary_ratio: float | None = None, expand_timesteps: bool = False,
                 **options: Any):
        if transformer_2 is not None and boundary_ratio is None:
            raise SipoError(
                "the model has a transformer_2 but its model_index.json has no boundary_ratio; restore the "
                "pipeline's model_index.json (Wan2.2-T2V-A14B: boundary_ratio 0.875)"
            )
        self.boundary_ratio = boundary_ratio if transformer_2 is not None else None
        self.expand_timesteps = bool(expand_timesteps)
        self.patch_size = tuple(int(p) for p in transformer.config.patch_size)
        if transformer_2 is not None:
            boundary = boundary_ratio * int(scheduler.config.num_train_timesteps)
            transformer = WanExperts(transformer, transformer_2, boundary)
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
        # WanPipeline reads the VAE config's scale factors (Wan2.1: 4 and 8; Wan2.2's VAE: 4 and 16)
        self.temporal_compression = int(vae.config.get("scale_factor_temporal") or 2 ** sum(vae.config.temperal_downsample))
        self.vae_scale_spatial = int(vae.config.get("scale_factor_spatial") or 2 ** len(vae.config.temperal_downsample))
        self.spatial_multiple = self.vae_scale_spatial * self.patch_size[1]
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
        self._latents_mean, self._latents_std = mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    @property
    def max_sequence_length(self) -> int:
        return MAX_SEQUENCE_LENGTH

    def keep_fp32_modules(self) -> list[nn.Module]:
        """Wan's VAE stays float32 when frozen weights are cast (diffusers' Wan examples load it so)."""
        return [self.vae]

    @property
    def some_parameters_sit_out_a_step(self) -> bool:
        """A14B: a step whose samples all fall on one side of the boundary leaves the other expert idle."""
        return self.experts is not None

    @property
    def experts(self) -> WanExperts | None:
        """Wan2.2-A14B's two experts (the denoiser itself), ``None`` for a one-transformer model."""
        return self.denoiser if isinstance(self.denoiser, WanExperts) else None

    @classmethod
    def load_components(cls, path: Path, index: dict[str, Any]) -> dict[str, Any]:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        two_experts = (index.get("transformer_2") or [None])[0] is not None and (path / "transformer_2").is_dir()
        return dict(
            transformer=WanTransformer3DModel.from_pretrained(str(path), subfolder="transformer"),
            transformer_2=WanTransformer3DModel.from_pretrained(str(path), subfolder="transformer_2") if two_experts else None,
            boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=bool(index.get("expand_timesteps", False)),
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
        """Flow velocity ``u_hat`` ``[B, C, F, h, w]``, called as ``WanPipeline`` calls the transformer.

        TI2V-5B (``expand_timesteps``): one timestep per token, ``[B, F * h/2 * w/2]``, as the
        pipeline builds it from its all-ones mask for text-to-video. A14B: `WanExperts` routes.
        """
        model = self.denoiser if denoiser is None else denoiser
        timestep = self.model_timesteps(timesteps)
        if self.expand_timesteps:
            frames, height, width = (size // patch for size, patch in zip(x_t.shape[2:], self.patch_size))
            timestep = timestep[:, None].expand(-1, frames * height * width)
        return model(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ random-weight builder
    @staticmethod
    def variant_configs(variant: str, scale: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        """``(transformer configs, VAE config, pipeline extras)`` of a published layout at ``scale``.

        One transformer config per expert (A14B: two); extras are the scheduler shift and what
        model_index.json carries (``boundary_ratio``, ``expand_timesteps``).
        """
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if scale not in ("tiny", "full"):
            raise ValueError("scale must be tiny or full")
        full = scale == "full"
        if variant == "2.1-t2v-1.3b":
            return [FULL_TRANSFORMER_CONFIG if full else TINY_TRANSFORMER_CONFIG], ({} if full else TINY_VAE_CONFIG), {}
        if variant == "2.2-ti2v-5b":
            transformer = FULL_TI2V_5B_TRANSFORMER_CONFIG if full else TINY_TI2V_TRANSFORMER_CONFIG
            vae = FULL_WAN22_VAE_CONFIG if full else TINY_WAN22_VAE_CONFIG
            return [transformer], vae, dict(flow_shift=TI2V_FLOW_SHIFT, expand_timesteps=True)
        transformer = FULL_A14B_TRANSFORMER_CONFIG if full else TINY_TRANSFORMER_CONFIG
        return [transformer, transformer], ({} if full else TINY_VAE_CONFIG), dict(
            flow_shift=A14B_FLOW_SHIFT, boundary_ratio=A14B_BOUNDARY_RATIO)

    @classmethod
    def build_random_pipeline(
        cls,
        directory: str | Path,
        scale: str = "tiny",
        seed: int = 0,
        torch_dtype: torch.dtype = torch.float32,
        with_text_encoder: bool = True,
        variant: str = "2.1-t2v-1.3b",
    ) -> Path:
        """Save a random-weight ``WanPipeline``; ``scale="full"`` is the published configs of ``variant``.

        ``variant``: ``2.1-t2v-1.3b`` (Wan2.1-T2V-1.3B), ``2.2-ti2v-5b`` (Wan2.2-TI2V-5B: its VAE,
        48 channels, ``expand_timesteps``) or ``2.2-t2v-a14b`` (Wan2.2-T2V-A14B: two experts,
        ``boundary_ratio`` 0.875). The tokenizer is the offline tiny T5 vocabulary (valid ids for
        any vocab size); ``with_text_encoder=False`` skips UMT5-XXL (5.7B parameters) for
        benchmarks that feed embeddings directly (such a directory is not loadable by the adapter).
        """
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from sipo.models.random_init import TINY_T5_ENCODER_CONFIG, tiny_t5_tokenizer

        transformer_configs, vae_config, extras = cls.variant_configs(variant, scale)
        directory = Path(directory)
        torch.manual_seed(seed)
        tokenizer = tiny_t5_tokenizer(None, model_max_length=MAX_SEQUENCE_LENGTH)
        transformers_built = [WanTransformer3DModel(**config) for config in transformer_configs]
        vae = AutoencoderKLWan(**vae_config)
        if scale == "full":
            text_config = UMT5Config(**FULL_UMT5_CONFIG)
        else:
            text_config = UMT5Config(vocab_size=len(tokenizer), **TINY_T5_ENCODER_CONFIG)
        text_encoder = UMT5EncoderModel(text_config) if with_text_encoder else None
        scheduler = UniPCMultistepScheduler(**dict(FULL_SCHEDULER_CONFIG, flow_shift=extras.get("flow_shift", 3.0)))
        parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformers_built[0],
                     scheduler=scheduler)
        if len(transformers_built) == 2:
            parts.update(transformer_2=transformers_built[1], boundary_ratio=extras["boundary_ratio"])
        if extras.get("expand_timesteps"):
            parts["expand_timesteps"] = True
        # The VAE stays float32, as the adapter loads and holds it.
        return cls.save_random_pipeline(directory, parts, torch_dtype, cast=("transformer", "transformer_2", "text_encoder"))

    # ------------------------------------------------------------------ two experts: pipeline and files
    #: the low-noise expert's LoRA file beside ``pytorch_lora_weights.safetensors`` (the high-noise one's)
    TRANSFORMER_2_LORA_FILE = "pytorch_lora_weights_transformer_2.safetensors"

    def pipeline(self, **overrides: Any):
        """``WanPipeline`` over this adapter's components; A14B gets both experts and its boundary."""
        experts = self.experts
        if experts is not None:
            overrides = dict(transformer=experts.transformer, transformer_2=experts.transformer_2,
                             boundary_ratio=self.boundary_ratio, **overrides)
        if self.expand_timesteps:
            overrides = dict(expand_timesteps=True, **overrides)
        return super().pipeline(**overrides)

    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """One file per expert for A14B: ``pytorch_lora_weights.safetensors`` (high noise,
        ``transformer``) and `TRANSFORMER_2_LORA_FILE` (low noise), loaded as
        ``pipe.load_lora_weights(dir)`` and ``pipe.load_lora_weights(dir, weight_name=...,
        load_into_transformer_2=True)`` (diffusers' WanLoraLoaderMixin reads the ``transformer.``
        keys of a file into whichever expert it is told). One transformer: one file, as before."""
        if self.experts is None:
            return super().save_lora(output_dir, lora_state_dict)
        import diffusers

        from sipo.models.base import check_lora_state_dict

        check_lora_state_dict(lora_state_dict)
        for prefix, weight_name in (("transformer.", "pytorch_lora_weights.safetensors"),
                                    ("transformer_2.", self.TRANSFORMER_2_LORA_FILE)):
            layers = {k[len(prefix):]: v for k, v in lora_state_dict.items() if k.startswith(prefix)}
            diffusers.WanPipeline.save_lora_weights(
                save_directory=str(output_dir), transformer_lora_layers=layers, weight_name=weight_name,
                transformer_lora_adapter_metadata=self.lora_config_dict(), safe_serialization=True,
            )

    def save_full(self, output_dir: str | Path) -> None:
        """The fine-tuned transformer(s) in diffusers format, where ``WanPipeline`` looks for them."""
        experts = self.experts
        if experts is None:
            return super().save_full(output_dir)
        experts.transformer.save_pretrained(Path(output_dir) / "transformer", safe_serialization=True)
        experts.transformer_2.save_pretrained(Path(output_dir) / "transformer_2", safe_serialization=True)
