"""HPSv3 (Ma et al. 2025, ``MizzenAI/HPSv3``): Qwen2-VL-7B-Instruct with a reward head, scoring an image
against its prompt at a special ``<|Reward|>`` token.

The authors' package ``hpsv3`` pins transformers 4.45.2 and needs torchvision, so it cannot be
installed beside this project's transformers 5 (and its torch pin); its published checkpoint
(``HPSv3.safetensors``: every weight of the reward model, key names of transformers 4.45) is loaded
here into transformers 5's ``Qwen2VLModel`` plus the head, reading the authors' code for the layout
(hpsv3/model/qwen2vl_trainer.py ``Qwen2VLRewardModelBT``, hpsv3/inference.py, hpsv3/train.py
``create_model_and_processor``, hpsv3/config/HPSv3_7B.yaml):

- tokenizer: Qwen2-VL's, with ``<|Reward|>`` added as a special token (the checkpoint's embedding has
  the extra row); padding on the right.
- picture: RGB, resized with PIL bicubic to ``smart_resize(h, w, 28, 256*28*28, 256*28*28)`` (the
  published ``min_pixels = max_pixels = 200704``: about 448 x 448), then Qwen2-VL's image processor.
- message: one user turn, the image and then ``INSTRUCTION.format(text_prompt=prompt) +
  REWARD_SUFFIX`` (the published strings, below), through the model folder's chat template with the
  generation prompt.
- forward: the language model on the token embeddings with the vision tower's merged patches in
  place of the image tokens and NO multimodal rope: the authors call the text model without position
  ids, so every token gets its sequence index on all three rope axes (transformers 5's text model
  does the same when given none). The head ``Linear(h, 1024) -> ReLU -> Dropout -> Linear(1024, 16)
  -> ReLU -> Linear(16, 2)`` (``rm_head_type: ranknet``, float32) on the ``<|Reward|>`` token's
  hidden state gives ``(mu, sigma)``; the score is ``mu`` (what the authors' example prints).

A directory for ``--scorer-path hpsv3=DIR`` holds Qwen/Qwen2-VL-7B-Instruct's config.json, tokenizer
files, preprocessor_config.json and chat template (its weights are not needed) and ``HPSv3.safetensors``
from MizzenAI/HPSv3 (docs/evaluation.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.rewards.base import Scorer, first_existing, require_files
from sipo.rewards.clip import load_state_dict_file

HPSV3_WEIGHT_FILES = ("HPSv3.safetensors", "HPSv3_7B.pth", "HPSv3.pt")
#: the special token whose hidden state the head reads (hpsv3/train.py)
REWARD_TOKEN = "<|Reward|>"
#: min_pixels = max_pixels of hpsv3/config/HPSv3_7B.yaml and inference.py: 256 * 28 * 28
IMAGE_PIXELS = 256 * 28 * 28
#: the published instruction (hpsv3/dataset/data_collator_qwen.py ``INSTRUCTION``), verbatim: the model
#: was trained on exactly this text, so it is data, not code
INSTRUCTION = '\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n\n**Text Alignment:**  \nAssess how well the image matches the textual prompt across the following sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.\n- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.\n- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.\nTextual prompt - {text_prompt}\n\n\n'
#: the published ``prompt_with_special_token`` appended to the instruction
REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def reward_head(hidden_size: int) -> nn.Sequential:
    """``rm_head_type: ranknet`` without kwargs: ``Linear(h, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU,
    Linear(16, 2)`` (state-dict indices 0, 3 and 5), outputs ``(mu, sigma)``."""
    return nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def split_hpsv3_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(``Qwen2VLModel`` state in transformers 5 names, head state) from the published checkpoint.

    transformers 4.45 names the language model ``model.*`` and the vision tower ``visual.*`` at the top
    of ``Qwen2VLForConditionalGeneration``; transformers 5 nests both in ``model`` as ``language_model``
    and ``visual``. Either naming is accepted; ``lm_head`` is dropped (the reward never reads logits).
    """
    backbone, head = {}, {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key.removeprefix("rm_head.")] = value
        elif key.startswith("lm_head."):
            continue
        elif key.startswith(("model.language_model.", "model.visual.")):
            backbone[key.removeprefix("model.")] = value
        elif key.startswith("visual."):
            backbone[key] = value
        elif key.startswith("model."):
            backbone["language_model." + key.removeprefix("model.")] = value
    return backbone, head


def resized_picture(image: Tensor):
    """``[3, H, W]`` in ``[0, 1]`` -> the RGB PIL picture HPSv3 scores: 8-bit, resized (PIL bicubic) so that
    both sides are multiples of 28 and the area is 256*28*28 (qwen-vl-utils' ``smart_resize``)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    picture = Image.fromarray(array, mode="RGB")
    height, width = smart_resize(array.shape[0], array.shape[1], factor=28, min_pixels=IMAGE_PIXELS,
                                 max_pixels=IMAGE_PIXELS)
    return picture.resize((width, height), Image.BICUBIC)


class HPSv3(Scorer):
    """HPSv3's mu (about 0-15 on real images; higher = preferred)."""

    name = "hpsv3"

    def __init__(self, backbone: nn.Module, head: nn.Module, tokenizer, image_processor, chat_template: str,
                 device, dtype) -> None:
        self.backbone, self.head = backbone, head
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template
        self.reward_token_id = int(tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def load(cls, source=None, device="cpu") -> "HPSv3":
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if source is None:
            raise SipoError(
                "the hpsv3 scorer needs a local directory; pass --scorer-path hpsv3=DIR with HPSv3.safetensors "
                "(MizzenAI/HPSv3) and Qwen/Qwen2-VL-7B-Instruct's config, tokenizer and preprocessor files"
            )
        directory = require_files(cls.name, source, {"weights": HPSV3_WEIGHT_FILES, "config": ("config.json",),
                                                     "tokenizer": ("tokenizer.json", "vocab.json"),
                                                     "image processor": ("preprocessor_config.json",)})
        backbone_state, head_state = split_hpsv3_state_dict(load_state_dict_file(first_existing(directory, HPSV3_WEIGHT_FILES)))
        embed = backbone_state.get("language_model.embed_tokens.weight")
        if embed is None or "5.weight" not in head_state:
            raise SipoError(f"{directory} does not hold an HPSv3 checkpoint (model.embed_tokens, rm_head.5); "
                            "use HPSv3.safetensors from MizzenAI/HPSv3")
        tokenizer = AutoTokenizer.from_pretrained(str(directory), padding_side="right")
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        chat_template = _chat_template(directory, tokenizer)
        if not chat_template:
            raise SipoError(f"{directory} has no chat template; copy chat_template.json from Qwen/Qwen2-VL-7B-Instruct there")
        # Qwen2-VL's image processor on PIL (its default one needs torchvision, which sipo does without)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory))
        config = Qwen2VLConfig.from_pretrained(str(directory))
        config.text_config.vocab_size = embed.shape[0]  # the checkpoint's, with the <|Reward|> row
        dtype = embed.dtype if torch.device(device).type == "cuda" else torch.float32
        with torch.device("meta"):
            backbone = Qwen2VLModel(config)
        head = reward_head(config.text_config.hidden_size)
        try:
            missing, unexpected = backbone.load_state_dict(backbone_state, strict=False, assign=True)
            head.load_state_dict(head_state)
        except RuntimeError as error:
            raise SipoError(f"{directory}'s HPSv3 weights do not fit its config.json ({str(error).splitlines()[0]}); "
                            "use Qwen/Qwen2-VL-7B-Instruct's config with HPSv3.safetensors") from error
        missing = [k for k in missing if "rotary" not in k]
        if missing or unexpected:
            raise SipoError(f"{directory}'s HPSv3 weights do not fit its config.json (e.g. {(missing or unexpected)[0]}); "
                            "use Qwen/Qwen2-VL-7B-Instruct's config with HPSv3.safetensors")
        _materialise_buffers(backbone)
        backbone = backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)
        head = head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        return cls(backbone, head, tokenizer, image_processor, chat_template, device, dtype)

    def messages(self, prompts: list[str]) -> list[str]:
        """The chat-template text of each (image, prompt) message, with the generation prompt."""
        return [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + REWARD_SUFFIX}]}],
            chat_template=self.chat_template, tokenize=False, add_generation_prompt=True) for prompt in prompts]

    def inputs(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """What Qwen2-VL's processor gives for the messages: pixel patches, their grid, and the token ids with
        each image's one ``<|image_pad|>`` repeated once per merged patch (padded on the right)."""
        pictures = self.image_processor([resized_picture(image) for image in images], return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        image_token = "<|image_pad|>"
        texts = [text.replace(image_token, image_token * (int(grid.prod()) // merge), 1)
                 for text, grid in zip(self.messages(prompts), pictures["image_grid_thw"])]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                 "pixel_values": pictures["pixel_values"], "image_grid_thw": pictures["image_grid_thw"]}
        return {key: value.to(self.device) for key, value in batch.items()}

    def _score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        batch = self.inputs(images, prompts)
        input_ids = batch["input_ids"]
        embeds = self.backbone.language_model.embed_tokens(input_ids)
        patches = self.backbone.visual(batch["pixel_values"].to(self.dtype), grid_thw=batch["image_grid_thw"]).pooler_output
        image_positions = (input_ids == self.backbone.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_positions, patches.to(embeds.dtype))
        # no position ids: each token's sequence index on all three rope axes, as the authors' forward
        states = self.backbone.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                              use_cache=False).last_hidden_state
        reward_positions = input_ids == self.reward_token_id
        if not bool((reward_positions.sum(dim=1) == 1).all()):
            raise SipoError("an HPSv3 prompt lost its <|Reward|> token; shorten the prompt (the tokenizer truncated it)")
        return self.head(states[reward_positions].float())[:, 0]


def _chat_template(directory: Path, tokenizer) -> str | None:
    """The model folder's chat template: chat_template.json / .jinja, else the tokenizer's."""
    import json

    for name in ("chat_template.jinja", "chat_template.json"):
        path = directory / name
        if path.exists():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


def _materialise_buffers(module: nn.Module) -> None:
    """Buffers a meta-device construction left empty (the rotary embeddings' inverse frequencies, which the
    checkpoint does not hold): each such module is built again from its config on the CPU, buffers taken."""
    for sub in module.modules():
        if not any(buffer.is_meta for buffer in sub.buffers(recurse=False)):
            continue
        if not hasattr(sub, "config"):
            raise SipoError(f"HPSv3: could not build the buffers of {type(sub).__name__}")
        fresh = type(sub)(sub.config)
        for name, buffer in fresh.named_buffers(recurse=False):
            sub._buffers[name] = buffer
