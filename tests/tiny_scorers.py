"""Tiny random-weight reward models, saved the way each published checkpoint is laid out.

Each builder writes a directory the real loader in ``sipo.rewards`` reads: a transformers CLIP
directory (PickScore, CLIP score), ``clip/`` + the aesthetic MLP ``.pth`` (LAION aesthetic), an
open_clip ``{"state_dict": ...}`` ``.pt`` + tokenizer files (HPSv2). Nothing downloads.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from sipo.models.random_init import TINY_MAX_LENGTH, tiny_clip_tokenizer

TINY_CLIP_IMAGE_SIZE = 32
TINY_PROJECTION_DIM = 16


def make_tiny_clip(directory: str | Path, seed: int = 0, save_tokenizer: bool = True, positive: bool = False) -> Path:
    """A tiny transformers ``CLIPModel`` (+ its tokenizer) saved with ``save_pretrained``: the PickScore_v1 layout.

    ``positive``: give both towers' final layer norms the same bias and both projections the same
    matrix, so image-text cosines are positive (random weights otherwise give negative ones, which
    CLIP score clamps to 0).
    """
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = tiny_clip_tokenizer(vocab_dir)
    config = CLIPConfig(
        projection_dim=TINY_PROJECTION_DIM,
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": TINY_MAX_LENGTH, "vocab_size": len(tokenizer),
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": TINY_CLIP_IMAGE_SIZE, "patch_size": 8},
    )
    model = CLIPModel(config)
    if positive:
        with torch.no_grad():
            shared = torch.randn(32)
            for norm in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
                norm.weight.mul_(0.5)
                norm.bias.copy_(shared)
            model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(directory, safe_serialization=True)
    if save_tokenizer:
        tokenizer.save_pretrained(directory)
    return directory


def make_tiny_aesthetic(directory: str | Path, seed: int = 0) -> Path:
    """``clip/`` (CLIP image tower) + ``sac+logos+ava1-l14-linearMSE.pth`` (the MLP's plain state dict)."""
    from sipo.rewards.clip import AestheticHead

    directory = Path(directory)
    make_tiny_clip(directory / "clip", seed=seed, save_tokenizer=False)
    torch.manual_seed(seed + 1)
    head = AestheticHead(TINY_PROJECTION_DIM)
    torch.save(head.state_dict(), directory / "sac+logos+ava1-l14-linearMSE.pth")
    return directory


# ----------------------------------------------------------------------------- open_clip (HPSv2)
#: an open_clip model config (the ``model_cfg`` of open_clip_config.json) at toy size.
TINY_OPEN_CLIP_CFG = {
    "embed_dim": TINY_PROJECTION_DIM,
    "vision_cfg": {"image_size": TINY_CLIP_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": TINY_MAX_LENGTH, "vocab_size": None, "width": 32, "heads": 4, "layers": 2},
}


class _Block(nn.Module):
    """open_clip's ResidualAttentionBlock (pre-LN; torch MultiheadAttention; GELU MLP), same parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, heads, layers):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _Visual(nn.Module):
    def __init__(self, cfg, embed_dim):
        super().__init__()
        width, patch, grid = cfg["width"], cfg["patch_size"], cfg["image_size"] // cfg["patch_size"]
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * 0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, width // cfg["head_width"], cfg["layers"])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class ReferenceOpenCLIP(nn.Module):
    """An open_clip-style ViT CLIP written independently of sipo.rewards.hpsv2: its ``state_dict()`` has
    open_clip's key names, and its forward is open_clip's (class-token pooling; text pooled at argmax id)."""

    def __init__(self, cfg):
        super().__init__()
        text = cfg["text_cfg"]
        self.visual = _Visual(cfg["vision_cfg"], cfg["embed_dim"])
        self.token_embedding = nn.Embedding(text["vocab_size"], text["width"])
        self.positional_embedding = nn.Parameter(torch.randn(text["context_length"], text["width"]) * 0.1)
        self.transformer = _Transformer(text["width"], text["heads"], text["layers"])
        self.ln_final = nn.LayerNorm(text["width"])
        self.text_projection = nn.Parameter(torch.randn(text["width"], cfg["embed_dim"]) * text["width"] ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        # random norms, so a swapped ln_1/ln_2 or pre/post would show
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, 0.2)
                nn.init.normal_(module.bias, 0.0, 0.2)

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, ids):
        length = ids.shape[1]
        causal = torch.full((length, length), float("-inf")).triu(1)
        x = self.transformer(self.token_embedding(ids) + self.positional_embedding[:length], causal)
        x = self.ln_final(x)
        return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


def make_tiny_hpsv2(directory: str | Path, seed: int = 0) -> tuple[Path, ReferenceOpenCLIP]:
    """``HPS_v2.1_compressed.pt`` (``{"state_dict": open_clip keys}``), open_clip_config.json, tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer(directory)  # writes vocab.json + merges.txt here
    cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CFG))
    cfg["text_cfg"]["vocab_size"] = len(tokenizer)
    torch.manual_seed(seed)
    model = ReferenceOpenCLIP(cfg).eval()
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, directory / "HPS_v2.1_compressed.pt")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return directory, model


