"""Issue 30's new-user faults, one test each where no topic file holds it (items 4, 7, 8, 13-20):
each reproduces the fault first (it failed on 10c1de3), then checks the sentence or behaviour now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sipo.config import load_config
from sipo.errors import SipoError
from train_fixtures import tiny_overrides, write_jsonl_pairs


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=4)


# ----------------------------------------------------------------------------- item 4
def test_a_model_index_component_without_its_folder_stops_in_one_sentence(tmp_path, tiny_sd15_dir):
    """A Wan2.2-A14B folder whose transformer_2/ an interrupted download lost trained as one expert."""
    from sipo.rundir import check_model_dir

    folder = tmp_path / "Wan2.2-T2V-A14B"
    components = {"transformer": "WanTransformer3DModel", "transformer_2": "WanTransformer3DModel",
                  "vae": "AutoencoderKLWan", "text_encoder": "UMT5EncoderModel", "tokenizer": "T5TokenizerFast",
                  "scheduler": "UniPCMultistepScheduler"}
    libraries = {"text_encoder": "transformers", "tokenizer": "transformers"}
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "boundary_ratio": 0.875,
        **{name: [libraries.get(name, "diffusers"), cls] for name, cls in components.items()}}))
    for name in components:
        if name != "transformer_2":
            (folder / name).mkdir()
    config = load_config(None, ["model.family=wan", f"model.pretrained_path={folder}"])
    with pytest.raises(SipoError) as stopped:
        check_model_dir(config.model)
    assert str(stopped.value) == (
        f"{folder}/model_index.json lists transformer_2 (WanTransformer3DModel), but {folder} has no transformer_2/ "
        "folder (an interrupted download?), and diffusers refuses such a directory too; download transformer_2/ "
        "again or point model.pretrained_path at a complete pipeline directory")
    # a complete directory, whose model_index.json lists [null, null] components, passes
    check_model_dir(load_config(None, [f"model.pretrained_path={tiny_sd15_dir}"]).model)
