"""The training loop: read it top to bottom.

config -> adapter + dataset -> (per micro-batch) encode, draw t/eps, per-pair terms, weights,
reduce -> backward -> (per optimizer step) guard against non-finite values, clip, step, log,
checkpoint. One code path serves DPO, +mask, +clip, +reweight, C&M and SIPO: the objective
switches only change how ``objectives.preference_loss`` reduces the per-pair losses.

Multi-GPU runs go through ``accelerate launch -m sipo train ...``: accelerate wraps the denoiser
(DDP/FSDP/DeepSpeed), each process reads its own shard of every global batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sipo import objectives
from sipo.checkpoints import (
    TrainState, is_write_failure, disk_is_full, list_checkpoints, load_checkpoint, run_fingerprint, save_checkpoint,
    write_error,
)
from sipo.config import SipoConfig, check_against_model, check_values, save_config
from sipo.data.order import DataOrder, ResumableBatchSampler
from sipo.errors import SipoError
from sipo.models import DiffusionAdapter, adapter_from_config, add_lora, lora_disabled
from sipo.models.base import EncodedPairs, hold_frozen_weights_in
from sipo.performance import (
    COMPUTE_DTYPES, StepClock, configure_kernels, make_optimizer, restore_device_rng,
)
from sipo.preference import PairNoise, PairTerms, compute_pair_terms, draw_pair_noise, objective_loss, step_beta, update_auto_beta

StepCallback = Callable[[int, DiffusionAdapter], None]


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    adapter: DiffusionAdapter | None = None


# ----------------------------------------------------------------------------- set-up helpers
def _lr_scheduler(config: SipoConfig, optimizer):
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[config.train.lr_scheduler]
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.train.lr_warmup_steps, num_training_steps=config.train.max_steps
    )


def _project_url() -> str:
    """The Homepage of sipo's own package metadata (pyproject.toml [project.urls]), stated once."""
    from importlib import metadata

    try:
        for entry in metadata.metadata("sipo").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() == "homepage":
                return url.strip()
    except metadata.PackageNotFoundError:
        pass
    return "https://pypi.org/project/sipo/"


def _write_model_card(output_dir: Path, config: SipoConfig, state: TrainState) -> None:
    switches = config.objective.switches()
    weights = "pytorch_lora_weights.safetensors (load with pipe.load_lora_weights(dir))" if config.train.finetune == "lora" else "unet/ (diffusers format)"
    text = f"""---
library_name: diffusers
tags: [sipo, diffusion-dpo, preference-optimization, {config.model.family}]
base_model: {config.model.pretrained_path}
---
# {config.objective.name} fine-tune of `{config.model.pretrained_path}`

Trained with [sipo]({_project_url()}) ({config.objective.name}: mask={switches['mask']},
clip={switches['clip']}, reweight={switches['reweight']}, beta={config.objective.beta}) for
{state.step} optimizer steps on `{config.data.path}` ({config.data.format}).

- weights: {weights}
- resolved config: config.yaml
- non-finite steps skipped: {state.bad_steps}; batches with every pair masked: {state.all_masked_batches};
  malformed rows skipped: {state.skipped_rows}
"""
    (output_dir / "README.md").write_text(text)


