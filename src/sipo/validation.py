"""Held-out preference pairs: is it learning? (the paper's "test accuracy", its Fig. 1c/8)

- :func:`held_out_split` sets aside ``data.validation_fraction`` of the pairs by a hash of each
  pair's place in the user's files, so the split never changes with seeds, workers or a resume,
  and never leaks into training (``data.validation_path`` names a separate set instead).
- :func:`preference_metrics` is the reduction: implicit accuracy, loss, reward margin, gradient
  factor ``sigmoid(-z)``, fraction of negative margins, and accuracy per timestep quartile.
- :class:`Validation` is the trainer's hook: at step 0, every ``train.validate_every`` steps and
  at the end it runs the held-out pairs with ``t`` and ``eps`` FIXED per pair (drawn from
  ``train.validation_seed`` and the pair's key, never from the training generator), so the curve
  measures the model, not the noise; it logs beside them the same numbers for the step's training
  pairs, appends ``validation.jsonl``, redraws ``validation.png`` and keeps ``best/`` per
  ``train.keep_best``.
"""

from __future__ import annotations

import hashlib
import json
import re
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from sipo.errors import SipoError


def stop_requested(run) -> bool:
    """Whether a stop signal has arrived (``run.stop``, sipo.train's handlers), for the long loops outside
    the steps (validation) to cut themselves short. One process only: across processes the trainer's
    agreement decides (a rank that stopped alone would leave the others waiting in a collective)."""
    stop = getattr(run, "stop", None)
    return stop is not None and stop.signum is not None and run.accelerator.num_processes == 1

VALIDATION_LOG = "validation.jsonl"
VALIDATION_PLOT = "validation.png"
BEST_DIR = "best"


# ----------------------------------------------------------------------------- the split
def _unit_hash(text: str) -> float:
    """A number in [0, 1) that depends on ``text`` only."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def held_out_split(dataset, fraction: float) -> tuple[list[int], list[int]]:
    """``(training indices, held-out indices)``: pair ``i`` is held out when the hash of its key is below ``fraction``."""
    keep, held = [], []
    for index in range(len(dataset)):
        (held if _unit_hash(dataset.pair_key(index)) < fraction else keep).append(index)
    if not held:
        raise SipoError(f"data.validation_fraction={fraction} holds out none of the {len(dataset)} pairs; raise it "
                        "or name a separate set with data.validation_path")
    if not keep:
        raise SipoError(f"data.validation_fraction={fraction} holds out all {len(dataset)} pairs, leaving none to "
                        "train on; lower it")
    return keep, held


class PairSubset(Dataset):
    """Some pairs of a dataset under their own indices 0..n-1; the report, collate, flips and row
    groups stay the parent's (an item keeps its parent's index, so flips and the cache match)."""

    def __init__(self, parent, indices: Sequence[int]) -> None:
        self.parent, self.indices = parent, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.parent[self.indices[int(index)]]

    def pair_key(self, index: int) -> str:
        return self.parent.pair_key(self.indices[int(index)])

    def __getattr__(self, name: str):
        if name in ("parent", "indices"):  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        if name == "row_group_ids" and hasattr(self.parent, "row_group_ids"):
            import numpy as np

            return lambda: np.asarray(self.parent.row_group_ids())[self.indices]
        return getattr(self.parent, name)


# ----------------------------------------------------------------------------- the numbers
def preference_metrics(z: Tensor, timesteps: Tensor, num_train_timesteps: int) -> dict[str, float]:
    """The held-out curve's numbers from per-pair logits ``z`` (SPEC 2: ``loss = -logsigmoid(z)``).

    ``accuracy = mean(z > 0)``, ``loss = mean(-logsigmoid(z))``, ``reward_margin = mean(z)``,
    ``grad_factor = mean(sigmoid(-z))`` (the weight DPO's gradient gives a pair),
    ``negative_margin_fraction = mean(z < 0)``, and ``accuracy_q1..q4`` over the quarters of
    ``[0, T)`` the pairs' timesteps fall in (NaN for an empty quarter).
    """
    z, timesteps = z.detach().double().flatten().cpu(), timesteps.detach().flatten().cpu()
    if z.numel() == 0:
        return {}
    record = {
        "accuracy": float((z > 0).double().mean()),
        "loss": float(-F.logsigmoid(z).mean()),
        "reward_margin": float(z.mean()),
        "grad_factor": float(torch.sigmoid(-z).mean()),
        "negative_margin_fraction": float((z < 0).double().mean()),
        "pairs": int(z.numel()),
    }
    quarter = (timesteps.long() * 4 // num_train_timesteps).clamp(0, 3)
    for q in range(4):
        chosen = quarter == q
        record[f"accuracy_q{q + 1}"] = float((z[chosen] > 0).double().mean()) if chosen.any() else float("nan")
    return record


def held_out_noise(x0_shape: Sequence[int], key: str, num_train_timesteps: int, seed: int):
    """One pair's fixed ``t``, ``eps`` and posterior noise: the same at every validation of every run
    with this seed, whatever the training generator, the batch or the process."""
    from sipo.preference import PairNoise

    generator = torch.Generator().manual_seed(int(_unit_hash(f"{seed}:{key}") * 2**62))
    timesteps = torch.randint(0, num_train_timesteps, (1,), generator=generator)
    eps = torch.randn((1, *x0_shape), generator=generator)
    return PairNoise(timesteps, eps, torch.randn((1, *x0_shape), generator=generator))


# ----------------------------------------------------------------------------- the hook
class Validation:
    """The trainer's validation hook (see the module docstring); built by :func:`from_plan`."""

    def __init__(self, held_out, key_source, config, output_dir: Path, best: "BestKeeper") -> None:
        self.held_out = held_out  # what is read (the cache's items where training reads the cache)
        self.key_source = key_source  # the pictures' dataset: each item's index -> its pair key
        self.config = config
        self.output_dir = Path(output_dir)
        self.every = config.train.validate_every
        self.best = best

    # ------------------------------------------------------------------ when
    def at_start(self, run) -> None:
        """Step 0 (the base model) of a fresh run; a resume has it in validation.jsonl already."""
        if run.state.step == 0:
            self.validate(run, None)

    def after_step(self, run, step) -> None:
        if self.every and run.state.step % self.every == 0 and run.state.step < run.config.train.max_steps:
            self.validate(run, step)

    def at_end(self, run, step) -> None:
        """The final weights, when this call took a step (after_step leaves the last step to this)."""
        if step is not None:
            self.validate(run, step)

    # ------------------------------------------------------------------ what
    @torch.no_grad()
    def held_out_terms(self, run) -> tuple[Tensor, Tensor] | None:
        """``(z, t)`` of every held-out pair at its fixed noise, with the current weights (None: cut short
        by a stop signal)."""
        adapter, device = run.adapter, run.accelerator.device
        was_training = adapter.denoiser.training
        adapter.denoiser.eval()  # no dropout: the curve is a function of the weights alone
        batch_size = run.config.train.batch_size
        try:
            # whatever a module might draw, the training stream stays untouched
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                terms = []
                for start in range(0, len(self.held_out), batch_size):
                    if stop_requested(run):  # a stop signal: no partial record, the run stops now
                        return None
                    terms.append(self._batch_terms(run, range(start, min(start + batch_size, len(self.held_out)))))
        finally:
            adapter.denoiser.train(was_training)
        terms = [t for t in terms if t is not None]
        if not terms:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat([t.z.float().cpu() for t in terms]), torch.cat([t.timesteps.cpu() for t in terms])

    def _batch_terms(self, run, positions: range):
        """The per-pair terms of the held-out pairs at ``positions`` (None when every row was malformed)."""
        from sipo.data import collate_pairs
        from sipo.preference import PairNoise, compute_pair_terms, step_beta

        adapter, accelerator, oc = run.adapter, run.accelerator, run.config.objective
        batch = getattr(self.held_out, "collate", collate_pairs)([self.held_out[i] for i in positions])
        if not batch["indices"]:
            return None
        encoded = _encode(adapter, batch, accelerator.device)
        draws = [held_out_noise(encoded.x0_winner.shape[1:], self.key_source.pair_key(index), run.num_train_timesteps,
                                run.config.train.validation_seed) for index in batch["indices"]]
        noise = PairNoise(*(torch.cat([getattr(d, name) for d in draws]).to(accelerator.device)
                            for name in ("timesteps", "eps", "posterior_noise")))
        with accelerator.autocast():
            # DPO's z at the run's current beta (auto beta moves it): accuracy is sign(z), whatever the objective
            beta = step_beta(oc.beta, oc.beta_mode, run.state.auto_beta_ema, oc.target_gradient_factor,
                             oc.beta_min, oc.beta_max)
            return compute_pair_terms(
                adapter, encoded, noise, beta=beta, reference_predict=run.reference_predict,
                denoiser=run.forward_model, weight_norm=oc.weight_norm, pair_weight=oc.pair_weight,
                weight_model=oc.weight_model, weight_step=oc.weight_step,
            )

    def validate(self, run, step) -> dict[str, Any]:
        """One validation: the record (held-out, and the step's training pairs), logged and plotted; best/ kept."""
        held_out = self.held_out_terms(run)
        if held_out is None:
            return {}
        z, timesteps = held_out
        record: dict[str, Any] = {"step": run.state.step}
        record.update({f"held_out/{k}": v for k, v in preference_metrics(z, timesteps, run.num_train_timesteps).items()})
        train_z, train_t = _step_pairs(run.accelerator, step)
        if train_z.numel():
            record.update({f"train/{k}": v for k, v in preference_metrics(train_z, train_t, run.num_train_timesteps).items()})
        accelerator = run.accelerator
        if accelerator.is_main_process:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=run.state.step)
            with open(self.output_dir / VALIDATION_LOG, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            plot_validation(self.output_dir / VALIDATION_LOG, self.output_dir / VALIDATION_PLOT)
            self.best.offer(run, "held_out_accuracy", record.get("held_out/accuracy", float("nan")))
        accelerator.wait_for_everyone()
        return record


def _step_pairs(accelerator, step) -> tuple[Tensor, Tensor]:
    """``(z, t)`` of the step's training pairs; of every process's (rank order), as one process would see them."""
    if step is None:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    z = torch.cat([t.z.detach().float().cpu() for t in step.terms]) if step.terms else torch.zeros(0)
    t = torch.cat([t.timesteps.cpu() for t in step.terms]) if step.terms else torch.zeros(0, dtype=torch.long)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        shares = gather_object([(z, t)])
        z, t = torch.cat([share[0] for share in shares]), torch.cat([share[1] for share in shares])
    return z, t


class BestKeeper:
    """``best/``: the weights of the step with the highest ``train.keep_best`` value so far (ties keep
    the earlier step), with ``best.json`` naming step, metric and value. Outside checkpoints/, so
    ``train.keep_last`` never prunes it; a resume reads the value to beat back from best.json, if
    best.json's metric is the one kept now: values of two metrics are never compared (a resume with
    another ``train.keep_best`` keeps best/ afresh, and ``note`` says so)."""

    def __init__(self, output_dir: Path, metric: str, resumed: bool) -> None:
        self.output_dir, self.metric = Path(output_dir), metric
        self.current = self._read() if resumed else None
        self.note = None
        if self.current is not None and self.current.get("metric") != metric and metric != "none":
            self.note = (f"best/ holds step {self.current.get('step')} kept by {self.current.get('metric')} = "
                         f"{self.current.get('value')}, and train.keep_best is now {metric}: the two are not "
                         f"comparable, so best/ is kept afresh by {metric} (its first finite value replaces it)")
            self.current = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.output_dir / BEST_DIR / "best.json").read_text())
        except (OSError, ValueError):
            return None

    def offer(self, run, metric: str, value: float) -> None:
        """Keep the current weights if ``metric`` is the one kept and ``value`` beats the best so far."""
        if metric != self.metric or not math.isfinite(value):
            return
        if self.current is not None and value <= self.current["value"]:
            return
        best, tmp = self.output_dir / BEST_DIR, self.output_dir / f".tmp-{BEST_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if run.config.train.finetune == "lora":
            from peft.utils import get_peft_model_state_dict

            from sipo.export import write_lora_formats

            run.adapter.save_lora(tmp, get_peft_model_state_dict(run.accelerator.unwrap_model(run.model)))
            write_lora_formats(tmp, run.config)
        else:
            run.adapter.save_full(tmp)
        # the trainable tensors under their parameter names, as a checkpoint holds them: `sipo eval/analyze
        # --checkpoint RUN/best` load best/ through the checkpoints' own path (sipo.checkpoints.run_weights)
        from safetensors.torch import save_file

        save_file({name: p.detach().cpu().contiguous() for name, p in run.trainable.items()},
                  str(tmp / "trainable.safetensors"))
        self.current = {"step": run.state.step, "metric": metric, "value": value}
        (tmp / "best.json").write_text(json.dumps(self.current, indent=2))
        shutil.rmtree(best, ignore_errors=True)
        os.replace(tmp, best)


# ----------------------------------------------------------------------------- validation samples
def validation_prompts(entries: Sequence[str]) -> list[str]:
    """``train.validation_prompts``: prompts as a list, or one ``.txt`` file of one prompt per line."""
    if len(entries) == 1 and entries[0].endswith(".txt"):
        from sipo.evaluate import read_prompts

        path = Path(entries[0]).expanduser()
        if not path.is_file():
            raise SipoError(f"train.validation_prompts names {path}, which does not exist; give a text file of one "
                            "prompt per line, or the prompts themselves as a list")
        return read_prompts(path)
    return [entry for entry in entries if entry.strip()]


class SampleValidation:
    """Every ``train.sample_every`` steps (and at step 0 and the end): each validation prompt x seed
    sampled with the family's pipeline and the current weights, the same seeds each time; PNGs
    (video: frames) and a grid under ``samples/step-N/``, the grid to the trackers; with
    ``train.validation_scorers`` each scorer's mean and the win rate against step 0's samples of the
    same prompt and seed, with its bootstrap interval, into validation.jsonl."""

    def __init__(self, config, output_dir: Path, best: BestKeeper, device) -> None:
        from sipo.evaluate import parse_scorer_paths
        from sipo.rewards import load_scorer

        tc = config.train
        self.prompts = validation_prompts(tc.validation_prompts)
        from sipo.data.pairs import family_needs_input_image

        if self.prompts and family_needs_input_image(config.model.family):
            raise SipoError(f"train.validation_prompts samples from prompts alone, and model.family={config.model.family} "
                            "edits or animates an input image; unset train.validation_prompts and score held-out inputs "
                            "with `sipo eval --inputs FILE` after training")

        from sipo.models import sampler_settings

        # the family's guidance unless train.sample_guidance_scale names one; the steps are train.sample_steps
        self.sampler = sampler_settings(config.model, tc.sample_steps, tc.sample_guidance_scale)
        self.seeds, self.every, self.tc = list(tc.validation_seeds), tc.sample_every, tc
        self.output_dir, self.best = Path(output_dir), best
        paths = parse_scorer_paths(tc.validation_scorer_paths)
        self.scorers = {name: load_scorer(name, paths.get(name), device) for name in tc.validation_scorers}

    def at_start(self, run) -> None:
        if run.state.step == 0:
            self.sample(run)

    def after_step(self, run, step) -> None:
        if self.every and run.state.step % self.every == 0 and run.state.step < run.config.train.max_steps:
            self.sample(run)

    def at_end(self, run, step) -> None:
        if step is not None:
            self.sample(run)

    @torch.no_grad()
    def pictures(self, run) -> list[tuple[int, int, Tensor]] | None:
        """``(prompt index, seed, picture)`` for every prompt and seed, from the current weights (None: cut
        short by a stop signal)."""
        adapter = run.adapter
        was_training = adapter.denoiser.training
        adapter.denoiser.eval()
        devices = [run.accelerator.device] if run.accelerator.device.type == "cuda" else []
        out = []
        try:
            with torch.random.fork_rng(devices=devices):  # no draw of the training stream is consumed
                for index, prompt in enumerate(self.prompts):
                    if stop_requested(run):  # a stop signal: the samples of this step are left unwritten
                        return None
                    generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]
                    batch = adapter.sample([prompt] * len(self.seeds), generator=generators,
                                           **self.sampler)
                    out.extend((index, seed, picture.cpu()) for seed, picture in zip(self.seeds, batch))
        finally:
            adapter.denoiser.train(was_training)
        return out

    def sample(self, run) -> None:
        from sipo.evaluate import bootstrap_ci, save_picture, win_outcomes
        from sipo.tracking import log_sample_grid

        accelerator = run.accelerator
        if accelerator.is_main_process:
            folder = self.output_dir / "samples" / f"step-{run.state.step:08d}"
            samples = self.pictures(run)
            if samples is None:
                accelerator.wait_for_everyone()
                return
            for index, seed, picture in samples:
                save_picture(folder / f"p{index:03d}_s{seed}.png", picture)
            grid = sample_grid([p for _, _, p in samples], rows=len(self.prompts), columns=len(self.seeds))
            _save_png(folder / "grid.png", grid)
            log_sample_grid(accelerator, grid, [f"{self.prompts[i]} (seed {seed})" for i, seed, _ in samples],
                            [p for _, _, p in samples], run.state.step)
            record: dict[str, Any] = {"step": run.state.step}
            scores: dict[str, list[float]] = {}
            for name, scorer in self.scorers.items():
                images = torch.stack([p for _, _, p in samples]).to(scorer.device if hasattr(scorer, "device") else "cpu")
                values = scorer.score(images, [self.prompts[i] for i, _, _ in samples]).double().cpu()
                scores[name] = values.tolist()
                record[f"samples/{name}/mean"] = float(values.mean())
                first = self.output_dir / "samples" / f"step-{0:08d}" / "scores.json"
                if run.state.step > 0 and first.is_file():
                    outcomes = win_outcomes(values, torch.tensor(json.loads(first.read_text())[name], dtype=torch.float64))
                    low, high = bootstrap_ci(outcomes)
                    record.update({f"samples/{name}/win_rate_vs_step0": float(outcomes.double().mean()),
                                   f"samples/{name}/win_rate_low": low, f"samples/{name}/win_rate_high": high})
            (folder / "scores.json").write_text(json.dumps(scores))
            if self.scorers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=run.state.step)
                with open(self.output_dir / VALIDATION_LOG, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                for name in self.scorers:
                    self.best.offer(run, name, record[f"samples/{name}/mean"])
        accelerator.wait_for_everyone()


def sample_grid(pictures: list[Tensor], rows: int, columns: int):
    """One uint8 ``[H*rows, W*columns, 3]`` image: prompts down, seeds across (a video shows its middle frame)."""
    import numpy as np

    tiles = [(p[p.shape[0] // 2] if p.ndim == 4 else p).float().clamp(0, 1) for p in pictures]
    height, width = tiles[0].shape[-2:]
    grid = torch.zeros(3, height * rows, width * columns)
    for position, tile in enumerate(tiles):
        row, column = divmod(position, columns)
        grid[:, row * height:(row + 1) * height, column * width:(column + 1) * width] = tile
    return (grid.mul(255).round().byte().permute(1, 2, 0).numpy()).astype(np.uint8)


def _save_png(path: Path, array) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _encode(adapter, batch: dict[str, Any], device: torch.device):
    """A held-out batch in model space. Cached items are ready; pictures go through the encoders
    on the encoders' own device (with a latent cache they stay on the CPU), then to ``device``."""
    from sipo.models.base import EncodedPairs
    from sipo.preference import encoded_batch

    if "x0_chosen" in batch:
        return encoded_batch(adapter, batch, device)
    frozen = [p for module in adapter.frozen_modules() for p in module.parameters()][:1]
    encoder_device = frozen[0].device if frozen else device
    encoded = encoded_batch(adapter, batch, encoder_device)
    move = lambda x: x.to(device)  # noqa: E731
    return EncodedPairs(move(encoded.x0_winner), move(encoded.x0_loser),
                        {k: move(v) for k, v in encoded.conditioning.items()})


class Hooks:
    """The validation points of the loop (at start, after each step, at the end), each forwarded to
    the parts a run has: held-out pairs, validation samples. No part: every call is a no-op."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)

    def at_start(self, run) -> None:
        for part in self.parts:
            part.at_start(run)

    def after_step(self, run, step) -> None:
        for part in self.parts:
            part.after_step(run, step)

    def at_end(self, run, step) -> None:
        for part in self.parts:
            part.at_end(run, step)


def validation_hook(config, plan, dataset, device) -> Hooks:
    """The run's validation hooks. ``dataset`` is what training reads (pictures or the cache, same
    indices); the held-out pairs are its ``plan.held_out_indices``, or the separate set."""
    best = BestKeeper(plan.output_dir, config.train.keep_best, resumed=plan.start_step > 0)
    if best.note:
        plan.notes.append(best.note)
    parts: list[Any] = []
    if plan.held_out is not None and plan.held_out_indices is None:  # data.validation_path
        parts.append(Validation(plan.held_out, plan.held_out, config, plan.output_dir, best))
    elif plan.held_out is not None:
        parts.append(Validation(PairSubset(dataset, plan.held_out_indices), plan.dataset, config, plan.output_dir, best))
    if config.train.validation_prompts:
        parts.append(SampleValidation(config, plan.output_dir, best, device))
    return Hooks(parts)


def open_held_out(config, dataset) -> tuple[Any, list[int] | None, list[int] | None]:
    """``(held-out set, training indices, held-out indices)`` per ``data.validation_path`` /
    ``data.validation_fraction``; ``(None, None, None)`` when neither is set."""
    import dataclasses

    from sipo.data import open_preference_dataset

    data = config.data
    if data.validation_path:
        # a hub layout's validation-*.parquet beside train-* is what a user who names the folder means
        try:
            separate = open_preference_dataset(
                dataclasses.replace(data, path=data.validation_path, max_pairs=None, split="validation", streaming=False),
                config.model.resolution, seed=config.train.seed, family=config.model.family)
        except SipoError as error:  # the readers speak of the key they read, data.path: name the one the user set
            raise SipoError(re.sub(r"\bdata\.path\b", "data.validation_path", error.cli_message)) from None
        if len(separate) == 0:
            raise SipoError(f"data.validation_path {data.validation_path} holds no pairs; point it at held-out "
                            "preference pairs or unset it")
        return separate, None, None
    if data.validation_fraction is not None:
        keep, held = held_out_split(dataset, data.validation_fraction)
        return PairSubset(dataset, held), keep, held
    return None, None, None


# ----------------------------------------------------------------------------- the plot
def read_validation_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's validation.jsonl (unreadable lines skipped)."""
    from sipo.rundir import read_metrics

    records, _ = read_metrics(Path(path), up_to_step=2**62)
    return records


def plot_validation(log: Path, png: Path) -> None:
    """Held-out and training implicit accuracy and reward margin against the step, one PNG."""
    from sipo.plotting import pyplot

    plt = pyplot()

    records = read_validation_log(log)
    if not records:
        return
    figure, (accuracy, margin) = plt.subplots(1, 2, figsize=(10, 3.6))
    for prefix, style in (("held_out", "-o"), ("train", "--s")):
        steps = [r["step"] for r in records if f"{prefix}/accuracy" in r]
        if not steps:
            continue
        label = "held-out pairs (fixed t, eps)" if prefix == "held_out" else "training pairs of the step"
        accuracy.plot(steps, [r[f"{prefix}/accuracy"] for r in records if f"{prefix}/accuracy" in r], style, label=label)
        margin.plot(steps, [r[f"{prefix}/reward_margin"] for r in records if f"{prefix}/accuracy" in r], style, label=label)
    accuracy.set(xlabel="optimizer step", ylabel="implicit accuracy (z > 0)", ylim=(-0.02, 1.02))
    margin.set(xlabel="optimizer step", ylabel="reward margin (mean z)")
    accuracy.axhline(0.5, color="grey", lw=0.8, ls=":")
    accuracy.legend(fontsize=8)
    figure.tight_layout()
    tmp = png.with_name(f".tmp-{png.name}")
    figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    os.replace(tmp, png)
