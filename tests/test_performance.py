"""Speed and memory settings (issue 8): throughput in the logs, frozen weights in the compute dtype with
float32 LoRA and optimizer state, chunked encoding, gradient checkpointing that saves less for
backward, deterministic kernels. Nothing here asserts wall-clock time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sipo.checkpoints import list_checkpoints
from sipo.config import load_config
from sipo.models import add_lora
from sipo.models.base import hold_frozen_weights_in
from sipo.performance import configure_kernels, make_optimizer, peak_memory_gb
from sipo.preference import compute_pair_terms, draw_pair_noise
from sipo.train import train
from train_fixtures import tiny_overrides, write_jsonl_pairs

THROUGHPUT_KEYS = ("pairs_per_s", "s_per_step", "peak_memory_gb")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=4)


def test_throughput_is_logged_and_consistent(tiny_sd15_dir, manifest, tmp_path):
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path, **{"train.max_steps": 3, "train.batch_size": 2}))
    result = train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert all(math.isfinite(record[k]) and record[k] > 0 for k in THROUGHPUT_KEYS)
        # log_every=1: one step of 2 pairs per record, so pairs/s times s/step is the batch size
        assert record["pairs_per_s"] * record["s_per_step"] == pytest.approx(2.0, rel=1e-6)
        assert record["peak_memory_gb"] < 1000  # gigabytes, not bytes or kilobytes
    assert records == result.history
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = set()
    for events in (tmp_path / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert set(THROUGHPUT_KEYS) <= scalars


def test_peak_memory_reads_the_process_or_the_gpu(test_device):
    before = peak_memory_gb(test_device)
    block = torch.ones(64 * 2**20 // 4, device=test_device)  # 64 MiB more, touched
    block += 1
    assert peak_memory_gb(test_device) >= before
    assert peak_memory_gb(test_device) * 1e9 >= 64 * 2**20  # at least what is alive now


def test_frozen_weights_in_compute_dtype_lora_and_optimizer_in_float32(tiny_sd15_dir, manifest, tmp_path):
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path, **{"train.mixed_precision": "bf16", "objective.tau": 0.05, "train.max_steps": 1}))
    result = train(config, progress=False)
    adapter = result.adapter
    assert all(r["finite"] == 1.0 for r in result.history)
    params = dict(adapter.denoiser.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in adapter.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in adapter.text_encoder.parameters()} == {torch.bfloat16}
    optimizer = torch.load(list_checkpoints(tmp_path)[-1] / "optimizer.pt", weights_only=True)
    moments = [v for state in optimizer["state"].values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_keep_fp32_modules_stay_float32(tiny_sd15_adapter):
    tiny_sd15_adapter.keep_fp32_modules = lambda: [tiny_sd15_adapter.vae]
    tiny_sd15_adapter.denoiser.requires_grad_(False)
    hold_frozen_weights_in(tiny_sd15_adapter, torch.float16)
    assert {p.dtype for p in tiny_sd15_adapter.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in tiny_sd15_adapter.text_encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in tiny_sd15_adapter.denoiser.parameters()} == {torch.float16}


def test_full_finetune_keeps_the_trained_denoiser_and_its_reference_float32(tiny_sd15_dir, tmp_path):
    """The policy trains in float32; the reference is a copy of it made after the casts, so it holds the
    policy's float32 weights too (issue 26 item 6: a bf16 copy was not the initial policy)."""
    from sipo.train import build_model
    from train_fixtures import tiny_overrides

    config = load_config(None, tiny_overrides(tiny_sd15_dir, tmp_path / "pairs.jsonl", tmp_path / "run",
                                              **{"train.finetune": "full", "train.mixed_precision": "bf16"}))
    adapter, reference = build_model(config, None)
    assert {p.dtype for p in adapter.denoiser.parameters()} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    assert {p.dtype for p in adapter.text_encoder.parameters()} == {torch.bfloat16}  # frozen encoders are cast
    assert not any(p.requires_grad for p in reference.parameters())


