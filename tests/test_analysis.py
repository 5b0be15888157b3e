"""`sipo analyze` (SPEC 6): streamed statistics checked against direct computations, the CSV against
its documented schema, the outputs, and the CLI end to end on the tiny SD1.5 model."""

from __future__ import annotations

import copy
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_SD15_IMAGE_SIZE, make_image_pairs

from sipo import analysis
from sipo.config import config_from_dict
from sipo.performance import full_float32
from sipo.preference import compute_pair_terms

ROOT = Path(__file__).resolve().parents[1]
SEED = 3
NUM_PAIRS, NUM_BUCKETS = 8, 3


def _config(model_dir: Path, output_dir: Path, data: dict | None = None, objective: str = "sipo", **train):
    return config_from_dict({
        "model": {"family": "sd15", "pretrained_path": str(model_dir), "resolution": TINY_SD15_IMAGE_SIZE},
        "data": data or {"format": "jsonl", "path": "unused.jsonl"},
        "objective": {"name": objective, "beta": 5000.0, "tau": 0.999, "pair_weight": "product"},
        "train": {"seed": SEED, "output_dir": str(output_dir), "lora_rank": 4, "lora_alpha": 4.0, **train},
    })


def _in_memory_pairs(count: int) -> list[dict]:
    prompts, winners, losers = make_image_pairs(batch_size=count, seed=11)
    return [{"prompt": p, "chosen": w, "rejected": l, "index": i}
            for i, (p, w, l) in enumerate(zip(prompts, winners, losers))]


@pytest.fixture(scope="module")
def lora_adapter(tiny_sd15_dir):
    """The tiny SD1.5 with LoRA whose B matrices are random, so policy != reference and z != 0."""
    from sipo.models import load_adapter
    from sipo.models import add_lora

    adapter = load_adapter("sd15", str(tiny_sd15_dir))
    torch.manual_seed(0)
    add_lora(adapter, _config(tiny_sd15_dir, Path("unused")))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return adapter


@pytest.fixture(scope="module")
def analysed(lora_adapter, tiny_sd15_dir, tmp_path_factory):
    """One analysis run on 8 in-memory pairs x 3 buckets; the adapter is copied first, so the
    direct computation below starts from the very same weights."""
    output_dir = tmp_path_factory.mktemp("analysis")
    pristine = copy.deepcopy(lora_adapter)
    result = analysis.run_analysis(
        _config(tiny_sd15_dir, output_dir), num_pairs=NUM_PAIRS, num_buckets=NUM_BUCKETS, output_dir=output_dir,
        adapter=lora_adapter, dataset=_in_memory_pairs(NUM_PAIRS), progress=False, verbose=False,
    )
    return result, pristine, output_dir


def test_welford_trace_equals_torch_var_of_stacked_vectors():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(9, 50, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 5, 50) + 3.0
    welford = analysis.WelfordTrace(50)
    for vector in vectors:
        welford.update(vector)
    assert welford.variance_trace == pytest.approx(float(torch.var(vectors, dim=0).sum()), rel=1e-12)
    assert welford.mean_norm == pytest.approx(float(vectors.mean(0).norm()), rel=1e-12)
    assert welford.norm_mean == pytest.approx(float(vectors.norm(dim=1).mean()), rel=1e-12)


def test_bucket_bounds_match_the_trainers_buckets():
    from sipo.objectives import timestep_bucket

    for T, K in ((1000, 20), (1000, 3), (7, 7), (10, 4)):
        t = torch.arange(T)
        bucket = timestep_bucket(t, T, K)
        for k in range(K):
            low, high = analysis.bucket_bounds(k, K, T)
            assert t[bucket == k].tolist() == list(range(low, high))


