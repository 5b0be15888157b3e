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
from typing import Any, Iterator

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


# ----------------------------------------------------------------------------- speed levers (issue 22)
#: ``train.compile_scope``: what ``train.compile`` compiles
COMPILE_SCOPES = ("blocks", "model")


def compile_denoiser(model: nn.Module, scope: str, **options: Any) -> nn.Module:
    """``torch.compile`` the denoiser's repeated blocks (``"blocks"``), or the whole module (``"model"``).

    ``"blocks"`` is regional compilation as diffusers' ``ModelMixin.compile_repeated_blocks`` does it:
    every submodule whose class a diffusers model lists in ``_repeated_blocks`` (SD1.5/SDXL:
    ``BasicTransformerBlock``) is compiled in place, one graph shared by all of them, so compiling
    takes a fraction of the whole model's time and the graphs stay small. A denoiser with no such
    list (a two-expert wrapper, the digits UNet) is compiled whole. Returns what forward calls go
    through: ``model`` itself for blocks (its submodules now run compiled), else the compiled module.
    ``options`` go to ``torch.compile`` (tests pass ``backend="aot_eager"``: dynamo without a C++ build).
    """
    if scope not in COMPILE_SCOPES:
        raise SipoError(f"train.compile_scope={scope!r} is not valid; choose one of {list(COMPILE_SCOPES)}")
    if scope == "blocks":
        inner = getattr(model, "module", model)  # DDP / accelerate wrappers keep the model in .module
        names = {name for sub in inner.modules() for name in (getattr(type(sub), "_repeated_blocks", None) or ())}
        blocks = [sub for sub in inner.modules() if type(sub).__name__ in names]
        for block in blocks:
            block.compile(**options)
        if blocks:
            return model
    return torch.compile(model, **options)


def use_channels_last(denoiser: nn.Module, enabled: bool) -> bool:
    """Store the 4-D convolution weights of a UNet in channels-last order (NHWC), where it has any.

    cuDNN's fastest convolution kernels on tensor cores read NHWC; activations follow the weights'
    layout through the network. Only the memory layout changes, not a value (checked against the
    default layout in tests/test_speed.py). Returns whether any weight was converted (transformers
    have no 4-D weights beyond a patch embedding, so this is for UNets).
    """
    if not enabled:
        return False
    if not any(p.dim() == 4 for p in denoiser.parameters()):
        return False
    denoiser.to(memory_format=torch.channels_last)
    return True


def configure_autotuning(cudnn_benchmark: bool, deterministic: bool) -> None:
    """cuDNN autotuning (``torch.backends.cudnn.benchmark``): time each convolution's algorithms on
    its first shape and keep the fastest. The trainer's shapes are fixed, so it pays after the first
    step on CUDA; it does nothing on the CPU. The config decides (a second run in one process gets its
    own setting); deterministic runs keep it off (``configure_kernels``)."""
    if not deterministic:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)


#: ``model.offload_frozen``: where the frozen base of a LoRA run lives between its uses
OFFLOAD_MODES = ("none", "group")


def offload_frozen_base(denoiser: nn.Module, mode: str, device: torch.device, blocks_per_group: int = 1) -> bool:
    """Keep the denoiser's frozen base in host memory and bring one group of blocks to ``device`` at a
    time (diffusers' ``ModelMixin.enable_group_offload``, block level), for models whose base does
    not fit beside the activations. Every forward then copies the base to the device once (the
    policy and the reference pass each), so it costs step time in exchange for memory. On the CPU
    the onload and offload devices are the same: nothing moves, and the setting only adds the hooks.
    On a GPU it is refused while trainable parameters sit inside the blocks (every LoRA run today):
    the offload would carry them along and lose their updates. Returns whether it was applied.
    """
    if mode not in OFFLOAD_MODES:
        raise SipoError(f"model.offload_frozen={mode!r} is not valid; choose one of {list(OFFLOAD_MODES)}")
    if mode == "none":
        return False
    if device.type != "cpu" and any(p.requires_grad for p in denoiser.parameters()):
        # diffusers' offload moves every parameter of a block, the LoRA weights inside it too: with
        # streams it restores its pinned host copy at each offload (the optimizer's update is lost),
        # without them the gradient lands on a parameter that has moved back to the host
        raise SipoError("model.offload_frozen=group would move the trainable LoRA weights with the frozen blocks "
                        f"on {device.type}, and diffusers' offload does not keep their updates; set "
                        "model.offload_frozen=none (model.frozen_dtype=fp8 halves the base's memory instead)")
    if not hasattr(denoiser, "enable_group_offload"):
        raise SipoError(f"model.offload_frozen=group needs a diffusers model, and this denoiser is a "
                        f"{type(denoiser).__name__}; set model.offload_frozen=none")
    denoiser.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=blocks_per_group,
                                  use_stream=device.type == "cuda")
    return True


def compile_counts() -> dict[str, int]:
    """How many frames dynamo has compiled so far and how many of those were recompiles (a guard failed).

    Read before and after a stretch of steps: a difference in ``recompiles`` after the warm-up means
    some input (a shape, a dtype, the LoRA switch of the reference pass) changed a graph's guards.
    """
    from torch._dynamo.utils import counters

    return {"frames": int(counters["stats"].get("unique_graphs", 0)),
            "recompiles": int(sum(counters["recompiles"].values()))}
