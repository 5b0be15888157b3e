"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders, size micro-conditioning.

Conditioning is what ``StableDiffusionXLPipeline.encode_prompt`` feeds its UNet (no clip skip):
the penultimate hidden states of ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2`` (OpenCLIP
ViT-bigG, with projection) concatenated along the features (768 + 1280 = 2048 for SDXL base), the
pooled, projected embedding of ``text_encoder_2`` as ``text_embeds``, and ``time_ids`` =
(original height, original width, crop top, crop left, target height, target width) of each pair,
the micro-conditioning SDXL was trained with (Podell et al. 2023, section 2.2). The datasets record
the original size and crop of every pair (``size_info``); without it a pair is taken as uncropped
at its own size, which is what the pipeline assumes when sampling.

``x0`` is the VAE latent (posterior mean) times ``vae.config.scaling_factor`` (0.13025 for SDXL);
the schedule is the scheduler's ``alphas_cumprod`` in the VP view, epsilon prediction; 1024 px.

The SDXL VAE overflows in fp16 (its activations exceed 65504): diffusers marks it
``force_upcast: true`` and so does this adapter, which keeps such a VAE in float32
(``keep_fp32_modules``) when the trainer casts frozen weights to the compute dtype. A VAE marked
``force_upcast: false`` (madebyollin/sdxl-vae-fp16-fix and the like, set with ``model.vae_path``)
runs in the compute dtype.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import (
    Conditioning,
    DiffusionAdapter,
    check_lora_state_dict,
    encode_in_chunks,
    epsilon_or_v_schedule,
    is_local_path,
)

