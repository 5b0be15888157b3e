"""One optimizer step optimises SPEC's objective whatever the layout (docs/method.md, "What one optimizer step
optimises"): the same 4 pairs per step as (batch_size, gradient_accumulation_steps, processes) = (4,1,1), (1,4,1),
(2,2,1), (2,1,2) and (1,2,2) log the same loss and gradient norm and train the same LoRA, for every objective whose
loss is a ratio or uses a batch statistic, with the mask keeping some pairs but not all. The logged loss is also
checked against SPEC's formula evaluated by hand from the per-pair terms.

Both 2-process layouts of every objective (and the run the resume tests continue) go through ONE launch of the
gloo launcher of tests/test_distributed.py, started first and running while this process trains the 1-process
layouts.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sipo.config import load_config
from sipo.errors import SipoError
from test_distributed import SOURCE, TESTS, _accelerate_config
from train_fixtures import tiny_overrides, write_jsonl_pairs, write_tiny_config

STEPS = 2
LAYOUTS = ((4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2))  # (batch_size, accumulation, processes)
#: extra settings per objective; the mask keeps some pairs of each step but not all (test_the_mask_keeps_some_pairs):
#: at seed 0, step 1's pairs have min(w_w, w_l) = 0.927 0.859 0.924 0.922 (tau 0.9 keeps 3) and product weights
#: 0.860 0.739 0.853 0.850 (tau 0.8 keeps 3); KTO and alpha-DPO take the mask too, on top of their batch statistic
OBJECTIVES = {
    "dpo": {},
    "dpo-cm": {},
    "sipo": {},
    "sipo-outside": {"objective.tau": 0.8},
    "kto": {"objective.mask": True},
    "alpha-dpo": {"objective.mask": True},
}
LORA = "pytorch_lora_weights.safetensors"
#: one beta for all: float32 rounding of the per-pair errors differs with the batch a convolution sees (~1e-7),
#: and z = -0.5*beta*delta carries it; the presets' 1000-5000 would need a 10x looser tolerance
BETA = 500.0
#: float32 sums in other orders (a sum of 4 pairs, of 4 micro-batches, DDP's mean of 2 processes), grown through
#: beta; AdamW's epsilon is raised from 1e-8 so that a LoRA element whose gradient is a near-cancelling sum
#: (|g| ~ its rounding) moves by ~lr*g/eps, not by +-lr whichever way the rounding went; typical |g| ~ 1e-2.
#: Measured: losses and grad norms within 6e-5 (relative), LoRA within 3.4e-6; the old trainer differed by
#: 0.5-0.9 (relative) in the loss and 3.9e-3 in the LoRA
ADAM_EPSILON = 1e-4
TOLERANCE = 2e-4


def _settings(objective: str, layout: tuple[int, int, int], **extra) -> dict:
    batch, accumulation, _ = layout
    return {"objective.name": objective, **OBJECTIVES[objective], "train.batch_size": batch,
            "train.gradient_accumulation_steps": accumulation, "train.max_steps": STEPS, "train.checkpoint_every": 0,
            "train.report_to": "none", "train.deterministic": True, "objective.beta": BETA,
            "train.adam_epsilon": ADAM_EPSILON, **extra}


def _name(objective: str, layout: tuple[int, int, int]) -> str:
    return f"{objective}-{'x'.join(map(str, layout))}"


def _record(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"loss": [r["loss"] for r in lines], "grad_norm": [r["grad_norm"] for r in lines],
            "masked_fraction": [r["masked_fraction"] for r in lines], "lora": load_file(str(run / LORA))}


def _start_launch(root: Path, model: Path, pairs: Path) -> subprocess.Popen:
    """Every 2-process run in one ``accelerate launch`` (the worker's ``--each``), started in the background."""
    runs = []
    for objective in OBJECTIVES:
        for layout in (layout for layout in LAYOUTS if layout[2] == 2):
            config = write_tiny_config(root / f"{_name(objective, layout)}.yaml", model, pairs,
                                       root / _name(objective, layout), **_settings(objective, layout))
            runs.append(["train", "--config", str(config), "--no-progress"])
    # the run the resume tests continue: dpo on 2 processes of 2 pairs, stopped after step 1
    source = write_tiny_config(root / "resume-source.yaml", model, pairs, root / "resume-source",
                               **_settings("dpo", (2, 1, 2), **{"train.max_steps": 1}))
    runs.append(["train", "--config", str(source), "--no-progress"])
    (root / "runs.json").write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(SOURCE), str(TESTS)])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(_accelerate_config(root / "accelerate.yaml")), str(TESTS / "distributed_worker.py"),
               str(root / "record"), "--each", str(root / "runs.json")]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, tiny_sd15_dir):
    """``{(objective, layout): record}`` for every objective and layout, and what the resume tests need."""
    from sipo.models import adapter_from_config
    from sipo.train import train

    root = tmp_path_factory.mktemp("step_layout")
    pairs = write_jsonl_pairs(root / "pairs", num_pairs=STEPS * 4)
    launch = _start_launch(root, tiny_sd15_dir, pairs)
    try:
        overrides = lambda objective, layout, **extra: tiny_overrides(  # noqa: E731
            tiny_sd15_dir, pairs, root / _name(objective, layout), **_settings(objective, layout, **extra))
        base = adapter_from_config(load_config(None, overrides("dpo", (4, 1, 1))).model)
        terms = {}  # the per-pair terms of sipo's and sipo-outside's (1,4,1) runs, for the loss by hand
        train_module = importlib.import_module("sipo.train")
        for objective in OBJECTIVES:
            for layout in (layout for layout in LAYOUTS if layout[2] == 1):
                by_hand = layout == (1, 4, 1) and objective in ("sipo", "sipo-outside")
                spy = _spy(train_module, terms.setdefault(objective, [])) if by_hand else None
                try:
                    train(load_config(None, overrides(objective, layout)), progress=False, adapter=copy.deepcopy(base))
                finally:
                    if spy is not None:
                        train_module.compute_pair_terms = spy
        output, _ = launch.communicate(timeout=400)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, output[-3000:]
    records = {(objective, layout): _record(root / _name(objective, layout)) for objective in OBJECTIVES
               for layout in LAYOUTS}
    print(layout_table(records))  # pytest -s shows it: the table of docs/method.md
    return {"records": records, "terms": terms, "root": root, "overrides": overrides, "base": base}


