"""The map-style dataset every format shares, and `collate_pairs`.

A format subclass only says where a pair's prompt and two pictures live (`_locate`) and how to
read them (`_load`); this base class turns problems into `SkippedRow`s (or a `SipoError` when
strict), applies the reproducible flip and keeps the `DataReport`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from sipo.data.decode import MalformedRow
from sipo.data.report import IDENTICAL_PAIR, PAIR_KIND_MISMATCH, DataReport, SkippedRow
from sipo.data.sizes import size_info
from sipo.errors import SipoError

Item = dict[str, Any] | SkippedRow

_MASK64 = (1 << 64) - 1


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether pair ``index`` is mirrored in ``epoch``: a fixed hash, no global RNG.

    SplitMix64 (Steele et al., 2014) of the three numbers; the same answer in every process,
    so a resumed run or another DataLoader worker flips exactly the same pairs.
    """
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index) & _MASK64
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return bool(x >> 63)


def media_of_family(family: str | None) -> str | None:
    """``"video"`` for a video family (its adapter is a `VideoAdapter`), ``"image"`` for the others,
    ``None`` when no family is given (each file then decides by itself)."""
    if family is None:
        return None
    from sipo.models import adapter_class
    from sipo.models.video import VideoAdapter

    return "video" if issubclass(adapter_class(family), VideoAdapter) else "image"


def family_needs_input_image(family: str | None) -> bool | None:
    """Whether ``family`` edits or animates an input image (its adapter's ``needs_input_image``: every pair
    then carries one, shared by both sides); ``None`` when no family is given (the data decides)."""
    if family is None:
        return None
    from sipo.models import adapter_class

    return bool(getattr(adapter_class(family), "needs_input_image", False))


def check_input_images(family: str | None, path: str, with_input: int, rows: int) -> None:
    """Stop with one sentence when the data's input images do not fit the family: a conditioned family
    (Qwen-Image-Edit, Wan image-to-video) given pairs without any, or another family given pairs with them.

    ``with_input`` of the ``rows`` usable rows name an input image.
    """
    needs = family_needs_input_image(family)
    if needs is None or not rows:
        return
    if needs and not with_input:
        raise SipoError(f"model.family={family} edits or animates an input image, and the pairs of {path} have none; "
                        "add an input_image to every pair (docs/data.md: the input_image column) or set model.family "
                        "to a text-to-image or text-to-video family")
    if not needs and with_input:
        raise SipoError(f"the pairs of {path} carry input images ({with_input} of {rows}), and model.family={family} "
                        "generates from text alone; set model.family to a family that takes one (qwenimage_edit, "
                        "wan_i2v) or drop the input_image column")


