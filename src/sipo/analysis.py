"""`sipo analyze`: the per-timestep study of SPEC 6 as a tool.

For ``N`` preference pairs and ``K`` equal timestep buckets over ``[0, T)``, every pair is pushed
through every bucket (stratified: one ``t`` drawn uniformly inside each bucket, with its own
``eps`` and posterior noise) by :func:`sipo.preference.compute_pair_terms`, the very function the
trainer uses. Per bucket we keep:

- ``log w`` of winner, loser and pair (SPEC 3): mean, std and quantiles. These are ``N`` floats per
  bucket, kept exactly.
- the per-pair DPO loss ``loss_pair = -logsigmoid(z)`` (SPEC 2, unweighted, unmasked) and ``z``.
- the gradient ``g_i`` of ``loss_pair_i`` (one pair = a batch of one) with respect to the gradient
  parameters: every LoRA tensor (LoRA is injected if the model has none), or, for
  ``train.finetune=full``, the denoiser's last parameter tensors in registration order (the output
  side) up to ``max_grad_elements`` elements. Gradients are streamed: a running Welford mean
  vector per bucket and one scalar ``M2`` (the trace of the scatter matrix), so memory is
  ``K x P`` floats whatever ``N`` is, and no per-pair gradient is kept.

Outputs (``output_dir``, keyed by the weights analysed as ``sipo eval``'s are: ``weights.json``):
``analysis.csv`` (one row per bucket, columns :data:`CSV_COLUMNS`,
documented in docs/analysis.md), ``masked_fraction_vs_tau.csv``, ``analysis.json`` (everything,
plus the findings paragraph), and three plots. Deterministic given ``config.train.seed``.

Randomness protocol (what a test replays): pairs are taken in the order :func:`pair_order`;
one ``torch.Generator`` seeded with ``config.train.seed`` draws, pair by pair and bucket by
bucket in increasing order, ``draw_bucket_noise(x0_shape, T, bucket, K, generator)``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sipo.performance import full_float32
from sipo.config import SipoConfig, config_from_dict
from sipo.errors import SipoError
from sipo.evaluate import claim_output_folder, weights_key
from sipo.models import DiffusionAdapter, adapter_from_config
from sipo.preference import PairNoise, compute_pair_terms, draw_pair_noise, reference_predictor

#: quantiles of log w reported per bucket (column suffixes q05 ... q95).
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
ROLES = ("winner", "loser", "pair")
#: default cap on the gradient parameters of a full (non-LoRA) model: 2**20 elements.
DEFAULT_MAX_GRAD_ELEMENTS = 1 << 20


def _quantile_name(q: float) -> str:
    return f"q{round(q * 100):02d}"


#: The columns of analysis.csv, in order (docs/analysis.md documents each; a test checks both agree).
CSV_COLUMNS: tuple[str, ...] = (
    "bucket", "t_low", "t_high", "t_mean", "n_pairs", "n_undefined",
    *(f"log_w_{role}_{stat}" for role in ROLES for stat in ("mean", "std", *map(_quantile_name, QUANTILES))),
    "loss_mean", "loss_std", "z_mean", "implicit_acc", "err_winner_mean", "err_loser_mean",
    "n_grad", "grad_norm_mean", "grad_mean_norm", "grad_var_trace", "grad_var_per_dim",
    "masked_fraction",
)
TAU_COLUMNS: tuple[str, ...] = ("tau", "log_tau", "masked_fraction")
#: what run_analysis writes into its output folder; outputs of other weights are moved aside
#: (sipo.evaluate.claim_output_folder), anything else there is left alone.
ANALYSIS_PRODUCTS: tuple[str, ...] = ("analysis.csv", "masked_fraction_vs_tau.csv", "analysis.json", "log_w_vs_t.png",
                                      "grad_variance_vs_t.png", "masked_fraction_vs_tau.png")


# ----------------------------------------------------------------------------- streaming statistics
class WelfordTrace:
    """Running mean of vectors and the trace of their covariance, one vector at a time.

    Welford's update on the mean vector, with the second moment kept only as its trace:
    ``delta = x - mean; mean += delta / n; m2 += dot(delta, x - mean)``. Then
    ``variance_trace = m2 / (n - 1) = sum over coordinates of the unbiased variance``, which is
    ``torch.var(stacked, dim=0).sum()`` without ever stacking. Memory: one vector.
    """

    def __init__(self, size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.count = 0
        self.mean = torch.zeros(size, device=device, dtype=dtype)
        self.m2 = 0.0
        self.norm_sum = 0.0

    def update(self, vector: Tensor) -> None:
        x = vector.detach().to(self.mean.dtype).reshape(-1)
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += float(torch.dot(delta, x - self.mean))
        self.norm_sum += float(x.norm())

    @property
    def variance_trace(self) -> float:
        """Sum over coordinates of the unbiased (``n - 1``) variance; NaN below two vectors."""
        return self.m2 / (self.count - 1) if self.count > 1 else float("nan")

    @property
    def variance_per_dim(self) -> float:
        return self.variance_trace / self.mean.numel()

    @property
    def mean_norm(self) -> float:
        """``||mean gradient||``: the norm of the gradient of the bucket's mean loss."""
        return float(self.mean.norm()) if self.count else float("nan")

    @property
    def norm_mean(self) -> float:
        """Mean over vectors of ``||g_i||``."""
        return self.norm_sum / self.count if self.count else float("nan")