def layout_table(records: dict) -> str:
    """Loss and gradient norm of steps 1 and 2 per objective and layout, and each layout's largest LoRA difference
    from (4,1,1), as a Markdown table."""
    lines = ["| objective | layout (B,G,N) | loss step 1 | loss step 2 | grad norm step 1 | grad norm step 2 | "
             "masked step 1, 2 | max LoRA diff vs (4,1,1) |", "|---|---|---|---|---|---|---|---|"]
    for (objective, layout), record in records.items():
        difference = _max_difference(record["lora"], records[(objective, LAYOUTS[0])]["lora"])
        lines.append(f"| {objective} | {layout} | {record['loss'][0]:.6f} | {record['loss'][1]:.6f} | "
                     f"{record['grad_norm'][0]:.6f} | {record['grad_norm'][1]:.6f} | "
                     f"{record['masked_fraction'][0]:.2f}, {record['masked_fraction'][1]:.2f} | {difference:.1e} |")
    return "\n".join(lines)


def _spy(train_module, recorded: list):
    """Record every micro-batch's per-pair terms (detached) that ``sipo.train`` computes; returns the original."""
    original = train_module.compute_pair_terms

    def recording(*args, **kwargs):
        terms = original(*args, **kwargs)
        recorded.append({name: getattr(terms, name).detach().double().clone() for name in
                         ("z", "err_winner", "err_loser", "ref_err_winner", "ref_err_loser", "log_w_winner",
                          "log_w_loser", "timesteps")})
        return terms

    train_module.compute_pair_terms = recording
    return original


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b) and a
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ----------------------------------------------------------------------------- every layout: one step
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_layout_of_the_same_pairs_trains_the_same_step(layout_runs, objective):
    records = layout_runs["records"]
    reference = records[(objective, LAYOUTS[0])]
    assert len(reference["loss"]) == STEPS and len(set(reference["loss"])) == STEPS  # step 2 is not step 1
    for layout in LAYOUTS[1:]:
        record = records[(objective, layout)]
        for key in ("loss", "grad_norm"):
            assert record[key] == pytest.approx(reference[key], rel=TOLERANCE, abs=TOLERANCE), (layout, key)
        assert _max_difference(record["lora"], reference["lora"]) < TOLERANCE, layout
    assert any(float(w.abs().max()) > 0 for k, w in reference["lora"].items() if "lora_B" in k or "lora.up" in k)


@pytest.mark.parametrize("objective", [name for name in OBJECTIVES if name != "dpo"])
def test_the_mask_keeps_some_pairs_of_every_step_but_not_all(layout_runs, objective):
    for layout in LAYOUTS:
        masked = layout_runs["records"][(objective, layout)]["masked_fraction"]
        assert all(0.0 < fraction < 1.0 for fraction in masked), (layout, masked)


# ----------------------------------------------------------------------------- the value is SPEC's
def _alpha_dpo_at_zero(alpha0: float = 0.9999) -> float:
    p = 0.5  # sigmoid(0)
    alpha = alpha0 * p  # adaptive alpha: alpha0 * mean sigmoid(z)
    return (p ** alpha - (1 - alpha) - alpha * p) / (alpha * (alpha - 1))


