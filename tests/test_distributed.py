"""Several processes on the CPU (gloo), launched the way users launch them: ``accelerate launch
--config_file <MULTI_GPU + use_cpu, 2 processes> ... sipo train``. Two processes with a per-process batch of 2
train what one process with a batch of 4 trains (which pairs each rank reads, the loss history, the
held-out validation, the LoRA weights); a 2-process run stopped after step 2 and resumed equals the
uninterrupted one bit for bit, with one checkpoint, written once; each final line is printed once.

Three 2-process launches in all (module fixtures), each a few steps of the tiny SD1.5 model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from sipo.validation import VALIDATION_LOG
from train_fixtures import write_jsonl_pairs, write_tiny_config

STEPS = 4
PER_PROCESS_BATCH = 2
LORA = "pytorch_lora_weights.safetensors"
#: float32 sums in another order (DDP averages two half-batch gradients, one process differentiates
#: the mean of four pairs), grown through beta and Adam's per-weight normalisation. Measured: 1.1e-5
#: (loss), 1.1e-5 (LoRA); one process on 2 threads instead of 1 differs from itself by 7.5e-6 and 2.4e-4
#: (docs/distributed.md). Each rank drawing its own noise (sipo before) differs by 1.5e-2 and 7.8e-3. Since
#: the noise is keyed by (seed, step, place in the step's batch), any layout draws the same noise per pair.
TOLERANCE = 1e-4
TESTS = Path(__file__).resolve().parent
SOURCE = TESTS.parent / "src"


def _settings(**extra) -> dict:
    # DPO here; every objective divides by the normaliser of the step's whole batch, so the masked and
    # self-normalised ones train alike on 2 processes too (tests/test_step_layout.py checks six objectives)
    return {"objective.name": "dpo", "train.max_steps": STEPS, "train.checkpoint_every": 0,
            "train.report_to": "none", "train.deterministic": True, "data.validation_fraction": 0.25,
            "train.validate_every": 2, "objective.beta": 500.0, **extra}  # beta: the fixtures' 5000 amplifies rounding 10x more


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accelerate_config(path: Path) -> Path:
    # MULTI_GPU is accelerate's torchrun launcher, which starts the 2 processes (its MULTI_CPU starts one
    # process per launch unless mpirun runs it); sipo joins them over gloo on a machine without GPUs
    path.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_processes": 2,
        "num_machines": 1, "machine_rank": 0, "main_process_ip": "127.0.0.1", "main_process_port": _free_port(),
        "mixed_precision": "no", "use_cpu": True,
    }))
    return path


def _launch(accelerate_config: Path, program: list[str]) -> subprocess.CompletedProcess:
    return _run_on_cpu(["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config), *program])


def _run_on_cpu(arguments: list[str]) -> subprocess.CompletedProcess:
    # CPU processes on any machine (no visible GPU): the comparison is gloo DDP against one CPU process,
    # and a machine with fewer GPUs than processes must not hand rank 1 a device it lacks
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(SOURCE), str(TESTS)])}
    done = subprocess.run([sys.executable, *arguments], env=env, capture_output=True, text=True, timeout=400)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("sipo: ")]
    assert done.returncode == 0, "\n".join(errors) or done.stderr[-3000:]
    return done


def _sipo_train(config: Path, *args: str) -> list[str]:
    return ["-m", "sipo", "train", "--config", str(config), "--no-progress", *args]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _validation(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / VALIDATION_LOG).read_text().splitlines()]


def _max_lora_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / LORA)), load_file(str(b / LORA))
    assert sorted(wa) == sorted(wb) and wa
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_sd15_dir):
    root = tmp_path_factory.mktemp("distributed")
    pairs = write_jsonl_pairs(root / "pairs", num_pairs=16)
    return {"root": root, "pairs": pairs, "model": tiny_sd15_dir,
            "accelerate": _accelerate_config(root / "accelerate_multi_cpu.yaml")}


@pytest.fixture(scope="module")
def one_process(setting):
    """One process, the global batch of 4, through the same worker (on the CPU, as the two are)."""
    output, record = setting["root"] / "one", setting["root"] / "one-record"
    config = write_tiny_config(setting["root"] / "one.yaml", setting["model"], setting["pairs"], output,
                               **_settings(**{"train.batch_size": 2 * PER_PROCESS_BATCH}))
    _run_on_cpu([str(TESTS / "distributed_worker.py"), str(record), *_sipo_train(config)[2:]])
    return output, json.loads((record / "indices-0.json").read_text())


@pytest.fixture(scope="module")
def two_processes(setting):
    """Two processes of 2 pairs each, through the worker that records each rank's batches."""
    output, record = setting["root"] / "two", setting["root"] / "two-record"
    config = write_tiny_config(setting["root"] / "two.yaml", setting["model"], setting["pairs"], output,
                               **_settings(**{"train.batch_size": PER_PROCESS_BATCH}))
    done = _launch(setting["accelerate"], [str(TESTS / "distributed_worker.py"), str(record), *_sipo_train(config)[2:]])
    ranks = [json.loads((record / f"indices-{rank}.json").read_text()) for rank in (0, 1)]
    return output, ranks, done


