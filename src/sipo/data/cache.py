"""The latent cache: every pair encoded once (VAE latents + text conditioning) into safetensors shards.

``sipo cache --config FILE`` writes ``<data dir>/.sipo-cache/<key>/`` (or ``<data.cache_dir>/<key>/``):

- ``shard-NNNNN.safetensors``: the pairs ``[n * SHARD_PAIRS, (n + 1) * SHARD_PAIRS)`` that loaded:
  ``index`` ``[m]``, ``x0_chosen`` / ``x0_rejected`` ``[m, ...]`` (float32 model-space x0),
  ``cond.<name>`` ``[m, ...]`` (the adapter's conditioning), with ``data.random_flip`` also
  ``x0_chosen_flipped`` / ``x0_rejected_flipped`` (the latents of the mirrored pictures: a flipped
  latent is not the latent of the flipped image), and ``size_info`` when the dataset records it
  (then also ``size_info_flipped``, and ``cond_flipped.<name>`` for the conditioning a mirror
  changes: SDXL's ``time_ids`` carry the crop, which a flip mirrors), and ``stored_noise`` ``[m, 3]``
  (the seeds each side was sampled from and the draw's dtype code, ``-1`` seeds where the row has
  none: ``objective.noise=stored`` reads them) and ``score_margin`` ``[m]`` (NaN where the row has
  none: ``objective.reward_beta`` reads it). A conditioned family's input image is in ``cond.*`` (its
  latents, and the vision-language states of Qwen-Image-Edit), never in ``x0``; its file is in the key (a
  JSONL manifest's ``input_image`` paths are stamped with the pictures).
  The skipped rows and the prompts are in the file's metadata. Each shard is written under a
  temporary name and renamed, so an interrupted ``sipo cache`` continues from the missing shards.
- ``manifest.json`` (written last): the key and what it hashes, the counts, the index-time data
  report, the parquet row-group ids (so a run from the cache reads the same pairs in the same
  order and reports the same skips as a run from the pictures) and each shard's size and sha256.

The key hashes the family, the model's component configs and weight-file sizes and mtimes (and
``model.vae_path``'s), the resolution, the clip sampling (``data.num_frames/fps/height/width``), the
data files' sizes and mtimes (a JSONL manifest's content, and the size and mtime of every picture it
lists, so pictures regenerated under the same names change the key), ``max_pairs``,
``random_flip``, the encoders' dtype and ``FORMAT_VERSION``: change any and the cache no longer
matches. ``sipo train`` then refuses it (``data.use_cache=always``) or encodes on the fly (``auto``).

Every shard is checked against its size and sha256 when the cache is opened for training (reading
the cache once, at about the disk's speed): a truncated or bit-flipped shard stops the run
(``always``) or sends it to the pictures (``auto``), and ``sipo cache`` again re-encodes exactly the
shards that fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from sipo.config import SipoConfig
from sipo.data.pairs import encode_extras, flip_decision
from sipo.data.report import DataReport, SkippedRow
from sipo.data.sizes import resize_crop_box
from sipo.errors import SipoError

#: 2: mirrored pairs carry their own crop conditioning (``cond_flipped.*``); clip sampling is in the key
#: 3: shard checksums in the manifest; a JSONL dataset's pictures and ``model.vae_path`` in the key
#: 4: each pair's stored-noise seeds (``stored_noise``: chosen seed, rejected seed, noise dtype code) and ``score_margin``
FORMAT_VERSION = 4
SHARD_PAIRS = 256
#: pairs per encoder call while caching (the VAE itself still works in encode_chunk_size chunks)
ENCODE_PAIRS = 32
CACHE_FOLDER = ".sipo-cache"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- the key
def _file_stamp(path: Path) -> list[Any]:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")


def model_fingerprint(model_path: str) -> dict[str, Any]:
    """What identifies a local model directory: each component's config texts and weight-file stamps."""
    root = Path(model_path).expanduser()
    if not root.is_dir():
        return {"hub_id": model_path}  # a hub id is its own fingerprint
    found: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = str(path.relative_to(root))
        if path.suffix in (".json", ".txt", ".yaml"):
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix in WEIGHT_SUFFIXES:
            found[relative] = _file_stamp(path)[1:]
    return found


