"""ImageReward (Xu et al. 2023, ``THUDM/ImageReward``): BLIP (ViT-L/16 + a BERT text encoder with
cross-attention to the image) and an MLP on the text encoder's first token, standardised.

The authors' package ``image-reward`` pins an old timm and needs torchvision (which pulls another
torch build than this project pins, and does not import here), so the published checkpoint
(``ImageReward.pt``, a plain state dict with original BLIP key names, + ``med_config.json``) is
loaded into transformers' ``BlipVisionModel`` + ``BlipTextModel`` of the same architecture by
renaming keys (:func:`blip_to_transformers`; the text encoder's names are already BERT's). The
score is what ``ImageReward.score`` returns: ``(mlp(text_states[:, 0]) - 0.16717) / 1.03334``,
prompts tokenised to 35 tokens.
"""

from __future__ import annotations

import json
import re

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.rewards.base import Scorer, clip_preprocess, first_existing, require_files
from sipo.rewards.clip import AestheticHead, load_state_dict_file

IMAGE_REWARD_FILES = ("ImageReward.pt", "ImageReward.safetensors")
#: ImageReward's standardisation of the raw MLP output (ImageReward.py, ``self.mean`` / ``self.std``).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: prompt length ImageReward tokenises to (``max_length=35``).
PROMPT_TOKENS = 35
_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def blip_to_transformers(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Split an ImageReward state dict into (vision, text, mlp) dicts with transformers' key names."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, target in _VISION_RENAMES:
                name, count = re.subn(pattern, target, name)
                if count:
                    break
            vision[name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = value
    return vision, text, mlp


class ImageReward(Scorer):
    """ImageReward v1.0 on transformers' BLIP modules (about -2..2; 0 = the authors' average image)."""

    name = "imagereward"

    def __init__(self, vision: nn.Module, text: nn.Module, head: nn.Module, tokenizer, device):
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.device = torch.device(device)
        self.image_size = vision.config.image_size

    @classmethod
    def load(cls, source=None, device="cpu") -> "ImageReward":
        from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        if source is None:
            raise SipoError(
                "the imagereward scorer needs a local directory; pass --scorer-path imagereward=DIR with "
                "ImageReward.pt and med_config.json (THUDM/ImageReward) and vocab.txt (bert-base-uncased)"
            )
        directory = require_files(cls.name, source, {"weights": IMAGE_REWARD_FILES, "text config": ("med_config.json",),
                                                     "tokenizer": ("vocab.txt",)})
        vision_state, text_state, mlp_state = blip_to_transformers(
            load_state_dict_file(first_existing(directory, IMAGE_REWARD_FILES)))
        if "embeddings.class_embedding" not in vision_state or "layers.0.weight" not in mlp_state:
            raise SipoError(f"{directory} does not hold an ImageReward state dict (blip.visual_encoder.*, mlp.*); "
                            "use ImageReward.pt from THUDM/ImageReward")
        # The vision tower is BLIP's ViT-L/16 (hard-coded by the authors); read its sizes off the weights.
        width = vision_state["embeddings.class_embedding"].shape[-1]
        patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
        positions = vision_state["embeddings.position_embedding"].shape[1] - 1
        depth = len({k.split(".")[2] for k in vision_state if k.startswith("encoder.layers.")})
        vision_config = BlipVisionConfig(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=max(1, width // 64),
            image_size=patch * round(positions**0.5), patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu",
        )
        med = json.loads((directory / "med_config.json").read_text())
        text_config = BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
            intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
            layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
            pad_token_id=med.get("pad_token_id", 0),
            # med_config.json names neither; the score never uses them
            bos_token_id=med.get("bos_token_id"), sep_token_id=med.get("sep_token_id"),
        )
        vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
        head = AestheticHead(mlp_state["layers.0.weight"].shape[1])  # ImageReward's MLP is that same MLP
        for module, state in ((vision, vision_state), (text, text_state), (head, mlp_state)):
            try:
                missing, unexpected = module.load_state_dict(state, strict=False)
            except RuntimeError:
                missing, unexpected = ["a tensor of another shape"], []
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise SipoError(f"{directory}'s weights do not fit ImageReward's architecture (e.g. {(missing or unexpected)[0]}); "
                                "use ImageReward.pt with its med_config.json")
        tokenizer = BertTokenizer.from_pretrained(str(directory))
        modules = [m.to(device).eval().requires_grad_(False) for m in (vision, text, head)]
        return cls(*modules, tokenizer, device)

    def _score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = clip_preprocess(images, self.image_size)  # BLIP uses CLIP's resize, crop and normalisation
        image_states = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=self.device)
        states = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           encoder_hidden_states=image_states, encoder_attention_mask=image_mask).last_hidden_state
        raw = self.head(states[:, 0].float()).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD
