"""What ``accelerate launch`` runs in tests/test_distributed.py: ``sipo train`` (sipo.cli.main), with
each process's micro-batches (the dataset indices it read) recorded in ``<record_dir>/indices-<rank>.json``,
so the test sees which pairs each rank trained on. Usage: ``distributed_worker.py RECORD_DIR sipo-args...``, or
``distributed_worker.py RECORD_DIR --each RUNS.json`` (a JSON list of sipo argument lists) to run several
``sipo`` commands, one after another, in one launch (tests/test_step_layout.py: one launch, many runs)."""

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

    if sys.argv[2] == "--each":
        import torch.distributed

        # every run's end_training() destroys the process group; the next run needs it: destroy it once, last
        destroy, torch.distributed.destroy_process_group = torch.distributed.destroy_process_group, lambda *a, **k: None
        codes = [main(arguments) for arguments in json.loads(Path(sys.argv[3]).read_text())]
        destroy()
        sys.exit(max(code or 0 for code in codes))
    sys.exit(main(sys.argv[2:]))