def model_files_fingerprint(model_config) -> dict[str, Any]:
    """The model's files a run depends on: the pipeline directory's, and ``model.vae_path``'s when set.

    The one description of "these weights" shared by the cache key and the resume fingerprint
    (``sipo.checkpoints.run_fingerprint``): weights replaced in place change both.
    """
    found = {"pipeline": model_fingerprint(model_config.pretrained_path)}
    if getattr(model_config, "vae_path", ""):
        found["vae"] = model_fingerprint(model_config.vae_path)
    return found


def files_digest(stamps: Any, count: int) -> str:
    """``"N files, sha256 XXXX"`` of ``count`` files' stamps (any JSON value): short enough for a
    message that says they changed."""
    return f"{count} files, sha256 {hashlib.sha256(json.dumps(stamps, sort_keys=True).encode()).hexdigest()[:16]}"


def model_files_digest(model_config) -> str:
    """`model_files_fingerprint` as ``"N files, sha256 XXXX"`` (the resume fingerprint's ``model.files``)."""
    found = model_files_fingerprint(model_config)
    return files_digest(found, sum(len(files) for files in found.values()))


def _data_files(data_config) -> list[Path]:
    if data_config.format == "pickapic":
        from sipo.data.pickapic import find_shards

        return find_shards(data_config.path, data_config.split)
    if data_config.format == "webdataset":
        from sipo.data.webdataset import find_tar_shards

        return find_tar_shards(data_config.path)
    if data_config.format == "hf":
        return hf_files(data_config.path)
    return [Path(data_config.path)]


def hf_files(path: str) -> list[Path]:
    """The files of a local `datasets` folder (hidden ones, such as .sipo-cache/, are not data); none for a hub id."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def picture_stamps(manifest: Path) -> list[list[Any]]:
    """``[relative path, size, mtime_ns]`` of every picture a JSONL manifest lists (``[path, None]``
    for a missing one): rewriting a picture under its old name changes its stamp."""
    from sipo.data.jsonl import listed_pictures

    stamps: list[list[Any]] = []
    for path in listed_pictures(manifest):
        relative = os.path.relpath(path, manifest.parent)
        try:
            stat = path.stat()
        except (OSError, ValueError):  # missing, or a name the file system refuses: the dataset skips it
            stamps.append([relative, None])
            continue
        stamps.append([relative, stat.st_size, stat.st_mtime_ns])
    return stamps


def data_fingerprint(data_config) -> dict[str, Any]:
    """The data files' names, sizes and mtimes; a JSONL manifest's content hash and its pictures' stamps too."""
    files = _data_files(data_config)
    found: dict[str, Any] = {"format": data_config.format, "files": [_file_stamp(p) for p in files]}
    if data_config.format == "hf":
        # which rows become which pairs: the split, the column mapping, and for a hub id the id itself
        found.update(split=data_config.split, columns=dict(sorted(data_config.columns.items())))
        if not files:
            found["hub_id"] = data_config.path
    if data_config.format == "jsonl" and files and files[0].is_file():
        found["manifest_sha256"] = hashlib.sha256(files[0].read_bytes()).hexdigest()
        stamps = picture_stamps(files[0])
        found["pictures"] = files_digest(stamps, len(stamps))
    return found