def test_chunked_encoding_equals_one_call(tiny_sd15_adapter):
    generator = torch.Generator().manual_seed(0)
    pictures = torch.rand(5, 3, 32, 32, generator=generator) * 2 - 1
    calls: list[int] = []
    original = tiny_sd15_adapter.vae.encode
    tiny_sd15_adapter.vae.encode = lambda x: calls.append(x.shape[0]) or original(x)
    tiny_sd15_adapter.encode_chunk_size = 2
    chunked = tiny_sd15_adapter.encode_images(pictures)
    assert calls == [2, 2, 1]
    with torch.no_grad():  # reference: the VAE on all five at once, posterior mean times the scaling factor
        whole = original(pictures).latent_dist.mean * tiny_sd15_adapter.vae.config.scaling_factor
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def _saved_bytes_of_policy_step(adapter, checkpointing: bool) -> tuple[int, int]:
    """Bytes autograd keeps for backward in one policy+reference step, and those kept by the reference."""
    from sipo.models import lora_disabled

    if checkpointing:
        adapter.denoiser.enable_gradient_checkpointing()
    adapter.denoiser.train()
    generator = torch.Generator().manual_seed(0)
    prompts = ["a photo of a cat", "a red dog"]
    pictures = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    encoded = adapter.encode(prompts, pictures, pictures.flip(-1))
    noise = draw_pair_noise(encoded.x0_winner.shape, 1000, generator)
    saved = {"all": 0, "reference": 0}
    in_reference = [False]

    def pack(tensor):
        saved["all"] += tensor.numel() * tensor.element_size()
        if in_reference[0]:
            saved["reference"] += tensor.numel() * tensor.element_size()
        return tensor

    def reference(x_t, t, cond):
        in_reference[0] = True
        try:
            with lora_disabled(adapter.denoiser):
                return adapter.predict(x_t, t, cond)
        finally:
            in_reference[0] = False

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        terms = compute_pair_terms(adapter, encoded, noise, beta=5000.0, reference_predict=reference)
    terms.loss_pair.sum().backward()  # checkpointing must still give gradients
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.denoiser.parameters() if p.requires_grad)
    return saved["all"], saved["reference"]


def test_gradient_checkpointing_keeps_less_for_backward(tiny_sd15_dir):
    from sipo.models import load_adapter

    config = load_config(None, ["train.lora_rank=4"])
    totals = {}
    for checkpointing in (False, True):
        adapter = load_adapter("sd15", str(tiny_sd15_dir))
        torch.manual_seed(0)
        add_lora(adapter, config)
        totals[checkpointing], reference = _saved_bytes_of_policy_step(adapter, checkpointing)
        assert reference == 0  # the reference forward runs under no_grad: it keeps nothing
    assert totals[True] < 0.5 * totals[False]


def test_optimizer_is_fused_on_cuda_and_foreach_elsewhere(test_device):
    config = load_config(None, [])
    param = torch.nn.Parameter(torch.zeros(3, device=test_device))
    optimizer = make_optimizer([param], config.train, test_device)
    group = optimizer.param_groups[0]
    assert group["fused"] is (True if test_device.type == "cuda" else None)
    assert group["foreach"] is (None if test_device.type == "cuda" else True)


def test_deterministic_kernels_on_and_back_off():
    configure_kernels(True)
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    finally:
        configure_kernels(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.allow_tf32  # PyTorch's default back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA generator exists only on CUDA")
def test_cuda_rng_state_is_saved_and_restored(tmp_path):
    from sipo.performance import restore_device_rng, save_device_rng

    device = torch.device("cuda")
    save_device_rng(tmp_path, device)
    expected = torch.rand(4, device=device)
    restore_device_rng(tmp_path, device)
    torch.testing.assert_close(torch.rand(4, device=device), expected, rtol=0, atol=0)
