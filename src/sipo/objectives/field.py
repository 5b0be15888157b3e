"""The field's other offline objectives of SPEC 9 as pure functions on tensors.

Each takes the per-pair quantities of SPEC 2 (or the output-space tensors where its formula needs
them) and returns the unreduced per-pair loss ``[B]``; the trainer reduces (``reduce_pair_losses``).
Batch-level statistics (KTO's reference point, alpha-DPO's adaptive alpha) are inputs: the caller
computes them over the step's pairs on every process (sipo.preference). Nothing here reads a
config, a file or a clock.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sipo.objectives.core import _check_pair_shapes, dpo_loss_per_pair
from sipo.schedules import expand_like


def hinge_loss(z: Tensor) -> Tensor:
    """``relu(1 - z)`` (SPEC 9; diffusers' SD1.5 DPO example, ``--loss_type hinge``)."""
    return F.relu(1.0 - z)


def ipo_loss(z: Tensor, tau: float = 0.5) -> Tensor:
    """``(z - 1/(2*tau))^2`` (SPEC 9, IPO): pulls every pair's logit to ``1/(2 tau)`` (``tau=0.5``: ``z = 1``).

    diffusers' SD1.5 example has this branch but reads an undefined argument there; written from SPEC 9.
    """
    if tau <= 0:
        raise ValueError(f"ipo tau must be positive, got {tau}")
    return (z - 1.0 / (2.0 * float(tau))).pow(2)


def smoothed_dpo_loss(z: Tensor, label_smoothing: float) -> Tensor:
    """``-(1-ls)*logsigmoid(z) - ls*logsigmoid(-z)`` (SPEC 9; cDPO, OneTrainer PR #1403).

    ``ls`` is the probability that a pair's label is flipped; ``ls = 0`` is :func:`dpo_loss_per_pair`.
    """
    if label_smoothing == 0:
        return dpo_loss_per_pair(z)
    ls = float(label_smoothing)
    return -(1.0 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)


def dmpo_loss(z: Tensor, alpha: float = 0.01) -> Tensor:
    """``KL(Bern(p) || Bern(q))`` with ``p = sigmoid(z)``, ``q = clamp(1 - alpha, 1e-6, 1 - 1e-6)`` (SPEC 9).

    ``= p*(log p - log q) + (1-p)*(log(1-p) - log(1-q))`` with ``log p = -softplus(-z)`` and
    ``log(1-p) = -softplus(z)`` (stable for large ``|z|``). Minimal (zero) at ``p = q``: DMPO pulls
    each pair's preference probability to ``1 - alpha`` instead of to 1. Source: AIDC-AI/Diffusion-SDPO
    train.py, ``train_method == 'dmpo'`` (defaults of its scripts: alpha 0.01, beta 2000 SD1.5 / 6000 SDXL).
    """
    q = min(max(1.0 - float(alpha), 1e-6), 1.0 - 1e-6)
    p = torch.sigmoid(z)
    log_p, log_1mp = -F.softplus(-z), -F.softplus(z)
    return p * (log_p - math.log(q)) + (1.0 - p) * (log_1mp - math.log1p(-q))


def alpha_dpo_loss(z: Tensor, alpha: float | Tensor) -> Tensor:
    """``(p^alpha - (1 - alpha) - alpha*p) / (alpha*(alpha - 1))`` with ``p = sigmoid(z)`` (SPEC 9, alpha-DPO).

    For ``0 < alpha < 1`` it is non-negative, zero at ``p = 1`` and decreasing in ``z``. ``p^alpha`` is
    ``exp(alpha * logsigmoid(z))``. The adaptive alpha of the official code,
    ``alpha0 * mean(sigmoid(z)).detach()`` over the step's pairs of every process, is computed by the
    caller (:func:`adaptive_alpha`). Source: yangli-lab/Diffusion_alpha-DPO_ICLR2026 scripts/main.py.
    """
    alpha = torch.as_tensor(alpha, dtype=z.dtype, device=z.device).detach()
    p = torch.sigmoid(z)
    p_alpha = torch.exp(alpha * F.logsigmoid(z))
    return (p_alpha - (1.0 - alpha) - alpha * p) / (alpha * (alpha - 1.0))


def adaptive_alpha(mean_sigmoid_z: Tensor | float, alpha0: float = 0.9999) -> Tensor:
    """``alpha = alpha0 * mean(sigmoid(z))``, detached (alpha-DPO's adaptive alpha; the mean is the caller's)."""
    return (float(alpha0) * torch.as_tensor(mean_sigmoid_z)).detach()


def kto_loss(
    err_w: Tensor,
    err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
    reference_point: Tensor | float,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
) -> Tensor:
    """Diffusion-KTO on a pair, its winner desirable and its loser undesirable (SPEC 9).

    Per image ``g = -(err_theta - err_ref)`` (the implicit reward); ``kl`` = the reference point
    (:func:`kto_reference_point`, detached); ``h_w = sigmoid(0.5*beta*(g_w - kl))``,
    ``h_l = sigmoid(-0.5*beta*(g_l - kl))``; the pair's loss is the mean of its two images' losses,
    ``(lambda_d*(1 - h_w) + lambda_u*(1 - h_l)) / 2``, so the mean over pairs is the official mean over
    images. Source: jacklishufan/diffusion-kto train_kto_sd_v1.5.py (``--loss kto --halo sigmoid``,
    ``bce_offset none``); its scale is ``beta_dpo * g`` without the 0.5, so its ``--beta_dpo 1000`` is
    beta 2000 here.
    """
    _check_pair_shapes(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    kl = torch.as_tensor(reference_point, dtype=torch.float32, device=err_w.device).detach()
    g_w = -(err_w.float() - ref_err_w.float())
    g_l = -(err_l.float() - ref_err_l.float())
    scale = 0.5 * float(beta)
    loss_w = float(lambda_desirable) * (1.0 - torch.sigmoid(scale * (g_w - kl)))
    loss_l = float(lambda_undesirable) * (1.0 - torch.sigmoid(-scale * (g_l - kl)))
    return 0.5 * (loss_w + loss_l)


def kto_reference_point(mean_implicit_reward: Tensor | float) -> Tensor:
    """KTO's reference point ``kl = max(0, mean over images of g)``, detached (the mean is the caller's,
    all-reduced over processes as the official code does with ``accelerator.reduce``)."""
    return torch.as_tensor(mean_implicit_reward).detach().clamp(min=0.0)


def mapo_loss(
    err_w: Tensor, err_l: Tensor, num_train_timesteps: int, snr_value: float = 0.5, ratio_weight: float = 0.1
) -> Tensor:
    """MaPO, reference-free (SPEC 9): ``err_w - ratio_weight * logsigmoid(T * (f(err_w) - f(err_l)))``.

    ``f(e) = s*e / (exp(s*e) - 1)`` with the constant ``s = snr_value`` (a log-odds surrogate that
    decreases in ``e``: a lower winner error raises the margin); ``T`` = the scheduler's
    ``num_train_timesteps`` ("maximise the margin over the whole denoising process"). No beta and no
    reference model. Source: mapo-t2i/mapo utils.compute_loss (defaults ``--beta_mapo 0.1``,
    ``--snr_value 0.5``); its loss is ``mean(err_w) - mean(ratio)``, the mean of this per-pair loss.
    """
    _check_pair_shapes(err_w=err_w, err_l=err_l)
    s = float(snr_value)

    def log_odds(err: Tensor) -> Tensor:
        scaled = s * err.float()
        # s*e/expm1(s*e) -> 1 as e -> 0; the guard keeps an exact zero error finite.
        safe = torch.where(scaled == 0, torch.ones_like(scaled), scaled)
        return torch.where(scaled == 0, torch.ones_like(scaled), safe / torch.expm1(safe))

    margin = log_odds(err_w) - log_odds(err_l)
    return err_w.float() - float(ratio_weight) * F.logsigmoid(margin * float(num_train_timesteps))


DSPO_VARIANTS = ("sd15", "sdxl")


def dspo_loss(
    pred_w: Tensor, target_w: Tensor, ref_pred_w: Tensor, z: Tensor, beta: float, variant: str = "sd15"
) -> Tensor:
    """DSPO (SPEC 9), winner half only, per-sample mean over the non-batch dims, ``[B]``.

    ``sd15``: ``mean((pred_w - target_w) - beta*(1 - sigmoid(z))*(pred_w - pred_ref_w))^2``;
    ``sdxl`` (its SDXL branch): with ``d = pred_w - pred_ref_w``, ``mean(((1 - sigmoid(z)) * d)^2)`` when
    the batch mean of ``mean(d^2)`` is at least 0.1, else ``(1 - sigmoid(z))^2``. ``sigmoid(z)`` is NOT
    detached: the gradient flows through ``z`` as well as through ``pred_w``; ``pred_ref_w`` carries none.
    The same beta enters ``z``. Source: huaishengzhu/DSPO train.py (launchers: beta 0.001 SD1.5,
    5000 SDXL; its ``-0.5*beta_dpo`` scale is this project's).
    """
    if not (pred_w.shape == target_w.shape == ref_pred_w.shape) or pred_w.shape[0] != z.shape[0] or z.ndim != 1:
        raise ValueError(
            f"dspo_loss needs pred_w, target_w, ref_pred_w of one shape [B, ...] and z [B], got "
            f"{[tuple(t.shape) for t in (pred_w, target_w, ref_pred_w, z)]}"
        )
    pred_w, target_w, ref_pred_w = pred_w.float(), target_w.float(), ref_pred_w.detach().float()
    factor = expand_like(1.0 - torch.sigmoid(z.float()), pred_w)
    departure = pred_w - ref_pred_w
    batch = pred_w.shape[0]
    if variant == "sd15":
        residual = (pred_w - target_w) - float(beta) * factor * departure
        return residual.pow(2).reshape(batch, -1).mean(dim=1)
    if variant == "sdxl":
        if departure.pow(2).reshape(batch, -1).mean(dim=1).mean() >= 0.1:
            return (factor * departure).pow(2).reshape(batch, -1).mean(dim=1)
        return (1.0 - torch.sigmoid(z.float())).pow(2)
    raise ValueError(f"dspo variant must be one of {DSPO_VARIANTS}, got {variant!r}")


@torch.no_grad()
def winner_safeguard_scale(pred_w: Tensor, target_w: Tensor, pred_l: Tensor, target_l: Tensor, mu: float) -> Tensor:
    """Diffusion-SDPO's winner-preserving scale ``lambda`` of the loser's gradient, a detached scalar (SPEC 9).

    ``r_w = pred_w - target_w``, ``r_l = pred_l - target_l`` flattened over the micro-batch;
    ``lambda = clamp((1 - mu) * ||r_w||^2 / (r_l.r_w + 1e-9), 0, 1)`` when ``r_l.r_w > 0``, else 1.
    The caller enters the loser's error as ``sg(e_l) + lambda*(e_l - sg(e_l))`` (:func:`safeguarded_error`):
    the value is unchanged, the loser's gradient scaled so the step does not raise the winner's error
    (``mu = 1`` stops the loser's gradient whenever the residuals agree). Source: AIDC-AI/Diffusion-SDPO
    train.py ``get_adaptive_lose_l_scale``; it works on the MSE's output gradients ``2 r / N``, whose
    factor cancels in the ratio except against the 1e-9 guard.
    """
    if not 0.0 <= float(mu) <= 1.0:
        raise ValueError(f"safeguard mu must be in [0, 1], got {mu}")
    r_w = (pred_w.float() - target_w.float()).flatten()
    r_l = (pred_l.float() - target_l.float()).flatten()
    dot = (r_l * r_w).sum()
    capped = ((1.0 - float(mu)) * r_w.pow(2).sum() / (dot + 1e-9)).clamp(0.0, 1.0)
    return torch.where(dot > 0, capped, torch.ones_like(capped))


def safeguarded_error(err_l: Tensor, scale: Tensor | float) -> Tensor:
    """``sg(e_l) + scale*(e_l - sg(e_l))``: the value of ``e_l``, its gradient multiplied by ``scale``."""
    return err_l.detach() + torch.as_tensor(scale, dtype=err_l.dtype, device=err_l.device).detach() * (err_l - err_l.detach())


def elementwise_sipo_logits(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float, eps: float = 0.1
) -> Tensor:
    """The sd-scripts reading of the paper's v1 weight, on per-ELEMENT squared errors (SPEC 9).

    Per element and side: ``w = exp(ref_e - e)``; ``c = clamp(1/(w + 1e-8), 1 - eps, 1 + eps)``;
    ``c_max = max(c_w, c_l)``; ``logits = c_max*beta*(ref_e_w - e_w) - c_max*beta*(ref_e_l - e_l)``
    ``= -beta*c_max*((e_w - ref_e_w) - (e_l - ref_e_l))``; same shape in and out. ``c`` is detached (a
    weight, not trained). Source: kohya-ss/sd-scripts PR #1427 ``sdpo_loss`` as SPEC 9 transcribes it
    (the PR's code could not be read here). Its logit has no 0.5, unlike SPEC 2's ``z``: beta here is
    the PR's own (recommended 0.02, the preset's default), not this project's DPO units.
    """
    if not (err_w.shape == err_l.shape == ref_err_w.shape == ref_err_l.shape):
        raise ValueError(
            "elementwise errors must share one shape, got "
            f"{[tuple(t.shape) for t in (err_w, err_l, ref_err_w, ref_err_l)]}"
        )
    err_w, err_l, ref_err_w, ref_err_l = (t.float() for t in (err_w, err_l, ref_err_w, ref_err_l))
    with torch.no_grad():
        low, high = 1.0 - float(eps), 1.0 + float(eps)
        c_w = (1.0 / (torch.exp(ref_err_w - err_w.detach()) + 1e-8)).clamp(low, high)
        c_l = (1.0 / (torch.exp(ref_err_l - err_l.detach()) + 1e-8)).clamp(low, high)
        c_max = torch.maximum(c_w, c_l)
    return -float(beta) * c_max * ((err_w - ref_err_w) - (err_l - ref_err_l))


def elementwise_sipo_loss(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float, eps: float = 0.1
) -> Tensor:
    """``mean over the non-batch dims of -logsigmoid(elementwise_sipo_logits(...))``, ``[B]`` (SPEC 9)."""
    logits = elementwise_sipo_logits(err_w, err_l, ref_err_w, ref_err_l, beta, eps)
    return dpo_loss_per_pair(logits).reshape(logits.shape[0], -1).mean(dim=1)


def sft_loss(err_w: Tensor) -> Tensor:
    """``err_theta(w)``: supervised fine-tuning on the winners only (official Diffusion-DPO ``--sft``)."""
    return err_w.float()


def auto_beta(
    abs_margin_ema: float | Tensor,
    target_gradient_factor: float = 0.2,
    beta_min: float | None = None,
    beta_max: float | None = None,
) -> float:
    """``beta = -2*logit(g) / ema``, clamped to ``[beta_min, beta_max]`` (SPEC 9, automatic beta).

    With ``ema`` the running mean of ``|delta|``, a pair of typical margin (``z = 0.5*beta*ema``) then
    has the gradient factor ``sigmoid(-z) = g``. ``g`` in ``(0, 0.5)`` gives a positive beta.
    Source: SimpleTuner's Flow-DPO auto-beta (its rule, in this project's ``z = -0.5*beta*delta``).
    """
    g = float(target_gradient_factor)
    if not 0.0 < g < 0.5:
        raise ValueError(f"target_gradient_factor must be in (0, 0.5), got {g}")
    ema = float(abs_margin_ema)
    logit_g = math.log(g) - math.log1p(-g)
    beta = -2.0 * logit_g / ema if ema > 0 else float("inf")
    if beta_max is not None:
        beta = min(beta, float(beta_max))
    if beta_min is not None:
        beta = max(beta, float(beta_min))
    return beta


def abs_margin_for_beta(beta: float, target_gradient_factor: float = 0.2) -> float:
    """``ema = -2*logit(g) / beta``: the typical ``|delta|`` at which ``beta`` gives the gradient factor
    ``g`` (the inverse of :func:`auto_beta`; SPEC 9). It seeds the automatic beta's EMA, so the rule
    starts from the configured beta and moves only as fast as the EMA lets the measured margins in."""
    g = float(target_gradient_factor)
    if not 0.0 < g < 0.5:
        raise ValueError(f"target_gradient_factor must be in (0, 0.5), got {g}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return -2.0 * (math.log(g) - math.log1p(-g)) / float(beta)


def update_abs_margin_ema(ema: float, mean_abs_delta: float, decay: float = 0.99) -> float:
    """``ema <- decay*ema + (1 - decay)*m`` (SPEC 9). The first ``ema`` is :func:`abs_margin_for_beta` of
    the configured beta, never a step's margin: the margins of the first steps after a zero LoRA are
    ~1e-7 and would send beta to its cap."""
    return float(decay) * float(ema) + (1.0 - float(decay)) * float(mean_abs_delta)
