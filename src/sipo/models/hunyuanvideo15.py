"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline`` / ``HunyuanVideo15Transformer3DModel``).

Followed: diffusers 0.42.1 pipelines/hunyuan_video1_5/pipeline_hunyuan_video1_5.py (prompts, the
transformer's inputs, the inference grid) and Tencent's own trainer, train.py of
github.com/Tencent-Hunyuan/HunyuanVideo-1.5 (latents, noise levels, target, the t2v condition).

- ``x0``: the VAE posterior mode times ``vae.config.scaling_factor`` (1.03682), ``[1, 32, F', H/16, W/16]``
  with ``F' = (F - 1) / 4 + 1`` (121 frames -> 31): what the pipeline divides by before decoding
  (the trainer takes a posterior sample; sipo uses the mode, as for every family, so a pair's ``x0``
  is one fixed tensor the latent cache can hold).
- the transformer's input: ``[x_t, zeros (32 channels), zeros (1 channel)]`` on the channels (65), the
  pipeline's ``prepare_cond_latents_and_mask`` and the trainer's ``get_condition`` for t2v (no first
  frame), and all-zero ``image_embeds`` (no image: the transformer masks them out; the pipeline passes
  729, `predict` one, and drops the text padding every sample shares: masked tokens take no part, so the
  prediction is the same with ~100 instead of 1985 text tokens in the joint attention); patch size 1,
  positions from the latent grid inside the transformer (its ``rope``).
- conditioning: ``HunyuanVideo15Pipeline.encode_prompt``: Qwen2.5-VL-7B's text model (the third-last
  layer, the chat template's first 108 tokens cropped, 1000 tokens) -> ``encoder_hidden_states`` and
  ``encoder_attention_mask``; ByT5 (Glyph-SDXL-v2) on the quoted text of a prompt, 256 tokens (zeros and
  an all-zero mask without quotes) -> ``encoder_hidden_states_2``, ``encoder_attention_mask_2``. Both
  encoders follow ``model.text_encoder_device`` (Qwen2.5-VL-7B: 15 GB in bf16); ``model.prompt_cache_size``
  and ``sipo cache`` keep the four tensors per prompt.
- schedule: rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``, target ``u = eps - x0`` (train.py:
  ``target = noise - latents``); its training sigmas are ``shift(u)`` with ``train_timestep_shift`` 3.0,
  ``shift(u) = 3u / (1 + 2u)``, from a logit-normal ``u`` (its default ``snr_type`` lognorm:
  ``objective.timestep_sampling=logit_normal``, or uniform ``u``), so training index ``t`` is
  ``sigma = shift((t + 1) / T)``; the transformer gets ``timestep = sigma * T`` as both the trainer and
  the pipeline pass it. The pipeline samples on ``linspace(1, 0, n + 1)[:-1]`` shifted by its scheduler's
  ``shift`` (5.0 for 480p, 9.0 for 720p t2v), and the SIPO weight's ``s`` is the previous step of that
  grid (``sipo.schedules.two_shift_flow_schedule``).
- LoRA: HunyuanVideo15Pipeline has no LoRA loader in diffusers 0.42.1 (diffusers#14420); sipo writes the
  usual diffusers LoRA file (``transformer.``-prefixed peft keys, the LoraConfig in its metadata) and
  `load_lora_weights` loads it into a pipeline's transformer through diffusers' peft integration.
  Targets (`LORA_TARGETS`): the trainer's default is every Linear (``target_modules="all-linear"``);
  sipo takes every Linear of the double-stream and token-refiner blocks, video and text streams, attention
  and feed-forward, and leaves out the adaLN modulation and the embedders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning, check_lora_state_dict, require_flow_match_scheduler
from sipo.models.video import VideoAdapter, load_component
from sipo.schedules import two_shift_flow_schedule

#: hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v transformer/config.json (diffusers
#: scripts/convert_hunyuan_video1_5_to_diffusers.py, "480p_t2v"; 720p_t2v differs in target_size 960).
FULL_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
    num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584,
    text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0, rope_axes_dim=(16, 56, 56), use_meanflow=False,
    target_size=640, task_type="t2v",
)
#: its scheduler/scheduler_config.json: FlowMatchEulerDiscreteScheduler with shift 5.0 (720p t2v: 9.0)
FULL_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=5.0)
#: train.py's TrainingConfig.train_timestep_shift
TRAIN_SHIFT = 3.0
#: the usual clip: 121 frames (the pipeline's num_frames default) at 480 x 848, the pipeline's default size
#: for target_size 640 at 16:9 -> 31 x 30 x 53 latents
USUAL_FRAMES, USUAL_HEIGHT, USUAL_WIDTH = 121, 480, 848
#: HunyuanVideo15Pipeline.vision_num_semantic_tokens: the zero image tokens of text-to-video
IMAGE_TOKENS = 729
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: the attention (both streams) and feed-forward Linears of every double-stream and token-refiner block
LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)