# ----------------------------------------------------------------------------- randomness protocol
def pair_order(dataset_size: int, seed: int) -> list[int]:
    """Dataset indices in the order the analysis reads them: a permutation seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed * 100_003 + 7)
    return torch.randperm(dataset_size, generator=generator).tolist()


def bucket_bounds(bucket: int, num_buckets: int, num_train_timesteps: int) -> tuple[int, int]:
    """``[t_low, t_high)`` of bucket ``k``: the timesteps with ``floor(t * K / T) == k``.

    Matches :func:`sipo.objectives.timestep_bucket` (the trainer's EMA buckets).
    """
    t_low = -(-bucket * num_train_timesteps // num_buckets)  # ceil(k T / K)
    t_high = -(-(bucket + 1) * num_train_timesteps // num_buckets)
    return t_low, t_high


def draw_bucket_noise(
    x0_shape: torch.Size, num_train_timesteps: int, bucket: int, num_buckets: int, generator: torch.Generator
) -> PairNoise:
    """``t ~ U{t_low..t_high-1}`` inside ``bucket``, and the step's noise (``draw_pair_noise``)."""
    t_low, t_high = bucket_bounds(bucket, num_buckets, num_train_timesteps)
    return draw_pair_noise(x0_shape, num_train_timesteps, generator, t_low=t_low, t_high=t_high)


# ----------------------------------------------------------------------------- model set-up
@dataclass
class GradientParameters:
    """Which parameters the per-pair gradients are taken with respect to."""

    kind: str  # "lora" or "last_tensors"
    names: list[str]
    params: list[nn.Parameter] = field(repr=False)

    @property
    def num_elements(self) -> int:
        return sum(p.numel() for p in self.params)

    def describe(self) -> str:
        if self.kind == "lora":
            return f"all {len(self.names)} LoRA tensors ({self.num_elements:,} elements)"
        return (f"the denoiser's last {len(self.names)} parameter tensors ({self.num_elements:,} elements, "
                f"{self.names[0]} ... {self.names[-1]})")


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def select_gradient_parameters(
    denoiser: nn.Module, finetune: str, max_grad_elements: int = DEFAULT_MAX_GRAD_ELEMENTS
) -> GradientParameters:
    """LoRA: every ``lora_`` tensor. Full: the last tensors in registration order (the output side:
    for a diffusers UNet ``conv_out``, ``conv_norm_out`` and the last up-block) while their total
    stays within ``max_grad_elements`` (always at least one tensor). Only these require grad.
    """
    named = list(denoiser.named_parameters())
    if finetune == "lora":
        chosen = [(n, p) for n, p in named if "lora_" in n]
        kind = "lora"
    else:
        chosen, total = [], 0
        for name, param in reversed(named):
            if chosen and total + param.numel() > max_grad_elements:
                break
            chosen.append((name, param))
            total += param.numel()
        chosen.reverse()
        kind = "last_tensors"
    if not chosen:
        raise SipoError("the denoiser has no parameters to take gradients of; check train.finetune and the model")
    denoiser.requires_grad_(False)
    for _, param in chosen:
        param.requires_grad_(True)
    return GradientParameters(kind, [n for n, _ in chosen], [p for _, p in chosen])


def _peek_run_config(run_dir: str | Path) -> SipoConfig | None:
    import yaml

    from sipo.checkpoints import run_directory_of

    saved = run_directory_of(run_dir) / "config.yaml"
    if not saved.is_file():
        return None  # load_run_weights stops with the clear error
    return config_from_dict(yaml.safe_load(saved.read_text()))


def prepare_model(
    config: SipoConfig,
    checkpoint: str | Path | None = None,
    adapter: DiffusionAdapter | None = None,
    max_grad_elements: int = DEFAULT_MAX_GRAD_ELEMENTS,
    weights_checkpoint: str | Path | None = None,
) -> tuple[DiffusionAdapter, Any, GradientParameters]:
    """Load the policy (base model, or a run's weights), its reference, and the gradient parameters.

    The reference is the trainer's: LoRA switched off for a LoRA model, the base weights (a frozen
    copy taken before a full run's weights are loaded) for a full model. Returns
    ``(adapter, reference_predict, gradient_parameters)``. ``weights_checkpoint``: the checkpoint of
    ``checkpoint`` to load (default its newest intact one), the one the outputs are keyed by.
    """
    if adapter is None:
        adapter = adapter_from_config(config.model, config.data)
    adapter.freeze_encoders()
    finetune = config.train.finetune
    if checkpoint is not None:
        run_config = _peek_run_config(checkpoint)
        if run_config is not None:
            finetune = run_config.train.finetune
    elif has_lora(adapter.denoiser):
        finetune = "lora"
    reference_denoiser = None
    if finetune == "full":
        reference_denoiser = copy.deepcopy(adapter.denoiser).requires_grad_(False).eval()
    if checkpoint is not None:
        from sipo.checkpoints import load_run_weights

        load_run_weights(adapter, checkpoint, weights_checkpoint)
    if finetune == "lora" and not has_lora(adapter.denoiser):
        from sipo.models import add_lora

        add_lora(adapter, config)
    device = adapter.device if adapter.device.type != "cpu" else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    adapter.to(device)
    adapter.denoiser.eval()  # no dropout: the gradient is a function of (pair, t, eps)
    if reference_denoiser is not None:
        reference_denoiser.to(device)
    grads = select_gradient_parameters(adapter.denoiser, finetune, max_grad_elements)
    return adapter, reference_predictor(adapter, adapter.denoiser, reference_denoiser), grads


def run_validation_curve(checkpoint: str | Path | None) -> list[dict[str, Any]]:
    """The held-out records (step, accuracy, margin, per-quartile accuracy) of the run ``checkpoint``
    names, from its validation.jsonl; empty when there is none."""
    from sipo.validation import VALIDATION_LOG, read_validation_log

    from sipo.checkpoints import run_directory_of

    if checkpoint is None or not (run_directory_of(checkpoint) / VALIDATION_LOG).is_file():
        return []
    checkpoint = run_directory_of(checkpoint)
    keep = ("held_out/accuracy", "held_out/reward_margin", "held_out/loss", "held_out/accuracy_q1",
            "held_out/accuracy_q2", "held_out/accuracy_q3", "held_out/accuracy_q4")
    return [{"step": r["step"], **{k: r[k] for k in keep if k in r}}
            for r in read_validation_log(Path(checkpoint) / VALIDATION_LOG) if "held_out/accuracy" in r]


def validation_paragraph(curve: list[dict[str, Any]]) -> str:
    """One sentence on the held-out curve: where it started, peaked and ended."""
    best = max(curve, key=lambda r: (r["held_out/accuracy"], -r["step"]))
    first, last = curve[0], curve[-1]
    return (f"Held-out implicit accuracy (the run's validation.jsonl, {len(curve)} validations): "
            f"{first['held_out/accuracy']:.3f} at step {first['step']}, best {best['held_out/accuracy']:.3f} at step "
            f"{best['step']}, {last['held_out/accuracy']:.3f} at step {last['step']}.")


def _is_pair(item: Any) -> bool:
    return isinstance(item, dict) and {"prompt", "chosen", "rejected"} <= set(item)


def iter_pairs(dataset: Sequence, num_pairs: int, seed: int) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yield up to ``num_pairs`` valid ``(index, item)`` in :func:`pair_order`, skipping malformed rows."""
    found = 0
    for index in pair_order(len(dataset), seed):
        if found == num_pairs:
            return
        item = dataset[index]
        if _is_pair(item):
            found += 1
            yield index, item


def flat_gradient(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    """``d loss / d params`` flattened into one vector (zeros for parameters the loss does not reach)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
    ])