def encoder_dtype_name(config: SipoConfig) -> str:
    """The dtype the frozen encoders run in: the run's compute dtype."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(config.train.mixed_precision, "float32")


def cache_identity(config: SipoConfig) -> dict[str, Any]:
    """Everything the cached tensors depend on (hashed into the key)."""
    return {
        "format_version": FORMAT_VERSION,
        "family": config.model.family,
        "model": model_files_fingerprint(config.model),
        "resolution": config.model.resolution,
        "data": data_fingerprint(config.data),
        "max_pairs": config.data.max_pairs,
        "random_flip": config.data.random_flip,
        "encoder_dtype": encoder_dtype_name(config),
        # how clips are sampled decides a video's latents as the resolution decides a picture's
        "clips": [config.data.num_frames, config.data.fps, config.data.height, config.data.width],
        # the margin filter decides which pairs get an index (only present when set: older keys stay valid)
        **({"min_score_margin": config.data.min_score_margin} if config.data.min_score_margin is not None else {}),
    }


def cache_key(config: SipoConfig, identity: dict[str, Any] | None = None) -> str:
    """The key of ``cache_identity(config)`` (pass ``identity`` when it is already computed: for a large
    manifest it stats every picture)."""
    text = json.dumps(identity if identity is not None else cache_identity(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root(config: SipoConfig) -> Path:
    """``data.cache_dir``, or ``.sipo-cache`` beside the data (the folder of a file, the folder itself)."""
    if config.data.cache_dir:
        return Path(config.data.cache_dir).expanduser()
    files = _data_files(config.data)
    base = Path(config.data.path)
    if config.data.format == "hf" and not files:  # a hub id: beside the hub's own cache
        return Path.home() / ".cache" / "sipo" / config.data.path.replace("/", "--") / CACHE_FOLDER
    if base.is_dir():
        return base / CACHE_FOLDER
    return (files[0].parent if files else base.parent) / CACHE_FOLDER


def cache_location(config: SipoConfig, identity: dict[str, Any] | None = None) -> Path:
    return cache_root(config) / cache_key(config, identity)


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksum(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _shard_is_sound(path: Path, expected: dict[str, Any] | None) -> bool:
    """A shard kept from an earlier build: it matches the checksum its manifest recorded, or (an
    interrupted build, no manifest yet) its header and index read."""
    if isinstance(expected, dict):
        return _checksum(path) == expected
    try:
        with safe_open(str(path), "pt") as handle:
            handle.get_tensor("index")
        return True
    except Exception:  # noqa: BLE001 - safetensors raises its own error type on a damaged file
        return False


# ----------------------------------------------------------------------------- writing
def build_cache(config: SipoConfig, adapter=None, progress: bool = True, shard_pairs: int = SHARD_PAIRS,
                device: torch.device | str | None = None) -> Path:
    """Encode every pair of ``config.data`` once into the cache folder; returns that folder.

    Shards already on disk are kept: a rerun after an interruption encodes only the missing ones.
    """
    from tqdm.auto import tqdm

    from sipo.data import collate_pairs, open_preference_dataset
    from sipo.models import adapter_from_config
    from sipo.models.base import hold_frozen_weights_in
    from sipo.performance import COMPUTE_DTYPES, configure_kernels

    # the latents a deterministic run trains on are encoded with its kernels (TF32 off on CUDA)
    configure_kernels(config.train.deterministic)
    if config.data.streaming:
        raise SipoError("sipo cache encodes an indexed dataset, and data.streaming=true reads a stream; set "
                        "data.streaming=false (the cache then replaces the pictures in training)")
    # The plain pictures; flipped latents come from mirrored pictures below.
    dataset = open_preference_dataset(dataclasses.replace(config.data, random_flip=False), config.model.resolution,
                                      seed=config.train.seed, family=config.model.family)
    index_report = _index_time_report(dataset.report)
    identity = cache_identity(config)  # the files as they are now, before any is encoded
    location = cache_location(config, identity)
    location.mkdir(parents=True, exist_ok=True)
    # A rebuild checks the shards it keeps against the checksums of the last complete build; without
    # its manifest the cache reads as incomplete (not damaged) until this build finishes.
    try:
        previous = (read_manifest(location) or {}).get("checksums")
    except DamagedCache:
        previous = None
    previous = previous if isinstance(previous, dict) else {}
    (location / MANIFEST).unlink(missing_ok=True)
    if adapter is None:
        adapter = adapter_from_config(config.model)
    adapter.freeze_encoders()
    if config.model.encode_chunk_size is not None:
        adapter.encode_chunk_size = config.model.encode_chunk_size
    if config.train.mixed_precision in COMPUTE_DTYPES:
        hold_frozen_weights_in(adapter, COMPUTE_DTYPES[config.train.mixed_precision])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for module in adapter.frozen_modules():
        module.to(device)

    num_shards = max(1, math.ceil(len(dataset) / shard_pairs))
    checksums: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(dataset), desc="sipo cache", unit="pair", disable=not progress, dynamic_ncols=True)
    for number in range(num_shards):
        low, high = number * shard_pairs, min((number + 1) * shard_pairs, len(dataset))
        target = location / _shard_name(number)
        if target.is_file() and not _shard_is_sound(target, previous.get(target.name)):
            target.unlink()  # truncated or bit-flipped: encoded again below
        if not target.is_file():
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=ENCODE_PAIRS, sampler=range(low, high), collate_fn=collate_pairs,
                num_workers=config.data.num_workers,
            )
            tensors, prompts, skipped = _encode_shard(adapter, loader, config.data.random_flip, device,
                                                      config.model.resolution)
            metadata = {"prompts": json.dumps(prompts), "skipped": json.dumps(skipped)}
            partial = location / f".tmp-{target.name}"
            save_file(tensors, str(partial), metadata=metadata)
            os.replace(partial, target)
        checksums[target.name] = _checksum(target)
        bar.update(high - low)
    bar.close()

    manifest = {
        "key": location.name,
        "identity": identity,
        "pairs": len(dataset),
        "shard_pairs": shard_pairs,
        "shards": num_shards,
        "report": index_report,
        "row_group_ids": dataset.row_group_ids().tolist() if hasattr(dataset, "row_group_ids") else None,
        "checksums": checksums,
    }
    temporary = location / f".tmp-{MANIFEST}"
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, location / MANIFEST)
    return location


def mirrored_size_info(sizes: Tensor, resolution: int) -> Tensor:
    """``[B, 4]`` (orig_h, orig_w, crop_top, crop_left) of the same pictures mirrored: the crop's left edge
    becomes ``new_width - left - resolution`` (what the dataset records for a flipped pair, `size_info`)."""
    mirrored = sizes.clone()
    for row in mirrored:
        new_width = resize_crop_box(int(row[1]), int(row[0]), resolution)[0]
        row[3] = new_width - row[3] - resolution
    return mirrored


def _encode_shard(adapter, loader, random_flip: bool, device,
                  resolution: int) -> tuple[dict[str, Tensor], list[str], list[list]]:
    parts: dict[str, list[Tensor]] = {}
    flipped_conditioning: dict[str, list[Tensor]] = {}
    differs: set[str] = set()
    prompts: list[str] = []
    skipped: list[list] = []

    def add(name: str, value: Tensor, into: dict[str, list[Tensor]] = parts) -> None:
        into.setdefault(name, []).append(value.detach().cpu().contiguous())

    for batch in loader:
        skipped.extend([row.index, row.reason, row.where] for row in batch["skipped"])
        if not batch["indices"]:
            continue
        prompts.extend(batch["prompts"])
        add("index", torch.tensor(batch["indices"], dtype=torch.long))
        extra = encode_extras(batch, device)
        encoded = adapter.encode(batch["prompts"], batch["chosen"].to(device), batch["rejected"].to(device), **extra)
        add("x0_chosen", encoded.x0_winner)
        add("x0_rejected", encoded.x0_loser)
        for name, value in encoded.conditioning.items():
            add(f"cond.{name}", value)
        if "size_info" in extra:
            add("size_info", batch["size_info"])
        add("stored_noise", _seed_columns(batch))
        add("score_margin", batch["score_margin"] if batch.get("score_margin") is not None
            else torch.full((len(batch["indices"]),), float("nan")))
        if random_flip:
            # the pictures the dataset would hand out mirrored (PreferenceDataset flips the last axis)
            mirrored = [batch["chosen"].flip(-1).to(device), batch["rejected"].flip(-1).to(device)]
            if extra:
                # a mirror moves the crop, and the conditioning may depend on it (SDXL's time_ids), and it
                # mirrors the input image too (its latents, and what a vision-language encoder reads from it)
                mirrored_extra = {}
                if "size_info" in extra:
                    mirrored_extra["size_info"] = mirrored_size_info(batch["size_info"], resolution)
                    add("size_info_flipped", mirrored_extra["size_info"])
                if "input_images" in extra:
                    mirrored_extra["input_images"] = extra["input_images"].flip(-1)
                flipped = adapter.encode(batch["prompts"], *mirrored, **mirrored_extra)
                chosen, rejected = flipped.x0_winner, flipped.x0_loser
                for name, value in flipped.conditioning.items():
                    add(f"cond_flipped.{name}", value, flipped_conditioning)
                    if not torch.equal(value.cpu(), encoded.conditioning[name].cpu()):
                        differs.add(name)
            else:
                chosen, rejected = adapter.encode_images(torch.cat(mirrored)).chunk(2)
            add("x0_chosen_flipped", chosen)
            add("x0_rejected_flipped", rejected)
    if not parts:  # every row of the shard was malformed
        return {"index": torch.zeros(0, dtype=torch.long)}, prompts, skipped
    # only the conditioning a mirror changes is stored twice (the prompts' embeddings are not)
    parts.update({f"cond_flipped.{name}": flipped_conditioning[f"cond_flipped.{name}"] for name in differs})
    if all(torch.isnan(part).all() for part in parts.get("score_margin", [])):
        parts.pop("score_margin", None)  # no row of the shard is scored
    return {name: torch.cat(values) for name, values in parts.items()}, prompts, skipped


def _seed_columns(batch: dict[str, Any]) -> Tensor:
    """``[B, 3]`` int64: each pair's chosen seed, rejected seed and noise dtype code (objective.noise=stored),
    ``-1`` seeds where the batch carries none."""
    from sipo.data.jsonl import NOISE_DTYPE_NAMES

    count = len(batch["indices"])
    if batch.get("chosen_seed") is None:
        return torch.tensor([[-1, -1, 0]] * count, dtype=torch.long).reshape(count, 3)
    codes = [NOISE_DTYPE_NAMES.index(name) for name in batch["noise_dtype"]]
    return torch.stack([batch["chosen_seed"].long(), batch["rejected_seed"].long(), torch.tensor(codes)], dim=1)


def _index_time_report(report: DataReport) -> dict[str, Any]:
    """The report's counts fixed when the dataset was opened (before any pair is loaded)."""
    return {
        "source": report.source, "format": report.format, "rows_seen": report.rows_seen,
        "ties_dropped": report.ties_dropped, "shards": report.shards, "pairs": report.pairs,
        "index_skips": dict(report.index_skips), "examples": {k: list(v) for k, v in report.examples.items()},
    }