class PreferenceDataset(Dataset):
    """Pairs ``dict(prompt, chosen, rejected, index)`` with pictures in [-1, 1], or `SkippedRow`s.

    ``chosen``/``rejected`` are ``[3, r, r]`` for images and ``[F, 3, r, r]`` for videos.
    """

    format: str = ""

    def __init__(self, source: str, resolution: int, *, strict: bool, random_flip: bool, seed: int) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.source = source
        self.resolution = resolution
        self.strict = strict
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.report = DataReport(source, self.format)

    # --- what a format provides ------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def _where(self, index: int) -> str:
        """Where pair ``index`` lives in the user's files, for messages."""
        raise NotImplementedError

    def pair_key(self, index: int) -> str:
        """What identifies pair ``index`` across runs, seeds, workers and machines: its place in the
        user's files, named by file name and row, never by the absolute path (``_where``'s), so a folder
        moved, copied to a temporary directory or mounted elsewhere on another node keeps its held-out
        split and its fixed validation noise (sipo.validation hashes this)."""
        raise NotImplementedError

    def _load_input(self, index: int) -> torch.Tensor | None:
        """The input image of pair ``index`` (``[3, H, W]`` in [-1, 1], the size of one frame of its pictures),
        ``None`` when the pairs have none; raises `MalformedRow`. Formats with an input_image column override it."""
        return None

    def _load(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(prompt, chosen, rejected) of pair ``index``; raises `MalformedRow`.

        An image format may append the chosen picture's original ``(height, width)`` (see
        ``sipo.data.sizes``); the item then carries ``size_info`` for SDXL's size conditioning.
        """
        raise NotImplementedError

    def row_extras(self, index: int) -> dict[str, Any] | None:
        """What pair ``index``'s row carries beyond its pictures, for the step: ``chosen_seed``,
        ``rejected_seed`` and ``noise_dtype`` (the seeds its two pictures were sampled from, ``sipo
        pairs``; objective.noise=stored) and ``score_margin`` (objective.reward_beta); None when the
        format or the row has none."""
        return None

    # --- shared ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Change which pairs ``random_flip`` mirrors (call it before each epoch, like DDP samplers)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Item:
        index, length = int(index), len(self)  # samplers may hand out numpy integers
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"pair index {index} out of range for {length} pairs")
        return self._item(index)

    def _item(self, index: int) -> Item:
        """Pair ``index`` (in range): loaded, checked, flipped and recorded; a stream calls it by position."""
        try:
            prompt, chosen, rejected, *original = self._load(index)
            if chosen.shape != rejected.shape:
                raise MalformedRow(PAIR_KIND_MISMATCH, f"{tuple(chosen.shape)} vs {tuple(rejected.shape)}")
            input_image = self._load_input(index)
            if input_image is not None and input_image.shape != chosen.shape[-3:]:
                raise MalformedRow(PAIR_KIND_MISMATCH, f"input_image {tuple(input_image.shape)} vs a frame "
                                                       f"{tuple(chosen.shape[-3:])}")
            if torch.equal(chosen, rejected):
                # one file twice, or two copies: both sides get the same noise, so z is 0 whatever the
                # weights are and the pair only dilutes the batch
                raise MalformedRow(IDENTICAL_PAIR)
        except MalformedRow as problem:
            where = self._where(index)
            if problem.detail:
                where = f"{where}: {problem.detail}"
            if self.strict:
                raise SipoError(
                    f"{where} is malformed ({problem.reason}); fix or remove it, "
                    "or set data.strict=false to skip and count such rows"
                ) from None
            skipped = SkippedRow(index=index, reason=problem.reason, where=where)
            self.report.record([skipped])
            return skipped
        flipped = self.random_flip and flip_decision(self.seed, self.epoch, index)
        if flipped:
            # Both pictures together: a flip must not become a difference between them.
            chosen, rejected = chosen.flip(-1), rejected.flip(-1)
            # the input image too: an edit or a first frame stays aligned with what it conditions
            input_image = input_image.flip(-1) if input_image is not None else None
        item = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "index": index}
        if input_image is not None:
            item["input_image"] = input_image
        if original and original[0] is not None:
            item["size_info"] = size_info(original[0], self.resolution, flipped)
        extras = self.row_extras(index)
        if extras is not None:
            item.update(extras)
        self.report.record([item])
        return item

    def _raise_or_count(self, reason: str, where: str) -> None:
        """A row dropped while indexing: stop when strict, else count it in the report."""
        if self.strict:
            raise SipoError(
                f"{where} is malformed ({reason}); fix or remove it, "
                "or set data.strict=false to skip and count such rows"
            )
        self.report.skip_at_index_time(reason, where)


def collate_pairs(items: Sequence[Item]) -> dict[str, Any]:
    """Stack dataset items into a batch, setting aside the skipped ones.

    Returns ``dict(prompts=list[str], chosen=Tensor[B, ...], rejected=Tensor[B, ...],
    skipped=list[SkippedRow], indices=list[int], rows=list[int])``, plus ``size_info`` (``[B, 4]`` long: original
    height/width, crop top/left) when every pair recorded one (images), ``input_image`` (``[B, 3, H, W]``)
    when every pair has one (the conditioned families), and the stored-noise seeds (``collate_seeds``).
    When every item was skipped (B == 0),
    ``chosen`` and ``rejected`` are None: the caller skips the step rather than running the
    model on an empty batch.
    """
    pairs = [item for item in items if not isinstance(item, SkippedRow)]
    skipped = [item for item in items if isinstance(item, SkippedRow)]
    chosen = rejected = None
    if pairs:
        shapes = {tuple(pair["chosen"].shape) for pair in pairs}
        if len(shapes) > 1:
            raise SipoError(
                f"pairs in one batch have different shapes {sorted(shapes)} (videos of different "
                "lengths); use clips with the same frame count or set train.batch_size=1"
            )
        chosen = torch.stack([pair["chosen"] for pair in pairs])
        rejected = torch.stack([pair["rejected"] for pair in pairs])
    batch = {
        "prompts": [pair["prompt"] for pair in pairs],
        "chosen": chosen,
        "rejected": rejected,
        "skipped": skipped,
        "indices": [pair["index"] for pair in pairs],
        # each kept pair's row in the micro-batch: its place in the step's batch keys its noise (sipo.train)
        "rows": [row for row, item in enumerate(items) if not isinstance(item, SkippedRow)],
    }
    if pairs and all("size_info" in pair for pair in pairs):
        batch["size_info"] = torch.stack([pair["size_info"] for pair in pairs])
    if pairs and all("input_image" in pair for pair in pairs):
        batch["input_image"] = torch.stack([pair["input_image"] for pair in pairs])
    batch.update(collate_seeds(pairs))
    return batch


def collate_seeds(pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``chosen_seed`` / ``rejected_seed`` (``[B]`` int64) and ``noise_dtype`` (names) when every pair
    carries them (objective.noise=stored reads them), ``stored_noise_problem`` (a sentence) when a
    pair's seeds cannot reproduce its noise, ``score_margin`` (``[B]``) when every pair carries one
    (objective.reward_beta)."""
    extras = {}
    if pairs and all("score_margin" in pair for pair in pairs):
        extras["score_margin"] = torch.tensor([float(pair["score_margin"]) for pair in pairs], dtype=torch.float32)
    problems = [pair["stored_noise_problem"] for pair in pairs if "stored_noise_problem" in pair]
    if problems:
        return {**extras, "stored_noise_problem": problems[0]}
    if not pairs or not all("chosen_seed" in pair for pair in pairs):
        return extras
    return {**extras, "chosen_seed": torch.tensor([int(pair["chosen_seed"]) for pair in pairs], dtype=torch.long),
            "rejected_seed": torch.tensor([int(pair["rejected_seed"]) for pair in pairs], dtype=torch.long),
            "noise_dtype": [str(pair.get("noise_dtype", "float32")) for pair in pairs]}


def encode_extras(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """What ``adapter.encode`` takes besides prompts and pictures, from a ``collate_pairs`` batch:
    ``size_info`` (SDXL) and ``input_images`` (the conditioned families), where the batch has them."""
    extra: dict[str, Any] = {}
    if batch.get("size_info") is not None:
        extra["size_info"] = batch["size_info"]
    if batch.get("input_image") is not None:
        extra["input_images"] = batch["input_image"] if device is None else batch["input_image"].to(device)
    return extra
