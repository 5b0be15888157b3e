"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H/14 fine-tuned on human preferences.

The authors publish an open_clip state dict (``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt``,
``{"state_dict": ...}``) and score with ``hpsv2`` / ``open_clip``, which need torchvision (and a
different torch build than this project pins). So the state dict is loaded into transformers'
``CLIPModel`` of the same architecture by renaming keys (:func:`open_clip_to_transformers`); the
score is what ``hpsv2.score`` returns: the cosine of the normalised image and text embeddings
(about 0.25-0.30 for SD1.5 images at full scale).

Architecture: open_clip's ``ViT-H-14`` config (written below), or the ``open_clip_config.json``
beside the weights (open_clip's hub format, ``{"model_cfg": {...}}``) when present. GELU (not
quick-GELU), layer norm eps 1e-5, text pooled at the end-of-text token: as open_clip.
"""

from __future__ import annotations

import json
from torch import Tensor

from sipo.errors import SipoError
from sipo.rewards.base import first_existing, require_files
from sipo.rewards.clip import CLIPSimilarityScorer, load_state_dict_file

HPS_WEIGHT_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt", "model.safetensors")
TOKENIZER_FILES = ("vocab.json", "tokenizer.json")

#: open_clip's src/open_clip/model_configs/ViT-H-14.json, written out.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def clip_config_from_open_clip(model_cfg: dict):
    """transformers ``CLIPConfig`` equal to an open_clip model config (standard ViT + causal text tower)."""
    from transformers import CLIPConfig

    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    vision_width = vision["width"]
    vision_heads = vision_width // vision.get("head_width", 64)
    return CLIPConfig(
        projection_dim=model_cfg["embed_dim"],
        vision_config={
            "hidden_size": vision_width, "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision["layers"], "num_attention_heads": vision_heads,
            "image_size": vision["image_size"], "patch_size": vision["patch_size"], "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        text_config={
            "hidden_size": text["width"], "intermediate_size": int(text["width"] * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text["layers"], "num_attention_heads": text["heads"],
            "max_position_embeddings": text["context_length"], "vocab_size": text["vocab_size"],
            "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            # open_clip pools at argmax(token id): the end-of-text token has the largest id.
            "eos_token_id": text["vocab_size"] - 1, "bos_token_id": text["vocab_size"] - 2, "pad_token_id": 0,
        },
    )


def _rename_block(prefix_in: str, prefix_out: str, state: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    """One residual attention block: fused ``in_proj`` -> q/k/v, ``c_fc``/``c_proj`` -> fc1/fc2, ln_1/ln_2."""
    q, k, v = state[f"{prefix_in}.attn.in_proj_weight"].chunk(3, dim=0)
    qb, kb, vb = state[f"{prefix_in}.attn.in_proj_bias"].chunk(3, dim=0)
    for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
        out[f"{prefix_out}.self_attn.{name}.weight"] = weight
        out[f"{prefix_out}.self_attn.{name}.bias"] = bias
    pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for source, target in pairs.items():
        for kind in ("weight", "bias"):
            out[f"{prefix_out}.{target}.{kind}"] = state[f"{prefix_in}.{source}.{kind}"]


def open_clip_to_transformers(state: dict[str, Tensor], vision_layers: int, text_layers: int) -> dict[str, Tensor]:
    """Rename an open_clip ViT CLIP state dict to transformers ``CLIPModel`` keys (projections transposed)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out: dict[str, Tensor] = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "visual_projection.weight": state["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
        "logit_scale": state["logit_scale"],
    }
    for kind in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{kind}"] = state[f"visual.ln_pre.{kind}"]
        out[f"vision_model.post_layernorm.{kind}"] = state[f"visual.ln_post.{kind}"]
        out[f"text_model.final_layer_norm.{kind}"] = state[f"ln_final.{kind}"]
    for i in range(vision_layers):
        _rename_block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", state, out)
    for i in range(text_layers):
        _rename_block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", state, out)
    return out


class HPSv2(CLIPSimilarityScorer):
    """HPSv2(.1): cosine of the normalised open_clip ViT-H/14 embeddings, loaded into transformers CLIP."""

    name = "hpsv2"

    def _score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.cosine(images, prompts)

    @classmethod
    def load(cls, source=None, device="cpu") -> "HPSv2":
        from transformers import CLIPModel, CLIPTokenizer

        if source is None:
            raise SipoError(
                "the hpsv2 scorer needs a local directory; pass --scorer-path hpsv2=DIR with "
                "HPS_v2.1_compressed.pt (xswu/HPSv2) and vocab.json + merges.txt (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
            )
        directory = require_files(cls.name, source, {"weights": HPS_WEIGHT_FILES, "tokenizer": TOKENIZER_FILES})
        model_cfg = VIT_H_14
        if (directory / "open_clip_config.json").is_file():
            model_cfg = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]
        config = clip_config_from_open_clip(model_cfg)
        state = load_state_dict_file(first_existing(directory, HPS_WEIGHT_FILES))
        try:
            renamed = open_clip_to_transformers(
                state, config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers)
        except KeyError as error:
            raise SipoError(
                f"{directory} does not hold an open_clip ViT state dict (no {error.args[0]}); "
                "use HPS_v2.1_compressed.pt from xswu/HPSv2"
            ) from None
        model = CLIPModel(config)
        try:
            missing, unexpected = model.load_state_dict(renamed, strict=False)
        except RuntimeError:  # a tensor of another shape
            missing, unexpected = ["a tensor shape"], []
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise SipoError(
                f"{directory}'s weights do not fit the ViT-H-14 architecture (e.g. {(missing or unexpected)[0]}); "
                "add its open_clip_config.json or use the published HPSv2 checkpoint"
            )
        tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=config.text_config.max_position_embeddings)
        return cls(model.to(device).eval().requires_grad_(False), tokenizer, device)