# ----------------------------------------------------------------------------- the study
@dataclass
class AnalysisResult:
    rows: list[dict[str, float]]
    tau_curve: list[dict[str, float]]
    findings: str
    gradient: dict[str, Any]
    files: dict[str, Path]
    summary: dict[str, Any]


@full_float32()  # measured against float64/CPU references: no TF32 rounding on CUDA (docs/performance.md)
def run_analysis(
    config: SipoConfig,
    checkpoint: str | Path | None = None,
    num_pairs: int = 64,
    num_buckets: int = 20,
    output_dir: str | Path = "runs/analysis",
    *,
    adapter: DiffusionAdapter | None = None,
    dataset: Sequence | None = None,
    max_grad_elements: int = DEFAULT_MAX_GRAD_ELEMENTS,
    progress: bool = True,
    verbose: bool = True,
    plots: bool = True,
) -> AnalysisResult:
    """Per-timestep importance weights, DPO loss and gradient variance (SPEC 6) -> CSV, JSON, PNG.

    ``adapter`` and ``dataset`` replace the ones ``config`` names (the demo passes its in-memory
    model and pairs); ``dataset`` is any map-style sequence of ``dict(prompt, chosen, rejected)``
    with images ``[C, H, W]`` (or ``[F, C, H, W]``) in ``[-1, 1]``; other items count as malformed.
    """
    from tqdm.auto import tqdm

    if num_pairs < 2:
        raise SipoError(f"--pairs must be at least 2 (a variance over pairs needs two), got {num_pairs}")
    if num_buckets < 1:
        raise SipoError(f"--buckets must be at least 1, got {num_buckets}")
    oc = config.objective
    seed = config.train.seed
    # What needs no model comes first: a run without a checkpoint, or a bad data.path, fails in a second.
    from sipo.rundir import check_output_dir

    check_output_dir(Path(output_dir), name="--output-dir")
    if checkpoint is not None:
        from sipo.evaluate import check_run_family

        check_run_family(checkpoint, config.model.family)
    weights = weights_key(config, checkpoint)
    if checkpoint is not None:
        from sipo.evaluate import measuring

        print(f"sipo: {measuring(checkpoint, weights)}")
    if adapter is None:  # the model directory's own numbers, read from its JSON before it loads
        from sipo.config import check_against_model
        from sipo.rundir import model_numbers

        numbers = model_numbers(config.model.pretrained_path)
        check_against_model(config, *numbers)
        if numbers[0] is not None and num_buckets > numbers[0]:
            raise SipoError(f"--buckets ({num_buckets}) cannot exceed the model's {numbers[0]} training timesteps")
    if dataset is None:
        from sipo.data import open_preference_dataset

        dataset = open_preference_dataset(config.data, config.model.resolution, seed=seed, family=config.model.family)
    if len(dataset) == 0:
        raise SipoError(f"the dataset {config.data.path!r} holds no pairs; point data.path at preference pairs")
    torch.manual_seed(seed)  # LoRA injection draws its initial weights from the global stream
    adapter, reference_predict, grads = prepare_model(
        config, checkpoint, adapter, max_grad_elements,
        weights_checkpoint=None if checkpoint is None else weights["path"])
    T = adapter.schedule.num_train_timesteps
    if num_buckets > T:
        raise SipoError(f"--buckets ({num_buckets}) cannot exceed the model's {T} training timesteps")

    device = adapter.device
    generator = torch.Generator().manual_seed(seed)
    # K running-mean vectors of P elements: float64 while that stays within 2 GiB, float32 beyond.
    accumulator = torch.float64 if num_buckets * grads.num_elements * 8 <= 2**31 else torch.float32
    welford = [WelfordTrace(grads.num_elements, device=device, dtype=accumulator) for _ in range(num_buckets)]
    scalars: dict[str, list[list[float]]] = {
        key: [[] for _ in range(num_buckets)]
        for key in ("t", "log_w_winner", "log_w_loser", "log_w_pair", "loss", "z", "err_winner", "err_loser")
    }
    used = 0
    bar = tqdm(total=num_pairs, desc="sipo analyze", unit="pair", disable=not progress, dynamic_ncols=True)
    for _, item in iter_pairs(dataset, num_pairs, seed):
        with torch.no_grad():
            sizes = item["size_info"][None] if "size_info" in item else None
            inputs = item["input_image"][None].to(device) if "input_image" in item else None
            encoded = adapter.encode(
                [item["prompt"]], item["chosen"][None].to(device), item["rejected"][None].to(device), size_info=sizes,
                input_images=inputs,
            )
        for bucket in range(num_buckets):
            noise = draw_bucket_noise(encoded.x0_winner.shape, T, bucket, num_buckets, generator)
            terms = compute_pair_terms(
                adapter, encoded, noise, beta=oc.beta, reference_predict=reference_predict,
                weight_norm=oc.weight_norm, pair_weight=oc.pair_weight, weight_model=oc.weight_model, weight_step=oc.weight_step,
                objective=oc.pair_settings(),
            )
            loss = terms.loss_pair[0]
            if torch.isfinite(loss):
                welford[bucket].update(flat_gradient(loss, grads.params))
            for key, value in (
                ("t", terms.timesteps), ("log_w_winner", terms.log_w_winner), ("log_w_loser", terms.log_w_loser),
                ("log_w_pair", terms.log_w_pair), ("loss", terms.loss_pair), ("z", terms.z),
                ("err_winner", terms.err_winner), ("err_loser", terms.err_loser),
            ):
                scalars[key][bucket].append(float(value[0].detach()))
        used += 1
        bar.update(1)
    bar.close()
    if used < 2:
        raise SipoError(f"found only {used} valid pair(s) in {config.data.path!r}; the analysis needs at least 2")

    rows = [
        _bucket_row(k, *bucket_bounds(k, num_buckets, T), {key: v[k] for key, v in scalars.items()}, welford[k], oc.tau)
        for k in range(num_buckets)
    ]
    all_log_w = np.array([v for per_bucket in scalars["log_w_pair"] for v in per_bucket])
    tau_curve = masked_fraction_curve(all_log_w, oc.tau)
    correlation = bucket_correlation(rows)
    gradient = {"kind": grads.kind, "description": grads.describe(), "num_tensors": len(grads.names),
                "num_elements": grads.num_elements, "accumulator_dtype": str(accumulator).removeprefix("torch."),
                "names": grads.names}
    findings = findings_paragraph(rows, T, correlation, used, oc.tau, tau_curve_at(all_log_w, oc.tau), grads.describe())

    output_dir = Path(output_dir)
    moved = claim_output_folder(output_dir, weights, products=ANALYSIS_PRODUCTS)
    if moved and verbose:
        print(f"sipo: {moved}")
    files = {"csv": output_dir / "analysis.csv", "tau_csv": output_dir / "masked_fraction_vs_tau.csv",
             "json": output_dir / "analysis.json"}
    write_csv(files["csv"], CSV_COLUMNS, rows)
    write_csv(files["tau_csv"], TAU_COLUMNS, tau_curve)
    if plots:
        files.update(plot_analysis(rows, tau_curve, oc.tau, T, output_dir))
    summary = {
        "model": {"family": config.model.family, "pretrained_path": config.model.pretrained_path,
                  "checkpoint": None if checkpoint is None else str(checkpoint),
                  "checkpoint_step": weights.get("checkpoint"), "weights_sha256": weights["weights"],
                  "num_train_timesteps": T, "num_inference_steps": adapter.schedule.num_inference_steps,
                  "prediction_type": adapter.schedule.prediction_type},
        "objective": {"beta": oc.beta, "tau": oc.tau, "weight_norm": oc.weight_norm,
                      "pair_weight": oc.pair_weight, "weight_model": oc.weight_model},
        "seed": seed, "num_pairs": used, "num_pairs_requested": num_pairs, "num_buckets": num_buckets,
        "gradient": gradient, "correlation": correlation,
    }
    validation = run_validation_curve(checkpoint)
    if validation:  # the run's held-out curve (sipo.validation) beside the per-timestep study
        findings += "\n" + validation_paragraph(validation)
    document = {**summary, "buckets": rows, "masked_fraction_vs_tau": tau_curve, "findings": findings,
                "files": {k: str(v) for k, v in files.items()}, "columns": list(CSV_COLUMNS),
                **({"validation": validation} if validation else {})}
    files["json"].write_text(json.dumps(_json_safe(document), indent=2))
    if verbose:
        print(findings)
        for name, path in files.items():
            print(f"  {name}: {path}")
    return AnalysisResult(rows, tau_curve, findings, gradient, files, summary)


