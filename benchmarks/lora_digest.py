"""A fixed tiny run's LoRA weights as a sha256: run it before and after a change to the trainer.

Behaviour-preserving refactors of ``sipo.train`` (issue 16) must print the same digests. Three runs
cover the loop's branches: plain DPO, SIPO with gradient accumulation and a mid-run checkpoint, and
SIPO with the per-timestep EMA of the weights. The tiny SD1.5 model and pairs are built from seeds
(tests/tiny_models.py, tests/train_fixtures.py); nothing is downloaded.

    python benchmarks/lora_digest.py            # prints one line per run: name, steps, sha256
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RUNS = {
    "dpo": {"objective.name": "dpo", "train.max_steps": 4},
    "sipo-accumulate": {"objective.name": "sipo", "train.max_steps": 4, "train.gradient_accumulation_steps": 2,
                        "train.checkpoint_every": 2},
    "sipo-ema": {"objective.name": "sipo", "train.max_steps": 3, "objective.weight_source": "timestep_ema",
                 "objective.weight_placement": "outside"},
}


def tensor_digest(path: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes in key order (the file's metadata
    names temporary paths, so the file's own bytes differ from run to run)."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for key, tensor in sorted(load_file(path).items()):
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    from tiny_models import make_tiny_sd15
    from train_fixtures import tiny_overrides, write_jsonl_pairs

    from sipo.config import load_config
    from sipo.train import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_sd15(root / "model")
        manifest = write_jsonl_pairs(root / "data", num_pairs=6)
        for name, extra in RUNS.items():
            config = load_config("demo", tiny_overrides(model, manifest, root / name, **{"train.report_to": "none", **extra}))
            result = train(config, progress=False)
            digest = tensor_digest(result.output_dir / "pytorch_lora_weights.safetensors")
            losses = ",".join(f"{r['loss']:.6f}" for r in result.history)
            print(f"{name:16s} steps={result.steps} lora_sha256={digest} losses={losses}")


if __name__ == "__main__":
    main()
