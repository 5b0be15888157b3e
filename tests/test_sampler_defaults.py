"""A family's sampler defaults live in one place (``DiffusionAdapter.sampler_defaults``) that eval,
compare, pairs and validation samples read (issue 30, item 6): a FLUX run is sampled at its own
distilled guidance, not at SD1.5's 7.5, and a value the user names wins."""

from __future__ import annotations

import inspect

import pytest
from tiny_scorers import make_tiny_aesthetic

from sipo.config import ModelConfig
from sipo.models import FAMILIES, adapter_class, sampler_settings

#: docs/models.md, per family: (steps, guidance) its pipeline samples with by default
DOCUMENTED = {
    "sd15": (50, 7.5), "sdxl": (50, 5.0), "sd3": (28, 7.0), "flux": (28, 3.5), "qwenimage": (50, 4.0),
    "cogvideox": (50, 6.0), "wan": (50, 5.0),
    # issue 28's families, each its diffusers pipeline's own __call__ defaults (diffusers 0.42.1)
    "flux2": (50, 4.0), "zimage": (50, 5.0), "qwenimage_edit": (50, 4.0), "wan_i2v": (50, 5.0), "ltx2": (30, 3.0),
    "hunyuanvideo15": (50, 6.0),
}


@pytest.mark.parametrize("family", sorted(DOCUMENTED))
def test_each_family_samples_at_its_documented_defaults(family):
    assert sampler_settings(ModelConfig(family=family)) == {
        "num_inference_steps": DOCUMENTED[family][0], "guidance_scale": DOCUMENTED[family][1]}
    # an explicit value wins, each on its own
    assert sampler_settings(ModelConfig(family=family), 3, None)["num_inference_steps"] == 3
    assert sampler_settings(ModelConfig(family=family), None, 1.0) == {
        "num_inference_steps": DOCUMENTED[family][0], "guidance_scale": 1.0}


def test_every_family_has_an_entry_and_sample_reads_it():
    """``sample()`` called without steps or guidance uses the same table (no second default in a signature)."""
    assert set(FAMILIES) - {"digits"} == set(DOCUMENTED)
    for family in DOCUMENTED:
        parameters = inspect.signature(adapter_class(family).sample).parameters
        assert parameters["num_inference_steps"].default is None, family
        assert parameters["guidance_scale"].default is None, family


def test_flux_guidance_is_the_runs_model_guidance():
    assert sampler_settings(ModelConfig(family="flux", guidance=2.0))["guidance_scale"] == 2.0
    assert sampler_settings(ModelConfig(family="flux", guidance=2.0), None, 5.0)["guidance_scale"] == 5.0


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from sipo.models.flux import FluxAdapter

    root = tmp_path_factory.mktemp("sampler_flux")
    return FluxAdapter.build_random_pipeline(root / "flux"), make_tiny_aesthetic(root / "aesthetic")


def _eval_base(tiny_flux, tmp_path, monkeypatch, *extra: str) -> list[dict]:
    """``sipo eval --base`` on the tiny FLUX.1-dev (model.guidance 2.5); the FluxPipeline calls' kwargs."""
    from diffusers import FluxPipeline

    from sipo.cli import main

    model, aesthetic = tiny_flux
    calls: list[dict] = []
    original = FluxPipeline.__call__

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", recording)
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    status = main(["eval", "--config", "flux1_dev_lora", f"model.pretrained_path={model}", "model.resolution=32",
                   "model.guidance=2.5", "--base", "--prompts", str(prompts), "--scorers", "aesthetic",
                   "--scorer-path", f"aesthetic={aesthetic}", "--output-dir", str(tmp_path / "eval"), "--no-progress",
                   *extra])
    assert status == 0
    return calls


def test_flux_eval_samples_at_the_runs_guidance_and_an_explicit_value_wins(tiny_flux, tmp_path, monkeypatch):
    import json

    calls = _eval_base(tiny_flux, tmp_path / "defaults", monkeypatch)
    assert [(c["guidance_scale"], c["num_inference_steps"]) for c in calls] == [(2.5, 28)]
    settings = json.loads((tmp_path / "defaults" / "eval" / "summary.json").read_text())["settings"]
    assert (settings["guidance_scale"], settings["num_inference_steps"]) == (2.5, 28)  # the report names them

    calls = _eval_base(tiny_flux, tmp_path / "explicit", monkeypatch, "--guidance-scale", "6", "--num-inference-steps", "2")
    assert [(c["guidance_scale"], c["num_inference_steps"]) for c in calls] == [(6.0, 2)]


def test_validation_samples_read_the_family_defaults(tmp_path):
    from sipo.config import load_config
    from sipo.validation import SampleValidation

    config = load_config("flux1_dev_lora", ["model.guidance=2.5", "train.validation_prompts=[a cat]"])
    assert config.train.sample_guidance_scale is None
    # what SampleValidation passes to adapter.sample: train.sample_steps at the family's guidance
    sampler = SampleValidation(config, tmp_path, best=None, device="cpu").sampler
    assert sampler == {"num_inference_steps": config.train.sample_steps, "guidance_scale": 2.5}
    config = load_config("flux1_dev_lora", ["train.sample_guidance_scale=4", "train.validation_prompts=[a cat]"])
    assert SampleValidation(config, tmp_path, best=None, device="cpu").sampler["guidance_scale"] == 4.0
