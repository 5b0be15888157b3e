"""Shared fixtures: tiny random-weight model directories, built once per test session.

``tests/`` is on ``sys.path`` (pytest's rootdir conftest insertion), so test modules import the
builders with ``from tiny_models import ...``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_image_pairs, make_other_family_dir, make_tiny_sd15


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory) -> Path:
    """A saved tiny ``StableDiffusionPipeline`` (epsilon-prediction, SD1.5 betas). Treat as read-only."""
    return make_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="session")
def tiny_sd15_v_dir(tmp_path_factory) -> Path:
    """The same tiny pipeline with a ``v_prediction`` scheduler. Treat as read-only."""
    return make_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15_v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def other_family_dir(tmp_path_factory) -> Path:
    """A saved tiny ``DDPMPipeline``: a valid diffusers directory that is no family of ours."""
    return make_other_family_dir(tmp_path_factory.mktemp("ddpm_pipeline"))


@pytest.fixture
def tiny_sd15_adapter(tiny_sd15_dir):
    """A fresh ``SD15Adapter`` loaded from ``tiny_sd15_dir`` (each test may mutate it, e.g. add LoRA)."""
    from sipo.models import load_adapter

    return load_adapter("sd15", str(tiny_sd15_dir))


@pytest.fixture
def image_pairs():
    """Two preference pairs at the tiny SD1.5 resolution: ``(prompts, winners, losers)``."""
    return make_image_pairs()



@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models spend their time in per-op overhead; one thread is faster on 2 shared cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
