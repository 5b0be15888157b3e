"""Reward models: every scorer's loader round trip on a tiny random-weight checkpoint saved the way the
real one is published, checked against an independent forward pass; the Scorer contract; bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_scorers import (
    TINY_CLIP_IMAGE_SIZE,
    make_tiny_aesthetic,
    make_tiny_clip,
    make_tiny_hpsv2,
    make_tiny_image_reward,
)

from sipo.errors import SipoError
from sipo.rewards import SCORERS, load_scorer
from sipo.rewards.base import CLIP_MEAN, CLIP_STD, clip_preprocess
from sipo.rewards.image_reward import REWARD_MEAN, REWARD_STD

PROMPTS = ["a photo of a cat", "a red dog on the painting", "the blue digit"]


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    hps_dir, hps_reference = make_tiny_hpsv2(root / "hpsv2")
    ir_dir, vit, text, mlp = make_tiny_image_reward(root / "imagereward")
    return {
        "pickscore": make_tiny_clip(root / "pickscore"),
        "clipscore": make_tiny_clip(root / "clipscore", seed=3, positive=True),
        "aesthetic": make_tiny_aesthetic(root / "aesthetic"),
        "hpsv2": hps_dir,
        "imagereward": ir_dir,
        "_references": {"hpsv2": hps_reference, "imagereward": (vit, text, mlp)},
    }


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 40, 48, generator=generator)  # not square, not the model size: resize + crop run


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- preprocessing
def test_clip_preprocess_normalises_a_constant_image_exactly():
    value = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    out = clip_preprocess(value.expand(2, 3, 50, 70), 32)
    expected = (value - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, expected.expand(2, 3, 32, 32), atol=1e-5, rtol=0)


def test_clip_preprocess_center_crops_the_longer_side():
    image = torch.rand(1, 3, 32, 48)  # shorter side already 32: no resize, columns 8..40 kept
    out = clip_preprocess(image, 32, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(out, image[..., :, 8:40])


# ----------------------------------------------------------------------------- round trips
LOADABLE = ["pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward"]


@pytest.mark.parametrize("name", LOADABLE)
def test_scorer_round_trip_scores_change_with_image_and_prompt(name, scorer_dirs, images):
    scorer = load_scorer(name, str(scorer_dirs[name]), _device())
    scores = scorer.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scorer.score(images, PROMPTS), scores)  # eval mode: deterministic
    flipped = scorer.score(images.flip(-1).roll(7, dims=-2), PROMPTS)
    assert not torch.allclose(flipped, scores, atol=1e-7, rtol=0)
    if scorer.uses_prompts:
        other = scorer.score(images, ["a dog", "a cat", "the red painting of a blue cat"])
        assert not torch.allclose(other, scores, atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", LOADABLE)
def test_video_score_is_the_frame_average(name, scorer_dirs, images):
    scorer = load_scorer(name, str(scorer_dirs[name]), _device())
    videos = torch.stack([images, images.flip(-1)], dim=1)  # [3, 2 frames, 3, H, W]
    expected = (scorer.score(images, PROMPTS) + scorer.score(images.flip(-1), PROMPTS)) / 2
    torch.testing.assert_close(scorer.score(videos, PROMPTS), expected)


def test_pickscore_equals_clipmodel_logits_per_image(scorer_dirs, images):
    """PickScore's model card: ``logit_scale.exp() * image_embs @ text_embs.T``, diagonal; here from
    transformers' own ``CLIPModel.forward`` (``logits_per_image``), a second code path."""
    scorer = load_scorer("pickscore", str(scorer_dirs["pickscore"]))
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           pixel_values=clip_preprocess(images, TINY_CLIP_IMAGE_SIZE))
    torch.testing.assert_close(scorer.score(images, PROMPTS), out.logits_per_image.diagonal(), atol=1e-5, rtol=1e-5)


