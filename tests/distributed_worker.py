"""What ``accelerate launch`` runs in tests/test_distributed.py: ``sipo train`` (sipo.cli.main), with
each process's micro-batches (the dataset indices it read) recorded in ``<record_dir>/indices-<rank>.json``,
so the test sees which pairs each rank trained on. Usage: ``distributed_worker.py RECORD_DIR sipo-args...``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def recording(original, path: Path):
    """``original`` (``sipo.train.data_loader``) with every batch's indices appended to ``path`` (JSON)."""
    seen: list[list[int]] = []

    def recording_loader(*args, **kwargs):
        for batch in original(*args, **kwargs):
            seen.append([int(i) for i in batch["indices"]])
            path.write_text(json.dumps(seen))
            yield batch

    return recording_loader


if __name__ == "__main__":
    record_dir = Path(sys.argv[1])
    record_dir.mkdir(parents=True, exist_ok=True)
    import importlib

    train_module = importlib.import_module("sipo.train")  # the attribute sipo.train is the function
    rank = int(os.environ.get("RANK", "0"))
    train_module.data_loader = recording(train_module.data_loader, record_dir / f"indices-{rank}.json")
    from sipo.cli import main

    sys.exit(main(sys.argv[2:]))