def test_step_one_has_zero_logits_so_every_layout_logs_the_objectives_value_at_z_zero(layout_runs):
    # a zero LoRA is the reference: z = 0 and the implicit rewards are 0 for every pair, so the masked mean is the
    # per-pair value whatever the mask kept (the old per-micro-batch normaliser gave ln 2 / 4 for sipo at (1,4,1))
    at_zero = {"dpo": math.log(2), "dpo-cm": math.log(2), "sipo": math.log(2), "sipo-outside": math.log(2),
               "kto": 0.5,  # (1 - sigmoid(0)) on both images, reference point max(0, 0)
               "alpha-dpo": _alpha_dpo_at_zero()}
    for (objective, layout), record in layout_runs["records"].items():
        assert record["loss"][0] == pytest.approx(at_zero[objective], rel=1e-6), (objective, layout)


def _step_two(terms: list[dict]) -> dict[str, list[float]]:
    """Step 2's four pairs (micro-batches 5-8 of the (1,4,1) run) as lists of floats."""
    assert len(terms) == 4 * STEPS
    return {name: [float(t[name][0]) for t in terms[4:]] for name in terms[4]}


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def test_sipo_outside_logs_spec5s_self_normalised_loss_over_the_steps_whole_batch(layout_runs):
    pairs = _step_two(layout_runs["terms"]["sipo-outside"])
    weights = [math.exp(a + b) for a, b in zip(pairs["log_w_winner"], pairs["log_w_loser"])]  # product
    kept = [w for w in weights if w >= 0.8]
    assert 0 < len(kept) < 4
    clipped = [min(max(w, 0.0), 2.0) for w in weights]  # clip_eps 1: [0, 2]
    numerator = sum(c * _softplus(-z) for w, c, z in zip(weights, clipped, pairs["z"]) if w >= 0.8)
    denominator = sum(c for w, c in zip(weights, clipped) if w >= 0.8)
    # the terms are the (1,4,1) run's (its 4 micro-batches: the old trainer logged the mean of 4 one-pair
    # losses there, each weight cancelling itself); the other layouts equal it (the test above)
    assert layout_runs["records"][("sipo-outside", (1, 4, 1))]["loss"][1] == pytest.approx(numerator / denominator,
                                                                                          rel=1e-6)


def test_sipo_logs_spec4as_masked_mean_over_the_steps_whole_batch(layout_runs):
    pairs = _step_two(layout_runs["terms"]["sipo"])
    beta, total, kept = BETA, 0.0, 0
    for i in range(4):
        w_w, w_l = math.exp(pairs["log_w_winner"][i]), math.exp(pairs["log_w_loser"][i])
        if min(w_w, w_l) < 0.9:
            continue
        c_w, c_l = min(max(w_w, 0.9), 1.1), min(max(w_l, 0.9), 1.1)
        z = -0.5 * beta * (c_w * (pairs["err_winner"][i] - pairs["ref_err_winner"][i])
                           - c_l * (pairs["err_loser"][i] - pairs["ref_err_loser"][i]))
        total, kept = total + _softplus(-z), kept + 1
    assert 0 < kept < 4
    assert layout_runs["records"][("sipo", (1, 4, 1))]["loss"][1] == pytest.approx(total / kept, rel=1e-6)


# ----------------------------------------------------------------------------- --resume and the global batch
def test_resume_on_one_process_continues_a_two_process_run_of_the_same_global_batch(layout_runs, capsys):
    from sipo.train import train

    run = layout_runs["root"] / _name("dpo", (4, 1, 1))
    resumed = layout_runs["root"] / "resumed"
    shutil.copytree(layout_runs["root"] / "resume-source", resumed)
    config = load_config(None, layout_runs["overrides"]("dpo", (4, 1, 1), **{"train.output_dir": str(resumed)}))
    capsys.readouterr()
    train(config, resume=True, progress=False, adapter=copy.deepcopy(layout_runs["base"]))
    out = capsys.readouterr().out
    assert "the layout changed from 2 x 1 x 2 processes to 4 x 1 x 1 process" in out, out
    assert "the same global batch of 4 pairs per step" in out
    # stopped after step 1 on 2 processes, step 2 on 1: the run of 1 process from the start
    assert _max_difference(load_file(str(resumed / LORA)), load_file(str(run / LORA))) < TOLERANCE
    assert _record(resumed)["loss"] == pytest.approx(_record(run)["loss"], rel=TOLERANCE)


def test_resume_with_another_global_batch_stops_in_one_sentence_naming_the_fix(layout_runs):
    from sipo.train import train

    source = layout_runs["root"] / "resume-source"
    before = sorted(p.name for p in source.rglob("*"))
    config = load_config(None, layout_runs["overrides"]("dpo", (2, 1, 1), **{"train.output_dir": str(source)}))
    with pytest.raises(SipoError, match=r"resume=True refused: .*train.num_processes: 2 -> 1; the global batch changed from "
                                        r"4 pairs per step \(batch_size x gradient_accumulation_steps x processes = 2 x 1 x "
                                        r"2 processes\) to 2 \(2 x 1 x 1 process\), .*: keep 4 with "
                                        r"train.gradient_accumulation_steps=2 with this batch_size and these processes\)"):
        train(config, resume=True, progress=False, adapter=copy.deepcopy(layout_runs["base"]))
    assert sorted(p.name for p in source.rglob("*")) == before


def test_check_global_batch_names_what_changed():
    from sipo.checkpoints import check_global_batch

    layout = lambda b, g, n: {"train.batch_size": b, "train.gradient_accumulation_steps": g,  # noqa: E731
                              "train.num_processes": n}
    assert check_global_batch(layout(2, 2, 2), layout(2, 2, 2)) == (None, None)
    line, refusal = check_global_batch(layout(2, 2, 2), layout(1, 8, 1))
    assert "from 2 x 2 x 2 processes to 1 x 8 x 1 process" in line and refusal is None
    line, refusal = check_global_batch(layout(2, 2, 2), layout(3, 2, 2))
    assert line is None and "from 8 pairs per step" in refusal and "to 12" in refusal
    assert refusal.endswith("keep 8 with a train.batch_size and train.gradient_accumulation_steps whose product with "
                            "the 2 processes is 8")
    # a checkpoint of an older sipo recorded no processes: batch_size and accumulation are compared key by key
    older = {"train.batch_size": 2, "train.gradient_accumulation_steps": 1}
    assert check_global_batch(older, layout(2, 1, 2)) == (None, None)


# ----------------------------------------------------------------------------- the pieces
def test_the_sums_of_two_micro_batches_divide_by_one_normaliser():
    from sipo.objectives import pair_loss_sums, step_loss

    loss = torch.tensor([1.0, 2.0, 4.0, 8.0])
    keep = torch.tensor([True, False, True, True])
    weight = torch.tensor([0.5, 3.0, 1.0, 2.0])
    cases = [({}, (1 + 4 + 8) / 3),  # C&M: the kept mean of the step, not the mean of two micro-batch means
             ({"weight": weight, "normalize": "self"}, (0.5 + 4 + 16) / 3.5),
             ({"weight": weight, "normalize": "batch"}, (0.5 + 4 + 16) / 4)]
    for settings, expected in cases:
        first = pair_loss_sums(loss[:2], keep[:2], **{k: v[:2] if k == "weight" else v for k, v in settings.items()})
        second = pair_loss_sums(loss[2:], keep[2:], **{k: v[2:] if k == "weight" else v for k, v in settings.items()})
        total = step_loss(first.numerator + second.numerator, first.denominator + second.denominator, first.floor)
        assert float(total) == pytest.approx(expected, rel=1e-6)
    # every pair masked: loss 0, not 0/0
    parts = pair_loss_sums(loss, torch.zeros(4, dtype=torch.bool))
    assert float(step_loss(*parts)) == 0.0


def test_a_pairs_noise_depends_on_seed_step_and_place_only():
    from sipo.preference import draw_step_noise

    shape = torch.Size((4, 2, 3, 3))
    whole = draw_step_noise(shape, 1000, 0, 5, [8, 9, 10, 11])
    alone = draw_step_noise(torch.Size((1, 2, 3, 3)), 1000, 0, 5, [10])  # the same pair on another process
    for name in ("timesteps", "eps", "posterior_noise"):
        assert torch.equal(getattr(whole, name)[2:3], getattr(alone, name))
    assert not torch.equal(draw_step_noise(shape, 1000, 0, 6, [8, 9, 10, 11]).eps, whole.eps)  # another step
    assert not torch.equal(draw_step_noise(shape, 1000, 1, 5, [8, 9, 10, 11]).eps, whole.eps)  # another seed
    assert len(set(whole.eps[:, 0, 0, 0].tolist())) == 4  # every place its own draw
    sampled = draw_step_noise(shape, 1000, 0, 5, [8, 9, 10, 11], timestep_sampling="logit_normal")
    assert ((0 <= sampled.timesteps) & (sampled.timesteps < 1000)).all()


def test_deepspeed_with_gradient_accumulation_stops_in_one_sentence(monkeypatch):
    from sipo.train import refuse_deepspeed

    refuse_deepspeed(4)  # no DeepSpeed asked for
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    refuse_deepspeed(1)  # one micro-batch per step: the normaliser is known before DeepSpeed's backward
    with pytest.raises(SipoError, match=r"DeepSpeed, which steps the optimizer inside every backward, so with "
                                        r"train.gradient_accumulation_steps=4 .*; set train.gradient_accumulation_steps=1"):
        refuse_deepspeed(4)