def test_per_bucket_variance_equals_direct_computation(analysed, test_device):
    """Replay the documented randomness protocol (module docstring of sipo.analysis) with the
    shared per-pair step, stack every per-pair LoRA gradient, and compare per bucket with
    ``torch.var(stacked, dim=0).sum()`` (unbiased, the trace of the covariance)."""
    from sipo.models import lora_disabled

    result, adapter, _ = analysed
    assert result.gradient["kind"] == "lora"
    # the same device as the analysis ran on, in full float32 like it: on CUDA, cuDNN's default TF32
    # convolutions against a CPU reference made the traces differ by 0.5% (docs/performance.md)
    adapter.to(test_device)
    pairs = _in_memory_pairs(NUM_PAIRS)
    params = [p for n, p in adapter.denoiser.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    adapter.denoiser.eval()
    T = adapter.schedule.num_train_timesteps

    def reference(x_t, t, cond):
        with lora_disabled(adapter.denoiser):
            return adapter.predict(x_t, t, cond)

    with full_float32():
        generator = torch.Generator().manual_seed(SEED)
        grads = [[] for _ in range(NUM_BUCKETS)]
        log_w = [[] for _ in range(NUM_BUCKETS)]
        losses = [[] for _ in range(NUM_BUCKETS)]
        for index in analysis.pair_order(NUM_PAIRS, SEED):
            pair = pairs[index]
            encoded = adapter.encode([pair["prompt"]], pair["chosen"][None], pair["rejected"][None])
            for bucket in range(NUM_BUCKETS):
                noise = analysis.draw_bucket_noise(encoded.x0_winner.shape, T, bucket, NUM_BUCKETS, generator)
                terms = compute_pair_terms(adapter, encoded, noise, beta=5000.0, reference_predict=reference)
                adapter.denoiser.zero_grad(set_to_none=True)
                terms.loss_pair.sum().backward()
                grads[bucket].append(torch.cat([p.grad.reshape(-1) for p in params]).double())
                log_w[bucket].append(float(terms.log_w_pair.detach()))
                losses[bucket].append(float(terms.loss_pair.detach()))
        for bucket, row in enumerate(result.rows):
            stacked = torch.stack(grads[bucket])
            assert row["n_grad"] == NUM_PAIRS
            assert row["grad_var_trace"] == pytest.approx(float(torch.var(stacked, dim=0).sum()), rel=1e-5)
            assert row["grad_var_per_dim"] == pytest.approx(float(torch.var(stacked, dim=0).mean()), rel=1e-5)
            assert row["grad_norm_mean"] == pytest.approx(float(stacked.norm(dim=1).mean()), rel=1e-5)
            assert row["grad_mean_norm"] == pytest.approx(float(stacked.mean(0).norm()), rel=1e-5)
            finite = torch.tensor([v for v in log_w[bucket] if v == v], dtype=torch.float64)
            assert row["log_w_pair_mean"] == pytest.approx(float(finite.mean()), rel=1e-6, abs=1e-9)
            assert row["loss_mean"] == pytest.approx(sum(losses[bucket]) / NUM_PAIRS, rel=1e-6)
    # random LoRA B: the policy differs from the reference, so the variance is not trivially zero
    assert all(row["grad_var_trace"] > 0 for row in result.rows)


def _documented_columns(name: str) -> list[str]:
    """The column names listed in docs/analysis.md between ``<!-- name -->`` markers."""
    text = (ROOT / "docs" / "analysis.md").read_text()
    block = re.search(rf"<!-- {name} start -->(.*?)<!-- {name} end -->", text, re.S).group(1)
    return re.findall(r"^\|\s*`([a-z0-9_]+)`\s*\|", block, re.M)


def test_csv_header_equals_documented_schema(analysed):
    result, _, output_dir = analysed
    with open(output_dir / "analysis.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(analysis.CSV_COLUMNS) == _documented_columns("csv-schema")
    assert len(rows) == 1 + NUM_BUCKETS
    with open(output_dir / "masked_fraction_vs_tau.csv") as handle:
        assert next(csv.reader(handle)) == list(analysis.TAU_COLUMNS) == _documented_columns("tau-schema")


def test_json_and_plots_are_written(analysed):
    result, _, output_dir = analysed
    document = json.loads((output_dir / "analysis.json").read_text())
    assert document["num_pairs"] == NUM_PAIRS and document["num_buckets"] == NUM_BUCKETS
    assert len(document["buckets"]) == NUM_BUCKETS and document["findings"] == result.findings
    assert document["gradient"]["kind"] == "lora"
    for name in ("log_w_vs_t.png", "grad_variance_vs_t.png", "masked_fraction_vs_tau.png"):
        assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lowest in bucket" in result.findings and "peaks in bucket" in result.findings
    curve = [c["masked_fraction"] for c in result.tau_curve]
    assert curve == sorted(curve) and curve[0] <= curve[-1] == 1.0


def test_full_finetune_takes_the_last_tensors_within_the_cap(tiny_sd15_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd15_dir), subfolder="unet")
    chosen = analysis.select_gradient_parameters(unet, "full", max_grad_elements=5000)
    named = [n for n, _ in unet.named_parameters()]
    assert chosen.kind == "last_tensors" and chosen.names == named[-len(chosen.names):]
    assert chosen.names[-1].startswith("conv_out") and chosen.num_elements <= 5000
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(chosen.names)


def test_full_finetune_checkpoint_is_compared_with_the_base_model(tiny_sd15_dir, tmp_path):
    """A full run's checkpoint: the policy gets the run's weights, the reference stays the base model,
    so z != 0 and the loss moves off log 2; gradients are on the last tensors."""
    from sipo.train import train

    manifest = _write_jsonl_dataset(tmp_path / "data", 2)
    data = {"format": "jsonl", "path": str(manifest)}
    run = _config(tiny_sd15_dir, tmp_path / "run", data=data, objective="dpo", finetune="full", max_steps=1,
                  batch_size=2, learning_rate=1e-3)
    train(run, progress=False)
    config = _config(tiny_sd15_dir, tmp_path / "other", data=data)  # a LoRA config: the run's finetune wins
    result = analysis.run_analysis(config, checkpoint=tmp_path / "run", num_pairs=2, num_buckets=2,
                                   output_dir=tmp_path / "analysis", progress=False, verbose=False, plots=False)
    assert result.gradient["kind"] == "last_tensors"
    assert all(abs(row["z_mean"]) > 0 for row in result.rows), result.rows
    assert all(row["grad_var_trace"] >= 0 for row in result.rows)


def _write_jsonl_dataset(directory: Path, count: int) -> Path:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(5)
    lines = []
    for i in range(count):
        for role in ("chosen", "rejected"):
            pixels = torch.randint(0, 256, (TINY_SD15_IMAGE_SIZE, TINY_SD15_IMAGE_SIZE, 3), generator=generator)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(directory / f"{i}_{role}.png")
        lines.append(json.dumps({"prompt": "a photo of a cat", "chosen": f"{i}_chosen.png", "rejected": f"{i}_rejected.png"}))
    manifest = directory / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_cli_analyze_on_the_tiny_model(tiny_sd15_dir, tmp_path):
    import yaml

    manifest = _write_jsonl_dataset(tmp_path / "data", 5)
    config = _config(tiny_sd15_dir, tmp_path / "run", data={"format": "jsonl", "path": str(manifest)})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    done = subprocess.run(
        [sys.executable, "-m", "sipo", "analyze", "--config", str(config_path), "--pairs", "4", "--buckets", "4"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    output_dir = tmp_path / "run" / "analysis"
    assert "Over 4 pairs and 4 timestep buckets" in done.stdout and str(output_dir / "analysis.csv") in done.stdout
    with open(output_dir / "analysis.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["n_pairs"]) for r in rows] == [4] * 4
    assert (output_dir / "grad_variance_vs_t.png").is_file()


def test_too_few_pairs_is_a_clear_error(tiny_sd15_dir, tmp_path):
    from sipo.errors import SipoError

    with pytest.raises(SipoError, match="at least 2"):
        analysis.run_analysis(_config(tiny_sd15_dir, tmp_path), num_pairs=1, output_dir=tmp_path)
