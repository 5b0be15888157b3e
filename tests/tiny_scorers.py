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


def make_tiny_clip(directory: str | Path, seed: int = 0, save_tokenizer: bool = True) -> Path:
    """A tiny transformers ``CLIPModel`` (+ its tokenizer) saved with ``save_pretrained``: the PickScore_v1 layout."""
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
    CLIPModel(config).save_pretrained(directory, safe_serialization=True)
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
