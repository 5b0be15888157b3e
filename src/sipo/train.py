"""The training loop: read it top to bottom.

``train()`` sets a run up with one named function per concern (checks before any write, the
accelerator, the model and its reference, the optimizer, the state, the data), then runs a loop
that calls :func:`training_step` (the micro-batches: encode, draw t/eps, per-pair terms, objective,
backward of its sums, then the step's one normaliser), :func:`optimizer_step` (finite check, clip,
step) and the hooks: the divergence guard, metrics, callbacks (validation and sampling plug in
here), checkpoints and the stop signals. One code path serves DPO, +mask, +clip, +reweight, C&M and
SIPO: the objective switches only change how ``objectives.preference_loss_sums`` sums the per-pair
losses; every sum runs over the optimizer step's whole batch (docs/method.md).

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
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from sipo import objectives, rundir
from sipo.checkpoints import (
    TrainState, checkpoint_step, disk_is_full, is_write_failure, list_checkpoints, load_checkpoint, run_fingerprint,
    save_checkpoint, write_error,
)
from sipo.config import SipoConfig, check_against_model, check_values, save_config
from sipo.data.order import DataOrder, ResumableBatchSampler
from sipo.errors import SipoError, TrainingInterrupted
from sipo.export import check_comfyui_family, write_checkpoint_formats, write_lora_formats
from sipo.models import DiffusionAdapter, adapter_from_config, add_lora
from sipo.models.base import hold_frozen_weights_in, store_frozen_base_in
from sipo.performance import (
    COMPUTE_DTYPES, StepClock, check_precision_for_device, compile_denoiser, configure_autotuning, configure_kernels,
    make_optimizer, offload_frozen_base, restore_device_rng, use_channels_last,
)
from sipo.validation import VALIDATION_LOG, PairSubset, open_held_out, validation_hook, validation_prompts
from sipo.preference import (
    PairLossSettings, PairNoise, PairTerms, StepStatistics, compute_pair_terms, draw_step_noise, encoded_batch,
    global_mean, implicit_rewards, objective_sums, reference_predictor, step_beta, update_auto_beta,
)
from sipo.preference import batch_pair_noise  # objective.noise (docs/spec.md section 11)

#: ``callback(step, adapter)``, called after every optimizer step (benchmarks time steps with it,
#: tests inject faults with it, validation and sampling hook in the same way)
StepCallback = Callable[[int, DiffusionAdapter], None]


@dataclass
class TrainResult:
    """What :func:`train` returns: where the run is, how many optimizer steps it holds, the logged
    metrics (one dict per log point, as in ``metrics.jsonl``) and the trained adapter."""

    output_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    adapter: DiffusionAdapter | None = None


@dataclass
class Plan:
    """The outcome of the checks: nothing has been written when it exists."""

    output_dir: Path
    dataset: Any
    fingerprint: dict[str, Any]
    resume_from: Path | None
    damaged: list[Path]
    notes: list[str]
    created_dir: bool  # the checks made output_dir: a run that fails before its first step removes it
    held_out: Any = None  # held-out pairs (data.validation_path / validation_fraction), or None
    train_indices: list[int] | None = None  # with validation_fraction: the pairs left to train on
    held_out_indices: list[int] | None = None

    @property
    def start_step(self) -> int:
        return checkpoint_step(self.resume_from) if self.resume_from is not None else 0


@dataclass
class Run:
    """Everything the loop reads and updates, built by the set-up functions below."""

    config: SipoConfig
    plan: Plan
    accelerator: Any
    adapter: DiffusionAdapter
    model: nn.Module  # the accelerate-prepared denoiser (DDP's no_sync and unwrapping use it)
    forward_model: nn.Module  # what forward calls go through: ``model``, compiled when train.compile
    reference_predict: Callable[[Tensor, Tensor, Any], Tensor]
    trainable: dict[str, nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    state: TrainState
    dataset: Any
    loader: Iterator[dict[str, Any]]
    history: list[dict[str, float]]
    validation: Any  # sipo.validation.Validation, or its no-op twin
    metrics: "MetricsWindow"
    first_micro_batch: int  # data consumed before this call (a resume's position)
    first_step: int  # the step this call started from
    masked_in_a_row: int = 0  # pairs masked since the start while none was kept (-1: one was kept)
    stop: Any = None  # the run's _StopSignals: validation reads it to cut itself short
    final_checkpoint: Path | None = None  # written before the end-of-run validation (write_final_checkpoint)

    @property
    def output_dir(self) -> Path:
        return self.plan.output_dir

    @property
    def num_train_timesteps(self) -> int:
        return self.adapter.schedule.num_train_timesteps


@dataclass
class StepOutput:
    """One optimizer step's micro-batches: per-pair terms, mask, weights and sums stay on the device.

    ``loss``, ``global_pairs`` and ``global_kept`` are the step's whole batch (every micro-batch on every
    process, one all-reduce in :func:`normalise_step`): the same values on every process."""

    terms: list[PairTerms] = field(default_factory=list)
    keeps: list[Tensor] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    sums: list[objectives.LossSums] = field(default_factory=list)  # each micro-batch's two sums (SPEC 4-5)
    mask_weights: list[Tensor] = field(default_factory=list)  # the pair weights the mask compared with tau
    beta: float = float("nan")  # the step's beta (objective.beta_mode=auto sets it per step)
    statistics: StepStatistics | None = None  # alpha-DPO / KTO statistics measured before any backward
    pairs: int = 0  # this process's pairs
    loss: Tensor | None = None  # the step's loss: summed numerators / max(floor, summed denominators)
    global_pairs: Any = 0  # pairs of the whole step, every process (a device tensor until _step_flags reads it)
    global_kept: Any = 0  # kept pairs of the whole step (a device tensor)
    kept_pairs: int = 0  # global_kept, read on the host once per step
    grad_norm: Any = None
    finite: bool = True

    def add(self, terms: PairTerms, sums: objectives.LossSums, keep: Tensor, effective_weight: Tensor,
            mask_weight: Tensor) -> None:
        """One micro-batch's results, detached (the backward uses the caller's ``sums``)."""
        self.terms.append(terms)
        self.sums.append(objectives.LossSums(sums.numerator.detach().float(), sums.denominator.float(), sums.floor))
        self.keeps.append(keep)
        self.weights.append(effective_weight)
        self.mask_weights.append(mask_weight.detach())


# ----------------------------------------------------------------------------- the loop
def train(
    config: SipoConfig,
    resume: bool = False,
    step_callback: StepCallback | None = None,
    progress: bool = True,
    adapter: DiffusionAdapter | None = None,
    overwrite: bool = False,
    callbacks: Sequence[StepCallback] = (),
) -> TrainResult:
    """Train per ``config`` into a fresh ``train.output_dir``.

    ``resume`` continues the run already there from its newest intact checkpoint; ``overwrite``
    replaces the run already there (only the files a sipo run wrote). Without either, a directory
    holding a run stops the call. ``adapter`` replaces the model ``config`` names (an in-memory
    model: the demo, notebooks); ``callbacks`` (and ``step_callback``) run after every optimizer
    step. SIGTERM or SIGINT finish the current step, write a checkpoint and raise
    :class:`sipo.errors.TrainingInterrupted`; before the first step they stop there (nothing trained),
    in the end-of-run validation they cut it short (the final checkpoint is already written) and the
    call returns with the final weights.
    """
    from tqdm.auto import tqdm

    plan = check_run(config, resume, overwrite, check_model=adapter is None)
    callbacks = [*callbacks, *([step_callback] if step_callback is not None else [])]
    tc = config.train
    # The stop signals are honoured from the set-up to the last file: a signal during the set-up or the
    # step-0 validation stops before the first step, one during a step after that step (with a
    # checkpoint), one during the end-of-run validation cuts it short (the final checkpoint is written
    # before it), one during the final save lets it finish.
    with rundir.claim(plan.output_dir, resume, overwrite, plan.damaged, plan.created_dir) as claim, \
            stop_signals() as stop:
        plan.notes += claim.notes
        run = set_up(config, plan, adapter)
        run.stop = stop
        claim.watch(run)
        start_writing(run)
        bar = tqdm(total=tc.max_steps, initial=run.state.step, desc=f"{config.objective.name} train", unit="step",
                   disable=not (progress and run.accelerator.is_main_process), dynamic_ncols=True)
        run.validation.at_start(run)
        if stop.agreed(run.accelerator):
            raise interrupted(run, stop.signum)
        step = None
        while run.state.step < tc.max_steps:
            step = training_step(run)
            optimizer_step(run, step)
            bar.update(1)
            guard_divergence(run, step)
            run.metrics.add(run, step)
            for callback in callbacks:
                callback(run.state.step, run.adapter)
            if run.state.step % tc.log_every == 0 or run.state.step == tc.max_steps:
                log_metrics(run, bar)
            guard_all_masked(run, step)  # after logging: the masked steps stay in metrics.jsonl
            run.validation.after_step(run, step)  # held-out pairs, samples, best/ (sipo.validation)
            checkpoint_if_due(run)
            if stop.agreed(run.accelerator) and run.state.step < tc.max_steps:
                raise interrupted(run, stop.signum)
        bar.close()
        write_final_checkpoint(run)
        run.validation.at_end(run, step)
        cut_short = stop.agreed(run.accelerator)
        finish(run)
        if cut_short and run.accelerator.is_main_process:
            print(f"sipo: {signal_name(stop.signum)} arrived at the end of the run; the end-of-run validation was cut "
                  f"short, and the final checkpoint and weights of step {run.state.step} are saved", flush=True)
    return TrainResult(output_dir=run.output_dir, steps=run.state.step, history=run.history, adapter=run.adapter)


def training_step(run: Run) -> StepOutput:
    """The micro-batches of one optimizer step: per-pair terms, objective, backward of the un-normalised sums;
    then the step's one normaliser divides the accumulated gradient (SPEC 4-5, docs/method.md)."""
    tc, oc, accelerator = run.config.train, run.config.objective, run.accelerator
    step = StepOutput(beta=step_beta(oc.beta, oc.beta_mode, run.state.auto_beta_ema, oc.target_gradient_factor,
                                     oc.beta_min, oc.beta_max))
    micro_batches = step_micro_batches(run, step)
    if oc.pair_settings().uses_step_statistic and tc.gradient_accumulation_steps > 1:
        micro_batches = list(micro_batches)  # read and encoded once, used by both passes
        step.statistics = step_statistics(run, micro_batches, step.beta)
    single = tc.gradient_accumulation_steps == 1
    for micro, encoded, noise in micro_batches:
        # Under DDP, gradients are all-reduced only on the last micro-step of the accumulation.
        last_micro = micro == tc.gradient_accumulation_steps - 1
        with contextlib.nullcontext() if last_micro else accelerator.no_sync(run.model):
            with accelerator.autocast():
                terms = compute_pair_terms(
                    run.adapter, encoded, noise, beta=step.beta, reference_predict=run.reference_predict,
                    denoiser=run.forward_model, weight_norm=oc.weight_norm, pair_weight=oc.pair_weight,
                    weight_model=oc.weight_model, weight_step=oc.weight_step, objective=oc.pair_settings(),
                    statistics=step.statistics,
                )
                weight = pair_weight(terms, run.state, oc.weight_source, run.num_train_timesteps, oc.ema_decay,
                                     accelerator)
                sums, keep, effective_weight = objective_sums(terms, weight, **oc.loss_settings(step.beta))
            step.add(terms, sums, keep, effective_weight, weight)
            # one micro-batch: its normaliser is known before the backward (DeepSpeed steps inside it)
            accelerator.backward(sums.numerator * (normalise_step(run, step) if single else 1.0))
    if step.loss is None:  # accumulated: the step's one normaliser divides the summed gradient
        scale_gradients(run.trainable, normalise_step(run, step))
    return step