# ----------------------------------------------------------------------------- BLIP (ImageReward)
class _TimmBlock(nn.Module):
    """BLIP's ViT block (timm layout: fused qkv with bias, ``proj``, LayerNorm eps 1e-6), same parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.attn.proj((attention @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class ReferenceBlipViT(nn.Module):
    """BLIP's VisionTransformer (models/BLIP/vit.py) at toy size, written independently: original key names."""

    def __init__(self, width: int = 64, depth: int = 2, patch: int = 8, image_size: int = 32):
        super().__init__()
        grid = image_size // patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, width) * 0.5)
        self.blocks = nn.ModuleList(_TimmBlock(width, max(1, width // 64)) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, 0.2)
                nn.init.normal_(module.bias, 0.0, 0.2)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


#: ImageReward's med_config.json at toy size (the published one: 768 wide, 12 layers, vocab 30524).
TINY_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": None, "encoder_width": 64,
    "add_cross_attention": True,
}
_BERT_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "in", "painting", "digit"]


def make_tiny_image_reward(directory: str | Path, seed: int = 0):
    """``ImageReward.pt`` (original BLIP key names), ``med_config.json`` and a BERT ``vocab.txt``.

    Returns ``(directory, vit, text_encoder, mlp)``: the reference modules the checkpoint was cut from.
    """
    from transformers import BlipTextConfig, BlipTextModel

    from sipo.rewards.clip import AestheticHead

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _BERT_WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + ["[DEC]", "[ENC]"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = dict(TINY_MED_CONFIG, vocab_size=len(vocab))
    (directory / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(seed)
    vit = ReferenceBlipViT(width=med["encoder_width"]).eval()
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=med["encoder_width"],
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
    ), add_pooling_layer=False).eval()
    mlp = AestheticHead(med["hidden_size"]).eval()
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.randn(8, med["encoder_width"])  # unused by the score, as published
    torch.save(state, directory / "ImageReward.pt")
    return directory, vit, text, mlp


# ----------------------------------------------------------------------------- HPSv3 (Qwen2-VL + reward head)
#: Qwen2-VL-7B-Instruct's chat template for what HPSv3 sends (one user turn: an image, then text), written
#: out for the tiny tokenizer: the default system turn, the vision markers, the generation prompt.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_hpsv3(directory: str | Path, seed: int = 0):
    """An HPSv3 folder at toy size: Qwen2-VL config, tokenizer, image processor, chat template, and
    ``HPSv3.safetensors`` in transformers 4.45's key names (``model.*``, ``visual.*``, ``lm_head``, ``rm_head``),
    as the authors save it. Returns ``(directory, model, head, tokenizer)``: the transformers 5 model and the
    head the checkpoint was cut from, and the tokenizer with ``<|Reward|>``."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sipo.models.random_init import tiny_qwen2_tokenizer
    from sipo.rewards.hpsv3 import REWARD_TOKEN, reward_head

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    tokenizer.save_pretrained(str(directory))
    (directory / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(str(directory))
    with_reward = len(tokenizer) + 1  # the authors add <|Reward|> and resize the embedding to the tokenizer
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=with_reward, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    config.save_pretrained(str(directory))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    head = reward_head(32).eval()
    with torch.no_grad():  # weights of unit scale, so that the score moves visibly with the hidden state
        for layer in head:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, 1.0)
    state = {}
    for key, value in model.state_dict().items():  # transformers 5 names -> the published 4.45 names
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("model.visual."):
            key = key.removeprefix("model.")
        state[key] = value.contiguous()
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file(state, str(directory / "HPSv3.safetensors"))
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return directory, model, head, tokenizer