class SDXLAdapter(DiffusionAdapter):
    """SDXL behind the adapter protocol; the denoiser is the UNet, the VAE and both text encoders stay frozen."""

    family = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    default_guidance_scale = 5.0  # diffusers' SDXL default
    # The attention projections, as in diffusers' train_dreambooth_lora_sdxl.py and its SDXL DPO example.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    components = {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer",
        "scheduler": "scheduler config",
    }
    # SD1.5's UNet is a UNet2DConditionModel too: these tell the two apart before it loads
    # (DiffusionAdapter.check_component_configs); SDXL's attends to both encoders' states concatenated.
    component_config = {"unet": {"addition_embed_type": "text_time"}}
    text_width_check = ("unet", "cross_attention_dim", ("text_encoder", "text_encoder_2"))
    #: images per VAE call. One: at 1024 px the fp32 VAE's encoder peaks at ~2.5 GiB per image
    #: (measured, docs/models.md), more than the checkpointed UNet step, and one image fills a GPU.
    encode_chunk_size: int = 1

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        scheduler,
        num_inference_steps: int = 50,
        force_zeros_for_empty_prompt: bool = True,
    ):
        self.denoiser: nn.Module = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.schedule = epsilon_or_v_schedule(self.family, scheduler, num_inference_steps)

    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_inference_steps: int = 50,
        trust_remote_code: bool = False,
        vae_path: str | None = None,
        **ignored: Any,
    ) -> "SDXLAdapter":
        """Load every component of a ``StableDiffusionXLPipeline`` directory (or hub id, where online).

        ``vae_path`` replaces the pipeline's ``vae/`` with another ``AutoencoderKL`` directory (its
        own ``config.json``, or a pipeline directory with a ``vae/`` folder), e.g. an fp16-safe VAE.
        Weights load from safetensors when present; nothing executes code from the directory.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        source, index = cls.locate_pipeline(path)
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
            vae = cls._load_vae(source, vae_path)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2")
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")
            # The training view of the schedule; SDXL's EulerDiscreteScheduler config carries the same betas.
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        except OSError as error:  # missing/corrupt weight files, or no network for a hub id
            raise SipoError(f"could not load the sdxl model from {source}: {error}") from error
        if unet.config.get("addition_embed_type") != "text_time":
            raise SipoError(
                f"the UNet in {source} has no SDXL size/text conditioning (addition_embed_type "
                f"{unet.config.get('addition_embed_type')!r}); point model.pretrained_path at an SDXL base model"
            )
        return cls(
            unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, num_inference_steps,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )

    @staticmethod
    def _load_vae(source: str, vae_path: str | None):
        from diffusers import AutoencoderKL

        if not vae_path:
            return AutoencoderKL.from_pretrained(source, subfolder="vae")
        where = Path(vae_path).expanduser()
        if is_local_path(vae_path) and not (where / "config.json").is_file() and not (where / "vae" / "config.json").is_file():
            raise SipoError(
                f"model.vae_path {vae_path} holds no AutoencoderKL (no config.json there or in vae/); "
                "point it at a VAE directory such as a download of madebyollin/sdxl-vae-fp16-fix, or leave it empty"
            )
        subfolder = "vae" if (where / "vae" / "config.json").is_file() else None
        return AutoencoderKL.from_pretrained(str(where) if is_local_path(vae_path) else vae_path, subfolder=subfolder)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder, self.text_encoder_2]

    def keep_fp32_modules(self) -> list[nn.Module]:
        """The VAE when its config says it overflows in fp16 (``force_upcast``, true for SDXL's own)."""
        return [self.vae] if self.vae.config.get("force_upcast", True) else []

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_images(self, pictures: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in ``[-1, 1]`` -> scaled latents ``[N, 4, H/8, W/8]`` (float32), in chunks.

        The posterior mean, not a sample: x0 is then a function of the image (cacheable,
        reproducible), and the VAE's posterior std is tiny next to the diffusion noise.
        """
        if pictures.ndim != 4 or pictures.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(pictures.shape)}")
        param = next(self.vae.parameters())

        def encode_chunk(part: Tensor) -> Tensor:
            return self.vae.encode(part.to(device=param.device, dtype=param.dtype)).latent_dist.mode().float()

        return encode_in_chunks(encode_chunk, pictures, self.encode_chunk_size) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``{"encoder_hidden_states": [N, 77, d1 + d2], "text_embeds": [N, p2]}``.

        As ``StableDiffusionXLPipeline.encode_prompt`` with ``clip_skip=None``: each encoder's
        penultimate hidden state, concatenated; the pooled projection of the second encoder.
        """
        states = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tokens = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            device = next(encoder.parameters()).device
            output = encoder(tokens.input_ids.to(device), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder's)
        return {"encoder_hidden_states": torch.cat(states, dim=-1).float(), "text_embeds": pooled.float()}

    @staticmethod
    def time_ids(size_info: Tensor | None, batch_size: int, height: int, width: int) -> Tensor:
        """``[B, 6]`` float: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per pair.

        ``size_info`` is the datasets' ``[B, 4]`` (orig_h, orig_w, crop_top, crop_left); without
        it every pair is its own uncropped original, as the pipeline assumes when sampling.
        """
        if size_info is None:
            size_info = torch.tensor([[height, width, 0, 0]]).repeat(batch_size, 1)
        size_info = torch.as_tensor(size_info)
        if size_info.shape != (batch_size, 4):
            raise ValueError(f"size_info must be [{batch_size}, 4] (orig_h, orig_w, crop_top, crop_left), got {tuple(size_info.shape)}")
        target = torch.tensor([[height, width]]).repeat(batch_size, 1).to(size_info.device)
        return torch.cat([size_info.long(), target.long()], dim=1).float()

    def pair_conditioning(
        self, conditioning: Conditioning, size_info: Tensor | None, height: int, width: int
    ) -> Conditioning:
        """Adds ``time_ids`` ``[B, 6]`` (see `time_ids`) beside the text embeddings."""
        ids = self.time_ids(size_info, conditioning["text_embeds"].shape[0], height, width)
        return {**conditioning, "time_ids": ids.to(conditioning["text_embeds"].device)}

    # ------------------------------------------------------------------ denoiser
    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        model = self.denoiser if denoiser is None else denoiser
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return model(
            x_t, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"], added_cond_kwargs=added
        ).sample

    # ------------------------------------------------------------------ saving
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """Write ``pytorch_lora_weights.safetensors`` for ``StableDiffusionXLPipeline.load_lora_weights``.

        UNet LoRA only (the text encoders are frozen), keys in diffusers' naming, the ``LoraConfig``
        (rank, alpha, targets) in the file's metadata so the loader applies the trained scale.
        """
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        check_lora_state_dict(lora_state_dict)
        StableDiffusionXLPipeline.save_lora_weights(
            save_directory=str(output_dir),
            unet_lora_layers=convert_state_dict_to_diffusers(lora_state_dict),
            unet_lora_adapter_metadata=self.lora_config_dict(),
            safe_serialization=True,
        )

    # ------------------------------------------------------------------ sampling
    def pipeline(self):
        """A ``StableDiffusionXLPipeline`` over this adapter's modules (Euler, SDXL's own sampler)."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.denoiser,
            scheduler=EulerDiscreteScheduler.from_config(self.scheduler.config),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        **family_options: Any,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from the current denoiser (Euler, classifier-free guidance).

        ``height``/``width`` default to the UNet's ``sample_size`` times the VAE's downsampling
        (1024 for SDXL base); ``guidance_scale`` 5.0 is diffusers' SDXL default.
        ``family_options`` go to the pipeline call (e.g. ``negative_prompt``, ``original_size``).
        """
        images = self.pipeline()(
            list(prompts),
            generator=generator,
            num_inference_steps=num_inference_steps or self.default_num_inference_steps,
            guidance_scale=self.default_guidance_scale if guidance_scale is None else guidance_scale,
            height=height,
            width=width,
            output_type="pt",
            **family_options,
        ).images
        return images.float().clamp(0, 1)

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(
        cls, directory: str | Path, scale: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> Path:
        """Save a random-weight ``StableDiffusionXLPipeline`` to ``directory`` (diffusers format).

        ``scale="full"``: SDXL base 1.0's component configs (``sdxl_component_configs``): a 2.57B
        UNet, CLIP ViT-L and OpenCLIP ViT-bigG text encoders, the 84M VAE; ~14 GB in float32.
        ``scale="tiny"``: the same architecture at diffusers-test size (32-px images), seconds.
        Tokenizers are the offline byte-level CLIP tokenizer of ``sipo.models.random_init``.
        """
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from sipo.models.random_init import tiny_clip_tokenizer

        configs = sdxl_component_configs(scale)
        directory = Path(directory)
        with tempfile.TemporaryDirectory() as vocab_dir:
            tokenizer = tiny_clip_tokenizer(vocab_dir)
        special = {
            "vocab_size": max(configs["text_encoder"]["vocab_size"], len(tokenizer)),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**configs["text_encoder"], **special}))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**configs["text_encoder_2"], **special}))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=EulerDiscreteScheduler(**configs["scheduler"]),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        if dtype != torch.float32:
            pipe.to(dtype)
        pipe.save_pretrained(directory, safe_serialization=True)
        return directory


