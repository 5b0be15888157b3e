"""The objectives of SPEC 2-5 as pure functions on tensors: Diffusion-DPO, the importance weight,
DPO-C&M and SIPO.

Per-pair quantities come first (``dpo_logits``, ``log_importance_weight``, ``pair_log_weight``);
turning them into one scalar is a separate, named step (``importance_mask``, ``clip_weight``,
``reduce_pair_losses``, composed by ``preference_loss``). Nothing here reads a config, a file or
a clock, and nothing draws random numbers: the caller draws ``t``, ``eps`` and ``x_prev``.

Shapes: batch first; per-pair results are float32 ``[B]``. Passing ``[B]`` where ``[B]`` is
expected and ``[B, 1]`` elsewhere raises instead of silently broadcasting to ``[B, B]``.
"""


from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sipo.schedules import expand_like

PAIR_WEIGHT_MODES = ("product", "min", "mean")
WEIGHT_PLACEMENTS = ("inside", "outside")
WEIGHT_NORMS = ("mean", "sum")
NORMALIZE_MODES = ("self", "batch")


def _check_pair_shapes(**tensors: Tensor) -> int:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"expected 1-d per-pair tensors of one shape [B], got {shapes}")
    return first[0]


def per_sample_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``err = mean over the D elements of (prediction - target)^2``, float32 ``[B]`` (SPEC 2)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    diff = prediction.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def dpo_logits(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float
) -> Tensor:
    """Diffusion-DPO logits (SPEC 2), the official Diffusion-DPO scaling.

    ``delta = (err_w - err_l) - (ref_err_w - ref_err_l)``; ``z = -0.5 * beta * delta``.
    The per-pair loss is ``-logsigmoid(z)`` (:func:`dpo_loss_per_pair`); swapping winner and
    loser negates ``z``. diffusers' SD1.5 DPO example's beta equals 0.5x this one.
    """
    _check_pair_shapes(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    # Grouped per trajectory: policy and reference errors are close, so each difference is exact
    # or nearly so, and weights of one in weighted_dpo_logits reproduce this bit for bit.
    delta = (err_w.float() - ref_err_w.float()) - (err_l.float() - ref_err_l.float())
    return -0.5 * float(beta) * delta


def weighted_dpo_logits(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    weight_w: Tensor,
    weight_l: Tensor,
    beta: float,
) -> Tensor:
    """DPO logits with one weight per trajectory inside the log-sigmoid (SPEC 4a, ``inside``).

    ``z = -0.5 * beta * (weight_w * (err_w - ref_err_w) - weight_l * (err_l - ref_err_l))``.
    The weights are detached (they scale each trajectory's log-ratio term, they are not trained);
    weights of one give exactly :func:`dpo_logits`. Non-finite weights give non-finite ``z``:
    callers replace masked weights before this call (:func:`inside_preference_loss`).
    """
    _check_pair_shapes(
        err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l, weight_w=weight_w, weight_l=weight_l
    )
    log_ratio_w = err_w.float() - ref_err_w.float()
    log_ratio_l = err_l.float() - ref_err_l.float()
    delta = weight_w.detach().float() * log_ratio_w - weight_l.detach().float() * log_ratio_l
    return -0.5 * float(beta) * delta


def dpo_loss_per_pair(z: Tensor) -> Tensor:
    """``loss_pair = -logsigmoid(z)`` (SPEC 2), unreduced ``[B]``; stable for large ``|z|``."""
    return -F.logsigmoid(z)


def _posterior_coefficients(a_t, b_t, a_s, b_s, like: Tensor):
    """Coefficients of ``q(x_s | x_t, x0)`` in float64 (they are per-sample scalars).

    ``r = a_t / a_s``, ``s2_ts = b_t^2 - r^2 b_s^2``;
    ``mu = (r b_s^2 / b_t^2) x_t + (a_s s2_ts / b_t^2) x0``; ``var = s2_ts b_s^2 / b_t^2``.
    """

    def as64(value):
        return torch.as_tensor(value, dtype=torch.float64, device=like.device)

    a_t, b_t, a_s, b_s = (as64(v) for v in (a_t, b_t, a_s, b_s))
    r = a_t / a_s
    s2_ts = b_t**2 - r**2 * b_s**2
    coef_xt = r * b_s**2 / b_t**2
    coef_x0 = a_s * s2_ts / b_t**2
    var = s2_ts * b_s**2 / b_t**2
    return coef_xt, coef_x0, var


def _per_sample(value: Tensor, batch: int) -> Tensor:
    return value.expand(batch) if value.ndim == 0 else value


def gaussian_posterior(
    x_t: Tensor, x0: Tensor, a_t, b_t, a_s, b_s
) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``q(x_s | x_t, x0)`` for ``s < t`` (SPEC 3, VDM form).

    With ``r = a_t / a_s`` and ``s2_ts = b_t^2 - r^2 b_s^2``:
    ``mean = (r b_s^2 / b_t^2) x_t + (a_s s2_ts / b_t^2) x0`` and ``var = s2_ts b_s^2 / b_t^2``.
    ``a``/``b`` are floats or ``[B]`` tensors; ``var`` is returned per sample, float32 ``[B]``.
    """
    coef_xt, coef_x0, var = _posterior_coefficients(a_t, b_t, a_s, b_s, x_t)
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    mean = (
        expand_like(coef_xt.to(dtype), x_t) * x_t.to(dtype)
        + expand_like(coef_x0.to(dtype), x0) * x0.to(dtype)
    )
    return mean, _per_sample(var, x_t.shape[0]).float()


@torch.no_grad()
def log_importance_weight(
    x_prev: Tensor,
    x_t: Tensor,
    x0: Tensor,
    x0_hat: Tensor,
    a_t,
    b_t,
    a_s,
    b_s,
    reduction: str = "mean",
) -> Tensor:
    """Step-wise log importance weight ``log p_theta(x_s|x_t) - log q(x_s|x_t,x0)`` (SPEC 3).

    Both densities are Gaussians with the posterior variance ``s2``; ``p_theta`` has the
    posterior mean with ``x0_hat`` in place of ``x0``. Written without cancellation as
    ``log w = sum(d * (2e - d)) / (2 s2)`` with ``e = x_prev - mu(x_t, x0)`` and
    ``d = (a_s s2_ts / b_t^2) (x0_hat - x0)``; ``reduction="mean"`` divides by the number of
    elements ``D`` (the project default, ``weight_norm: mean``), ``"sum"`` does not.

    Returns float32 ``[B]``, detached. Where ``s2 == 0`` (``b_s == 0``: the last inference
    step) the weight is undefined and the result is NaN; callers count such pairs as masked.
    """
    if reduction not in WEIGHT_NORMS:
        raise ValueError(f"reduction must be one of {WEIGHT_NORMS}, got {reduction!r}")
    if not (x_prev.shape == x_t.shape == x0.shape == x0_hat.shape):
        raise ValueError(
            "x_prev, x_t, x0 and x0_hat must share one shape, got "
            f"{[tuple(t.shape) for t in (x_prev, x_t, x0, x0_hat)]}"
        )
    batch = x_t.shape[0]
    coef_xt, coef_x0, var = _posterior_coefficients(a_t, b_t, a_s, b_s, x_t)
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    x_prev, x_t, x0, x0_hat = (t.detach().to(dtype) for t in (x_prev, x_t, x0, x0_hat))
    mean = expand_like(coef_xt.to(dtype), x_t) * x_t + expand_like(coef_x0.to(dtype), x0) * x0
    e = x_prev - mean
    d = expand_like(coef_x0.to(dtype), x0) * (x0_hat - x0)
    total = (d * (2.0 * e - d)).reshape(batch, -1).sum(dim=1).double()
    if reduction == "mean":
        total = total / x_t[0].numel()
    var = _per_sample(var, batch)
    log_w = torch.where(var > 0, total / (2.0 * var.clamp(min=torch.finfo(torch.float64).tiny)),
                        torch.full_like(total, float("nan")))
    return log_w.float()


def pair_log_weight(log_w_winner: Tensor, log_w_loser: Tensor, mode: str = "product") -> Tensor:
    """Combine both trajectories' log weights into one per pair (SPEC 3, ``pair_weight``).

    ``product``: ``log w_w + log w_l``; ``min``: ``min(log w_w, log w_l)``;
    ``mean``: ``log((w_w + w_l) / 2)``, computed as ``logaddexp - log 2``.
    """
    _check_pair_shapes(log_w_winner=log_w_winner, log_w_loser=log_w_loser)
    if mode == "product":
        return log_w_winner + log_w_loser
    if mode == "min":
        return torch.minimum(log_w_winner, log_w_loser)
    if mode == "mean":
        return torch.logaddexp(log_w_winner, log_w_loser) - math.log(2.0)
    raise ValueError(f"pair_weight must be one of {PAIR_WEIGHT_MODES}, got {mode!r}")


def importance_mask(
    weight: Tensor, timesteps: Tensor, tau: float, t_min: int | None = None, t_max: int | None = None
) -> Tensor:
    """``mask = (w >= tau) & (t_min <= t <= t_max)`` (SPEC 4); undefined (NaN) weights are masked."""
    _check_pair_shapes(weight=weight, timesteps=timesteps)
    keep = torch.isfinite(weight) & (weight >= tau)
    if t_min is not None:
        keep &= timesteps >= t_min
    if t_max is not None:
        keep &= timesteps <= t_max
    return keep


def clip_weight(weight: Tensor, w_floor: float = 0.0, w_clip: float | None = None) -> Tensor:
    """``w_c = clamp(w, min=w_floor, max=w_clip)`` (SPEC 4); NaN stays NaN."""
    return weight.clamp(min=w_floor, max=w_clip)


class LossSums(NamedTuple):
    """A loss of SPEC 4-5 as the ratio ``numerator / max(floor, denominator)`` of two sums over pairs.

    Every sum of SPEC 4/5 runs over the optimizer step's whole batch (N processes x G micro-batches x
    B pairs) with ONE normaliser: each micro-batch contributes its two sums, and the step's loss is
    :func:`step_loss` of their totals. ``numerator`` carries the gradient; ``denominator`` (the kept
    count, the kept weight sum or the pair count) is detached, so the gradient of the step's loss is
    the gradient of the summed numerators divided by the step's normaliser.
    """

    numerator: Tensor
    denominator: Tensor
    floor: float


def step_loss(numerator: Tensor, denominator: Tensor, floor: float) -> Tensor:
    """``numerator / max(floor, denominator)`` (SPEC 4-5): the step's loss from the sums over its whole batch.

    ``floor`` is 1 for counts (``max(1, sum(mask))``: a batch with every pair masked has loss 0) and
    ``eps`` for SIPO's self-normalised weight sum (``max(eps, sum(mask * w_c))``).
    """
    return numerator / denominator.clamp(min=floor).to(numerator.dtype)


def pair_loss_sums(
    loss_pair: Tensor,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    normalize: str = "self",
    eps: float = 1e-8,
) -> LossSums:
    """The two sums of :func:`reduce_pair_losses` over this batch's pairs (SPEC 4-5).

    - no weight (DPO, C&M): ``sum(mask * loss)`` over ``sum(mask)`` (no mask: every pair), floor 1;
    - weight, ``normalize="self"`` (SIPO): ``sum(mask * w * loss)`` over ``sum(mask * w)``, floor ``eps``;
    - weight, ``normalize="batch"``: ``sum(mask * w * loss)`` over the number of pairs, floor 1.

    Masked entries contribute exactly zero even if their loss or weight is NaN.
    """
    batch = loss_pair.shape[0]
    if mask is None:
        mask = torch.ones(batch, dtype=torch.bool, device=loss_pair.device)
    _check_pair_shapes(loss_pair=loss_pair, mask=mask)
    zero = torch.zeros((), dtype=loss_pair.dtype, device=loss_pair.device)
    if weight is None:
        return LossSums(torch.where(mask, loss_pair, zero).sum(), mask.sum().to(loss_pair.dtype).detach(), 1.0)
    _check_pair_shapes(loss_pair=loss_pair, weight=weight)
    weight = torch.where(mask, weight.detach().to(loss_pair.dtype), zero)
    total = (weight * torch.where(mask, loss_pair, zero)).sum()
    if normalize == "self":
        return LossSums(total, weight.sum().detach(), eps)
    if normalize == "batch":
        return LossSums(total, torch.tensor(float(batch), dtype=loss_pair.dtype, device=loss_pair.device), 1.0)
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")


def reduce_pair_losses(
    loss_pair: Tensor,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    normalize: str = "self",
    eps: float = 1e-8,
) -> Tensor:
    """Reduce per-pair losses to one scalar (SPEC 4-5): :func:`step_loss` of :func:`pair_loss_sums`.

    - no weight (DPO, C&M): ``sum(mask * loss) / max(1, sum(mask))``; with no mask, the mean.
    - weight, ``normalize="self"`` (SIPO): ``sum(mask * w * loss) / max(eps, sum(mask * w))``.
    - weight, ``normalize="batch"``: ``sum(mask * w * loss) / B``.

    Masked entries contribute exactly zero even if their loss or weight is NaN, so a batch in
    which every pair is masked gives a loss of 0 with finite (zero) gradients. This is the loss of
    ONE batch; the trainer's step sums the two parts over every micro-batch and process first.
    """
    return step_loss(*pair_loss_sums(loss_pair, mask, weight, normalize, eps))


def preference_loss_sums(
    loss_pair: Tensor,
    weight: Tensor,
    timesteps: Tensor,
    *,
    mask: bool = False,
    clip: bool = False,
    reweight: bool = False,
    tau: float = 0.0,
    t_min: int | None = None,
    t_max: int | None = None,
    w_floor: float = 0.0,
    w_clip: float | None = None,
    normalize: str = "self",
    eps: float = 1e-8,
) -> tuple[LossSums, Tensor, Tensor]:
    """The one code path behind DPO, +mask, +clip, +reweight, C&M and SIPO (SPEC 4-5).

    ``weight`` is the per-pair importance weight ``w`` (``exp(log_w_pair)``, or its timestep EMA).
    Switches: ``mask`` keeps pairs with ``w >= tau`` inside ``[t_min, t_max]``; ``clip`` bounds
    ``w`` to ``[w_floor, w_clip]``; ``reweight`` multiplies each kept pair's loss by its (clipped)
    weight and normalises per ``normalize``. Clipping changes only the weights that reweighting
    uses: with ``reweight`` off (C&M) the loss is the masked mean. All switches off is the
    Diffusion-DPO mean.

    Returns ``(LossSums, keep [B] bool, effective_weight [B])``; ``effective_weight`` is the clipped
    weight (or ``w`` itself when ``clip`` is off), for logging. The loss is :func:`step_loss` of the
    sums, totalled over the optimizer step's whole batch first (:class:`LossSums`).
    """
    _check_pair_shapes(loss_pair=loss_pair, weight=weight, timesteps=timesteps)
    weight = weight.detach().float()
    effective_weight = clip_weight(weight, w_floor, w_clip) if clip else weight
    if mask:
        keep = importance_mask(weight, timesteps, tau, t_min, t_max)
    else:
        keep = torch.ones_like(weight, dtype=torch.bool)
    if reweight:
        keep = keep & torch.isfinite(effective_weight)
        sums = pair_loss_sums(loss_pair, keep, effective_weight, normalize, eps)
    else:
        sums = pair_loss_sums(loss_pair, keep)
    return sums, keep, effective_weight


def preference_loss(
    loss_pair: Tensor,
    weight: Tensor,
    timesteps: Tensor,
    *,
    mask: bool = False,
    clip: bool = False,
    reweight: bool = False,
    tau: float = 0.0,
    t_min: int | None = None,
    t_max: int | None = None,
    w_floor: float = 0.0,
    w_clip: float | None = None,
    normalize: str = "self",
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`preference_loss_sums` of one batch as ``(loss, keep [B], effective_weight [B])`` (SPEC 4-5)."""
    sums, keep, effective_weight = preference_loss_sums(
        loss_pair, weight, timesteps, mask=mask, clip=clip, reweight=reweight, tau=tau, t_min=t_min, t_max=t_max,
        w_floor=w_floor, w_clip=w_clip, normalize=normalize, eps=eps,
    )
    return step_loss(*sums), keep, effective_weight


def trust_region_bounds(clip_eps: float) -> tuple[float, float]:
    """The clip range ``[max(0, 1 - eps), 1 + eps]`` of SPEC 4a; ``eps = 1`` is ``[0, 2]`` (SPEC 4)."""
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    return max(0.0, 1.0 - clip_eps), 1.0 + clip_eps


def inside_preference_loss_sums(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    weight_w: Tensor,
    weight_l: Tensor,
    pair_weight: Tensor,
    timesteps: Tensor,
    *,
    beta: float,
    mask: bool = True,
    clip: bool = True,
    reweight: bool = True,
    tau: float = 0.9,
    t_min: int | None = None,
    t_max: int | None = None,
    clip_eps: float = 0.1,
    pair_loss=None,
) -> tuple[LossSums, Tensor, Tensor, Tensor]:
    """DPO-C&M and SIPO with the weights inside the log-sigmoid (SPEC 4a, the paper's reading).

    ``keep = (pair_weight >= tau) & t in [t_min, t_max]`` (with ``pair_weight = min(w_w, w_l)``
    this thresholds each trajectory); ``c = clamp(w, 1 - eps, 1 + eps)`` per trajectory when
    ``clip``; ``reweight`` puts ``c_w, c_l`` (or the raw weights) into :func:`weighted_dpo_logits`,
    otherwise ``z`` is the plain :func:`dpo_logits` (C&M); the loss is the masked mean
    ``sum(keep * -logsigmoid(z)) / max(1, sum(keep))``. With every switch off this is DPO's mean.

    A trajectory weight that is not finite (undefined on the last inference step) masks its pair
    whenever weights are used; masked weights are replaced by one BEFORE the product, so a NaN
    never reaches ``z`` and masked pairs have zero loss and zero, finite gradients.

    ``pair_loss`` maps ``z`` to the per-pair loss (None: ``-logsigmoid(z)``; SPEC 9's hinge, IPO,
    smoothing, DMPO and alpha-DPO are functions of ``z`` alone and combine with the weights here).

    Returns ``(LossSums, keep [B] bool, z [B], effective pair weight [B])``; the last is
    ``min(c_w, c_l)`` (for logging). The loss is :func:`step_loss` of the sums, totalled over the
    optimizer step's whole batch first.
    """
    _check_pair_shapes(weight_w=weight_w, weight_l=weight_l, pair_weight=pair_weight, timesteps=timesteps)
    weight_w, weight_l = weight_w.detach().float(), weight_l.detach().float()
    if mask:
        keep = importance_mask(pair_weight.detach().float(), timesteps, tau, t_min, t_max)
    else:
        keep = torch.ones_like(weight_w, dtype=torch.bool)
    if clip:
        low, high = trust_region_bounds(clip_eps)
        weight_w, weight_l = clip_weight(weight_w, low, high), clip_weight(weight_l, low, high)
    effective_weight = torch.minimum(weight_w, weight_l)
    if reweight:
        keep = keep & torch.isfinite(weight_w) & torch.isfinite(weight_l)
        one = torch.ones_like(weight_w)
        z = weighted_dpo_logits(
            err_w, err_l, ref_err_w, ref_err_l,
            torch.where(keep, weight_w, one), torch.where(keep, weight_l, one), beta,
        )
    else:
        z = dpo_logits(err_w, err_l, ref_err_w, ref_err_l, beta)
    sums = pair_loss_sums(dpo_loss_per_pair(z) if pair_loss is None else pair_loss(z), keep)
    return sums, keep, z, effective_weight


