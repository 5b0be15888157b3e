"""What made a resumable output: one record beside it, checked before a rerun continues it.

A command that writes its output piece by piece and continues after a kill (``sipo relabel``'s
``<out>.partial``, a pairs or compare run's folder) must never continue with other settings: the
output would mix two scorers, two manifests or two resolutions under one name. It records what
made the output in ``<output>.provenance.json`` beside it (a flat JSON object of strings and
numbers: the scorer checkpoint's digest, the data manifest's, the resolution and sampler settings)
and calls :func:`claim` before it writes:

    note = provenance.claim(partial, {"scorer": "pickscore",
                                      "scorer_checkpoint": provenance.source_digest(path),
                                      "data": provenance.source_digest(manifest), "resolution": 512},
                            what="the scores in", on_change="fresh")

- no output yet: the record is written, ``None`` returned (start);
- the output and the same record: ``None`` (continue it);
- the output with another record, or none (a run from before records): ``on_change="stop"`` raises
  :class:`~sipo.errors.SipoError` naming each change (``"scorer_checkpoint: 'a' -> 'b'"``) and ``fix``;
  ``on_change="fresh"`` deletes the output, writes the new record and returns the sentence to print.

:func:`forget` removes the record once the output is complete (or moved into its final name).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from sipo.errors import SipoError

SUFFIX = ".provenance.json"


def record_path(output: str | Path) -> Path:
    """``<output>.provenance.json``, beside the output (a file or a folder)."""
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


def source_digest(source: str | Path | None, default: str | None = None) -> str:
    """What a path or hub id names, as a short stable string: ``"<N> files, sha256 <16 hex>"`` of a local
    file or folder's contents (sipo.checkpoints.data_signature: whole small files, size and ends of
    large ones), ``"hub <id>"`` for a name that is no local path, ``"hub <default>"`` for None."""
    from sipo.checkpoints import data_signature

    if source is None or str(source) == "":
        return f"hub {default}" if default else "default"
    path = Path(source).expanduser()
    if path.exists():
        return data_signature(str(path))
    return f"hub {source}"


def read(output: str | Path) -> dict[str, Any] | None:
    """The record beside ``output``, or None (no record, or an unreadable one)."""
    try:
        value = json.loads(record_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write(output: str | Path, record: Mapping[str, Any]) -> Path:
    """Write the record beside ``output`` atomically (a kill leaves the old one or the new one)."""
    target = record_path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    tmp.write_text(json.dumps(normalise(record), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def normalise(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(dict(record), default=str))


def differences(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (a missing key reads ``(unset)``)."""
    if saved is None:
        return ["no record of what made it"]
    current = normalise(current)
    return [f"{key}: {saved.get(key, '(unset)')!r} -> {current.get(key, '(unset)')!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def claim(output: str | Path, record: Mapping[str, Any], *, what: str = "", on_change: str = "stop",
          fix: str = "delete it or write to another path") -> str | None:
    """Make ``output`` an output of ``record`` before anything is added to it (see the module docstring).

    ``what`` introduces the output in the sentence (``"the scores in"``); ``fix`` ends the stop sentence.
    Returns None, or (``on_change="fresh"``) the sentence saying what was discarded and why.
    """
    if on_change not in ("stop", "fresh"):
        raise ValueError(f"on_change must be 'stop' or 'fresh', not {on_change!r}")
    output = Path(output)
    if not output.exists():
        write(output, record)
        return None
    changes = differences(read(output), record)
    if not changes:
        return None
    subject = f"{what} {output}".strip()
    if on_change == "stop":
        raise SipoError(f"{subject} was made with other settings ({'; '.join(changes)}), and continuing would mix the "
                        f"two; {fix}")
    if output.is_dir() and not output.is_symlink():
        shutil.rmtree(output)
    else:
        output.unlink()
    write(output, record)
    return f"{subject} was made with other settings ({'; '.join(changes)}); it is discarded and started afresh"


def forget(output: str | Path) -> None:
    """Remove the record beside ``output`` (the output is complete, or gone)."""
    record_path(output).unlink(missing_ok=True)