# ----------------------------------------------------------------------------- reading
class CachedPairs(Dataset):
    """The cache as a map-style dataset with the same indices, flips, skips and report as the pictures'.

    ``ds[i]`` is ``dict(prompt, index, x0_chosen, x0_rejected, conditioning)`` or a `SkippedRow`;
    tensors are read row by row from the memory-mapped shards. Batch with ``ds.collate``.
    """

    def __init__(self, location: Path, manifest: dict[str, Any], random_flip: bool, seed: int) -> None:
        self.location = Path(location)
        self.manifest = manifest
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.shard_pairs = manifest["shard_pairs"]
        saved = manifest["report"]
        self.report = DataReport(saved["source"], saved["format"])
        self.report.rows_seen, self.report.ties_dropped, self.report.shards = (
            saved["rows_seen"], saved["ties_dropped"], saved["shards"])
        self.report.index_skips.update(saved["index_skips"])
        self.report.examples = {k: list(v) for k, v in saved["examples"].items()}
        self.report.set_pairs(manifest["pairs"])
        self._rows: dict[int, tuple[int, int]] = {}  # index -> (shard, row)
        self._skipped: dict[int, SkippedRow] = {}
        self._prompts: dict[int, str] = {}
        for number in range(manifest["shards"]):
            with safe_open(str(self.location / _shard_name(number)), "pt") as handle:
                metadata = handle.metadata() or {}
                indices = handle.get_tensor("index").tolist()
            for row, (index, prompt) in enumerate(zip(indices, json.loads(metadata.get("prompts", "[]")))):
                self._rows[index] = (number, row)
                self._prompts[index] = prompt
            for index, reason, where in json.loads(metadata.get("skipped", "[]")):
                self._skipped[index] = SkippedRow(index=index, reason=reason, where=where)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        if manifest["row_group_ids"] is not None:  # parquet: the trainer's block shuffle reads these
            import numpy as np

            blocks = np.asarray(manifest["row_group_ids"], dtype=np.int64)
            self.row_group_ids = lambda: blocks

    def __len__(self) -> int:
        return self.manifest["pairs"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _handle(self, number: int):
        if self._pid != os.getpid():  # a DataLoader worker: open its own files
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = safe_open(str(self.location / _shard_name(number)), "pt")
        return self._handles[number]

    def __getitem__(self, index: int):
        index = int(index)
        if index in self._skipped:
            row = self._skipped[index]
            self.report.record([row])
            return row
        number, row = self._rows[index]
        handle = self._handle(number)
        flip = self.random_flip and flip_decision(self.seed, self.epoch, index)
        suffix = "_flipped" if flip else ""
        read = lambda name: handle.get_slice(name)[row:row + 1][0]  # noqa: E731  (one row off the disk)
        keys = set(handle.keys())
        conditioning = {}
        for key in handle.keys():
            if key.startswith("cond."):
                # a mirrored pair's own conditioning where the mirror changes it (SDXL's crop in time_ids)
                mirrored = f"cond_flipped.{key[len('cond.'):]}"
                conditioning[key[len("cond."):]] = read(mirrored if flip and mirrored in keys else key)
        item: dict[str, Any] = {
            "prompt": self._prompts[index],
            "index": index,
            "x0_chosen": read(f"x0_chosen{suffix}"),
            "x0_rejected": read(f"x0_rejected{suffix}"),
            "conditioning": conditioning,
        }
        if "size_info" in keys:
            item["size_info"] = read("size_info_flipped" if flip and "size_info_flipped" in keys else "size_info")
        if "stored_noise" in keys:
            from sipo.data.jsonl import NOISE_DTYPE_NAMES

            chosen, rejected, code = (int(v) for v in read("stored_noise"))
            if chosen >= 0:
                item.update(chosen_seed=chosen, rejected_seed=rejected, noise_dtype=NOISE_DTYPE_NAMES[code])
        if "score_margin" in keys:
            margin = float(read("score_margin"))
            if margin == margin:  # NaN: the row had no score
                item["score_margin"] = margin
        self.report.record([item])
        return item

    @staticmethod
    def collate(items: Sequence[Any]) -> dict[str, Any]:
        """Like ``collate_pairs``, with ``x0_chosen``/``x0_rejected``/``conditioning`` in place of pictures."""
        pairs = [item for item in items if not isinstance(item, SkippedRow)]
        batch: dict[str, Any] = {
            "prompts": [pair["prompt"] for pair in pairs],
            "indices": [pair["index"] for pair in pairs],
            "rows": [row for row, item in enumerate(items) if not isinstance(item, SkippedRow)],
            "skipped": [item for item in items if isinstance(item, SkippedRow)],
            "chosen": None,
            "rejected": None,
        }
        if pairs:
            batch["x0_chosen"] = torch.stack([pair["x0_chosen"] for pair in pairs])
            batch["x0_rejected"] = torch.stack([pair["x0_rejected"] for pair in pairs])
            batch["conditioning"] = {name: torch.stack([pair["conditioning"][name] for pair in pairs])
                                     for name in pairs[0]["conditioning"]}
            if "size_info" in pairs[0]:
                batch["size_info"] = torch.stack([pair["size_info"] for pair in pairs])
        from sipo.data.pairs import collate_seeds

        batch.update(collate_seeds(pairs))
        return batch


class DamagedCache(Exception):
    """A complete cache whose files do not match its manifest (``why``: one short phrase)."""

    def __init__(self, location: Path, why: str) -> None:
        super().__init__(f"the latent cache {location} is damaged ({why})")
        self.location, self.why = Path(location), why


def read_manifest(location: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache, None when there is none; `DamagedCache` when it cannot be read."""
    path = Path(location) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # a write cut short, bad bytes
        raise DamagedCache(location, f"its {MANIFEST} is unreadable ({type(error).__name__})") from None
    if not isinstance(manifest, dict):
        raise DamagedCache(location, f"its {MANIFEST} is not a JSON object")
    return manifest


def verify_cache(location: Path, manifest: dict[str, Any]) -> str | None:
    """``None`` when every shard has the size and sha256 the manifest recorded, else why not (one phrase)."""
    from concurrent.futures import ThreadPoolExecutor

    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict):
        return f"its {MANIFEST} records no checksums"
    names = [_shard_name(number) for number in range(int(manifest.get("shards", 0)))]
    for name in names:  # the cheap checks first: a truncated copy fails here without reading anything
        path, expected = Path(location) / name, checksums.get(name)
        if not isinstance(expected, dict) or "size" not in expected or "sha256" not in expected:
            return f"{name} has no checksum"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, not {expected['size']}"
    # hashlib releases the GIL: threads read and hash several shards at once (the disk sets the pace)
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        digests = pool.map(lambda name: _sha256(Path(location) / name), names)
        for name, digest in zip(names, digests):
            if digest != checksums[name]["sha256"]:
                return f"{name} fails its sha256 check"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the first failure is enough: skip the shards not started
    return None


def open_cache(config: SipoConfig, verify: bool = True, identity: dict[str, Any] | None = None) -> CachedPairs | None:
    """The complete cache matching ``config``, or None; raises `DamagedCache` when its files do not
    match their checksums (``verify``) or cannot be read."""
    location = cache_location(config, identity)
    manifest = read_manifest(location)
    if manifest is None or manifest.get("key") != location.name:
        return None
    why = verify_cache(location, manifest) if verify else None
    if why is not None:
        raise DamagedCache(location, why)
    try:
        return CachedPairs(location, manifest, config.data.random_flip, config.train.seed)
    except Exception as error:  # noqa: BLE001 - safetensors' own error, a missing key: the files are damaged
        raise DamagedCache(location, f"{type(error).__name__} while reading its shards") from None


def _changed_entries(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The identity entries two caches differ in, two levels deep (``data.pictures``, ``resolution``)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if not prefix and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            changed += _changed_entries(old[key], new[key], f"{key}.")
        else:
            changed.append(f"{prefix}{key}")
    return changed


def _what_changed(other: Path, identity: dict[str, Any]) -> str:
    """``"; changed since: data.pictures"`` for the cache in ``other`` against this run's ``identity``,
    or nothing when it cannot tell."""
    try:
        saved = (read_manifest(other) or {}).get("identity")
    except DamagedCache:
        return ""
    if not isinstance(saved, dict):
        return ""
    changed = _changed_entries(saved, identity)
    return f"; changed since: {', '.join(changed[:4])}" if changed else ""


def open_cache_for_training(config: SipoConfig, dataset, log: Callable[[str], None] | None = None) -> CachedPairs | None:
    """What ``sipo train`` reads per ``data.use_cache``: the matching cache, or None for the pictures.

    ``always`` without a complete matching cache stops with one sentence that names ``sipo cache``;
    ``auto`` says which it uses.
    """
    mode = config.data.use_cache
    if mode == "never" or config.data.streaming:  # a stream has no indices for a cache to serve
        return None
    root = cache_root(config)
    # no cache folder at all (the usual case under auto): nothing to match, and no key to compute,
    # which for a JSONL dataset stats every picture
    identity = cache_identity(config) if root.is_dir() else None
    try:
        cached = open_cache(config, identity=identity) if identity is not None else None
    except DamagedCache as damage:
        if mode == "always":
            raise SipoError(f"{damage}; run `sipo cache --config FILE` with this run's config again to re-encode "
                            "the damaged shards, or set data.use_cache=auto to train from the pictures") from None
        if log:
            log(f"{damage}; encoding pictures every step (`sipo cache --config FILE` re-encodes the damaged shards)")
        return None
    if cached is not None and len(cached) != len(dataset):
        cached = None  # cannot happen for an unchanged key; never train on a cache of other pairs
    if cached is not None:
        if log:
            log(f"training from the latent cache {cached.location} ({len(cached)} pairs); "
                "the VAE and text encoders stay on the CPU")
        return cached
    location = cache_location(config, identity) if identity is not None else None
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != location.name) if location else []
    if location is not None and location.is_dir():
        why = f"the latent cache {location} is incomplete"
    elif others:
        # the newest other cache is the one this run most likely meant: say what no longer matches
        newest = max(others, key=lambda name: (root / name).stat().st_mtime_ns)
        why = (f"the latent cache under {root} was built for another model, resolution, data or precision "
               f"(key {newest}, this run needs {location.name}{_what_changed(root / newest, identity)})")
    else:
        why = f"no latent cache under {root}"
    if mode == "always":
        raise SipoError(f"{why}; run `sipo cache --config FILE` with this run's config first, or set data.use_cache=auto")
    if log and location is not None and (location.is_dir() or others):  # no cache at all: nothing worth a line
        log(f"{why}; encoding pictures every step (`sipo cache --config FILE` makes steps faster)")
    return None