def _stats(values: list[float]) -> tuple[float, float, list[float]]:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return float("nan"), float("nan"), [float("nan")] * len(QUANTILES)
    std = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    return float(finite.mean()), std, [float(q) for q in np.quantile(finite, QUANTILES)]


def _bucket_row(bucket: int, t_low: int, t_high: int, values: dict[str, list[float]], welford: WelfordTrace,
                tau: float) -> dict[str, float]:
    log_w_pair = np.asarray(values["log_w_pair"], dtype=np.float64)
    row: dict[str, float] = {
        "bucket": bucket, "t_low": t_low, "t_high": t_high, "t_mean": float(np.mean(values["t"])),
        "n_pairs": len(log_w_pair), "n_undefined": int((~np.isfinite(log_w_pair)).sum()),
    }
    for role in ROLES:
        mean, std, quantiles = _stats(values[f"log_w_{role}"])
        row[f"log_w_{role}_mean"] = mean
        row[f"log_w_{role}_std"] = std
        for q, value in zip(QUANTILES, quantiles):
            row[f"log_w_{role}_{_quantile_name(q)}"] = value
    loss_mean, loss_std, _ = _stats(values["loss"])
    z = np.asarray(values["z"], dtype=np.float64)
    row.update({
        "loss_mean": loss_mean, "loss_std": loss_std, "z_mean": float(np.nanmean(z)),
        "implicit_acc": float((z > 0).mean()),
        "err_winner_mean": float(np.nanmean(values["err_winner"])),
        "err_loser_mean": float(np.nanmean(values["err_loser"])),
        "n_grad": welford.count, "grad_norm_mean": welford.norm_mean, "grad_mean_norm": welford.mean_norm,
        "grad_var_trace": welford.variance_trace, "grad_var_per_dim": welford.variance_per_dim,
        "masked_fraction": masked_fraction(log_w_pair, tau),
    })
    return {column: row[column] for column in CSV_COLUMNS}


def masked_fraction(log_w_pair: np.ndarray, tau: float) -> float:
    """Fraction of draws the mask of SPEC 4 drops at ``tau``: ``w < tau``, compared in log space
    (``log w_pair < ln tau``, so weights beyond float range compare correctly), with undefined (NaN)
    weights counted as masked, as :func:`sipo.objectives.importance_mask` does. The timestep band
    (``t_min``/``t_max``) is not applied."""
    return _masked_fraction_log(log_w_pair, math.log(tau) if tau > 0 else -math.inf)


def _masked_fraction_log(log_w_pair: np.ndarray, log_tau: float) -> float:
    log_w_pair = np.asarray(log_w_pair, dtype=np.float64)
    if log_w_pair.size == 0:
        return float("nan")
    return float((np.isnan(log_w_pair) | (log_w_pair < log_tau)).mean())


def tau_curve_at(all_log_w: np.ndarray, tau: float) -> float:
    return masked_fraction(all_log_w, tau)


def masked_fraction_curve(all_log_w: np.ndarray, tau: float, points: int = 61) -> list[dict[str, float]]:
    """Masked fraction over all (pair, bucket) draws for a log-spaced grid of ``tau``.

    The grid runs from ``min(ln 0.01, ln tau, 1% quantile of log w_pair)`` to the largest observed
    ``log w_pair`` (or ``ln tau`` if larger), plus 5% of the span on each side: the range where the
    choice of ``tau`` matters, for ``weight_norm: mean`` (w near 1) and ``sum`` (w over many decades)
    alike. The extreme low tail below the 1% quantile is left out of the axis, not of the fractions.
    Computed in log space, so weights beyond float range compare exactly.
    """
    finite = all_log_w[np.isfinite(all_log_w)]
    log_tau = [math.log(tau)] if tau > 0 else []
    if finite.size:
        lo = min([math.log(0.01), float(np.quantile(finite, 0.01)), *log_tau])
        hi = max([float(finite.max()), *log_tau])
    else:
        lo, hi = math.log(0.01), max([0.0, *log_tau])
    pad = max(0.05 * (hi - lo), 1e-3)
    curve = []
    for value in np.linspace(lo - pad, hi + pad, points):
        curve.append({"tau": float(np.exp(value)), "log_tau": float(value),
                      "masked_fraction": _masked_fraction_log(all_log_w, float(value))})
    return curve


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):  # average ranks over ties
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2.0
        start = stop + 1
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def bucket_correlation(rows: list[dict[str, float]]) -> dict[str, float]:
    """Pearson and Spearman correlation, across buckets, of mean ``log w_pair`` and ``log10`` gradient
    variance (buckets where either is undefined are left out). Negative: low weights, high variance."""
    x = np.array([r["log_w_pair_mean"] for r in rows], dtype=np.float64)
    v = np.array([r["grad_var_trace"] for r in rows], dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(v) & (v > 0)
    x, y = x[ok], np.log10(v[ok])
    return {"pearson": _pearson(x, y), "spearman": _pearson(_ranks(x), _ranks(y)) if len(x) else float("nan"),
            "num_buckets": int(ok.sum())}


def _where(t_low: int, t_high: int, T: int) -> str:
    centre = (t_low + t_high) / 2 / T
    if centre < 1 / 3:
        return "the nearly clean end (t near 0, late in sampling)"
    if centre > 2 / 3:
        return "the nearly pure-noise end (t near T, what the paper calls 'early')"
    return "mid-trajectory"


def findings_paragraph(rows: list[dict[str, float]], T: int, correlation: dict[str, float], num_pairs: int,
                       tau: float, masked_at_tau: float, gradient: str) -> str:
    """One paragraph: where weights are lowest, where the gradient variance peaks, their correlation."""
    def span(row):
        return f"bucket {row['bucket']} (t in [{row['t_low']}, {row['t_high']}))"

    defined = [r for r in rows if math.isfinite(r["log_w_pair_mean"])]
    with_var = [r for r in rows if math.isfinite(r["grad_var_trace"])]
    parts = [f"Over {num_pairs} pairs and {len(rows)} timestep buckets of [0, {T}):"]
    if defined:
        low = min(defined, key=lambda r: r["log_w_pair_mean"])
        high = max(defined, key=lambda r: r["log_w_pair_mean"])
        parts.append(
            f"importance weights are lowest in {span(low)}, {_where(low['t_low'], low['t_high'], T)}, with mean "
            f"log w_pair {low['log_w_pair_mean']:.4g} (5% quantile {low['log_w_pair_q05']:.4g}"
            + (f"; {low['n_undefined']} of its {low['n_pairs']} draws undefined, t on the last inference step"
               if low["n_undefined"] else "")
            + f"), and highest in "
            f"{span(high)}, {_where(high['t_low'], high['t_high'], T)} (mean {high['log_w_pair_mean']:.4g})."
        )
    if with_var:
        peak = max(with_var, key=lambda r: r["grad_var_trace"])
        floor = min(with_var, key=lambda r: r["grad_var_trace"])
        ratio = peak["grad_var_trace"] / floor["grad_var_trace"] if floor["grad_var_trace"] > 0 else float("inf")
        parts.append(
            f"The variance over pairs of the per-pair DPO gradient (trace of the covariance, on {gradient}) "
            f"peaks in {span(peak)}, {_where(peak['t_low'], peak['t_high'], T)}, at {peak['grad_var_trace']:.4g}, "
            f"{ratio:.3g}x its lowest bucket ({span(floor)}, {floor['grad_var_trace']:.4g})."
        )
    if correlation["num_buckets"] >= 3:
        sign = correlation["spearman"]
        verdict = ("low weights go with high gradient variance, as the paper reports" if sign < -0.3 else
                   "high weights go with high gradient variance, the opposite of the paper's finding" if sign > 0.3 else
                   "there is no clear monotone relation")
        parts.append(
            f"Across buckets, mean log w_pair and log10 gradient variance correlate with Pearson r = "
            f"{correlation['pearson']:.2f} and Spearman rho = {correlation['spearman']:.2f}: {verdict}."
        )
    parts.append(f"At tau = {tau:g}, the mask would drop {100 * masked_at_tau:.1f}% of the (pair, timestep) draws.")
    return " ".join(parts)


# ----------------------------------------------------------------------------- output
def write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, float]]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _symlog_threshold(values: np.ndarray) -> float | None:
    """A symlog linear range for the log w axis when the bucket means span over two decades, else None."""
    magnitude = np.abs(values[np.isfinite(values)])
    magnitude = magnitude[magnitude > 0]
    if magnitude.size < 2 or magnitude.max() / np.median(magnitude) < 100:
        return None
    return float(10 ** math.floor(math.log10(np.median(magnitude))))