def _start_trackers(accelerator, config: SipoConfig) -> None:
    """One stable log folder per run, ``<output_dir>/logs``; a resume appends to it.

    accelerate's TensorBoard tracker stores a config with ``add_hparams``, which makes a new
    timestamped folder on every call: TensorBoard gets the config as text instead.
    """
    import yaml

    if config.train.report_to == "none":
        return
    flat = {k: str(v) for k, v in _flat(config.to_dict()).items()}
    accelerator.init_trackers("logs", config=flat if config.train.report_to != "tensorboard" else None)
    if config.train.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_text("config", "```\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "```")


def _run_header(config: SipoConfig, dataset, output_dir: Path) -> str:
    """What the run is about to do, printed before the progress bar."""
    report = dataset.report
    skipped = f", {report.skipped_total} rows skipped while indexing ({report.skip_summary()})" if report.skipped_total else ""
    return (f"sipo: training {config.model.family} model {config.model.pretrained_path} with {config.objective.name} "
            f"into {output_dir}; data: {len(dataset)} pairs found in {config.data.path}{skipped}")


def _divergence_advice(output_dir: Path) -> str:
    """The way out of a divergence stop, true to what is on disk."""
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        return (f"lower objective.beta or turn on objective.mask and --resume from {checkpoints[-1].name}, the last "
                "good checkpoint, or lower train.learning_rate and start again with --overwrite")
    return ("no checkpoint was written before it, so lower objective.beta or train.learning_rate, or turn on "
            "objective.mask, and start again with --overwrite")


def _trainable_named(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- the loop
def train(
    config: SipoConfig,
    resume: bool = False,
    step_callback: StepCallback | None = None,
    progress: bool = True,
    adapter: DiffusionAdapter | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train per ``config`` into a fresh ``train.output_dir``.

    ``resume`` continues the run already there from its newest intact checkpoint; ``overwrite``
    replaces the run already there. Without either, a directory holding a run stops the call.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from sipo import rundir
    from sipo.data import collate_pairs, open_preference_dataset

    tc, oc = config.train, config.objective
    output_dir = Path(tc.output_dir)
    # Prologue: every check that can fail runs before the first byte is written into output_dir.
    from accelerate import PartialState

    process = PartialState()  # under `accelerate launch`: every rank checks before the main one writes
    check_values(config)
    notes = check_against_model(config, *rundir.model_numbers(config.model.pretrained_path))
    if adapter is None:
        rundir.check_model_dir(config.model)
    rundir.check_output_dir(output_dir)
    if resume and overwrite:
        raise SipoError("--resume and --overwrite contradict each other; pass one of them")
    if not resume and not overwrite:
        rundir.refuse_foreign_run(output_dir)
    # Open the data before loading a model: a bad path should fail in a second, not a minute.
    dataset = open_preference_dataset(config.data, config.model.resolution, seed=tc.seed)
    fingerprint = run_fingerprint(config)
    rundir.check_reporting(config)
    resume_from, damaged = None, []
    if resume:
        resume_from, damaged, resume_notes = rundir.choose_resume_checkpoint(output_dir, fingerprint)
        notes += resume_notes
    process.wait_for_everyone()
    if process.is_main_process:
        if resume:
            notes += rundir.discard_damaged(output_dir, damaged)
        elif overwrite:
            removed = rundir.remove_previous_run(output_dir)
            if removed:
                notes.append(f"--overwrite: removed the earlier run's {', '.join(removed)}")
    process.wait_for_everyone()

    # A second train() in one process (notebooks, the demo, tests) may ask for another precision;
    # accelerate keeps a process-wide state that would refuse it. The process group is kept.
    from accelerate.state import AcceleratorState

    configure_kernels(tc.deterministic)  # before CUDA initialises: cuBLAS reads its workspace setting once
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision, log_with=None if tc.report_to == "none" else tc.report_to,
        project_dir=str(output_dir),
    )
    torch.manual_seed(tc.seed)
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")
        _start_trackers(accelerator, config)
        for line in notes:
            accelerator.print(f"sipo: {line}")
        accelerator.print(_run_header(config, dataset, output_dir))

    # Model: policy, and the frozen reference (LoRA: the same weights with adapters switched off).
    if adapter is None:
        adapter = adapter_from_config(config.model)
    adapter.freeze_encoders()
    reference_denoiser = None
    if tc.finetune == "lora":
        add_lora(adapter, config)
    else:
        adapter.denoiser.requires_grad_(True)
        reference_denoiser = copy.deepcopy(adapter.denoiser).requires_grad_(False).eval()
    if tc.gradient_checkpointing and hasattr(adapter.denoiser, "enable_gradient_checkpointing"):
        adapter.denoiser.enable_gradient_checkpointing()
    # Frozen weights in the compute dtype, trainable ones (and so the optimizer state) in float32.
    if tc.mixed_precision in COMPUTE_DTYPES:
        hold_frozen_weights_in(adapter, COMPUTE_DTYPES[tc.mixed_precision],
                               [reference_denoiser] if reference_denoiser is not None else [])
    if config.model.encode_chunk_size is not None:
        adapter.encode_chunk_size = config.model.encode_chunk_size
    # A matching latent cache replaces the encoders: they stay on the CPU, unused.
    from sipo.data.cache import open_cache_for_training

    cached = open_cache_for_training(config, dataset, log=accelerator.print)
    if cached is not None:
        dataset = cached
        adapter.denoiser.to(accelerator.device)
    else:
        adapter.to(accelerator.device)
    if reference_denoiser is not None:
        reference_denoiser.to(accelerator.device)
    adapter.denoiser.train()

    trainable = _trainable_named(adapter.denoiser)
    optimizer = make_optimizer(list(trainable.values()), tc, accelerator.device)
    lr_scheduler = _lr_scheduler(config, optimizer)
    model, optimizer = accelerator.prepare(adapter.denoiser, optimizer)
    # Forward calls go through the compiled module; DDP's no_sync and unwrapping use `model`.
    forward_model = torch.compile(model) if tc.compile else model

    def reference_predict(x_t: Tensor, t: Tensor, cond) -> Tensor:
        if reference_denoiser is not None:
            return adapter.predict(x_t, t, cond, denoiser=reference_denoiser)
        with lora_disabled(forward_model):
            return adapter.predict(x_t, t, cond, denoiser=forward_model)

    # Randomness of t and eps: one CPU generator per process, saved in every checkpoint.
    generator = torch.Generator().manual_seed(tc.seed * 1009 + accelerator.process_index)
    state = TrainState()
    num_buckets = oc.ema_buckets
    state.ema = torch.full((num_buckets,), float("nan"), dtype=torch.float64)
    state.ema_seen = torch.zeros(num_buckets, dtype=torch.bool)
    history: list[dict[str, float]] = []
    metrics_path = output_dir / "metrics.jsonl"
    if resume_from is not None:
        state = load_checkpoint(resume_from, trainable, optimizer, lr_scheduler, generator)
        restore_device_rng(resume_from, accelerator.device)
        if metrics_path.is_file():
            history = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["step"] <= state.step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    elif accelerator.is_main_process and metrics_path.exists():
        metrics_path.unlink()
    first_micro_batch = state.micro_batches  # data consumed before this call (a resume's position)

    block_ids = dataset.row_group_ids() if config.data.shuffle == "block" and hasattr(dataset, "row_group_ids") else None
    sampler = ResumableBatchSampler(
        DataOrder(len(dataset), tc.seed, block_ids), tc.batch_size, state.micro_batches,
        accelerator.process_index, accelerator.num_processes,
    )
    pin = accelerator.device.type == "cuda"  # pinned host memory: copies to the GPU need not wait
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=getattr(dataset, "collate", collate_pairs),
        num_workers=config.data.num_workers, pin_memory=pin,
    ))
    num_train_timesteps = adapter.schedule.num_train_timesteps

    # Per-step metrics stay device tensors until they are logged: no host synchronisation per
    # micro-step, one per optimizer step (the finite check that decides whether to step).
    window: list[Tensor] = []
    weight_log: list[tuple[Tensor, Tensor]] = []
    clock = StepClock(state.step)
    window_pairs = 0
    bar = tqdm(total=tc.max_steps, initial=state.step, desc=f"{oc.name} train", unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    while state.step < tc.max_steps:
        step_terms: list[PairTerms] = []
        step_keep: list[Tensor] = []
        step_weights: list[Tensor] = []
        losses: list[Tensor] = []
        beta = step_beta(oc.beta, oc.beta_mode, state.auto_beta_ema, oc.target_gradient_factor, oc.beta_min, oc.beta_max)
        for micro in range(tc.gradient_accumulation_steps):
            batch = next(loader)
            state.micro_batches += 1
            state.skipped_rows += len(batch["skipped"])
            dataset.report.record(batch)
            if not batch["indices"]:
                continue  # every row of this micro-batch was malformed; counted above
            window_pairs += len(batch["indices"])
            encoded = _encoded_batch(adapter, batch, accelerator.device)
            noise = _to_device(draw_pair_noise(encoded.x0_winner.shape, num_train_timesteps, generator), accelerator.device)
            last_micro = micro == tc.gradient_accumulation_steps - 1
            # Under DDP, gradients are all-reduced only on the last micro-step of the accumulation.
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                with accelerator.autocast():
                    terms = compute_pair_terms(
                        adapter, encoded, noise, beta=beta, reference_predict=reference_predict,
                        denoiser=forward_model, weight_norm=oc.weight_norm, pair_weight=oc.pair_weight,
                        weight_model=oc.weight_model, weight_step=oc.weight_step, objective=oc.pair_settings(),
                    )
                    weight = _pair_weight(terms, state, oc.weight_source, num_train_timesteps, oc.ema_decay)
                    loss, keep, effective_weight = objective_loss(terms, weight, **oc.loss_settings(beta))
                accelerator.backward(loss / tc.gradient_accumulation_steps)
            losses.append(loss.detach().float())
            step_terms.append(terms)
            step_keep.append(keep)
            step_weights.append(effective_weight)

        grad_norm = accelerator.clip_grad_norm_(
            list(trainable.values()), tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
        ) if step_terms else torch.tensor(0.0)
        # The one host synchronisation of the step: whether the loss and the gradient are finite,
        # and how many micro-batches had every pair masked.
        loss_finite, grad_finite, all_masked = _step_flags(losses, grad_norm, step_keep)
        state.all_masked_batches += all_masked
        finite = loss_finite and grad_finite
        if finite:
            optimizer.step()
            state.consecutive_bad_steps = 0
        elif loss_finite and accelerator.scaler is not None:
            # fp16: an overflowing gradient with a finite loss is the loss scaler's normal search for
            # its scale; its step() skips the update and lowers the scale. Not a divergence.
            optimizer.step()
            finite = True
        else:
            state.bad_steps += 1
            state.consecutive_bad_steps += 1
        optimizer.zero_grad(set_to_none=True)
        if oc.beta_mode == "auto":  # every process calls it: the mean |delta| is all-reduced
            state.auto_beta_ema = update_auto_beta(state.auto_beta_ema, step_terms, oc.auto_beta_decay, accelerator.device)
        lr_scheduler.step()
        state.step += 1
        bar.update(1)

        if not finite and state.consecutive_bad_steps >= tc.max_bad_steps:
            bucket = _worst_bucket(step_terms, num_train_timesteps)
            raise SipoError(
                f"stopped at step {state.step}: {state.consecutive_bad_steps} optimizer steps in a row had a "
                f"non-finite loss or gradient (timesteps {bucket}); {_divergence_advice(output_dir)}"
            )
        weight_log.extend((t.timesteps.detach(), t.log_w_pair.detach()) for t in step_terms)
        if step_terms:
            window.append(_step_metrics(step_terms, step_keep, step_weights, losses, grad_norm, finite, beta))
        if step_callback is not None:
            step_callback(state.step, adapter)
        if state.step % tc.log_every == 0 or state.step == tc.max_steps:
            record = _summarise(window, state, lr_scheduler.get_last_lr()[0])
            record.update(clock.lap(state.step, window_pairs * accelerator.num_processes, accelerator.device))
            window, window_pairs = [], 0
            if accelerator.is_main_process and weight_log:
                weight_log = [(t.cpu(), w.cpu()) for t, w in weight_log]
                _log_weight_histogram(accelerator, weight_log, num_train_timesteps, oc.ema_buckets, state.step)
            weight_log = []
            history.append(record)
            if accelerator.is_main_process:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", acc=f"{record.get('implicit_acc', float('nan')):.2f}",
                                masked=f"{record.get('masked_fraction', float('nan')):.2f}",
                                pairs_s=f"{record['pairs_per_s']:.1f}")
        # No checkpoint while steps are failing: the last good one must stay the newest.
        if (tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and state.step < tc.max_steps
                and state.consecutive_bad_steps == 0):
            if accelerator.is_main_process:
                save_checkpoint(output_dir, trainable, optimizer, lr_scheduler, state, generator, tc.keep_last,
                                fingerprint, device=accelerator.device)
            accelerator.wait_for_everyone()
    bar.close()

    # Epilogue: the data summary always; weights and a model card only when some pair was used.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (output_dir / "data_report.json").write_text(json.dumps(dataset.report.to_dict(), indent=2))
        accelerator.print(f"data: {dataset.report}")
        if dataset.report.used == 0 and state.micro_batches > first_micro_batch:
            accelerator.end_training()
            raise SipoError(
                f"no usable pair in {config.data.path}: every row read was skipped ({dataset.report.skip_summary()}), "
                f"so no weights were written; fix the rows listed in {output_dir / 'data_report.json'}"
            )
        save_checkpoint(output_dir, trainable, optimizer, lr_scheduler, state, generator, tc.keep_last, fingerprint,
                        device=accelerator.device)
        unwrapped = accelerator.unwrap_model(model)
        try:
            if tc.finetune == "lora":
                from peft.utils import get_peft_model_state_dict

                adapter.save_lora(output_dir, get_peft_model_state_dict(unwrapped))
            else:
                adapter.save_full(output_dir)
            _write_model_card(output_dir, config, state)
        except Exception as error:
            if not is_write_failure(error):
                raise
            raise write_error(error, f"the final weights into {output_dir}", disk_is_full(error, output_dir),
                              "run again with --resume (the final checkpoint is saved)") from None
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, steps=state.step, history=history, adapter=adapter)


def _pair_weight(terms: PairTerms, state: TrainState, weight_source: str, num_train_timesteps: int, decay: float) -> Tensor:
    """``w = exp(log_w_pair)``, or its per-timestep-bucket EMA (SPEC 5); undefined weights stay NaN."""
    # exp(88) already overflows float32; a weight that large must be clipped, not read as non-finite
    # and masked (possible with weight_norm=sum, where log w scales with the element count).
    weight = terms.log_w_pair.double().clamp(max=80.0).exp()
    if weight_source == "sample":
        return weight.float()
    buckets = objectives.timestep_bucket(terms.timesteps.cpu(), num_train_timesteps, state.ema.shape[0])
    state.ema, state.ema_seen = objectives.update_timestep_ema(state.ema, state.ema_seen, buckets, weight.cpu(), decay)
    smoothed = state.ema[buckets].to(weight.device)
    return torch.where(torch.isfinite(weight), smoothed, weight).float()


#: the per-step metrics, in the order ``_step_metrics`` stacks them
STEP_METRICS = ("loss", "implicit_acc", "reward_margin", "err_winner", "err_loser", "ref_err_winner", "ref_err_loser",
                "kl_proxy", "masked_fraction", "mean_weight", "mean_log_w_pair", "grad_norm", "finite",
                "beta", "gradient_factor", "negative_margin_fraction")


def _encoded_batch(adapter: DiffusionAdapter, batch: dict[str, Any], device: torch.device) -> EncodedPairs:
    """A batch in model space: from the latent cache as is, or through the frozen encoders."""
    if "x0_chosen" in batch:
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return EncodedPairs(move(batch["x0_chosen"]), move(batch["x0_rejected"]),
                            {k: move(v) for k, v in batch["conditioning"].items()})
    extra = {"size_info": batch["size_info"]} if batch.get("size_info") is not None else {}
    with torch.no_grad():
        return adapter.encode(batch["prompts"], batch["chosen"].to(device, non_blocking=True),
                              batch["rejected"].to(device, non_blocking=True), **extra)


def _to_device(noise: PairNoise, device: torch.device) -> PairNoise:
    """The CPU-drawn noise on the device; from pinned memory on CUDA, so the copy does not block the host."""
    if device.type != "cuda":
        return noise
    return PairNoise(*(x.pin_memory().to(device, non_blocking=True) for x in (noise.timesteps, noise.eps, noise.posterior_noise)))


def _step_flags(losses: list[Tensor], grad_norm, keeps: list[Tensor]) -> tuple[bool, bool, int]:
    """(every loss finite, gradient norm finite, micro-batches with every pair masked) in one transfer."""
    if not losses:
        return True, True, 0
    flags = torch.stack([
        torch.isfinite(torch.stack(losses)).all().float(),
        torch.isfinite(torch.as_tensor(grad_norm, device=losses[0].device)).float(),
        torch.stack([~k.any() for k in keeps]).sum().float(),
    ]).tolist()
    return bool(flags[0]), bool(flags[1]), int(flags[2])


def _step_metrics(terms: list[PairTerms], keeps: list[Tensor], weights: list[Tensor], losses: list[Tensor],
                  grad_norm, finite: bool, beta: float = float("nan")) -> Tensor:
    """The step's metrics (``STEP_METRICS``) as one device tensor; read on the host only when logged."""
    cat = lambda name: torch.cat([getattr(t, name).detach().float() for t in terms])  # noqa: E731
    z = cat("z")
    err_winner, err_loser = cat("err_winner"), cat("err_loser")
    ref_err_winner, ref_err_loser = cat("ref_err_winner"), cat("ref_err_loser")
    log_w_pair = cat("log_w_pair")
    keep = torch.cat(keeps)
    weight = torch.cat([w.detach().float() for w in weights])
    return torch.stack([
        torch.stack(losses).mean(),
        (z > 0).float().mean(),
        z.mean(),
        err_winner.mean(),
        err_loser.mean(),
        ref_err_winner.mean(),
        ref_err_loser.mean(),
        ((err_winner + err_loser) - (ref_err_winner + ref_err_loser)).mean() / 2,
        1.0 - keep.float().mean(),
        _finite_mean(weight),
        _finite_mean(log_w_pair),
        torch.as_tensor(grad_norm, device=z.device).float(),
        torch.tensor(float(finite), device=z.device),
        torch.tensor(float(beta), device=z.device),
        torch.sigmoid(-z).mean(),  # the gradient factor of -logsigmoid(z) (docs/spec.md section 9)
        (z < 0).float().mean(),
    ])


def _finite_mean(values: Tensor) -> Tensor:
    """Mean of the finite entries, NaN when there are none (no host synchronisation)."""
    finite = torch.isfinite(values)
    total = torch.where(finite, values, torch.zeros_like(values)).sum()
    return total / finite.sum()  # 0/0 = NaN when nothing is finite


def _summarise(window: list[Tensor], state: TrainState, lr: float) -> dict[str, float]:
    record: dict[str, float] = {"step": state.step}
    if window:
        rows = torch.stack(window).cpu().tolist()  # the window's one device -> host transfer
        for column, key in enumerate(STEP_METRICS):
            values = [row[column] for row in rows if math.isfinite(row[column])]
            record[key] = sum(values) / len(values) if values else float("nan")
    record.update(lr=lr, bad_steps=state.bad_steps, all_masked_batches=state.all_masked_batches,
                  skipped_rows=state.skipped_rows)
    return record


def _log_weight_histogram(accelerator, weight_log, num_train_timesteps: int, num_buckets: int, step: int) -> None:
    """TensorBoard: histogram of log w over the window, and its mean per timestep bucket (SPEC 4)."""
    timesteps = torch.cat([t for t, _ in weight_log])
    log_w = torch.cat([w for _, w in weight_log])
    finite = torch.isfinite(log_w)
    if not finite.any():
        return
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return
    if not hasattr(writer, "add_histogram"):  # train.report_to is not tensorboard
        return
    writer.add_histogram("weights/log_w_pair", log_w[finite].numpy(), step)
    buckets = objectives.timestep_bucket(timesteps, num_train_timesteps, num_buckets)
    for bucket in buckets[finite].unique().tolist():
        selected = finite & (buckets == bucket)
        writer.add_scalar(f"weights_by_bucket/log_w_t{bucket * num_train_timesteps // num_buckets:04d}",
                          float(log_w[selected].mean()), step)


def _worst_bucket(terms: list[PairTerms], num_train_timesteps: int) -> str:
    if not terms:
        return "unknown: every row of the batch was skipped"
    timesteps = torch.cat([t.timesteps.cpu() for t in terms])
    bad = torch.cat([~torch.isfinite(t.loss_pair.detach().cpu()) for t in terms])
    chosen = timesteps[bad] if bad.any() else timesteps
    low = int(chosen.min()) * 20 // num_train_timesteps * num_train_timesteps // 20
    return f"{int(chosen.min())}-{int(chosen.max())}, bucket starting at t={low}"


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