@pytest.fixture(scope="module")
def stopped_and_resumed(setting):
    """Two processes, ``sipo train`` stopped at step 2 (train.max_steps=2), then ``--resume`` to step 4."""
    output = setting["root"] / "resumed"
    first = write_tiny_config(setting["root"] / "first.yaml", setting["model"], setting["pairs"], output,
                              **_settings(**{"train.batch_size": PER_PROCESS_BATCH, "train.max_steps": 2}))
    stopped = _launch(setting["accelerate"], _sipo_train(first))
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    files = sorted(str(p.relative_to(output / "checkpoints")) for p in (output / "checkpoints").rglob("*") if p.is_file())
    second = write_tiny_config(setting["root"] / "second.yaml", setting["model"], setting["pairs"], output,
                               **_settings(**{"train.batch_size": PER_PROCESS_BATCH}))
    resumed = _launch(setting["accelerate"], _sipo_train(second, "--resume"))
    return output, checkpoints, files, stopped, resumed


# ----------------------------------------------------------------------------- 2 processes = 1 process
def test_each_rank_reads_its_half_of_the_one_process_global_batch(one_process, two_processes):
    _, one = one_process
    _, (rank0, rank1), _ = two_processes
    assert len(one) == len(rank0) == len(rank1) == STEPS
    for step in range(STEPS):
        assert len(rank0[step]) == len(rank1[step]) == PER_PROCESS_BATCH
        # the one process's micro-batch, in its order: rank 0's pairs, then rank 1's
        assert rank0[step] + rank1[step] == one[step]
    # together the ranks read an epoch first: each training pair once (the key hash holds some of the 16 out)
    training = json.loads((two_processes[0] / "data_report.json").read_text())["validation"]["training_pairs"]
    read = [i for step in range(STEPS) for i in rank0[step] + rank1[step]]
    assert len(set(read[:training])) == training < 16


def test_two_processes_log_the_loss_history_of_one(one_process, two_processes):
    one, two = _losses(one_process[0]), _losses(two_processes[0])
    assert len(one) == len(two) == STEPS  # one line per step: rank 0 writes, the losses are averaged over ranks
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE
    assert len(set(one)) == STEPS  # the steps differ, so agreeing step by step says something


def test_two_processes_train_the_lora_weights_of_one(one_process, two_processes):
    assert _max_lora_difference(one_process[0], two_processes[0]) < TOLERANCE
    initial = load_file(str(one_process[0] / LORA))
    assert any(float(w.abs().max()) > 0 for k, w in initial.items() if "lora.up" in k)  # it trained: B left zero


def test_two_processes_validate_as_one(one_process, two_processes):
    one, two = _validation(one_process[0]), _validation(two_processes[0])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 2, 4]
    for a, b in zip(one, two):
        assert a["held_out/pairs"] == b["held_out/pairs"] > 0
        for key in a:
            if key.startswith(("held_out/", "train/")) and isinstance(a[key], float) and a[key] == a[key]:
                assert b[key] == pytest.approx(a[key], abs=TOLERANCE), key
        # the step's training pairs are every rank's: the global batch of 4
        assert a.get("train/pairs") == b.get("train/pairs")
    assert two[-1]["train/pairs"] == 2 * PER_PROCESS_BATCH