def step_micro_batches(run: Run, step: StepOutput) -> Iterator[tuple[int, Any, PairNoise]]:
    """``(micro, encoded pairs, their t and noise)`` for each of the step's micro-batches on this process.

    A pair's noise is keyed by its place in the step's global batch, ``(micro * processes + rank) *
    batch_size + row`` (the order ``DataOrder`` hands pairs out in), so every layout of the same global
    batch draws the same noise for the same pair (:func:`sipo.preference.draw_step_noise`).
    """
    tc, oc, accelerator = run.config.train, run.config.objective, run.accelerator
    for micro in range(tc.gradient_accumulation_steps):
        batch = next(run.loader)
        run.state.micro_batches += 1
        run.state.skipped_rows += len(batch["skipped"])
        run.dataset.report.record(batch)
        if not batch["indices"]:
            continue  # every row of this micro-batch was malformed; counted above
        step.pairs += len(batch["indices"])
        encoded = encoded_batch(run.adapter, batch, accelerator.device)
        first = (micro * accelerator.num_processes + accelerator.process_index) * tc.batch_size
        rows = batch.get("rows", range(len(batch["indices"])))
        noise = draw_step_noise(encoded.x0_winner.shape, run.num_train_timesteps, tc.seed, run.state.step,
                                [first + row for row in rows], **oc.timestep_settings())
        noise = batch_pair_noise(noise, batch, oc.noise, oc.reward_beta)  # stored noise, reward-scaled beta (docs/pairs.md)
        noise = _to_device(noise, accelerator.device)
        if tc.compile and run.state.step == run.first_step and micro == 0 and accelerator.num_processes == 1:
            check_compiled_gradients(run, encoded, noise, step.beta)
        yield micro, encoded, noise


