"""Random-weight models and offline tokenizers, built from configs: what tests and benchmarks load.

Nothing here downloads. Tokenizers are written from a small vocabulary made on the spot (every byte,
plus a few words), so any text tokenizes; weights come from a seeded generator. Each family module
may add a ``build_random_pipeline(directory, scale)`` that saves its pipeline in diffusers format
from the real published component configs (``scale="full"``) or a toy version (``"tiny"``), so the
real loading code is what reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

#: token length of the tiny CLIP tokenizer (CLIP's own).
TINY_MAX_LENGTH = 77

#: a one-layer T5-style text encoder, for T5Config (CogVideoX) and UMT5Config (Wan2.1) alike; the
#: vocabulary size is the tokenizer's (`tiny_t5_tokenizer`).
TINY_T5_ENCODER_CONFIG = dict(
    d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
)

_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "in", "painting", "digit")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_tiny_clip_vocab(directory: str | Path) -> Path:
    """Write a CLIP-style ``vocab.json`` + ``merges.txt``: every byte (alone and word-final) + a few words.

    Any text tokenizes (byte fallback), and the words in ``_WORDS`` become single tokens, so the
    prompts of the tests give distinct, short id sequences. About 560 entries.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        # merge left to right: "c a t</w>" -> "ca t</w>" -> "cat</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return directory


def tiny_clip_tokenizer(directory: str | Path, model_max_length: int = TINY_MAX_LENGTH):
    """A ``CLIPTokenizer`` loaded from the tiny vocab written into ``directory``."""
    from transformers import CLIPTokenizer

    write_tiny_clip_vocab(directory)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=model_max_length)


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """A T5/UMT5-style Unigram vocabulary: ``<pad>``, ``</s>``, ``<unk>`` (ids 0-2, as in T5), then
    every printable ASCII character alone and after the word-start mark ``▁``, then a few words.

    Scores are log-probabilities; whole words score higher than their letters, so the words of
    ``_WORDS`` become single tokens and anything else falls back to characters.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    characters = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    vocab += [("▁", -2.0)] + [(c, -5.0) for c in characters] + [("▁" + c, -5.5) for c in characters]
    vocab += [("▁" + word, -3.0) for word in _WORDS]
    return vocab


def tiny_t5_tokenizer(directory: str | Path | None = None, model_max_length: int = 226):
    """A ``T5Tokenizer`` (backed by the ``tokenizers`` library) over `tiny_t5_vocab`; no download.

    Serves both T5 (CogVideoX) and UMT5 (Wan2.1): the pipelines only need ids, an attention mask
    and ``</s>`` appended. Saved to ``directory`` when given (``tokenizer.json`` + config).
    """
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=tiny_t5_vocab(), extra_ids=0, model_max_length=model_max_length)
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


#: the pieces of QwenImagePipeline's prompt template (its ``prompt_template_encode``) as whole tokens, so
#: the template's prefix is 34 tokens with the tiny tokenizer too, as with Qwen2.5-VL's own: the
#: pipeline drops exactly that many (``prompt_template_encode_start_idx``)
_QWEN_TEMPLATE_WORDS = (
    "system", "\n", "Describe", " the", " image", " by", " detailing", " color", ",", " shape", " size",
    " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background",
    ":", "user", "assistant",
)


def tiny_qwen2_tokenizer(directory: str | Path | None = None, model_max_length: int = 1024):
    """A ``Qwen2Tokenizer`` (byte-level BPE, as Qwen2.5-VL's) over a vocabulary made here; no download.

    Every byte is a token (any text tokenizes), the chat markers ``<|im_start|>``/``<|im_end|>`` and
    ``<|endoftext|>`` (the pad token, as in Qwen2.5) are special tokens, and the words of
    QwenImagePipeline's template are added tokens. Saved to ``directory`` when given.
    """
    from transformers import Qwen2Tokenizer

    vocab = {token: index for index, token in enumerate(_bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.add_tokens(list(_QWEN_TEMPLATE_WORDS))
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


#: Qwen3's chat template reduced to what the FLUX.2 [klein] and Z-Image pipelines render: one user
#: message, the assistant turn opened, and the empty think block when ``enable_thinking`` is false
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen3_chat_tokenizer(directory: str | Path | None = None, model_max_length: int = 64):
    """`tiny_qwen2_tokenizer` with Qwen3's chat template (`QWEN3_CHAT_TEMPLATE`); the template's words
    are single tokens, so a short prompt fits a short ``model_max_length``. No download."""
    tokenizer = tiny_qwen2_tokenizer(None, model_max_length=model_max_length)
    tokenizer.add_tokens(["user", "<think>", "</think>", "\n\n"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


#: Mistral Small 3.1's chat template reduced to what Flux2Pipeline renders: a system and a user message
#: whose content is a list of text parts
MISTRAL_CHAT_TEMPLATE = (
    "<s>{% for message in messages %}{% for part in message['content'] %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ part['text'] }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ part['text'] }}[/INST]{% endif %}{% endfor %}{% endfor %}"
)


def tiny_mistral_chat_tokenizer(model_max_length: int = 64):
    """A byte-level ``PreTrainedTokenizerFast`` with `MISTRAL_CHAT_TEMPLATE`: what Flux2Pipeline's
    ``_get_mistral_3_small_prompt_embeds`` calls (``apply_chat_template`` on a batch of conversations,
    padded to ``max_length``). Mistral Small 3.1's own is a ``PixtralProcessor``, which needs torchvision
    for its image half; the text half is this. No download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(_bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "[IMG]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer
