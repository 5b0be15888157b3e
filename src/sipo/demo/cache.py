"""Where the demo keeps what it can rebuild: ``$SIPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/sipo/demo``,
else ``~/.cache/sipo/demo``. Entries are keyed by a hash of the settings that produced them."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """The demo's cache directory (not created here)."""
    explicit = os.environ.get("SIPO_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sipo" / "demo"


def settings_key(settings: Any) -> str:
    """A short, stable hash of a settings dataclass (or any JSON-able value)."""
    values = asdict(settings) if is_dataclass(settings) else settings
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