def step_statistics(run: Run, micro_batches: list, beta: float) -> StepStatistics:
    """alpha-DPO's ``mean sigmoid(z)`` and KTO's mean implicit reward over the step's whole batch, before any backward.

    They enter each pair's loss nonlinearly, so the exact step needs them first: a no-grad forward of policy
    and reference over the step's micro-batches (the encoded batches are kept for the second pass), one
    all-reduce each. Cost: about one more forward of both models per micro-batch, for these two objectives
    and only when ``gradient_accumulation_steps > 1`` (with one micro-batch the statistic comes from that
    micro-batch's own forward, as exact and free).
    """
    oc, accelerator = run.config.objective, run.accelerator
    z, rewards = [], []
    with torch.no_grad(), accelerator.autocast():
        for _, encoded, noise in micro_batches:
            # plain DPO terms: the same z and errors, without the statistic being measured
            terms = compute_pair_terms(run.adapter, encoded, noise, beta=beta, reference_predict=run.reference_predict,
                                       denoiser=run.forward_model, weight_norm=oc.weight_norm,
                                       pair_weight=oc.pair_weight, weight_model=oc.weight_model,
                                       weight_step=oc.weight_step, objective=PairLossSettings())
            z.append(torch.sigmoid(terms.z.float()))
            rewards.append(implicit_rewards(terms.err_winner, terms.err_loser, terms.ref_err_winner,
                                            terms.ref_err_loser).float())
    empty = torch.zeros(0, device=accelerator.device)
    kind = oc.pair_settings().loss
    return StepStatistics(
        mean_sigmoid_z=global_mean(torch.cat(z) if z else empty) if kind == "alpha-dpo" else None,
        mean_implicit_reward=global_mean(torch.cat(rewards) if rewards else empty) if kind == "kto" else None,
    )


def normalise_step(run: Run, step: StepOutput) -> Tensor:
    """The step's ONE normaliser (SPEC 4-5): every sum runs over N processes x G micro-batches x B pairs.

    One all-reduce totals the micro-batches' numerators, denominators, pairs and kept pairs on every process;
    sets the step's loss ``numerator / max(floor, denominator)`` and returns the factor that turns the
    backpropagated numerators into its gradient, ``N / max(floor, denominator)`` (N: DDP averages the
    processes' gradients). Exact: the mask and the weights in the denominator are detached.
    """
    from accelerate.utils import reduce

    device = run.accelerator.device
    zero = torch.zeros((), device=device)
    local = torch.stack([
        torch.stack([s.numerator for s in step.sums]).sum() if step.sums else zero,
        torch.stack([s.denominator for s in step.sums]).sum() if step.sums else zero,
        torch.tensor(float(step.pairs), device=device),
        torch.cat(step.keeps).sum().float() if step.keeps else zero,
    ]).to(device=device, dtype=torch.float32)
    numerator, denominator, step.global_pairs, step.global_kept = reduce(local, reduction="sum")
    normaliser = denominator.clamp(min=step.sums[0].floor if step.sums else 1.0)
    step.loss = numerator / normaliser
    return run.accelerator.num_processes / normaliser


def scale_gradients(trainable: dict[str, nn.Parameter], factor: Tensor) -> None:
    """Multiply the accumulated gradients by ``factor`` (a device scalar: no host synchronisation)."""
    grads = [p.grad for p in trainable.values() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))


#: per trainable tensor, |compiled grad - eager grad| above this fraction of |eager grad| is a miscompile
#: (the two differ by rounding only, a few percent at most in bf16; a dropped path differs by 100%)
COMPILED_GRADIENT_TOLERANCE = 0.25


def check_compiled_gradients(run: Run, encoded, noise, beta: float) -> None:
    """``train.compile``: the compiled denoiser's gradients equal the eager ones, checked once, on the first
    micro-batch, before any weight moves (issue 30 item 2).

    torch.compile of a whole SD1.5 UNet (``compile_scope=model``, inductor on the CPU, torch 2.13)
    returned zero gradients for the mid block's LoRA and wrong ones below it, while the forward
    values and ``compile_scope=blocks`` were right; a compiler fault of that kind would train the
    wrong model without a sign. The check differentiates the policy's errors on the pairs (the
    denoiser's output, whatever the objective) with the compiled graphs and again with
    ``torch.compiler.set_stance("force_eager")``, and stops with one sentence where any trainable
    tensor's gradient differs by more than ``COMPILED_GRADIENT_TOLERANCE`` of its eager norm.
    One process only (under DDP a second backward would meet the reducer)."""
    oc, tc = run.config.objective, run.config.train
    names, params = list(run.trainable), list(run.trainable.values())

    def gradients(stance: str) -> list[Tensor]:
        with torch.compiler.set_stance(stance), torch.random.fork_rng(), run.accelerator.autocast():
            terms = compute_pair_terms(
                run.adapter, encoded, noise, beta=beta, reference_predict=run.reference_predict,
                denoiser=run.forward_model, weight_norm=oc.weight_norm, pair_weight=oc.pair_weight,
                weight_model=oc.weight_model, weight_step=oc.weight_step, objective=oc.pair_settings())
            errors = (terms.err_winner.float() + terms.err_loser.float()).sum()
        if not errors.requires_grad:  # the compiled graph lost every path to the weights
            return [torch.zeros_like(p, dtype=torch.float32) for p in params]
        grads = torch.autograd.grad(errors, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach().float() for p, g in zip(params, grads)]

    compiled, eager = gradients("default"), gradients("force_eager")
    eager_norms = [float(e.norm()) for e in eager]
    scale = max(eager_norms, default=0.0)
    wrong = [(name, e_norm, float(c.norm())) for name, c, e, e_norm in zip(names, compiled, eager, eager_norms)
             if float((c - e).norm()) > COMPILED_GRADIENT_TOLERANCE * e_norm + 1e-6 * scale]
    if wrong:
        name, e_norm, c_norm = wrong[0]
        raise SipoError(
            f"train.compile_scope={tc.compile_scope}: torch.compile computed other gradients than the eager model for "
            f"{len(wrong)} of {len(names)} trainable tensors on the first batch (e.g. {name}: norm {c_norm:.3g} "
            f"compiled, {e_norm:.3g} eager), a fault of torch {torch.__version__}'s compiler on "
            f"{run.accelerator.device.type}, and would train another model than the one set; set "
            "train.compile_scope=blocks (its regional graphs compute the eager gradients) or train.compile=false")


