"""Speed levers (issue 22; docs/performance.md): each is a config key, validated, and trains.

Checked: the keys' one-sentence errors; ``train.channels_last`` stores the UNet's convolution
weights NHWC and changes no value (against the same UNet in the default layout); a 2-step tiny run
with each lever on (channels_last, group offload, DataLoader prefetch) gives the losses of the run
without it, since on the CPU none of them changes the arithmetic's order enough to matter (offload
moves nothing: onload and offload device are both the CPU); regional compilation compiles the
repeated blocks only, honours the LoRA switch of the reference pass (against the eager module)
and compiles nothing new after the warm-up (dynamo's own counter). The compile test uses dynamo
with the ``aot_eager`` backend on a two-block module: the graphs and guards are dynamo's, without
the minutes of C++ that inductor needs on this CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_fixtures import tiny_overrides, write_jsonl_pairs

from sipo.config import load_config
from sipo.errors import SipoError
from sipo.models import lora_disabled
from sipo.performance import compile_counts, compile_denoiser, configure_autotuning, use_channels_last
from sipo.train import train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl_pairs(tmp_path_factory.mktemp("speed_pairs"), num_pairs=4)


@pytest.mark.parametrize("override, fix", [
    ("train.compile_scope=layers", "choose one of ['blocks', 'model']"),
    ("model.offload_frozen=disk", "choose one of ['none', 'group']"),
    ("data.prefetch_factor=4", "set data.num_workers"),
    ("data.prefetch_factor=0", "set data.num_workers"),
])
def test_bad_values_stop_with_one_sentence(override, fix):
    with pytest.raises(SipoError) as error:
        load_config(None, [override])
    assert fix in str(error.value) and "\n" not in str(error.value)


def test_contradicting_settings_stop_with_one_sentence(tiny_sd15_dir, pairs, tmp_path):
    with pytest.raises(SipoError, match="set one of them to false"):
        load_config(None, ["train.cudnn_benchmark=true", "train.deterministic=true"])
    with pytest.raises(SipoError, match="set train.mixed_precision=bf16"):
        load_config(None, ["model.frozen_dtype=fp8", "train.mixed_precision=no"])
    with pytest.raises(SipoError, match="set model.offload_frozen=none or train.finetune=lora"):
        load_config(None, tiny_overrides(tiny_sd15_dir, pairs, tmp_path / "run", **{
            "model.offload_frozen": "group", "train.finetune": "full"}))


def test_channels_last_changes_the_layout_not_the_values(tiny_sd15_adapter):
    unet = tiny_sd15_adapter.denoiser.eval()
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=generator)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=text).sample
        assert use_channels_last(unet, True)
        convs = [m.weight for m in unet.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        got = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not use_channels_last(nn.Linear(3, 3), True)  # nothing 4-D: left alone


def test_cudnn_benchmark_follows_the_config():
    configure_autotuning(True, deterministic=False)
    assert torch.backends.cudnn.benchmark
    configure_autotuning(False, deterministic=False)
    assert not torch.backends.cudnn.benchmark


@pytest.mark.parametrize("levers", [
    {"train.channels_last": True},
    {"model.offload_frozen": "group"},
    {"data.num_workers": 1, "data.prefetch_factor": 3},
], ids=["channels_last", "offload", "prefetch"])
def test_each_lever_trains_two_steps_to_the_plain_runs_losses(tiny_sd15_dir, pairs, tmp_path, levers):
    def losses(name, extra):
        config = load_config(None, tiny_overrides(tiny_sd15_dir, pairs, tmp_path / name, **{
            "train.report_to": "none", "train.checkpoint_every": 0, "objective.name": "dpo",
            # beta 500, not the fixtures' 5000: a layout's rounding (channels_last picks other conv kernels)
            # grows with beta through the step; at 5000 it reached 1.1e-4 of the loss (tests/test_distributed.py)
            "objective.beta": 500.0, **extra}))
        result = train(config, progress=False)
        assert result.steps == 2
        return [record["loss"] for record in result.history]

    plain, with_lever = losses("plain", {}), losses("lever", levers)
    assert all(torch.isfinite(torch.tensor(with_lever)))
    assert with_lever == pytest.approx(plain, rel=1e-4, abs=1e-6)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.to_q(x))


class _Repeated(nn.Module):
    _repeated_blocks = ["_Block"]  # as diffusers models declare their regional-compile targets

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_regional_compile_honours_the_lora_switch_and_compiles_nothing_after_warm_up():
    from peft import LoraConfig, inject_adapter_in_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Repeated()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights="gaussian"), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)  # peft starts B at 0: make the adapters change the output
    x = torch.randn(3, 8)
    with torch.no_grad():
        eager_policy = model(x)
        with lora_disabled(model):
            eager_reference = model(x)
    assert not torch.allclose(eager_policy, eager_reference)

    compiled = compile_denoiser(model, "blocks", backend="aot_eager")
    assert compiled is model  # the blocks are compiled in place; the head stays eager

    def policy_and_reference():
        policy = compiled(x)
        policy.sum().backward()
        with torch.no_grad(), lora_disabled(compiled):
            reference = compiled(x)
        return policy.detach(), reference

    policy, reference = policy_and_reference()  # warm-up: the graphs of both passes
    warm = compile_counts()
    assert warm["frames"] >= 2  # one per LoRA state, shared by both blocks
    for _ in range(3):
        policy, reference = policy_and_reference()
    assert compile_counts() == warm
    torch.testing.assert_close(policy, eager_policy)
    torch.testing.assert_close(reference, eager_reference)
    torch._dynamo.reset()


def test_a_model_without_repeated_blocks_is_compiled_whole():
    model = nn.Sequential(nn.Linear(4, 4))
    compiled = compile_denoiser(model, "blocks", backend="eager")
    assert compiled is not model and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(SipoError, match="choose one of"):
        compile_denoiser(model, "everything")


def test_group_offload_is_refused_where_it_would_move_trainable_weights_to_another_device():
    from sipo.performance import offload_frozen_base

    with pytest.raises(SipoError, match="set model.offload_frozen=none"):
        offload_frozen_base(nn.Linear(2, 2), "group", torch.device("cuda"))  # checked before any CUDA call
    assert not offload_frozen_base(nn.Linear(2, 2), "none", torch.device("cuda"))
