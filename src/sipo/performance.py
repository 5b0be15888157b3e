"""Speed, memory and exactness settings of a run: kernels, optimizer, step clock, device RNG.

Nothing here changes what is computed, only how fast, in what memory, and whether it is bit-exact
(docs/performance.md).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from sipo.errors import SipoError

#: train.mixed_precision -> the dtype frozen weights are held in (``no`` keeps float32)
COMPUTE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: cuBLAS needs a fixed workspace to be deterministic (CUDA docs, "Results reproducibility")
CUBLAS_WORKSPACE = ":4096:8"
DEVICE_RNG_FILE = "device_rng.pt"


def check_precision_for_device(mixed_precision: str, device_type: str, setting: str = "train.mixed_precision") -> None:
    """Stop before any model loads when the precision ``setting`` cannot run on ``device_type``.

    fp16 autocast is a GPU feature: on the CPU, autocast leaves some matmuls in float32 while the
    frozen weights are held in float16, and the first step dies with "mat1 and mat2 must have the
    same dtype" (measured: torch 2.13, tiny SD1.5, 2 steps). bf16 autocast works on the CPU.
    ``device_type`` is the one the run will use (the trainer: accelerate's ``PartialState().device.type``),
    never assumed; ``setting`` is how the user spelled the choice (``--dtype`` for ``sipo eval``).
    """
    if mixed_precision == "fp16" and device_type == "cpu":
        raise SipoError(
            f"{setting}=fp16 needs a GPU, and this machine would run on the CPU; "
            f"set {setting}=bf16 (or no) here, and keep fp16 for GPU machines"
        )


def configure_kernels(deterministic: bool) -> None:
    """Deterministic kernels, or PyTorch's defaults back (a process may train twice).

    Deterministic: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic
    kernel raises instead of silently differing), the cuBLAS workspace, cuDNN without autotuning,
    and TF32 off (TF32 rounds fp32 matmul/conv inputs to 10 mantissa bits). Call before CUDA
    initialises: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it creates its handle.
    """
    if not deterministic and not torch.are_deterministic_algorithms_enabled():
        return  # leave the user's own settings (TF32, cuDNN autotuning) alone
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic
    # off, or PyTorch's defaults back: TF32 off for matmuls, on for cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = not deterministic


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Run fp32 work in full fp32: TF32 off for matmuls and cuDNN convolutions, then restored.

    For measurements compared against CPU or float64 references (``sipo analyze``): cuDNN uses TF32
    for fp32 convolutions by default, a ~1e-3 relative error per layer.
    """
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def make_optimizer(params: list[nn.Parameter], train_config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused CUDA kernel where every parameter is a float CUDA tensor, else ``foreach``.

    Both do the same arithmetic as the per-tensor loop in fewer kernel launches.
    """
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params, lr=train_config.learning_rate, betas=(train_config.adam_beta1, train_config.adam_beta2),
        weight_decay=train_config.adam_weight_decay, eps=train_config.adam_epsilon,
        **({"fused": True} if fused else {"foreach": True}),
    )


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / (1e9 if sys.platform == "darwin" else 1e6)  # macOS reports bytes, Linux KiB


class StepClock:
    """Wall time between log points -> ``s_per_step``, ``pairs_per_s`` and ``peak_memory_gb``.

    Read at a log point, after the metrics' device -> host transfer, so queued GPU work is counted.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.time = time.perf_counter()

    def lap(self, step: int, pairs: int, device: torch.device) -> dict[str, float]:
        now = time.perf_counter()
        elapsed, steps = now - self.time, max(step - self.step, 1)
        self.step, self.time = step, now
        return {
            "s_per_step": elapsed / steps,
            "pairs_per_s": pairs / elapsed if elapsed > 0 else float("nan"),
            "peak_memory_gb": peak_memory_gb(device),
        }


def save_device_rng(checkpoint: Path, device: torch.device) -> None:
    """Store the CUDA generator state beside a checkpoint (t and eps come from a CPU generator, but
    dropout or any other device-side draw would not continue exactly without it)."""
    if device.type == "cuda":
        torch.save({"cuda": torch.cuda.get_rng_state(device)}, Path(checkpoint) / DEVICE_RNG_FILE)


def restore_device_rng(checkpoint: Path, device: torch.device) -> None:
    """Put the CUDA generator back where ``save_device_rng`` left it (no file: nothing to restore)."""
    path = Path(checkpoint) / DEVICE_RNG_FILE
    if device.type == "cuda" and path.is_file():
        torch.cuda.set_rng_state(torch.load(path, weights_only=True)["cuda"], device)