# Toy sizes: 9 frames of 32x32 -> 3 latent frames of 4x2x2 (16x spatial, 4x temporal) -> 12 tokens.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
    mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=16, image_embed_dim=12,
    rope_axes_dim=(2, 2, 4), target_size=32, task_type="t2v",
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
    spatial_compression_ratio=16, temporal_compression_ratio=4, downsample_match_channel=False,
    upsample_match_channel=False,
)
TINY_QWEN25_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
    rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, rope_theta=1000000.0,
)
#: Qwen2.5's chat format (``<|im_start|>role\ncontent<|im_end|>\n``), what apply_chat_template needs
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_lora_weights(pipe: Any, path: str | Path, adapter_name: str = "default",
                      weight_name: str = LORA_WEIGHT_NAME) -> None:
    """Load a LoRA file sipo wrote (``path``: the file, or the directory holding ``weight_name``) into
    ``pipe.transformer`` of a ``HunyuanVideo15Pipeline``, which has no ``load_lora_weights`` of its own
    (diffusers#14420). Usage::

        from diffusers import HunyuanVideo15Pipeline
        from sipo.models.hunyuanvideo15 import load_lora_weights

        pipe = HunyuanVideo15Pipeline.from_pretrained("hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v")
        load_lora_weights(pipe, "runs/hunyuanvideo15_lora_sipo")

    The file is diffusers' LoRA format (``transformer.``-prefixed peft keys; rank, alpha and targets in its
    ``lora_adapter_metadata``), loaded through the transformer's own peft integration
    (``PeftAdapterMixin.load_lora_adapter``): each target Linear computes ``W x + (alpha / r) B A x``.
    A file without metadata loads with ``alpha = r`` (what diffusers assumes).
    """
    from safetensors import safe_open

    file = Path(path)
    if file.is_dir():
        file = file / weight_name
    if not file.is_file():
        raise SipoError(f"no LoRA file at {file}; pass the run's output directory or its {weight_name}")
    with safe_open(str(file), framework="pt") as handle:
        state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    # diffusers' packed metadata ("transformer.r", ...): load_lora_adapter strips the prefix itself
    metadata = json.loads(raw) if raw else None
    if not any(key.startswith("transformer.") for key in state_dict):
        raise SipoError(f"{file} holds no transformer LoRA weights (no 'transformer.' keys); pass a file sipo wrote")
    pipe.transformer.load_lora_adapter(state_dict, prefix="transformer", adapter_name=adapter_name, metadata=metadata)