def optimizer_step(run: Run, step: StepOutput) -> None:
    """Clip, then step only when the loss and the gradient are finite; advance the schedule and the counters."""
    tc, state, accelerator = run.config.train, run.state, run.accelerator
    step.grad_norm = accelerator.clip_grad_norm_(
        list(run.trainable.values()), tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
    ) if step.terms else torch.tensor(0.0)
    # The one host synchronisation of the step: whether the loss and the gradient are finite, and how many
    # pairs the whole step (every process) had and kept.
    loss_finite, grad_finite, step.kept_pairs, step.global_pairs = _step_flags(step.loss, step.grad_norm,
                                                                               step.global_kept, step.global_pairs)
    state.all_masked_batches += int(step.global_pairs > 0 and step.kept_pairs == 0)  # the whole step masked
    step.finite = loss_finite and grad_finite
    if step.finite:
        run.optimizer.step()
        state.consecutive_bad_steps = 0
    elif loss_finite and accelerator.scaler is not None:
        # fp16: an overflowing gradient with a finite loss is the loss scaler's normal search for
        # its scale; its step() skips the update and lowers the scale. Not a divergence.
        run.optimizer.step()
        step.finite = True
    else:
        state.bad_steps += 1
        state.consecutive_bad_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    if run.config.objective.beta_mode == "auto":  # every process calls it: the mean |delta| is all-reduced
        oc = run.config.objective
        state.auto_beta_ema = update_auto_beta(state.auto_beta_ema, step.terms, oc.auto_beta_decay, accelerator.device,
                                               configured_beta=oc.beta, target_gradient_factor=oc.target_gradient_factor)
    run.lr_scheduler.step()
    state.step += 1


def guard_divergence(run: Run, step: StepOutput) -> None:
    """Stop after ``train.max_bad_steps`` non-finite steps in a row, naming the timesteps and the way out."""
    state = run.state
    if not step.finite and state.consecutive_bad_steps >= run.config.train.max_bad_steps:
        bucket = _worst_bucket(step.terms, run.num_train_timesteps)
        raise SipoError(
            f"stopped at step {state.step}: {state.consecutive_bad_steps} optimizer steps in a row had a "
            f"non-finite loss or gradient (timesteps {bucket}); {_divergence_advice(run.output_dir)}"
        )


#: pairs in a row that every one masked before a run stops as useless (at a masked fraction of 0.8
#: a healthy run meets this with probability 0.8**64 ~ 6e-7)
ALL_MASKED_PATIENCE_PAIRS = 64


def guard_all_masked(run: Run, step: StepOutput) -> None:
    """Stop a run whose mask keeps no pair: each of its first 64 pairs fell below ``objective.tau`` or
    outside ``[t_min, t_max]``, so nothing is learned. (A shorter run that keeps none is told so at its end.)"""
    if step.kept_pairs:  # the step's kept pairs on every process: every process decides alike
        run.masked_in_a_row = -1  # some pair was kept: the guard has done its job for this run
    if run.masked_in_a_row < 0 or not step.global_pairs:
        return
    run.masked_in_a_row += step.global_pairs
    if run.masked_in_a_row >= ALL_MASKED_PATIENCE_PAIRS:
        oc = run.config.objective
        largest = torch.cat(step.mask_weights).nan_to_num(nan=0.0).max().item()
        raise SipoError(
            f"objective.tau={oc.tau} (with t_min={oc.t_min}, t_max={oc.t_max}) masked all {run.masked_in_a_row} pairs "
            f"of the first {run.state.step - run.first_step} steps, so the run learns nothing (the largest pair weight "
            f"in the last step was {largest:.3g}); lower objective.tau below that, widen [t_min, t_max], or set "
            "objective.mask=false"
        )


def log_metrics(run: Run, bar=None) -> dict[str, float]:
    """One record per log point: the window's means, lr, counters and throughput, to every sink."""
    accelerator = run.accelerator
    record = run.metrics.summarise(run)
    run.history.append(record)
    if accelerator.is_main_process:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=run.state.step)
        with open(run.output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                            acc=f"{record.get('implicit_acc', float('nan')):.2f}",
                            masked=f"{record.get('masked_fraction', float('nan')):.2f}",
                            pairs_s=f"{record['pairs_per_s']:.1f}")
    return record


def checkpoint_if_due(run: Run) -> None:
    """Every ``train.checkpoint_every`` steps; never while steps are failing (the last good one must stay newest)."""
    tc, state = run.config.train, run.state
    if (tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and state.step < tc.max_steps
            and state.consecutive_bad_steps == 0):
        write_checkpoint(run)


def write_checkpoint(run: Run) -> Path | None:
    """A resumable checkpoint of the current step (main process writes, every process waits)."""
    tc, accelerator = run.config.train, run.accelerator
    path = None
    if accelerator.is_main_process:
        path = save_checkpoint(run.output_dir, run.trainable, run.optimizer, run.lr_scheduler, run.state,
                               None, tc.keep_last, run.plan.fingerprint, device=accelerator.device)
        write_checkpoint_formats(path, run.trainable, run.config)  # beside the checkpoint, outside its manifest
    accelerator.wait_for_everyone()
    return path


def interrupted(run: Run, signum: int) -> TrainingInterrupted:
    """SIGTERM/SIGINT arrived: the step in flight has finished; checkpoint it and say how to continue."""
    import signal

    took_a_step = run.state.step > run.first_step  # else the newest checkpoint (if any) holds this step already
    path = write_checkpoint(run) if run.state.consecutive_bad_steps == 0 and took_a_step else None
    newest = list_checkpoints(run.output_dir)
    name = signal.Signals(signum).name
    if not took_a_step and not newest:
        message = (f"stopped by {name} before the first step, so nothing was trained; start again (add --overwrite "
                   "if the directory is kept)")
    elif newest:
        where = ("its checkpoint" if path is not None or checkpoint_step(newest[-1]) == run.state.step
                 else f"the last good checkpoint {newest[-1].name}")
        message = (f"stopped by {name} after step {run.state.step}; {where} is saved, continue with "
                   f"--resume (from {newest[-1].name})")
    else:
        message = f"stopped by {name} after step {run.state.step} before any checkpoint; start again with --overwrite"
    run.accelerator.end_training()
    return TrainingInterrupted(message, signum=signum, step=run.state.step)


