"""CLIP-based scorers on transformers' ``CLIPModel``: PickScore, CLIP score and the LAION aesthetic score.

- **PickScore** (Kirstain et al. 2023, ``yuvalkirstain/PickScore_v1``, a CLIP ViT-H/14 fine-tuned on
  Pick-a-Pic): ``exp(logit_scale) * cos(E_image, E_text)``, as its model card computes it.
- **CLIP score** (Hessel et al. 2021, as torchmetrics' ``CLIPScore`` defines it):
  ``100 * max(cos(E_image, E_text), 0)`` with ``openai/clip-vit-large-patch14``.
- **LAION aesthetic** (improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE.pth``): an MLP
  on the L2-normalised CLIP ViT-L/14 image embedding; the prompt is ignored.

Images are preprocessed on tensors (:func:`sipo.rewards.base.clip_preprocess`), never through PIL.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.rewards.base import Scorer, clip_preprocess, first_existing, require_files

#: files of a transformers CLIP directory (``save_pretrained`` / the hub repos' layout).
CLIP_FILES = {
    "config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    "tokenizer": ("tokenizer.json", "vocab.json"),
}
#: files of the CLIP image tower alone (the aesthetic head needs no text).
CLIP_IMAGE_FILES = {key: CLIP_FILES[key] for key in ("config", "weights")}


def is_local(source: str | Path) -> bool:
    """A path to find on disk (never sent to the hub): it exists, or it is written like a path."""
    text = str(source)
    return Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1


def load_clip(name: str, source: str | Path, device, tokenizer_source: str | None = None, need_tokenizer: bool = True):
    """``(CLIPModel, CLIPTokenizer or None)`` from a local directory or a hub id, eval mode, on ``device``."""
    from transformers import CLIPModel, CLIPTokenizer

    if is_local(source):
        source = require_files(name, source, CLIP_FILES if need_tokenizer else CLIP_IMAGE_FILES)
        tokenizer_source = str(source)
    try:
        model = CLIPModel.from_pretrained(str(source), use_safetensors=None)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_source or str(source)) if need_tokenizer else None
    except (OSError, ValueError) as error:
        raise SipoError(
            f"could not load the {name} scorer from {source} ({' '.join(str(error).split())[:200]}); "
            f"pass --scorer-path {name}=DIR with the files docs/evaluation.md lists"
        ) from error
    return model.to(device).eval().requires_grad_(False), tokenizer


class CLIPSimilarityScorer(Scorer):
    """Cosine similarity of CLIP image and text embeddings; subclasses set the scale."""

    default_source: str = ""
    default_tokenizer: str | None = None

    def __init__(self, model: nn.Module, tokenizer, device):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.image_size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, source=None, device="cpu"):
        tokenizer_source = cls.default_tokenizer if source is None else None
        model, tokenizer = load_clip(cls.name, source or cls.default_source, device, tokenizer_source)
        return cls(model, tokenizer, device)

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = clip_preprocess(images, self.image_size).to(self.model.dtype)
        image_embeds = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        text_out = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        text_embeds = self.model.text_projection(text_out.pooler_output)
        return torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)


class PickScore(CLIPSimilarityScorer):
    """PickScore: ``exp(logit_scale) * cos`` (about 20-23 for SD1.5 images at full scale)."""

    name = "pickscore"
    default_source = "yuvalkirstain/PickScore_v1"
    # The PickScore repo holds the model; its model card takes the processor from the base CLIP.
    default_tokenizer = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def _score_images(self, images, prompts):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


class CLIPScore(CLIPSimilarityScorer):
    """CLIP score ``100 * max(cos, 0)`` (torchmetrics' definition and default model)."""

    name = "clipscore"
    default_source = "openai/clip-vit-large-patch14"

    def _score_images(self, images, prompts):
        return 100.0 * self.cosine(images, prompts).clamp(min=0)


# ----------------------------------------------------------------------------- LAION aesthetic
#: file names of the published head (the .pth is a plain state dict of tensors).
AESTHETIC_HEAD_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors")


class AestheticHead(nn.Module):
    """improved-aesthetic-predictor's MLP: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropout between; off in eval).

    Module indices match the published state dict (``layers.0``, ``layers.2``, ``layers.4``,
    ``layers.6``, ``layers.7``).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``-d state dict (``weights_only``: no pickle code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SipoError(f"{path} is not a state dict of tensors; use the published checkpoint file")
    return state


class AestheticScore(Scorer):
    """LAION aesthetic score (about 1-10): the MLP head on the normalised CLIP ViT-L/14 image embedding."""

    name = "aesthetic"
    uses_prompts = False

    def __init__(self, clip: nn.Module, head: AestheticHead, device):
        self.model, self.head, self.device = clip, head, torch.device(device)
        self.image_size = clip.config.vision_config.image_size

    @classmethod
    def load(cls, source=None, device="cpu"):
        if source is None:
            raise SipoError(
                "the aesthetic scorer has no hub checkpoint; pass --scorer-path aesthetic=DIR with "
                "sac+logos+ava1-l14-linearMSE.pth and clip/ (openai/clip-vit-large-patch14)"
            )
        directory = require_files(cls.name, source, {"head": AESTHETIC_HEAD_FILES, "clip": ("clip",)})
        clip, _ = load_clip(cls.name, directory / "clip", device, need_tokenizer=False)
        state = load_state_dict_file(first_existing(directory, AESTHETIC_HEAD_FILES))
        if "layers.0.weight" not in state:
            raise SipoError(f"{directory} holds no aesthetic MLP (no layers.0.weight); use sac+logos+ava1-l14-linearMSE.pth")
        head = AestheticHead(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        if head.layers[0].in_features != clip.config.projection_dim:
            raise SipoError(
                f"the aesthetic head takes {head.layers[0].in_features}-d embeddings but {directory / 'clip'} "
                f"gives {clip.config.projection_dim}-d; use CLIP ViT-L/14 (openai/clip-vit-large-patch14)"
            )
        return cls(clip, head.to(device).eval().requires_grad_(False), device)

    def _score_images(self, images, prompts):
        pixels = clip_preprocess(images, self.image_size).to(self.model.dtype)
        embeds = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output).float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.head(embeds).squeeze(-1)
