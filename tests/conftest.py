"""Shared fixtures: tiny random-weight model directories, built once per test session.

``tests/`` is on ``sys.path`` (pytest's rootdir conftest insertion), so test modules import the
builders with ``from tiny_models import ...``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# train.deterministic needs a fixed cuBLAS workspace, read when CUDA initialises: set it before any test does.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Every hypothesis test draws the same examples on every run and machine (issue 17, item 25): derandomized,
# no example database carried between runs, a fixed example count and no deadline (a shared CI core
# must not fail a slow example). A test's own @settings may raise max_examples; it inherits the rest.
from hypothesis import HealthCheck, settings as hypothesis_settings

hypothesis_settings.register_profile(
    "sipo", derandomize=True, database=None, max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.load_profile("sipo")
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


@pytest.fixture(scope="session")
def test_device():
    """Where models under test run: ``$SIPO_TEST_DEVICE``, else CUDA when present (as the trainer
    picks it), else the CPU. Tests take devices from here, never assume one."""
    import torch

    return torch.device(os.environ.get("SIPO_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(autouse=True)
def _kernels_back_to_default():
    """A test that trains with train.deterministic leaves no process-wide deterministic mode behind."""
    yield
    import torch

    if torch.are_deterministic_algorithms_enabled():
        from sipo.performance import configure_kernels

        configure_kernels(False)