def test_clipscore_is_100_times_clamped_cosine(scorer_dirs, images):
    """torchmetrics' CLIPScore definition: ``max(100 * cos(E_I, E_C), 0)``; cosines from ``logits_per_image / exp(logit_scale)``."""
    scorer = load_scorer("clipscore", str(scorer_dirs["clipscore"]))
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           pixel_values=clip_preprocess(images, TINY_CLIP_IMAGE_SIZE))
    cosine = out.logits_per_image.diagonal() / scorer.model.logit_scale.exp()
    assert (cosine > 0).all()  # the tiny model is built with positive cosines: the clamp is not all that is tested
    torch.testing.assert_close(scorer.score(images, PROMPTS), (100 * cosine).clamp(min=0), atol=1e-4, rtol=1e-5)


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding(scorer_dirs, images):
    from transformers import CLIPModel

    from sipo.rewards.clip import AestheticHead

    scorer = load_scorer("aesthetic", str(scorer_dirs["aesthetic"]))
    clip = CLIPModel.from_pretrained(str(scorer_dirs["aesthetic"] / "clip")).eval()
    head = AestheticHead(16)
    head.load_state_dict(torch.load(scorer_dirs["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True))
    with torch.no_grad():
        out = clip(input_ids=torch.zeros(1, 3, dtype=torch.long), pixel_values=clip_preprocess(images, TINY_CLIP_IMAGE_SIZE))
        embeds = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        expected = head.eval()(embeds).squeeze(-1)
    torch.testing.assert_close(scorer.score(images, ["ignored"] * 3), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)  # prompt-free


def test_hpsv2_matches_an_open_clip_style_reference_forward(scorer_dirs, images):
    """The open_clip state dict renamed into transformers CLIP gives open_clip's embeddings (reference
    model in tests/tiny_scorers.py: torch MultiheadAttention blocks, class-token and argmax-id pooling)."""
    reference = scorer_dirs["_references"]["hpsv2"]
    scorer = load_scorer("hpsv2", str(scorer_dirs["hpsv2"]))
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_features = reference.encode_image(clip_preprocess(images, TINY_CLIP_IMAGE_SIZE))
        text_features = reference.encode_text(tokens.input_ids)
    expected = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_imagereward_matches_the_blip_reference_forward(scorer_dirs, images):
    """ImageReward.score: BLIP ViT states -> BERT with cross-attention -> MLP on token 0, standardised."""
    vit, text, mlp = scorer_dirs["_references"]["imagereward"]
    scorer = load_scorer("imagereward", str(scorer_dirs["imagereward"]))
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = vit(clip_preprocess(images, 32))
        hidden = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=states,
                      encoder_attention_mask=torch.ones(states.shape[:2], dtype=torch.long)).last_hidden_state
        expected = (mlp(hidden[:, 0]).squeeze(-1) - REWARD_MEAN) / REWARD_STD
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_digits_classifier_is_a_registered_scorer():
    from sipo.demo.pretrain import load_digit_images

    scorer = load_scorer("digits-classifier")
    pictures, labels = load_digit_images(8)
    pictures = ((pictures[:20] + 1) / 2).expand(-1, 3, -1, -1)  # [-1, 1] grey -> [0, 1] RGB
    right = scorer.score(pictures, [f"digit {int(d)}" for d in labels[:20]])
    wrong = scorer.score(pictures, [f"digit {(int(d) + 1) % 10}" for d in labels[:20]])
    assert right.mean() > 0.8 > 0.2 > wrong.mean()
    with pytest.raises(SipoError, match="names no digit"):
        scorer.score(pictures[:1], ["a cat"])


# ----------------------------------------------------------------------------- bad input
def test_unknown_scorer_name_lists_the_known_ones():
    with pytest.raises(SipoError, match="unknown scorer 'pickscor'.*pickscore"):
        load_scorer("pickscor", "/nowhere")


@pytest.mark.parametrize("name, remove", [
    ("pickscore", "model.safetensors"), ("pickscore", "tokenizer.json"), ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
    ("hpsv2", "HPS_v2.1_compressed.pt"), ("imagereward", "med_config.json"), ("imagereward", "vocab.txt"),
])
def test_scorer_directory_with_a_missing_file_is_one_sentence(name, remove, scorer_dirs, tmp_path):
    copy = tmp_path / name
    shutil.copytree(scorer_dirs[name], copy)
    (copy / remove).unlink()
    if remove == "tokenizer.json":
        (copy / "vocab.json").unlink(missing_ok=True)
    with pytest.raises(SipoError, match=rf"{name} scorer directory .* lacks") as error:
        load_scorer(name, str(copy))
    assert "\n" not in str(error.value)


def test_missing_scorer_directory_and_wrong_checkpoint(scorer_dirs, tmp_path):
    with pytest.raises(SipoError, match="does not exist"):
        load_scorer("hpsv2", str(tmp_path / "absent"))
    wrong = tmp_path / "wrong"
    shutil.copytree(scorer_dirs["hpsv2"], wrong)
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, wrong / "HPS_v2.1_compressed.pt")
    with pytest.raises(SipoError, match="open_clip"):
        load_scorer("hpsv2", str(wrong))


def test_registry_names_every_paper_scorer():
    assert {"pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore", "digits-classifier"} <= set(SCORERS)


def test_built_in_vit_h_14_config_has_the_published_open_clip_shapes():
    """open_clip ViT-H-14 (HPSv2's architecture), shapes from its config: visual width 1280, 32 layers, patch 14,
    16 heads of 80; text width 1024, 24 layers, context 77, vocab 49408; embed 1024. Built on the meta device."""
    from transformers import CLIPModel

    from sipo.rewards.hpsv2 import VIT_H_14, clip_config_from_open_clip

    with torch.device("meta"):
        model = CLIPModel(clip_config_from_open_clip(VIT_H_14))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (257, 1280)  # (224/14)^2 + 1
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert shapes["vision_model.encoder.layers.31.mlp.fc1.weight"] == (5120, 1280)
    assert "vision_model.encoder.layers.32.mlp.fc1.weight" not in shapes
    assert shapes["visual_projection.weight"] == (1024, 1280)
    assert shapes["text_model.embeddings.token_embedding.weight"] == (49408, 1024)
    assert shapes["text_model.encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["text_projection.weight"] == (1024, 1024)
    assert model.config.vision_config.num_attention_heads == 16
    # about 986M parameters, open_clip's figure for ViT-H-14
    assert 0.95e9 < sum(v.numel() for v in model.state_dict().values() if v.ndim) < 1.0e9


# ----------------------------------------------------------------------------- HPSv3
@pytest.fixture(scope="module")
def hpsv3(tmp_path_factory):
    from tiny_scorers import make_tiny_hpsv3

    return make_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3") / "hpsv3")


def test_hpsv3_picture_is_resized_to_256_merged_patches():
    """qwen-vl-utils' smart_resize with min = max = 256*28*28 (hpsv3/inference.py), by hand: a 40 x 48 picture
    rounds to 28 x 56 = 1568 px < 200704, so beta = sqrt(200704/1920) = 10.224 and the sides are
    ceil(40*beta/28)*28 = 420 and ceil(48*beta/28)*28 = 504; a square one is 448 x 448 exactly."""
    from sipo.rewards.hpsv3 import resized_picture

    assert resized_picture(torch.rand(3, 40, 48)).size == (504, 420)  # PIL: (width, height)
    assert resized_picture(torch.rand(3, 64, 64)).size == (448, 448)


def test_hpsv3_message_is_the_published_instruction_in_the_chat_template(hpsv3):
    from sipo.rewards.hpsv3 import INSTRUCTION, REWARD_SUFFIX

    directory, *_ = hpsv3
    scorer = load_scorer("hpsv3", str(directory), "cpu")
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>" + INSTRUCTION.format(text_prompt="a red dog")
                + REWARD_SUFFIX + "<|im_end|>\n<|im_start|>assistant\n")
    assert scorer.messages(["a red dog"]) == [expected]
    assert "Textual prompt - a red dog" in expected and expected.count("<|Reward|>") == 1
    assert INSTRUCTION.startswith("\nYou are tasked with evaluating a generated image based on Visual Quality")


def test_hpsv3_matches_the_published_layout_forward(hpsv3, images):
    """Independent forward as hpsv3/model/qwen2vl_trainer.py computes it, on the transformers 5 model the checkpoint
    was cut from: token embeddings with the vision tower's merged patches scattered into the image tokens, the
    language model given positions 0..L-1 (2-D position ids, the authors' call without multimodal rope), the
    ranknet head on the <|Reward|> token, mu = output 0. Right padding: two prompts of different lengths."""
    directory, model, head, tokenizer = hpsv3
    scorer = load_scorer("hpsv3", str(directory), "cpu")
    prompts = ["a photo of a cat", "a red dog on the painting, in the blue night, twice as long"]
    batch = scorer.inputs(images[:2], prompts)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # padded on the right
    with torch.no_grad():
        ids = batch["input_ids"]
        embeds = model.model.language_model.embed_tokens(ids)
        patches = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        mask = ids == model.config.image_token_id
        assert int(mask.sum()) == patches.shape[0] == 2 * 420 * 504 // 28**2  # one token per merged 28 x 28 patch
        embeds[mask] = patches
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        states = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                            position_ids=positions).last_hidden_state
        reward_at = ids == tokenizer.convert_tokens_to_ids("<|Reward|>")
        expected = head(states[reward_at])[:, 0]
        # the multimodal rope of Qwen2-VL's own forward gives other values: the positions are what is tested
        mrope = model(**batch, mm_token_type_ids=mask.long(), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(scorer.score(images[:2], prompts), expected, rtol=1e-5, atol=1e-5)
    assert (head(mrope[reward_at])[:, 0] - expected).abs().max() > 1e-2


def test_hpsv3_directory_without_its_checkpoint_is_one_sentence(hpsv3, tmp_path):
    import shutil

    directory, *_ = hpsv3
    copy = shutil.copytree(directory, tmp_path / "copy")
    (copy / "HPSv3.safetensors").unlink()
    with pytest.raises(SipoError, match="lacks weights"):
        load_scorer("hpsv3", str(copy))
