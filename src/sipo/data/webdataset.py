"""WebDataset tar shards of preference pairs, read by offset with the standard library's `tarfile`.

Each sample is the group of members that share a key (the member name up to the first dot of its
base name, as the ``webdataset`` package groups them):

    000042.txt            the prompt (UTF-8), or
    000042.json           {"prompt": "..."} (or "caption")
    000042.chosen.jpg     the preferred picture (.jpg .jpeg .png .webp .gif) or clip (.mp4 .webm .mov .gif)
    000042.rejected.jpg   the other one
    000042.input.jpg      (conditioned families) the picture both sides edit, or the clips' first frame

``data.path`` is one shard, a folder of ``*.tar``, a glob, or a brace list such as
``shards/pairs-{0000..0099}.tar`` (several comma-separated alternatives: ``{a,b}``). Opening reads
only the tar headers and remembers where every member's bytes start, so the shards are a map-style
dataset like the other formats: the seed's shuffle, DataLoader workers and exact resume work the same.
Shards must be uncompressed ``.tar`` (a ``.tar.gz`` has no offsets to seek to). Samples without a prompt
or without both pictures are skipped and counted ("missing field") when the shards are opened.

Why `tarfile` and not the ``webdataset`` package: that package is a streaming pipeline (no random
access, no length), and sipo's shuffle and resume need ``dataset[i]``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from sipo.data.decode import MalformedRow, decode_file, decode_image, decode_input_image, media_of_path
from sipo.data.pairs import PreferenceDataset, check_input_images, family_needs_input_image, media_of_family
from sipo.data.report import (
    MALFORMED_JSON,
    MISSING_FIELD,
    NOT_A_PICTURE,
    NOT_A_VIDEO,
    UNREADABLE_TAR,
    WRONG_FIELD_TYPE,
)
from sipo.data.sizes import original_size
from sipo.data.video import VideoSpec
from sipo.errors import SipoError

MEDIA_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".mp4", ".webm", ".mov")
#: what ``KEY.input.<ext>`` (a pair's input image) may be: a still picture
INPUT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``a-00.tar a-01.tar a-02.tar``; ``{x,y}`` -> both; nested and repeated braces too.

    Numeric ranges keep the zero padding of their first bound.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise SipoError(f"data.path {pattern} opens a brace it never closes; write e.g. shard-{{0000..0009}}.tar")
    inner, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    numbers = _RANGE.match(inner)
    if numbers:
        low, high = numbers.groups()
        width = len(low) if low.startswith("0") else 0
        step = 1 if int(high) >= int(low) else -1
        options = [str(n).zfill(width) for n in range(int(low), int(high) + step, step)]
    else:
        options, depth, begin = [], 0, 0
        for position, char in enumerate(inner):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "," and depth == 0:
                options.append(inner[begin:position])
                begin = position + 1
        options.append(inner[begin:])
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def find_tar_shards(path: str) -> list[Path]:
    """The tar shards ``data.path`` names: a file, a folder's ``*.tar``, a glob, or a brace list of those."""
    if not path:
        raise SipoError("data.path is empty; set data.path to tar shards, e.g. shards/pairs-{0000..0009}.tar")
    shards: list[Path] = []
    for item in expand_braces(path):
        target = Path(item)
        if glob.has_magic(item):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise SipoError(f"data.path {item} matches no files; fix the pattern or point data.path at the shards")
            shards += matched
        elif target.is_dir():
            inside = sorted(p for p in target.glob("*.tar") if p.is_file())
            if not inside:
                raise SipoError(f"{target} contains no .tar files; set data.path to a folder of WebDataset shards")
            shards += inside
        elif target.is_file():
            shards.append(target)
        else:
            raise SipoError(f"data.path names {item}, which does not exist; fix data.path (brace lists such as "
                            "pairs-{0000..0009}.tar must match the shards' names)")
    compressed = [p for p in shards if p.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"))]
    if compressed:
        raise SipoError(f"{compressed[0]} is a compressed tar, which cannot be read by offset; uncompress the shards "
                        "(gunzip) and point data.path at the .tar files")
    return shards


def split_key(name: str) -> tuple[str, str]:
    """(sample key, field) of a member name: ``dir/000042.chosen.jpg`` -> (``dir/000042``, ``chosen.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (field if dot else "")


class WebDataset(PreferenceDataset):
    """Preference pairs from WebDataset tar shards (see the module docstring)."""

    format = "webdataset"

    def __init__(
        self,
        path: str,
        resolution: int,
        *,
        max_pairs: int | None = None,
        strict: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        video: VideoSpec | None = None,
        family: str | None = None,
    ) -> None:
        super().__init__(path, resolution, strict=strict, random_flip=random_flip, seed=seed)
        self.video = video or VideoSpec()
        self.media = media_of_family(family)
        shards = find_tar_shards(path)
        self._shards = [os.fspath(p) for p in shards]
        self._keys: list[str] = []
        # per pair: shard, then (offset, size) of prompt, chosen, rejected, and which files those were
        places: list[list[int]] = []
        self._names: list[tuple[str, str, str]] = []
        self.needs_input = family_needs_input_image(family)
        # per pair: (offset, size) of KEY.input.<ext> and its field name; (-1, 0) and "" where there is none
        inputs: list[tuple[int, int]] = []
        self._input_names: list[str] = []
        for number, shard in enumerate(shards):
            if max_pairs is not None and len(places) >= max_pairs:
                break
            for key, fields in self._index_shard(shard):
                if max_pairs is not None and len(places) >= max_pairs:
                    break
                found = self._sample(key, fields, shard)
                if found is not None:
                    (prompt, chosen, rejected), names = found
                    places.append([number, *prompt, *chosen, *rejected])
                    self._keys.append(key)
                    self._names.append(names)
                    input_name = next((f"input{suffix}" for suffix in INPUT_SUFFIXES if f"input{suffix}" in fields), "")
                    inputs.append(fields[input_name] if input_name else (-1, 0))
                    self._input_names.append(input_name)
        self._places = np.asarray(places, dtype=np.int64).reshape(-1, 7)
        self._inputs = np.asarray(inputs, dtype=np.int64).reshape(-1, 2)
        check_input_images(family, path, sum(bool(name) for name in self._input_names), len(self._places))
        self.report.shards = len(shards)
        self.report.set_pairs(len(self._places))
        if not len(self._places):
            raise SipoError(
                f"no valid pairs in {path} ({self.report.rows_seen} samples, {self.report.skip_summary()}); each sample "
                "needs KEY.txt (or KEY.json), KEY.chosen.jpg and KEY.rejected.jpg (docs/data.md)")

    def _index_shard(self, shard: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        """The shard's samples in order: key -> {field: (offset, size)}; an unreadable shard is counted."""
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(shard, mode="r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, field = split_key(member.name)
                    samples.setdefault(key, {})[field.lower()] = (member.offset_data, member.size)
        except (OSError, tarfile.TarError) as error:
            self._raise_or_count(UNREADABLE_TAR, f"shard {shard} ({type(error).__name__})")
            return []
        return list(samples.items())

    def _sample(self, key: str, fields: dict[str, tuple[int, int]], shard: Path):
        """((prompt, chosen, rejected) places, their field names), or None after counting the problem."""
        self.report.rows_seen += 1
        where = f"sample {key} of {shard}"
        prompt = next((name for name in ("txt", "json") if name in fields), None)
        sides = {}
        for side in ("chosen", "rejected"):
            sides[side] = next((f"{side}{suffix}" for suffix in MEDIA_SUFFIXES if f"{side}{suffix}" in fields), None)
        missing = [name for name, value in (("prompt (.txt or .json)", prompt), ("chosen", sides["chosen"]),
                                            ("rejected", sides["rejected"])) if value is None]
        if missing:
            self._raise_or_count(MISSING_FIELD, f"{where} (no {', '.join(missing)}; has {sorted(fields)})")
            return None
        for side in ("chosen", "rejected"):
            kind = media_of_path(sides[side])
            if self.media is not None and kind is not None and kind != self.media:
                self._raise_or_count(NOT_A_VIDEO if self.media == "video" else NOT_A_PICTURE, f"{where} ({sides[side]})")
                return None
        names = (prompt, sides["chosen"], sides["rejected"])
        return tuple(fields[name] for name in names), names

    # --- per-pair reading ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._places)

    def _where(self, index: int) -> str:
        return f"sample {self._keys[index]} of {self._shards[self._places[index, 0]]}"

    def pair_key(self, index: int) -> str:
        return f"sample {self._keys[index]} of {os.path.basename(self._shards[self._places[index, 0]])}"

    def _load(self, index: int):
        shard, *spans = (int(v) for v in self._places[index])
        prompt_name, chosen_name, rejected_name = self._names[index]
        try:
            with open(self._shards[shard], "rb") as handle:
                parts = []
                for offset, size in zip(spans[0::2], spans[1::2]):
                    handle.seek(offset)
                    parts.append(handle.read(size))
        except OSError as error:
            raise MalformedRow(UNREADABLE_TAR, f"{type(error).__name__}: {error}") from None
        if any(len(part) != size for part, size in zip(parts, spans[1::2])):
            raise MalformedRow(UNREADABLE_TAR, "the shard is shorter than its headers say (truncated)")
        prompt = _prompt(parts[0], prompt_name)
        chosen = self._decode(parts[1], chosen_name)
        rejected = self._decode(parts[2], rejected_name)
        if chosen.ndim != 3:
            return prompt, chosen, rejected
        return prompt, chosen, rejected, original_size(parts[1])

    def _load_input(self, index: int) -> torch.Tensor | None:
        name = self._input_names[index]
        if not name:
            if self.needs_input:
                raise MalformedRow(MISSING_FIELD, "no KEY.input.<ext>")
            return None
        offset, size = (int(v) for v in self._inputs[index])
        try:
            with open(self._shards[int(self._places[index, 0])], "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as error:
            raise MalformedRow(UNREADABLE_TAR, f"{type(error).__name__}: {error}") from None
        if len(data) != size:
            raise MalformedRow(UNREADABLE_TAR, "the shard is shorter than its headers say (truncated)")
        try:
            return decode_input_image(data, self.resolution, self.video, self.media)
        except MalformedRow as problem:
            raise MalformedRow(problem.reason, f"{name}: {problem.detail}") from None

    def _decode(self, data: bytes, name: str) -> torch.Tensor:
        suffix = os.path.splitext(name)[1]
        if media_of_path(name) == "image":
            return decode_image(data, self.resolution)
        # clips (and GIFs, which may be either) go through the file decoder, which reads by suffix
        with tempfile.NamedTemporaryFile(suffix=suffix) as temporary:
            temporary.write(data)
            temporary.flush()
            return decode_file(temporary.name, self.resolution, self.video, self.media)


def _prompt(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRow(WRONG_FIELD_TYPE, f"{name} is not UTF-8 text") from None
    if name == "txt":
        return text.strip()
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        raise MalformedRow(MALFORMED_JSON, name) from None
    prompt = record.get("prompt", record.get("caption")) if isinstance(record, dict) else None
    if not isinstance(prompt, str):
        raise MalformedRow(MISSING_FIELD, f"{name} has no \"prompt\" (or \"caption\") text")
    return prompt