# --------------------------------------------------------------------------------------------
# Component configs. "full" = stabilityai/stable-diffusion-xl-base-1.0 (its unet/, vae/,
# text_encoder/, text_encoder_2/ config.json and scheduler/scheduler_config.json), written out
# here because nothing can be downloaded; "tiny" keeps every architectural feature (text_time
# embedding, two encoders, linear-projection transformers, per-level transformer depth) at toy size.

#: SDXL base 1.0's scheduler (EulerDiscreteScheduler, scaled_linear 0.00085 -> 0.012, epsilon).
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def sdxl_component_configs(scale: str = "tiny") -> dict[str, dict[str, Any]]:
    """Constructor kwargs of each SDXL component at ``scale`` ("tiny" or "full")."""
    if scale == "full":
        return {
            "unet": dict(
                sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_embed_type_num_heads=64,
                addition_time_embed_dim=256,
                # 6 size ids x 256 + the 1280-d pooled text embedding
                projection_class_embeddings_input_dim=2816,
                norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
            ),
            "vae": dict(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=32, scaling_factor=0.13025, force_upcast=True,
            ),
            "text_encoder": dict(  # CLIP ViT-L/14 text tower
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=768, layer_norm_eps=1e-5,
            ),
            "text_encoder_2": dict(  # OpenCLIP ViT-bigG/14 text tower, with its projection
                vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                projection_dim=1280, layer_norm_eps=1e-5,
            ),
            "scheduler": dict(SDXL_SCHEDULER),
        }
    if scale == "tiny":
        text = dict(
            vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
            layer_norm_eps=1e-5,
        )
        return {
            "unet": dict(
                sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
                cross_attention_dim=64, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,
                norm_num_groups=8,
            ),
            "vae": dict(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
                block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, scaling_factor=0.13025, force_upcast=True,
            ),
            "text_encoder": dict(text),
            "text_encoder_2": dict(text),
            "scheduler": dict(SDXL_SCHEDULER),
        }
    raise ValueError(f"scale must be 'tiny' or 'full', got {scale!r}")