def write_final_checkpoint(run: Run) -> Path | None:
    """The checkpoint of the last step, written before the end-of-run validation so that a signal or a
    crash during that validation loses no step; none when every row read was skipped (finish says so)."""
    accelerator, state = run.accelerator, run.state
    if run.dataset.report.used == 0 and state.micro_batches > run.first_micro_batch:
        return None
    if accelerator.is_main_process:
        run.final_checkpoint = save_checkpoint(
            run.output_dir, run.trainable, run.optimizer, run.lr_scheduler, state, None,
            run.config.train.keep_last, run.plan.fingerprint, device=accelerator.device)
        write_checkpoint_formats(run.final_checkpoint, run.trainable, run.config)
    else:
        run.final_checkpoint = run.output_dir / "checkpoints"  # the main process writes; the others only note it
    accelerator.wait_for_everyone()
    return run.final_checkpoint


def signal_name(signum: int | None) -> str:
    import signal

    return signal.Signals(signum).name if signum else "a signal"


def finish(run: Run) -> None:
    """The data summary always; the final checkpoint, weights and model card only when some pair was used."""
    config, accelerator, state, dataset = run.config, run.accelerator, run.state, run.dataset
    output_dir = run.output_dir
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        report = dataset.report.to_dict()
        if run.plan.held_out is not None:
            report["validation"] = {
                "source": config.data.validation_path or f"data.validation_fraction={config.data.validation_fraction}",
                "held_out_pairs": len(run.plan.held_out), "training_pairs": len(dataset)}
        (output_dir / "data_report.json").write_text(json.dumps(report, indent=2))
        accelerator.print(f"data: {dataset.report}")
        if run.masked_in_a_row > 0:
            accelerator.print(f"sipo: warning: the mask dropped all {run.masked_in_a_row} pairs of this run, so the "
                              "weights did not learn from them; lower objective.tau or set objective.mask=false")
        if run.final_checkpoint is None:  # no usable pair (write_final_checkpoint wrote none): no weights either
            accelerator.end_training()
            raise SipoError(
                f"no usable pair in {config.data.path}: every row read was skipped ({dataset.report.skip_summary()}), "
                f"so no weights were written; fix the rows listed in {output_dir / 'data_report.json'}"
            )
        unwrapped = accelerator.unwrap_model(run.model)
        try:
            if config.train.finetune == "lora":
                from peft.utils import get_peft_model_state_dict

                run.adapter.save_lora(output_dir, get_peft_model_state_dict(unwrapped))
                write_lora_formats(output_dir, config)
            else:
                run.adapter.save_full(output_dir)
            _write_model_card(output_dir, config, state)
        except Exception as error:
            if not is_write_failure(error):
                raise
            raise write_error(error, f"the final weights into {output_dir}", disk_is_full(error, output_dir),
                              "run again with --resume (the final checkpoint is saved)") from None
    accelerator.end_training()


# ----------------------------------------------------------------------------- set-up, in the order train() calls it
def check_run(config: SipoConfig, resume: bool, overwrite: bool, check_model: bool = True) -> Plan:
    """Every check that can fail, before the first byte is written into ``train.output_dir``.

    Under ``accelerate launch`` every rank runs them, so each stops with the same sentence.
    """
    from sipo.data import open_preference_dataset

    tc = config.train
    output_dir = Path(tc.output_dir)
    process = rundir.launch_state()
    rundir.check_launch(process.num_processes, process.device.type)
    refuse_deepspeed(tc.gradient_accumulation_steps)
    check_values(config)
    if tc.finetune == "lora" and tc.lora_format == "comfyui":
        check_comfyui_family(config.model.family)
    check_precision_for_device(tc.mixed_precision, process.device.type)
    notes = check_against_model(config, *rundir.model_numbers(config.model.pretrained_path))
    if check_model:
        rundir.check_model_dir(config.model)
    if resume and overwrite:
        raise SipoError("--resume and --overwrite contradict each other; pass one of them")
    rundir.refuse_model_dir(output_dir, config.model.pretrained_path)
    created_dir = not output_dir.exists()
    rundir.check_output_dir(output_dir)
    try:
        rundir.refuse_if_locked(output_dir)
        if not resume and not overwrite:
            rundir.refuse_foreign_run(output_dir)
        if overwrite:
            rundir.check_overwrite(output_dir)
        # Open the data before loading a model: a bad path should fail in a second, not a minute.
        dataset = open_preference_dataset(config.data, config.model.resolution, seed=tc.seed, family=config.model.family)
        if 0 < len(dataset) < tc.batch_size:
            notes.append(f"train.batch_size={tc.batch_size} is more than the {len(dataset)} pairs, so every micro-batch "
                         "repeats pairs (each with its own noise); pairs_per_s counts every pair evaluated")
        held_out, train_indices, held_out_indices = open_held_out(config, dataset)
        validation_prompts(tc.validation_prompts)  # a missing prompts file stops here, not after the model loads
        fingerprint = run_fingerprint(config, process.num_processes)
        rundir.check_reporting(config)
        resume_from, damaged = None, []
        if resume:
            resume_from, damaged, resume_notes = rundir.choose_resume_checkpoint(output_dir, fingerprint)
            notes += resume_notes
            done = checkpoint_step(resume_from)
            if done > tc.max_steps:
                raise SipoError(f"--resume: {resume_from.name} already holds {done} steps, more than "
                                f"train.max_steps={tc.max_steps}; set train.max_steps to at least {done}")
    except BaseException:
        if created_dir:
            rundir.remove_if_empty(output_dir)
        raise
    return Plan(output_dir, dataset, fingerprint, resume_from, damaged, notes, created_dir, held_out, train_indices,
                held_out_indices)


def refuse_deepspeed(gradient_accumulation_steps: int) -> None:
    """DeepSpeed steps the optimizer inside its own backward (accelerate's DeepSpeedEngineWrapper): with
    accumulation, before :func:`training_step` can divide the step's summed gradient by its one normaliser."""
    import os

    if gradient_accumulation_steps > 1 and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise SipoError(f"the accelerate config asks for DeepSpeed, which steps the optimizer inside every backward, so "
                        f"with train.gradient_accumulation_steps={gradient_accumulation_steps} sipo could not divide the "
                        "step's gradient by the normaliser of its whole batch (docs/method.md); set "
                        "train.gradient_accumulation_steps=1 (raise train.batch_size or the GPUs instead), or use DDP "
                        "or FSDP (configs/accelerate/ddp_8gpu.yaml, fsdp_8gpu.yaml)")


