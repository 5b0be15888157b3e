"""The public Python API (issue 16): ``import sipo`` names, and the README's "From Python" example
run exactly as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import sipo
from train_fixtures import write_jsonl_pairs

REPO = Path(__file__).resolve().parents[1]
PUBLIC = ("load_config", "SipoConfig", "train", "cache", "analyze", "evaluate", "TrainResult", "SipoError")


def test_every_public_name_is_documented_and_the_right_object():
    import inspect

    from sipo.config import SipoConfig, load_config
    from sipo.errors import SipoError
    from sipo.train import TrainResult, train

    for name in PUBLIC:
        assert name in sipo.__all__ and (getattr(sipo, name).__doc__ or "").strip(), name
    assert sipo.load_config is load_config and sipo.SipoConfig is SipoConfig and sipo.SipoError is SipoError
    assert sipo.train is train and sipo.TrainResult is TrainResult
    for name in ("cache", "analyze", "evaluate", "train"):
        assert inspect.isfunction(getattr(sipo, name)), name  # a function, not the submodule of the same name
    import importlib

    importlib.import_module("sipo.evaluate")  # importing the submodule does not rebind the function
    assert inspect.isfunction(sipo.evaluate) and inspect.isfunction(sipo.train)


def test_import_sipo_loads_no_heavy_library():
    code = "import sys, sipo; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_readme_from_python_example_runs_as_written(tmp_path):
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    write_jsonl_pairs(tmp_path, num_pairs=4)  # pairs.jsonl: the reader's own data in the example
    (tmp_path / "example.py").write_text(code + "\nprint('steps', result.steps, 'image', image.size)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps 2 image (32, 32)" in done.stdout
    assert (tmp_path / "runs" / "from-python" / "pytorch_lora_weights.safetensors").is_file()