def drop_shared_padding(states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(states, mask)`` ``[B, L, d]``, ``[B, L]`` without the positions masked in every sample (one kept where
    all are masked); the kept positions stay in order."""
    keep = mask.bool().any(dim=0)
    if not keep.any():
        keep = torch.zeros_like(keep)
        keep[0] = True
    return states[:, keep], mask[:, keep]


def tiny_qwen25_tokenizer(directory: str | Path | None = None):
    """The offline byte-level Qwen2 tokenizer of `sipo.models.random_init.tiny_qwen2_tokenizer` with Qwen2.5's
    chat template, which HunyuanVideo15Pipeline applies to every prompt."""
    from sipo.models.random_init import tiny_qwen2_tokenizer

    tokenizer = tiny_qwen2_tokenizer(None, model_max_length=2048)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


class HunyuanVideo15Adapter(VideoAdapter):
    """HunyuanVideo 1.5 T2V: the transformer trains (LoRA); VAE, Qwen2.5-VL and ByT5 stay frozen."""

    family = "hunyuanvideo15"
    pipeline_class_names = ("HunyuanVideo15Pipeline",)
    pipeline_class_name = "HunyuanVideo15Pipeline"
    components = {
        "transformer": "HunyuanVideo15Transformer3DModel",
        "vae": "AutoencoderKLHunyuanVideo15",
        "text_encoder": "Qwen2_5_VLTextModel",
        "tokenizer": "Qwen2Tokenizer",
        "text_encoder_2": "T5EncoderModel (ByT5)",
        "tokenizer_2": "ByT5Tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler config",
        "guider": "ClassifierFreeGuidance config",
    }
    lora_target_modules = LORA_TARGETS
    default_num_frames = USUAL_FRAMES
    default_height = USUAL_HEIGHT
    default_width = USUAL_WIDTH
    default_guidance_scale = 6.0

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, text_encoder_2, tokenizer_2, guider=None,
                 num_inference_steps: int = 50, **options: Any):
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, **options)
        require_flow_match_scheduler(self.family, scheduler)
        self.text_encoder_2, self.tokenizer_2, self.guider = text_encoder_2, tokenizer_2, guider
        self.temporal_compression = int(vae.config.temporal_compression_ratio)
        self.vae_scale_spatial = int(vae.config.spatial_compression_ratio)
        self.spatial_multiple = self.vae_scale_spatial
        self.inference_shift = float(scheduler.config.get("shift", 1.0))
        self.schedule = two_shift_flow_schedule(
            int(scheduler.config.num_train_timesteps), TRAIN_SHIFT, self.inference_shift, num_inference_steps)

    @classmethod
    def load_components(cls, path: Path, index: dict[str, Any]) -> dict[str, Any]:
        from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
        from diffusers.guiders import ClassifierFreeGuidance
        from transformers import AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLTextModel, T5EncoderModel

        return dict(
            transformer=HunyuanVideo15Transformer3DModel.from_pretrained(str(path), subfolder="transformer"),
            vae=AutoencoderKLHunyuanVideo15.from_pretrained(str(path), subfolder="vae"),
            text_encoder=load_component(path, "text_encoder", index, Qwen2_5_VLTextModel),
            tokenizer=AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer"),
            text_encoder_2=load_component(path, "text_encoder_2", index, T5EncoderModel),
            tokenizer_2=ByT5Tokenizer.from_pretrained(str(path), subfolder="tokenizer_2"),
            scheduler=load_component(path, "scheduler", index, FlowMatchEulerDiscreteScheduler),
            guider=load_component(path, "guider", index, ClassifierFreeGuidance) if (path / "guider").is_dir() else None,
        )

    @property
    def max_sequence_length(self) -> int:
        """HunyuanVideo15Pipeline's Qwen prompt length (its ``tokenizer_max_length``)."""
        return 1000

    def pipeline(self, **overrides: Any):
        """``HunyuanVideo15Pipeline`` over this adapter's modules; ``guider`` its CFG (the saved one by default)."""
        from diffusers.guiders import ClassifierFreeGuidance

        guider = overrides.pop("guider", None) or self.guider or ClassifierFreeGuidance(guidance_scale=self.default_guidance_scale)
        return super().pipeline(**{"text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2,
                                   "guider": guider, **overrides})

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder, self.text_encoder_2]

    def to(self, device: torch.device | str) -> "HunyuanVideo15Adapter":
        super().to(device)
        if self.text_encoder_device == "auto":
            self.text_encoder_2.to(device)
        return self

    # ------------------------------------------------------------------ encoding
    def encode_clip(self, clip: Tensor) -> Tensor:
        """``[1, F, 3, H, W]`` -> ``[1, 32, (F-1)/4+1, H/16, W/16]``: the posterior mode times ``scaling_factor``."""
        latents = self.vae.encode(clip.permute(0, 2, 1, 3, 4)).latent_dist.mode().float()
        return latents * float(self.vae.config.scaling_factor)

    def _encode_prompts_uncached(self, prompts: list[str]) -> dict[str, Tensor]:
        """The four tensors of ``HunyuanVideo15Pipeline.encode_prompt`` (Qwen2.5-VL states and mask, ByT5
        glyph states and mask), computed where the text encoders are."""
        if self._prompt_pipeline is None:
            self._prompt_pipeline = self.pipeline()
        device = next(self.text_encoder.parameters()).device
        states, mask, states_2, mask_2 = self._prompt_pipeline.encode_prompt(
            list(prompts), device=device, dtype=torch.float32, batch_size=len(prompts))
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask,
                "encoder_hidden_states_2": states_2, "encoder_attention_mask_2": mask_2}

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> ``sigma_t * T``: the trainer's shifted timestep, the pipeline's scheduler timestep."""
        sigma = self.schedule.b[timesteps.long().cpu()].float()
        return (sigma * self.schedule.num_train_timesteps).to(timesteps.device)

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` ``[B, 32, F, h, w]``, called as HunyuanVideo15Pipeline calls the transformer
        for text-to-video: zero condition latents and mask on the channels, zero image embeddings."""
        model = self.denoiser if denoiser is None else denoiser
        config = model.config
        batch, channels, frames, height, width = x_t.shape
        condition = x_t.new_zeros(batch, channels + 1, frames, height, width)
        # Masked tokens take no part: the transformer masks a padded text token as query and as key (and its
        # token refiner pools over the mask), and t2v's all-zero image tokens are all masked. So the padding
        # every sample of the batch shares is dropped and one zero image token stands for the pipeline's 729:
        # the same prediction (the one-step test against the pipeline checks it) with ~100 text tokens in the
        # joint attention instead of 1985.
        states, mask = drop_shared_padding(conditioning["encoder_hidden_states"], conditioning["encoder_attention_mask"])
        states_2, mask_2 = drop_shared_padding(conditioning["encoder_hidden_states_2"], conditioning["encoder_attention_mask_2"])
        image_embeds = x_t.new_zeros(batch, 1, config.image_embed_dim)
        dtype = x_t.dtype
        return model(
            hidden_states=torch.cat([x_t, condition], dim=1),
            image_embeds=image_embeds,
            timestep=self.model_timesteps(timesteps.to(x_t.device)).to(dtype),
            encoder_hidden_states=states.to(dtype),
            encoder_attention_mask=mask.to(dtype),
            encoder_hidden_states_2=states_2.to(dtype),
            encoder_attention_mask_2=mask_2.to(dtype),
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ saving
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """``pytorch_lora_weights.safetensors`` in diffusers' LoRA format (``transformer.`` keys, the LoraConfig
        in its metadata), written by diffusers' own LoRA writer; load it with `load_lora_weights`."""
        from diffusers.loaders.lora_base import LoraBaseMixin

        check_lora_state_dict(lora_state_dict)
        LoraBaseMixin._save_lora_weights(
            save_directory=str(output_dir), lora_layers={"transformer": lora_state_dict},
            lora_metadata={"transformer": self.lora_config_dict()}, is_main_process=True, weight_name=LORA_WEIGHT_NAME,
            save_function=None, safe_serialization=True,
        )

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | list[torch.Generator] | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None, height: int | None = None,
               width: int | None = None, num_frames: int | None = None, negative_prompt: str = "",
               **pipeline_options: Any) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` through ``HunyuanVideo15Pipeline`` with its CFG guider at
        ``guidance_scale``; prompts encoded by `encode_prompts` (text encoders where they live).

        One prompt per pipeline call (``generator``: one per prompt, or one for all): the VAE's causal
        attention in diffusers 0.42.1 builds its mask ``[B, L, L]`` against queries ``[B, 1, L, C]``, which
        broadcasts to ``[B, B, L, L]`` and fails for a batch of two or more clips.
        """
        from diffusers.guiders import ClassifierFreeGuidance

        prompts = list(prompts)
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        device, dtype = self.device, next(self.denoiser.parameters()).dtype
        positive = self.encode_prompts(prompts)
        negative = self.encode_prompts([negative_prompt])
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        pipe = self.pipeline(guider=ClassifierFreeGuidance(guidance_scale=scale))
        def trimmed(encoded: Conditioning, rows: slice, prefix: str) -> dict[str, Tensor]:
            # the padding masked in every row takes no part in the transformer's attention (see `predict`)
            states, mask = drop_shared_padding(encoded["encoder_hidden_states"][rows], encoded["encoder_attention_mask"][rows])
            states_2, mask_2 = drop_shared_padding(encoded["encoder_hidden_states_2"][rows], encoded["encoder_attention_mask_2"][rows])
            return {f"{prefix}prompt_embeds": states.to(device, dtype), f"{prefix}prompt_embeds_mask": mask.to(device),
                    f"{prefix}prompt_embeds_2": states_2.to(device, dtype), f"{prefix}prompt_embeds_mask_2": mask_2.to(device)}

        unconditional = trimmed(negative, slice(0, 1), "negative_")
        videos = []
        for index, prompt_generator in enumerate(generators):
            videos.append(pipe(
                **trimmed(positive, slice(index, index + 1), ""), **unconditional,
                num_frames=num_frames or self.default_num_frames, height=height or self.default_height,
                width=width or self.default_width, num_inference_steps=num_inference_steps or self.default_num_inference_steps,
                generator=prompt_generator,
                output_type="pt", **pipeline_options,
            ).frames)
        return torch.cat(videos).float().clamp(0, 1)

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(cls, directory: str | Path, scale: str = "tiny", seed: int = 0,
                              torch_dtype: torch.dtype = torch.float32) -> Path:
        """Save a random-weight ``HunyuanVideo15Pipeline`` at the toy sizes above: a 3-layer Qwen2.5-VL text
        model over the offline byte-level tokenizer with Qwen's chat template, a one-layer ByT5 over
        ``ByT5Tokenizer`` (bytes, no files), the 480p t2v scheduler (shift 5) and guider (6.0)."""
        if scale != "tiny":
            raise ValueError("only scale='tiny' is written to disk (the full transformer is 8.3B: build it on the meta device)")
        from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
        from diffusers.guiders import ClassifierFreeGuidance
        from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

        from sipo.models.random_init import TINY_T5_ENCODER_CONFIG

        torch.manual_seed(seed)
        tokenizer = tiny_qwen25_tokenizer()
        text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **TINY_QWEN25_TEXT_CONFIG))
        tokenizer_2 = ByT5Tokenizer()
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **TINY_T5_ENCODER_CONFIG))
        transformer = HunyuanVideo15Transformer3DModel(**TINY_TRANSFORMER_CONFIG)
        vae = AutoencoderKLHunyuanVideo15(**TINY_VAE_CONFIG)
        parts = dict(
            text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG), text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=6.0),
        )
        return cls.save_random_pipeline(directory, parts, torch_dtype, cast=("transformer", "text_encoder", "text_encoder_2"))