def plot_analysis(rows: list[dict[str, float]], tau_curve: list[dict[str, float]], tau: float, T: int,
                  output_dir: Path) -> dict[str, Path]:
    """Three PNGs: w vs t with quantile bands; gradient variance vs t (log axis); masked fraction vs tau."""
    from sipo.plotting import pyplot

    plt = pyplot()

    t = np.array([r["t_mean"] for r in rows])
    col = {c: np.array([r[c] for r in rows], dtype=np.float64) for c in CSV_COLUMNS if c != "bucket"}
    files = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(t, col["log_w_pair_q05"], col["log_w_pair_q95"], alpha=0.2, color="C0", label="pair 5-95%")
    ax.fill_between(t, col["log_w_pair_q25"], col["log_w_pair_q75"], alpha=0.35, color="C0", label="pair 25-75%")
    ax.plot(t, col["log_w_pair_mean"], "o-", color="C0", label="pair mean")
    ax.plot(t, col["log_w_winner_mean"], "--", color="C2", label="winner mean")
    ax.plot(t, col["log_w_loser_mean"], ":", color="C3", label="loser mean")
    if tau > 0:
        ax.axhline(math.log(tau), color="k", lw=0.8, ls="--", label=f"ln tau (tau={tau:g})")
    ax.set_xlim(0, T)
    ax.set_xlabel("timestep t (0 = clean, T = pure noise)")
    ax.set_ylabel("log w")
    linthresh = _symlog_threshold(col["log_w_pair_mean"])
    if linthresh is not None:  # a few buckets far below the rest: keep the others readable
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_ylabel(f"log w (symlog, linear within +-{linthresh:g})")
    ax.set_title("Importance weight vs timestep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files["plot_weights"] = output_dir / "log_w_vs_t.png"
    fig.savefig(files["plot_weights"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    var = col["grad_var_trace"]
    ok = np.isfinite(var) & (var > 0)
    ax.semilogy(t[ok], var[ok], "o-", color="C1", label="Var over pairs (trace)")
    norm2 = col["grad_mean_norm"] ** 2
    ok2 = np.isfinite(norm2) & (norm2 > 0)
    ax.semilogy(t[ok2], norm2[ok2], "s--", color="C4", label="||mean gradient||^2")
    ax.set_xlim(0, T)
    ax.set_xlabel("timestep t (0 = clean, T = pure noise)")
    ax.set_ylabel("per-pair gradient")
    ax.set_title("DPO gradient variance vs timestep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files["plot_variance"] = output_dir / "grad_variance_vs_t.png"
    fig.savefig(files["plot_variance"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    log_tau = np.array([c["log_tau"] for c in tau_curve])
    fraction = np.array([c["masked_fraction"] for c in tau_curve])
    ax.step(log_tau / math.log(10), fraction, where="post", color="C0")
    if tau > 0:
        ax.axvline(math.log10(tau), color="k", lw=0.8, ls="--", label=f"configured tau={tau:g}")
        ax.legend(fontsize=7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("log10 tau")
    ax.set_ylabel("fraction of draws masked (w < tau)")
    ax.set_title("Masked fraction vs tau")
    fig.tight_layout()
    files["plot_tau"] = output_dir / "masked_fraction_vs_tau.png"
    fig.savefig(files["plot_tau"], dpi=120)
    plt.close(fig)
    return files