def inside_preference_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    weight_w: Tensor,
    weight_l: Tensor,
    pair_weight: Tensor,
    timesteps: Tensor,
    *,
    beta: float,
    mask: bool = True,
    clip: bool = True,
    reweight: bool = True,
    tau: float = 0.9,
    t_min: int | None = None,
    t_max: int | None = None,
    clip_eps: float = 0.1,
    pair_loss=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`inside_preference_loss_sums` of one batch as ``(loss, keep, z, effective pair weight)`` (SPEC 4a)."""
    sums, keep, z, effective_weight = inside_preference_loss_sums(
        err_w, err_l, ref_err_w, ref_err_l, weight_w, weight_l, pair_weight, timesteps, beta=beta, mask=mask,
        clip=clip, reweight=reweight, tau=tau, t_min=t_min, t_max=t_max, clip_eps=clip_eps, pair_loss=pair_loss,
    )
    return step_loss(*sums), keep, z, effective_weight


def timestep_bucket(timesteps: Tensor, num_train_timesteps: int, num_buckets: int) -> Tensor:
    """Bucket index ``floor(t * K / T)`` in ``[0, K)`` for ``K`` equal buckets over ``[0, T)``."""
    return (timesteps.long() * num_buckets // num_train_timesteps).clamp(0, num_buckets - 1)


def update_timestep_ema(
    ema: Tensor, seen: Tensor, buckets: Tensor, weight: Tensor, decay: float
) -> tuple[Tensor, Tensor]:
    """One update of the per-bucket exponential moving average of ``w`` (SPEC 5, ``timestep_ema``).

    For each bucket with finite weights in this batch, with ``m`` their batch mean:
    ``ema <- decay * ema + (1 - decay) * m``, or ``ema <- m`` the first time the bucket is seen.
    Returns new ``(ema, seen)`` tensors; the inputs are not modified.
    """
    _check_pair_shapes(buckets=buckets, weight=weight)
    finite = torch.isfinite(weight)
    idx = buckets[finite].long()
    values = weight[finite].to(ema.dtype)
    sums = torch.zeros_like(ema).index_add_(0, idx, values)
    counts = torch.zeros_like(ema).index_add_(0, idx, torch.ones_like(values))
    observed = counts > 0
    batch_mean = sums / counts.clamp(min=1)
    blended = torch.where(seen, decay * ema + (1.0 - decay) * batch_mean, batch_mean)
    new_ema = torch.where(observed, blended, ema)
    return new_ema, seen | observed