def set_up(config: SipoConfig, plan: Plan, adapter: DiffusionAdapter | None) -> Run:
    """Accelerator, model and reference, optimizer, state and data: everything the loop needs."""
    accelerator = start_accelerator(config, plan.output_dir)
    adapter, reference_denoiser = build_model(config, adapter)
    dataset = place_model_and_data(config, plan.dataset, adapter, reference_denoiser, accelerator)
    offload_frozen_base(adapter.denoiser, config.model.offload_frozen, accelerator.device)
    validation = validation_hook(config, plan, dataset, accelerator.device)
    if plan.train_indices is not None:
        dataset = PairSubset(dataset, plan.train_indices)  # after the cache: it holds every pair, by index
    trainable = {name: p for name, p in adapter.denoiser.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(list(trainable.values()), config.train, accelerator.device)
    lr_scheduler = _lr_scheduler(config, optimizer)
    tell_ddp_about_idle_parameters(accelerator, adapter)
    model, optimizer = accelerator.prepare(adapter.denoiser, optimizer)
    forward_model = compile_denoiser(model, config.train.compile_scope) if config.train.compile else model
    # No noise stream to restore: a pair's t and noise are keyed by (seed, step, place) (step_micro_batches).
    state, history = restore_state(config, plan, trainable, optimizer, lr_scheduler, accelerator)
    return Run(
        config=config, plan=plan, accelerator=accelerator, adapter=adapter, model=model, forward_model=forward_model,
        reference_predict=reference_predictor(adapter, forward_model, reference_denoiser), trainable=trainable,
        optimizer=optimizer, lr_scheduler=lr_scheduler, state=state, dataset=dataset,
        loader=data_loader(config, dataset, state, accelerator), history=history, validation=validation,
        metrics=MetricsWindow(state.step), first_micro_batch=state.micro_batches, first_step=state.step,
    )


def start_accelerator(config: SipoConfig, output_dir: Path):
    """A fresh ``Accelerator`` for this run, with the kernels and the global seed set first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    tc = config.train
    configure_kernels(tc.deterministic)  # before CUDA initialises: cuBLAS reads its workspace setting once
    configure_autotuning(tc.cudnn_benchmark, tc.deterministic)
    # A second train() in one process (notebooks, the demo, tests) may ask for another precision;
    # accelerate keeps a process-wide state that would refuse it. The process group is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision, log_with=None if tc.report_to == "none" else tc.report_to,
        project_dir=str(output_dir),
    )
    torch.manual_seed(tc.seed)
    return accelerator


def tell_ddp_about_idle_parameters(accelerator, adapter: DiffusionAdapter) -> None:
    """DDP's ``find_unused_parameters`` for a model whose step may leave some parameters idle (Wan2.2-A14B:
    each sample goes to one expert), before ``prepare`` wraps it; without it DDP stops at the next step
    ("Expected to have finished reduction in the prior iteration"). A parameter idle on every process
    keeps no gradient (AdamW skips it, as one process does); idle on some, it averages their zeros in."""
    if adapter.some_parameters_sit_out_a_step and accelerator.num_processes > 1:
        from accelerate.utils import DistributedDataParallelKwargs

        # accelerate reads ddp_handler when prepare() wraps the model; the Accelerator is made before the
        # model is loaded, so the handler is set here rather than passed to its constructor
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)


def build_model(config: SipoConfig, adapter: DiffusionAdapter | None) -> tuple[DiffusionAdapter, nn.Module | None]:
    """The policy, and the frozen reference: for LoRA the same weights with adapters switched off
    (``None`` here), for a full fine-tune a frozen copy of the denoiser."""
    tc = config.train
    if adapter is None:
        adapter = adapter_from_config(config.model, config.data)
    adapter.freeze_encoders()
    reference_denoiser = None
    if tc.finetune == "lora":
        add_lora(adapter, config)
    else:
        adapter.denoiser.requires_grad_(True)
    if tc.gradient_checkpointing and hasattr(adapter.denoiser, "enable_gradient_checkpointing"):
        adapter.denoiser.enable_gradient_checkpointing()
    # Frozen weights in the compute dtype, trainable ones (and so the optimizer state) in float32.
    if tc.mixed_precision in COMPUTE_DTYPES:
        hold_frozen_weights_in(adapter, COMPUTE_DTYPES[tc.mixed_precision])
    store_frozen_base_in(adapter, config.model.frozen_dtype, COMPUTE_DTYPES.get(tc.mixed_precision, torch.float32))
    use_channels_last(adapter.denoiser, tc.channels_last)
    if tc.finetune == "full":
        # A copy of the policy as it is now, its float32 weights and layout included: the reference then
        # computes exactly what the initial policy computes (z = 0 for every pair at step 0). Cast to the
        # compute dtype it did not: autocast runs norms (and the modules that pick their input dtype from
        # their weights) in float32, so bf16-rounded copies of those weights gave z up to -2.3 at step 0.
        reference_denoiser = copy.deepcopy(adapter.denoiser).requires_grad_(False).eval()
    if tc.reference_checkpoint:  # the previous round's policy as the reference (sipo iterate --reference previous)
        from sipo.checkpoints import reference_with_weights

        reference_denoiser = reference_with_weights(adapter.denoiser, tc.reference_checkpoint)
    if config.model.encode_chunk_size is not None:
        adapter.encode_chunk_size = config.model.encode_chunk_size
    return adapter, reference_denoiser


def place_model_and_data(config: SipoConfig, dataset, adapter: DiffusionAdapter, reference_denoiser: nn.Module | None,
                         accelerator):
    """A matching latent cache replaces the pictures (the encoders then stay on the CPU, unused)."""
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
    return dataset


def restore_state(config: SipoConfig, plan: Plan, trainable, optimizer, lr_scheduler,
                  accelerator) -> tuple[TrainState, list[dict[str, float]]]:
    """A fresh state, or the checkpoint's (weights, optimizer, schedule, device RNG, EMA) and the metrics up to it.

    The data position is ``step x gradient_accumulation_steps`` micro-batches of this layout: ``--resume``
    allows another layout only with the same global batch (``sipo.rundir.check_global_batch``), so that
    is exactly the pairs the checkpoint's steps consumed.
    """
    state = TrainState()
    num_buckets = config.objective.ema_buckets
    state.ema = torch.full((num_buckets,), float("nan"), dtype=torch.float64)
    state.ema_seen = torch.zeros(num_buckets, dtype=torch.bool)
    if plan.resume_from is None:
        return state, []
    state = load_checkpoint(plan.resume_from, trainable, optimizer, lr_scheduler)
    state.micro_batches = state.step * config.train.gradient_accumulation_steps
    restore_device_rng(plan.resume_from, accelerator.device)
    history, dropped = rundir.read_metrics(plan.output_dir / "metrics.jsonl", up_to_step=state.step)
    if dropped:
        plan.notes.append(f"metrics.jsonl: dropped {dropped} unreadable line(s) (a write cut short); "
                          "the checkpoint itself is intact")
    plan.notes.append(f"resumed from {plan.resume_from} at step {state.step}")
    return state, history


def data_loader(config: SipoConfig, dataset, state: TrainState, accelerator) -> Iterator[dict[str, Any]]:
    """Batches in the seed's order from the state's data position, this process's share of each."""
    from sipo.data import collate_pairs

    tc = config.train
    if getattr(dataset, "streaming", False):  # data.streaming: the stream keeps its own order (sipo.data.hf_stream)
        from sipo.data.hf_stream import stream_loader

        return stream_loader(dataset, tc.batch_size, state.micro_batches, accelerator.process_index,
                             accelerator.num_processes, config.data.num_workers, accelerator.device.type == "cuda")
    block_ids = dataset.row_group_ids() if config.data.shuffle == "block" and hasattr(dataset, "row_group_ids") else None
    sampler = ResumableBatchSampler(
        DataOrder(len(dataset), tc.seed, block_ids), tc.batch_size, state.micro_batches,
        accelerator.process_index, accelerator.num_processes,
    )
    pin = accelerator.device.type == "cuda"  # pinned host memory: copies to the GPU need not wait
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=getattr(dataset, "collate", collate_pairs),
        num_workers=config.data.num_workers, pin_memory=pin,
        **({"prefetch_factor": config.data.prefetch_factor} if config.data.prefetch_factor else {}),
    ))