def test_the_final_lines_are_printed_once(two_processes):
    out = two_processes[2].stdout
    assert out.count("trained 4 steps") == 1, out
    assert out.count("sipo: training sd15 model") == 1, out


# ----------------------------------------------------------------------------- stop and resume with 2 processes
def test_a_stopped_and_resumed_two_process_run_equals_the_uninterrupted_one(two_processes, stopped_and_resumed):
    resumed = stopped_and_resumed[0]
    # the same two processes run the same operations in the same order from an exact state: bit for bit
    assert _max_lora_difference(two_processes[0], resumed) == 0.0
    assert _losses(resumed) == _losses(two_processes[0])
    assert [r["step"] for r in _validation(resumed)] == [0, 2, 4]


def test_the_stopped_run_wrote_one_checkpoint_once(one_process, stopped_and_resumed):
    _, checkpoints, files, stopped, resumed = stopped_and_resumed
    assert checkpoints == ["step-00000002"]
    # one process wrote it: the files of a one-process checkpoint, no second writer's leftovers
    single = sorted(p.name for p in (one_process[0] / "checkpoints" / "step-00000004").iterdir())
    assert files == [f"step-00000002/{name}" for name in single] and len(files) >= 5, files
    assert stopped.stdout.count("trained 2 steps") == 1 and resumed.stdout.count("trained 4 steps") == 1
    assert resumed.stdout.count("resumed from") == 1, resumed.stdout


# ----------------------------------------------------------------------------- FSDP and DeepSpeed: what runs without GPUs
def _launch_environment(config_file: str, deepspeed: bool = False) -> dict[str, str]:
    """The variables ``accelerate launch --config_file`` hands its processes for this config (launching none)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(TESTS.parent / config_file), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
        environment = prepare_deepspeed_cmd_env(args)[1]
    else:
        environment = prepare_multi_gpu_env(args)
    return {k: v for k, v in environment.items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def test_fsdp_or_deepspeed_asked_for_on_the_cpu_stops_in_one_sentence(monkeypatch):
    from sipo.errors import SipoError
    from sipo.rundir import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(variable, "true")
        with pytest.raises(SipoError, match=rf"asks for {name}, which accelerate starts only on GPUs \(on the CPU its "
                                            r"processes would run plain DDP\)"):
            check_launch(2, "cpu")
        check_launch(2, "cuda")  # where accelerate does start it
        monkeypatch.delenv(variable)
    check_launch(2, "cpu")  # DDP on the CPU


def test_the_fsdp_config_builds_accelerates_plugin_which_wraps_the_denoisers_blocks(tiny_sd15_dir, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from diffusers import CogVideoXTransformer3DModel, UNet2DConditionModel, WanTransformer3DModel

    environment = _launch_environment("configs/accelerate/fsdp_8gpu.yaml")
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    assert (environment["FSDP_AUTO_WRAP_POLICY"], environment["FSDP_STATE_DICT_TYPE"]) == ("TRANSFORMER_BASED_WRAP",
                                                                                           "FULL_STATE_DICT")
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in environment  # the model's own _no_split_modules decide
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    # these two place the parameters on the current GPU in the plugin's __post_init__, which raises without one
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.use_orig_params and plugin.fsdp_version == 1  # LoRA's trainable/frozen mix inside one unit
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet")
    plugin.set_auto_wrap_policy(unet)
    wrapped = {type(m).__name__ for m in unet.modules() if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)}
    assert wrapped == {"BasicTransformerBlock", "ResnetBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    # what the config's comment promises for the video families it is meant for
    assert WanTransformer3DModel._no_split_modules == ["WanTransformerBlock"]
    assert CogVideoXTransformer3DModel._no_split_modules == ["CogVideoXBlock", "CogVideoXPatchEmbed"]


def test_the_deepspeed_config_builds_accelerates_plugin(monkeypatch):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (docs/distributed.md: it installs from an sdist)")
    from accelerate.utils import DeepSpeedPlugin

    environment = _launch_environment("configs/accelerate/deepspeed_zero2_8gpu.yaml", deepspeed=True)
    assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert (plugin.zero_stage, plugin.gradient_clipping, plugin.gradient_accumulation_steps) == (2, 1.0, 1)
    assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "none"
