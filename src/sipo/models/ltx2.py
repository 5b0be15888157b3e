"""LTX-2 text-to-video (``LTX2Pipeline`` / ``LTX2VideoTransformer3DModel``), trained video-only.

Followed: diffusers 0.42.1 pipelines/ltx2/pipeline_ltx2.py (prompts, connectors, latent
normalisation, packing, position coordinates, the token-dependent shift, how the transformer is
called) and Lightricks' own trainer, packages/ltx-trainer of github.com/Lightricks/LTX-2
(training_strategies/text_to_video.py: noise, target, timesteps; timestep_samplers.py: the
noise-level density; configs/t2v_lora.yaml: LoRA targets).

- the audio branch: LTX-2's transformer is one audio-video model (a video stream, an audio stream,
  audio-to-video and video-to-audio cross-attention in every block). sipo trains video preference
  pairs and nothing else: the official trainer's text-to-video strategy with ``with_audio: false``,
  which hands ltx-core's transformer no audio modality, so no block runs the audio stream or the
  audio-to-video attention (ltx_core/model/transformer/transformer.py: ``run_a2v`` needs audio). In
  diffusers the same computation is the call with ``isolate_modalities=True`` (audio-to-video and
  video-to-audio attention off, what LTX2Pipeline's modality-isolation guidance runs): the video
  output then depends on no audio input, and the audio stream is fed one zero token (the diffusers
  transformer needs one) whose output is discarded. LoRA sits on the video attention only
  (``attn1``/``attn2`` q, k, v, out: the video modules of configs/t2v_lora.yaml); audio, audio-video
  and connector weights stay as published, so the LoRA leaves the audio the pipeline generates
  beside the video untouched except through the video tokens it attends to at inference.
- ``x0``: the video VAE posterior mode ``[1, 128, F', H/32, W/32]`` (``F' = (F - 1) / 8 + 1``: 121
  frames -> 16), normalised per channel as ``LTX2Pipeline._normalize_latents`` does,
  ``(z - latents_mean) * scaling_factor / latents_std`` (the VAE's ``latents_mean``/``latents_std``
  buffers): the inverse of ``_denormalize_latents`` before decoding.
- packing and positions: the transformer's patch size is 1, so ``_pack_latents`` makes one token per
  latent voxel, ``[B, F' h w, 128]``; the position coordinates are the transformer's own
  ``rope.prepare_video_coords(F', h, w, fps)`` (each token's pixel-space frame/row/column span,
  frames divided by the frame rate), as the pipeline builds them, at ``frame_rate`` 24 (the
  pipeline's default and what ``sipo eval`` samples at: set ``data.fps: 24``).
- conditioning: ``LTX2Pipeline.encode_prompt`` (Gemma 3 12B, ``Gemma3ForConditionalGeneration``:
  every layer's hidden states stacked, left-padded to 1024 tokens) then the pipeline's
  ``connectors`` (``LTX2TextConnectors``), whose video output and attention mask are what the
  transformer receives (``encoder_hidden_states``, ``encoder_attention_mask``). Both are frozen
  and follow ``model.text_encoder_device`` (Gemma 3 12B is 24 GB in bf16; `sample` moves the 1.4B
  connectors to the transformer's device for the pipeline call only); ``model.prompt_cache_size``
  and ``sipo cache`` keep the (connector) embeddings so Gemma need not run during training.
- schedule: rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``, target ``u = eps - x0``
  (text_to_video.py: ``video_targets = video_noise - video_latents``); the trainer draws sigma
  itself, unshifted, so training index ``t`` is ``sigma = (t + 1) / T``; the transformer gets
  ``timestep = sigma * T`` (and ``sigma`` the same, as the pipeline passes both).
  ``objective.timestep_sampling=ltx2`` draws sigma from the trainer's own density
  (`sipo.preference.ltx2_sigmas`). Its scheduler config (``use_dynamic_shifting``, base/max shift
  0.95/2.05 at 1024/4096 tokens, ``shift_terminal`` 0.1) shifts and stretches the inference grid by
  the clip's token count, so the SIPO weight's ``s`` is the previous step of that grid at the run's
  clip size (``sipo.schedules.ltx2_flow_schedule``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning, require_flow_match_scheduler
from sipo.models.video import VideoAdapter, load_component
from sipo.schedules import ltx2_flow_schedule, resolution_shift_mu

#: the LTX-2.0 transformer/config.json (diffusers scripts/convert_ltx2_to_diffusers.py, version "2.0").
FULL_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=128,
    cross_attention_dim=4096, vae_scale_factors=(8, 32, 32), pos_embed_max_pos=20, base_height=2048, base_width=2048,
    audio_in_channels=128, audio_out_channels=128, audio_patch_size=1, audio_patch_size_t=1,
    audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048, audio_scale_factor=4,
    audio_pos_embed_max_pos=20, audio_sampling_rate=16000, audio_hop_length=160, num_layers=48,
    activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6,
    caption_channels=3840, attention_bias=True, attention_out_bias=True, rope_theta=10000.0,
    rope_double_precision=True, causal_offset=1, timestep_scale_multiplier=1000,
    cross_attn_timestep_scale_multiplier=1000, rope_type="split",
)
#: its scheduler/scheduler_config.json (the same script; ai-toolkit's LTX-2 loader writes the same values).
FULL_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
    base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1, time_shift_type="exponential",
    invert_sigmas=False, stochastic_sampling=False,
)
#: the usual clip: LTX2Pipeline's default 121 frames at 512 x 768 -> 16 x 16 x 24 = 6144 tokens.
USUAL_FRAMES, USUAL_HEIGHT, USUAL_WIDTH = 121, 512, 768
#: LTX2Pipeline's prompt length (its __call__'s max_sequence_length default).
MAX_SEQUENCE_LENGTH = 1024
#: the frame rate the positions are computed at (LTX2Pipeline's default frame_rate).
FRAME_RATE = 24.0
#: the video attention of every block: the trainer's configs/t2v_lora.yaml video modules (q, k, v, out of
#: the self- and text cross-attention). peft matches a target as a whole dotted suffix, so "attn1.to_q"
#: is not "audio_attn1.to_q".
VIDEO_ATTENTION_TARGETS = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))

# Toy sizes: 9 frames of 32x32 -> 3 latent frames of 8x2x2 (16x spatial, 4x temporal) -> 12 tokens.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
    cross_attention_dim=16, vae_scale_factors=(4, 16, 16), audio_in_channels=4, audio_out_channels=4,
    audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1,
    qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False, rope_type="split",
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
    layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, True),
    decoder_spatio_temporal_scaling=(True, True), decoder_inject_noise=(False, False, False),
    downsample_type=("spatiotemporal", "spatiotemporal"), upsample_type=("spatiotemporal", "spatiotemporal"),
    upsample_residual=(False, False), upsample_factor=(1, 1), timestep_conditioning=False, patch_size=4,
    patch_size_t=1, encoder_causal=True, decoder_causal=False,
)
TINY_AUDIO_VAE_CONFIG: dict[str, Any] = dict(
    base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
    resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
    mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
)
TINY_VOCODER_CONFIG: dict[str, Any] = dict(
    in_channels=16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
    resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
)
#: a two-layer Gemma 3 text model (hidden 16) inside the conditional-generation wrapper the pipeline takes,
#: with a one-layer SigLIP tower it never calls for text.
TINY_GEMMA3_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=8, max_position_embeddings=64, sliding_window=8, rope_theta=10000.0,
)
TINY_SIGLIP_CONFIG: dict[str, Any] = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4,
)
#: tokens of the tiny tokenizer's prompts (padded to this length, as the real one pads to 1024)
TINY_MAX_SEQUENCE_LENGTH = 16


def tiny_gemma_tokenizer(directory: str | Path | None = None, model_max_length: int = TINY_MAX_SEQUENCE_LENGTH):
    """A ``GemmaTokenizer`` (byte-fallback BPE, as Gemma's) over a vocabulary made here; no download.

    ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``, ``<mask>`` (Gemma's ids 0-4), then every byte as
    ``<0xNN>`` (so any text tokenizes) and ``▁`` plus a few words. Saved to ``directory`` when given.
    """
    from transformers import GemmaTokenizer

    from sipo.models.random_init import _WORDS

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", *(f"▁{word}" for word in _WORDS)]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def video_tokens(num_frames: int, height: int, width: int, temporal: int = 8, spatial: int = 32) -> int:
    """Transformer tokens of a clip: latent frames x rows x columns (patch size 1): 6144 for 121 x 512 x 768."""
    return ((num_frames - 1) // temporal + 1) * (height // spatial) * (width // spatial)


class LTX2Adapter(VideoAdapter):
    """LTX-2: the video attention of the audio-video transformer trains (LoRA); everything else is frozen."""

    family = "ltx2"
    pipeline_class_names = ("LTX2Pipeline",)
    pipeline_class_name = "LTX2Pipeline"
    components = {
        "transformer": "LTX2VideoTransformer3DModel",
        "vae": "AutoencoderKLLTX2Video",
        "audio_vae": "AutoencoderKLLTX2Audio",
        "vocoder": "LTX2Vocoder",
        "text_encoder": "Gemma3ForConditionalGeneration",
        "tokenizer": "GemmaTokenizer",
        "connectors": "LTX2TextConnectors",
        "scheduler": "FlowMatchEulerDiscreteScheduler config",
    }
    lora_target_modules = VIDEO_ATTENTION_TARGETS
    default_num_frames = USUAL_FRAMES
    default_height = USUAL_HEIGHT
    default_width = USUAL_WIDTH
    default_guidance_scale = 3.0
    default_num_inference_steps = 30  # LTX2Pipeline's default

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, connectors, audio_vae, vocoder,
                 num_inference_steps: int = 30, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, **options: Any):
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, **options)
        require_flow_match_scheduler(self.family, scheduler)
        self.connectors, self.audio_vae, self.vocoder = connectors, audio_vae, vocoder
        self.temporal_compression = int(vae.temporal_compression_ratio)
        self.vae_scale_spatial = int(vae.spatial_compression_ratio)
        self.spatial_multiple = self.vae_scale_spatial
        # the inference grid of s (SPEC 10): the pipeline shifts it by the sampled clip's token count
        # (no clip size given: the usual clip's 6144 tokens, whatever the VAE's factors)
        if num_frames is None and height is None and width is None:
            self.tokens = video_tokens(USUAL_FRAMES, USUAL_HEIGHT, USUAL_WIDTH)
        else:
            frames, rows, columns = num_frames or USUAL_FRAMES, height or USUAL_HEIGHT, width or USUAL_WIDTH
            self.tokens = video_tokens(frames, rows, columns, self.temporal_compression, self.vae_scale_spatial)
        config = scheduler.config
        num_train_timesteps = int(config.num_train_timesteps)
        if config.get("use_dynamic_shifting"):
            self.mu = resolution_shift_mu(
                self.tokens, int(config.get("base_image_seq_len", 1024)), int(config.get("max_image_seq_len", 4096)),
                float(config.get("base_shift", 0.95)), float(config.get("max_shift", 2.05)),
            )
        else:
            self.mu = math.log(float(config.get("shift", 1.0)))
        self.schedule = ltx2_flow_schedule(num_train_timesteps, self.mu, config.get("shift_terminal"), num_inference_steps)

    @classmethod
    def from_pretrained(cls, path: str | Path, num_inference_steps: int = 30, trust_remote_code: bool = False,
                        text_encoder_device: str = "auto", prompt_cache_size: int = 0, num_frames: int | None = None,
                        height: int | None = None, width: int | None = None, **ignored: Any) -> "LTX2Adapter":
        """Load a local ``LTX2Pipeline`` directory; ``num_frames``/``height``/``width``: the clip size the
        run trains and samples at (the inference grid of ``s`` depends on its token count)."""
        from sipo.models.base import read_model_index

        path = cls.check_pipeline_directory(path)
        index = read_model_index(path)
        try:
            parts = cls.load_components(path, index)
        except OSError as error:
            raise SipoError(f"could not load the {cls.family} model from {path}: {error}") from error
        return cls(**parts, num_inference_steps=num_inference_steps, text_encoder_device=text_encoder_device,
                   prompt_cache_size=prompt_cache_size, num_frames=num_frames, height=height, width=width)

    @classmethod
    def load_components(cls, path: Path, index: dict[str, Any]) -> dict[str, Any]:
        from diffusers import (
            AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel,
        )
        from diffusers.pipelines.ltx2 import LTX2TextConnectors
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
        from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

        return dict(
            transformer=LTX2VideoTransformer3DModel.from_pretrained(str(path), subfolder="transformer"),
            vae=AutoencoderKLLTX2Video.from_pretrained(str(path), subfolder="vae"),
            audio_vae=AutoencoderKLLTX2Audio.from_pretrained(str(path), subfolder="audio_vae"),
            vocoder=load_component(path, "vocoder", index, LTX2Vocoder),
            text_encoder=load_component(path, "text_encoder", index, Gemma3ForConditionalGeneration),
            tokenizer=AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer"),
            connectors=LTX2TextConnectors.from_pretrained(str(path), subfolder="connectors"),
            scheduler=load_component(path, "scheduler", index, FlowMatchEulerDiscreteScheduler),
        )

    @property
    def max_sequence_length(self) -> int:
        """1024 (the pipeline's), or the tokenizer's own limit where it is shorter (the tiny one's 16)."""
        return int(min(MAX_SEQUENCE_LENGTH, self.tokenizer.model_max_length))

    def pipeline(self, **overrides: Any):
        """``LTX2Pipeline`` over this adapter's modules (audio VAE, vocoder, connectors included)."""
        return super().pipeline(**{"connectors": self.connectors, "audio_vae": self.audio_vae,
                                   "vocoder": self.vocoder, **overrides})

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder, self.connectors, self.audio_vae, self.vocoder]

    def to(self, device: torch.device | str) -> "LTX2Adapter":
        """Gemma and the connectors (1.4B) follow ``text_encoder_device``; `sample` brings the connectors to
        the transformer's device for its pipeline call only (the pipeline runs them there)."""
        super().to(device)
        for module in (self.audio_vae, self.vocoder):
            module.to(device)
        if self.text_encoder_device == "auto":
            self.connectors.to(device)
        return self

    # ------------------------------------------------------------------ encoding
    def encode_clip(self, clip: Tensor) -> Tensor:
        """``[1, F, 3, H, W]`` -> ``[1, 128, (F-1)/8+1, H/32, W/32]``: the posterior mode, normalised as the pipeline does."""
        latents = self.vae.encode(clip.permute(0, 2, 1, 3, 4)).latent_dist.mode().float()
        mean = self.vae.latents_mean.float().view(1, -1, 1, 1, 1).to(latents.device)
        std = self.vae.latents_std.float().view(1, -1, 1, 1, 1).to(latents.device)
        return (latents - mean) * float(self.vae.config.scaling_factor) / std

    def _encode_prompts_uncached(self, prompts: list[str]) -> dict[str, Tensor]:
        """``LTX2Pipeline.encode_prompt`` (Gemma, every layer's states) through the pipeline's ``connectors``:
        ``{"encoder_hidden_states": [N, L, dim], "encoder_attention_mask": [N, L]}``, what the transformer's
        video stream receives."""
        if self._prompt_pipeline is None:
            self._prompt_pipeline = self.pipeline()
        pipe = self._prompt_pipeline
        device = next(self.text_encoder.parameters()).device
        embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length, device=device)
        connectors_device = next(self.connectors.parameters()).device
        video, _, video_mask = self.connectors(embeds.to(connectors_device), mask.to(connectors_device),
                                               padding_side=getattr(self.tokenizer, "padding_side", "left"))
        return {"encoder_hidden_states": video.float(), "encoder_attention_mask": video_mask.float()}

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> ``sigma_t * T``: the pipeline's scheduler timestep (``timestep`` and ``sigma``)."""
        sigma = self.schedule.b[timesteps.long().cpu()].float()
        return (sigma * self.schedule.num_train_timesteps).to(timesteps.device)

    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` ``[B, C, F, h, w]``: packed to tokens, the video stream called as
        LTX2Pipeline calls it, with the audio-video attention off (the video-only model), unpacked back."""
        model = self.denoiser if denoiser is None else denoiser
        config = model.config
        batch, _, frames, height, width = x_t.shape
        tokens = x_t.permute(0, 2, 3, 4, 1).reshape(batch, frames * height * width, -1)  # LTX2Pipeline._pack_latents, patch 1
        timestep = self.model_timesteps(timesteps.to(x_t.device))
        states = conditioning["encoder_hidden_states"].to(tokens.dtype)
        # one zero audio token and zero audio text: with isolate_modalities the video never reads them
        audio_width = config.caption_channels if config.get("use_prompt_embeddings", True) else config.audio_cross_attention_dim
        audio_tokens = tokens.new_zeros(batch, 1, config.audio_in_channels)
        audio_text = tokens.new_zeros(batch, 1, audio_width)
        video_coords = model.rope.prepare_video_coords(batch, frames, height, width, x_t.device, fps=FRAME_RATE)
        output = model(
            hidden_states=tokens, audio_hidden_states=audio_tokens, encoder_hidden_states=states,
            audio_encoder_hidden_states=audio_text, timestep=timestep, sigma=timestep,
            encoder_attention_mask=conditioning["encoder_attention_mask"], audio_encoder_attention_mask=None,
            num_frames=frames, height=height, width=width, fps=FRAME_RATE, audio_num_frames=1,
            video_coords=video_coords, isolate_modalities=True, use_cross_timestep=True, return_dict=False,
        )[0]
        return output.reshape(batch, frames, height, width, -1).permute(0, 4, 1, 2, 3)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
               num_frames: int | None = None, negative_prompt: str = "", **pipeline_options: Any) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` through ``LTX2Pipeline`` (video and audio together, the
        audio discarded). Gemma runs where ``text_encoder_device`` puts it; its states go to the pipeline,
        which runs the connectors and the rest on the transformer's device."""
        pipe = self.pipeline()
        text_device = next(self.text_encoder.parameters()).device
        device, dtype = self.device, next(self.denoiser.parameters()).dtype
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            list(prompts), negative_prompt=[negative_prompt] * len(prompts), do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length, device=text_device)
        connectors_device = next(self.connectors.parameters()).device
        self.connectors.to(device)
        try:
            frames = self._pipeline_frames(pipe, embeds, mask, negative, negative_mask, device, dtype, num_frames, height,
                                           width, num_inference_steps, guidance_scale, generator, pipeline_options)
        finally:
            self.connectors.to(connectors_device)
        return frames.float().clamp(0, 1)

    def _pipeline_frames(self, pipe, embeds, mask, negative, negative_mask, device, dtype, num_frames, height, width,
                         num_inference_steps, guidance_scale, generator, pipeline_options) -> Tensor:
        """One ``LTX2Pipeline`` call on Gemma states (the connectors on the transformer's device): ``frames``."""
        return pipe(
            prompt_embeds=embeds.to(device, dtype), prompt_attention_mask=mask.to(device),
            negative_prompt_embeds=negative.to(device, dtype), negative_prompt_attention_mask=negative_mask.to(device),
            num_frames=num_frames or self.default_num_frames, height=height or self.default_height,
            width=width or self.default_width, num_inference_steps=num_inference_steps or self.default_num_inference_steps,
            frame_rate=FRAME_RATE,
            guidance_scale=self.default_guidance_scale if guidance_scale is None else guidance_scale,
            generator=generator, output_type="pt", max_sequence_length=self.max_sequence_length, **pipeline_options,
        ).frames

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(cls, directory: str | Path, scale: str = "tiny", seed: int = 0,
                              torch_dtype: torch.dtype = torch.float32) -> Path:
        """Save a random-weight ``LTX2Pipeline``: the toy sizes above (``scale="tiny"``), with the offline
        Gemma tokenizer of `tiny_gemma_tokenizer`, and LTX-2.0's scheduler config."""
        if scale != "tiny":
            raise ValueError("only scale='tiny' is written to disk (the full transformer is 19B: build it on the meta device)")
        from diffusers import (
            AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel,
        )
        from diffusers.pipelines.ltx2 import LTX2TextConnectors
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        torch.manual_seed(seed)
        tokenizer = tiny_gemma_tokenizer()
        text_config = dict(TINY_GEMMA3_TEXT_CONFIG, vocab_size=len(tokenizer))
        gemma = Gemma3Config(text_config=text_config, vision_config=dict(TINY_SIGLIP_CONFIG, model_type="siglip_vision_model"),
                             mm_tokens_per_image=4)
        text_encoder = Gemma3ForConditionalGeneration(gemma)
        transformer = LTX2VideoTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        connectors = LTX2TextConnectors(
            caption_channels=16, text_proj_in_factor=TINY_GEMMA3_TEXT_CONFIG["num_hidden_layers"] + 1,
            video_connector_num_attention_heads=2, video_connector_attention_head_dim=8, video_connector_num_layers=1,
            video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
            audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
            rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
        )
        vae = AutoencoderKLLTX2Video(**TINY_VAE_CONFIG)
        with torch.no_grad():  # non-trivial normalisation, so a wrong one shows
            vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, vae.latents_mean.numel()))
            vae.latents_std.copy_(torch.linspace(0.5, 1.5, vae.latents_std.numel()))
        audio_vae = AutoencoderKLLTX2Audio(**TINY_AUDIO_VAE_CONFIG)
        vocoder = LTX2Vocoder(**TINY_VOCODER_CONFIG)
        scheduler = FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG)
        parts = dict(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     connectors=connectors, transformer=transformer, vocoder=vocoder)
        return cls.save_random_pipeline(directory, parts, torch_dtype, cast=("transformer", "text_encoder"))