def start_writing(run: Run) -> None:
    """The first writes of the run, once every set-up step has succeeded: config, logs, metrics file."""
    accelerator, config, output_dir = run.accelerator, run.config, run.output_dir
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")
        _start_trackers(accelerator, config, output_dir, resumed=run.plan.resume_from is not None)
        if run.plan.resume_from is None:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
            (output_dir / VALIDATION_LOG).unlink(missing_ok=True)
        else:
            rundir.write_metrics(output_dir / "metrics.jsonl", run.history)
            if (output_dir / VALIDATION_LOG).is_file():  # validations after the checkpoint run again
                kept, _ = rundir.read_metrics(output_dir / VALIDATION_LOG, up_to_step=run.state.step)
                rundir.write_metrics(output_dir / VALIDATION_LOG, kept)
        for line in run.plan.notes:
            accelerator.print(f"sipo: {line}")
        accelerator.print(_run_header(config, run.dataset, output_dir, run.plan.held_out))
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- stop signals
class _StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before SIGKILL) and SIGINT set a flag that the loop
    reads after the step in flight; a second signal exits at once. :func:`request_stop` sets the same
    flag without a signal."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum, frame) -> None:
        import os
        import signal

        if self.signum is not None:  # the second signal: no checkpoint, exit now
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def agreed(self, accelerator) -> bool:
        """Whether any process was signalled (every process must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="max")
        if self.signum is None and int(flag.item()):
            self.signum = int(flag.item())
        return self.signum is not None


#: the stop flags of the trainings running in this process (one, or none)
_ACTIVE_STOPS: list[_StopSignals] = []


def request_stop(signum: int | None = None) -> None:
    """Stop the training running in this process after its current step, checkpointing it, as a first
    SIGTERM would (``signum``: the signal its message names; SIGTERM by default). Not a second signal:
    a stop already asked for stays the one it was. Called from a step callback (a `sipo sweep --workers`
    cell whose sweep was stopped); nothing happens when no training runs."""
    import signal

    for stop in _ACTIVE_STOPS:
        if stop.signum is None:
            stop.signum = int(signum or signal.SIGTERM)


@contextlib.contextmanager
def stop_signals() -> Iterator[_StopSignals]:
    """Install the handlers for the loop's duration (main thread only: elsewhere Python cannot)."""
    import signal
    import threading

    stop = _StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    # a signal the process was started ignoring (nohup, a shell's background job) stays ignored
    previous = {signum: signal.signal(signum, stop.handle) for signum in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    # a stop that arrived before these handlers, kept by the caller's (a sweep worker's sipo.sweep._RecordStop)
    stop.signum = next((getattr(h, "signum", None) for h in previous.values() if getattr(h, "signum", None)), None)
    _ACTIVE_STOPS.append(stop)
    try:
        yield stop
    finally:
        _ACTIVE_STOPS.remove(stop)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------- per-step pieces
def pair_weight(terms: PairTerms, state: TrainState, weight_source: str, num_train_timesteps: int, decay: float,
                accelerator=None) -> Tensor:
    """``w = exp(log_w_pair)``, or its per-timestep-bucket EMA (SPEC 5); undefined weights stay NaN.

    Under several processes every one updates the EMA with the whole global micro-batch's weights
    (gathered in rank order), so the EMA is the one process's and the same on every rank (the
    checkpoint holds rank 0's)."""
    # exp(88) already overflows float32; a weight that large must be clipped, not read as non-finite
    # and masked (possible with weight_norm=sum, where log w scales with the element count).
    weight = terms.log_w_pair.double().clamp(max=80.0).exp()
    if weight_source == "sample":
        return weight.float()
    buckets = objectives.timestep_bucket(terms.timesteps.cpu(), num_train_timesteps, state.ema.shape[0])
    all_buckets, all_weights = buckets, weight.cpu()
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        shares = gather_object([(buckets, weight.cpu())])
        all_buckets, all_weights = torch.cat([b for b, _ in shares]), torch.cat([w for _, w in shares])
    state.ema, state.ema_seen = objectives.update_timestep_ema(state.ema, state.ema_seen, all_buckets, all_weights, decay)
    smoothed = state.ema[buckets].to(weight.device)
    return torch.where(torch.isfinite(weight), smoothed, weight).float()


def _to_device(noise: PairNoise, device: torch.device) -> PairNoise:
    """The CPU-drawn noise on the device; from pinned memory on CUDA, so the copy does not block the host."""
    if device.type != "cuda":
        return noise
    def move(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.pin_memory().to(device, non_blocking=True)

    return PairNoise(move(noise.timesteps), move(noise.eps), move(noise.posterior_noise), move(noise.eps_loser),
                     move(noise.beta_scale))


def _step_flags(loss: Tensor | None, grad_norm, kept, pairs) -> tuple[bool, bool, int, int]:
    """(loss finite, gradient norm finite, pairs kept, pairs) of the whole step, in one transfer."""
    if loss is None:
        return True, True, 0, 0
    flags = torch.stack([
        torch.isfinite(loss).float(),
        torch.isfinite(torch.as_tensor(grad_norm, device=loss.device)).float(),
        torch.as_tensor(kept, device=loss.device).float(),
        torch.as_tensor(pairs, device=loss.device).float(),
    ]).tolist()
    return bool(flags[0]), bool(flags[1]), int(flags[2]), int(flags[3])


# ----------------------------------------------------------------------------- metrics
#: the per-step metrics, in the order ``_step_metrics`` stacks them
STEP_METRICS = ("loss", "implicit_acc", "reward_margin", "err_winner", "err_loser", "ref_err_winner", "ref_err_loser",
                "kl_proxy", "masked_fraction", "mean_weight", "mean_log_w_pair", "grad_norm", "finite",
                "beta", "gradient_factor", "negative_margin_fraction")


class MetricsWindow:
    """The steps since the last log point. Per-step metrics stay device tensors until they are
    logged: no host synchronisation per micro-step, one per optimizer step (the finite check)."""

    def __init__(self, step: int) -> None:
        self.rows: list[Tensor] = []
        self.weight_log: list[tuple[Tensor, Tensor]] = []
        self.pairs = 0
        self.clock = StepClock(step)

    def add(self, run: Run, step: StepOutput) -> None:
        self.pairs += step.pairs
        self.weight_log.extend((t.timesteps.detach(), t.log_w_pair.detach()) for t in step.terms)
        if step.terms:
            self.rows.append(_step_metrics(step.terms, step.keeps, step.weights, step.loss, step.grad_norm, step.finite,
                                           step.beta))
        elif run.accelerator.num_processes > 1:  # a row per step on every rank, so the ranks' rows line up
            self.rows.append(torch.full((len(STEP_METRICS),), float("nan"), device=run.accelerator.device))

    def summarise(self, run: Run) -> dict[str, float]:
        """The window's record, and the window emptied; the weight histogram goes to TensorBoard."""
        accelerator, state = run.accelerator, run.state
        rows = _mean_over_processes(accelerator, self.rows) if accelerator.num_processes > 1 else self.rows
        record = _summarise(rows, state, run.lr_scheduler.get_last_lr()[0])
        record.update(self.clock.lap(state.step, self.pairs * accelerator.num_processes, accelerator.device))
        if accelerator.is_main_process and self.weight_log:
            weight_log = [(t.cpu(), w.cpu()) for t, w in self.weight_log]
            oc = run.config.objective
            _log_weight_histogram(accelerator, weight_log, run.num_train_timesteps, oc.ema_buckets, state.step)
        self.rows, self.weight_log, self.pairs = [], [], 0
        return record


def _mean_over_processes(accelerator, rows: list[Tensor]) -> list[Tensor]:
    """Each step's metrics averaged over the processes (each row is the mean over that process's
    pairs): with equal shares, the mean over the global batch that one process would log."""
    if not rows:
        return rows
    stacked = torch.stack(rows)
    gathered = accelerator.gather(stacked).reshape(accelerator.num_processes, *stacked.shape)
    return list(gathered.nanmean(dim=0))


def _step_metrics(terms: list[PairTerms], keeps: list[Tensor], weights: list[Tensor], loss: Tensor,
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
        loss.float(),  # the step's loss over its whole batch (every process: the same value)
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


# ----------------------------------------------------------------------------- small helpers
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
- non-finite steps skipped: {state.bad_steps}; steps whose whole batch was masked: {state.all_masked_batches};
  malformed rows skipped: {state.skipped_rows}
{_best_line(output_dir)}"""
    (output_dir / "README.md").write_text(text)


def _best_line(output_dir: Path) -> str:
    """The model card's line on best/ (train.keep_best), or nothing."""
    try:
        best = json.loads((output_dir / "best" / "best.json").read_text())
    except (OSError, ValueError):
        return ""
    return (f"- best validation: step {best['step']}, {best['metric']} = {best['value']:.4g}; its weights are in best/ "
            "(load with pipe.load_lora_weights(dir / 'best'))\n")


def _start_trackers(accelerator, config: SipoConfig, output_dir: Path, resumed: bool) -> None:
    """One stable log folder per run, ``<output_dir>/logs``; a resume appends to it (W&B: to the
    same run, whose id ``sipo.tracking`` keeps in that folder).

    accelerate's TensorBoard tracker stores a config with ``add_hparams``, which makes a new
    timestamped folder on every call: TensorBoard gets the config as text instead.
    """
    import yaml

    from sipo.tracking import tracker_project, wandb_init_kwargs

    if config.train.report_to == "none":
        return
    flat = {k: str(v) for k, v in _flat(config.to_dict()).items()}
    init_kwargs = {"wandb": wandb_init_kwargs(output_dir, resumed)} if config.train.report_to == "wandb" else {}
    accelerator.init_trackers(tracker_project(config.train.report_to),
                              config=flat if config.train.report_to != "tensorboard" else None, init_kwargs=init_kwargs)
    if config.train.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_text("config", "```\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "```")


def _run_header(config: SipoConfig, dataset, output_dir: Path, held_out=None) -> str:
    """What the run is about to do, printed before the progress bar."""
    report = dataset.report
    skipped = f", {report.skipped_total} rows skipped while indexing ({report.skip_summary()})" if report.skipped_total else ""
    held = ""
    if held_out is not None:
        source = config.data.validation_path or f"data.validation_fraction={config.data.validation_fraction}"
        held = f"; {len(held_out)} held-out pairs ({source}) validated every {config.train.validate_every} steps"
    return (f"sipo: training {config.model.family} model {config.model.pretrained_path} with {config.objective.name} "
            f"into {output_dir}; data: {pairs_found(dataset)} in {config.data.path}{skipped}{held}")


def pairs_found(dataset) -> str:
    """``"N pairs found"``, or what a stream (data.streaming, no length) says instead."""
    return "pairs streamed" if getattr(dataset, "streaming", False) else f"{len(dataset)} pairs found"


def _divergence_advice(output_dir: Path) -> str:
    """The way out of a divergence stop, true to what is on disk."""
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        return (f"lower objective.beta or turn on objective.mask and --resume from {checkpoints[-1].name}, the last "
                "good checkpoint, or lower train.learning_rate and start again with --overwrite")
    return ("no checkpoint was written before it, so lower objective.beta or train.learning_rate, or turn on "
            "objective.mask, and start again with --overwrite")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
