"""Preference-pair datasets: Pick-a-Pic parquet shards, JSONL manifests, `datasets` splits and tar shards (docs/data.md).

    ds = open_preference_dataset(config.data, resolution=config.model.resolution, seed=config.train.seed)
    loader = DataLoader(ds, batch_size=..., collate_fn=collate_pairs, num_workers=config.data.num_workers)
    for batch in loader:
        ds.report.record(batch)          # keeps the counts right when workers load the rows
        if batch["chosen"] is None:      # every row of this batch was malformed
            continue

``ds[i]`` is ``dict(prompt, chosen, rejected, index)`` with pictures in [-1, 1] (``[3, r, r]``,
or ``[F, 3, r, r]`` for videos), or a `SkippedRow` when the row is malformed (a `SipoError`
instead when ``data.strict``).
"""

from __future__ import annotations

from sipo.config import DataConfig
from sipo.data.decode import MalformedRow, decode_file, decode_image, decode_video
from sipo.data.hf import HfDataset
from sipo.data.jsonl import JsonlDataset
from sipo.data.pairs import PreferenceDataset, collate_pairs, family_needs_input_image, flip_decision, media_of_family
from sipo.data.pickapic import PickapicDataset
from sipo.data.report import DataReport, SkippedRow
from sipo.data.video import VideoSpec
from sipo.data.webdataset import WebDataset
from sipo.errors import SipoError

#: data.format -> dataset class (DataConfig already checks the name; this is the one dispatch)
FORMATS: dict[str, type[PreferenceDataset]] = {
    "pickapic": PickapicDataset,
    "jsonl": JsonlDataset,
    "hf": HfDataset,
    "webdataset": WebDataset,
}


def open_preference_dataset(cfg: DataConfig, resolution: int, *, seed: int = 0,
                            family: str | None = None) -> PreferenceDataset:
    """Index the pairs that ``cfg`` names and return a map-style dataset of them.

    ``resolution`` is the square side of every returned picture; ``seed`` (the run's seed)
    decides which pairs ``cfg.random_flip`` mirrors; ``family`` (``model.family``) says whether
    the model needs pictures or clips, so data of the other kind stops here, not at a tensor
    shape (``None``: each file's suffix decides). Opening reads labels or the manifest only,
    never the pictures; user-fixable problems (missing path, missing column, only ties, no
    valid pair, the wrong kind for the model) raise `SipoError`.
    """
    if cfg.format not in FORMATS:
        raise SipoError(f"data.format={cfg.format!r} is not valid; choose one of {list(FORMATS)}")
    if cfg.format == "pickapic":
        if media_of_family(family) == "video":
            raise SipoError(f"data.format=pickapic holds pictures, but model.family={family} trains on videos; "
                            "set data.format=jsonl with a manifest of video clips (docs/data.md) or set "
                            "model.family to an image family")
        options = {"split": cfg.split, "min_score_margin": cfg.min_score_margin}
        if family_needs_input_image(family):
            raise SipoError(f"data.format=pickapic holds text-to-image pairs, and model.family={family} edits or animates "
                            "an input image; set data.format to jsonl, hf or webdataset with an input_image per pair "
                            "(docs/data.md)")
    elif cfg.format == "hf":
        options = {"split": cfg.split, "columns": cfg.columns, "video": video_spec(cfg), "family": family}
        if cfg.streaming:
            from sipo.data.hf_stream import HfStreamingPairs

            return HfStreamingPairs(cfg.path, resolution, max_pairs=cfg.max_pairs,
                                    strict=cfg.strict, random_flip=cfg.random_flip, seed=seed,
                                    shuffle_buffer=cfg.shuffle_buffer, **options)
    elif cfg.format == "jsonl":
        options = {"video": video_spec(cfg), "family": family, "min_score_margin": cfg.min_score_margin}
    else:  # webdataset shards, like manifests, may hold clips
        options = {"video": video_spec(cfg), "family": family}
    return FORMATS[cfg.format](
        cfg.path,
        resolution,
        max_pairs=cfg.max_pairs,
        strict=cfg.strict,
        random_flip=cfg.random_flip,
        seed=seed,
        **options,
    )


def video_spec(cfg: DataConfig) -> VideoSpec:
    """How the clips of a video manifest are sampled: ``data.num_frames/fps/height/width``."""
    return VideoSpec(num_frames=cfg.num_frames, fps=cfg.fps, height=cfg.height, width=cfg.width)


__all__ = [
    "FORMATS",
    "DataReport",
    "HfDataset",
    "JsonlDataset",
    "MalformedRow",
    "PickapicDataset",
    "PreferenceDataset",
    "SkippedRow",
    "VideoSpec",
    "WebDataset",
    "collate_pairs",
    "decode_file",
    "decode_image",
    "decode_video",
    "flip_decision",
    "open_preference_dataset",
    "video_spec",
]
