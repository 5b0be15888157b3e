"""One forward pass over a batch of preference pairs -> every per-pair term of SPEC 2-3.

Shared by the trainer and the analysis, so both compute exactly the same ``z``, loss and
importance weights. The caller draws the randomness (``draw_pair_noise``) so winner and loser
share ``t``, ``eps`` and the posterior noise by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sipo import objectives
from sipo.models.base import Conditioning, DiffusionAdapter, EncodedPairs, concat_conditioning, lora_disabled
from sipo.schedules import add_noise, predicted_x0_and_eps, training_target

ReferencePredict = Callable[[Tensor, Tensor, Conditioning], Tensor]


@dataclass
class PairNoise:
    """The randomness of one step: timesteps ``[B]``, forward noise and posterior noise ``[B, ...]``."""

    timesteps: Tensor
    eps: Tensor
    posterior_noise: Tensor


@dataclass
class PairTerms:
    """Per-pair results of one step; every tensor is ``[B]``."""

    timesteps: Tensor
    z: Tensor
    loss_pair: Tensor
    err_winner: Tensor
    err_loser: Tensor
    ref_err_winner: Tensor
    ref_err_loser: Tensor
    log_w_winner: Tensor
    log_w_loser: Tensor
    log_w_pair: Tensor


def encoded_batch(adapter: DiffusionAdapter, batch: dict[str, Any], device: torch.device) -> EncodedPairs:
    """A batch in model space: from the latent cache as is, or through the frozen encoders."""
    if "x0_chosen" in batch:
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return EncodedPairs(move(batch["x0_chosen"]), move(batch["x0_rejected"]),
                            {k: move(v) for k, v in batch["conditioning"].items()})
    extra = {"size_info": batch["size_info"]} if batch.get("size_info") is not None else {}
    with torch.no_grad():
        return adapter.encode(batch["prompts"], batch["chosen"].to(device, non_blocking=True),
                              batch["rejected"].to(device, non_blocking=True), **extra)


def reference_predictor(adapter: DiffusionAdapter, denoiser: nn.Module, reference_denoiser: nn.Module | None = None
                        ) -> ReferencePredict:
    """The reference model's prediction, as the trainer and the analysis both define it: the frozen
    copy ``reference_denoiser`` of a full fine-tune, or ``denoiser`` with its LoRA switched off."""

    def reference_predict(x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if reference_denoiser is not None:
            return adapter.predict(x_t, t, cond, denoiser=reference_denoiser)
        with lora_disabled(denoiser):
            return adapter.predict(x_t, t, cond, denoiser=denoiser)

    return reference_predict


#: ``objective.timestep_sampling``: how the trainer draws ``t`` (SPEC 10; Esser et al. 2024, SD3 paper 3.1)
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")


def sample_noise_level_fractions(
    count: int, generator: torch.Generator, sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> Tensor:
    """``u`` in ``[0, 1]`` ``[count]`` from the SD3 paper's densities, drawn on ``generator``.

    ``logit_normal``: ``u = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)``; ``mode``:
    ``u = 1 - v - mode_scale * (cos(pi v / 2)^2 - 1 + v)``, ``v ~ U[0, 1)``. The formulas of diffusers'
    training_utils.compute_density_for_timestep_sampling (its train_dreambooth_lora_flux.py / _sd3.py
    defaults: mean 0, std 1, mode_scale 1.29), there drawn on the global generator.
    """
    if sampling == "logit_normal":
        normal = torch.randn((count,), generator=generator, dtype=torch.float64) * logit_std + logit_mean
        return torch.sigmoid(normal)
    if sampling == "mode":
        v = torch.rand((count,), generator=generator, dtype=torch.float64)
        return 1.0 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1.0 + v)
    raise ValueError(f"sampling must be logit_normal or mode here, got {sampling!r}")


def draw_pair_noise(
    x0_shape: torch.Size,
    num_train_timesteps: int,
    generator: torch.Generator,
    t_low: int = 0,
    t_high: int | None = None,
    timestep_sampling: str = "uniform",
    **density: float,
) -> PairNoise:
    """Draw ``t`` and Gaussian noise on the CPU generator.

    ``uniform`` (default): ``t ~ U{t_low..t_high-1}``. ``logit_normal`` / ``mode`` (full range only):
    ``u`` from `sample_noise_level_fractions` (``density``: its ``logit_mean``, ``logit_std``,
    ``mode_scale``), then the training index as diffusers' flow LoRA scripts pick it,
    ``index = floor(u T)`` into the scheduler's descending timesteps (index 0 = the noisiest), which
    is ``t = T - 1 - index`` on this project's ascending grid (large ``u``: low noise). Both densities
    are symmetric about ``u = 1/2``, so the direction only matters for a non-zero ``logit_mean``.
    Drawing on the CPU keeps the stream identical across devices, which is what makes a resumed run
    continue exactly.
    """
    t_high = num_train_timesteps if t_high is None else t_high
    batch = x0_shape[0]
    if timestep_sampling == "uniform":
        timesteps = torch.randint(t_low, t_high, (batch,), generator=generator)
    elif timestep_sampling in TIMESTEP_SAMPLINGS:
        if (t_low, t_high) != (0, num_train_timesteps):
            raise ValueError(f"timestep_sampling={timestep_sampling!r} draws over all {num_train_timesteps} timesteps only")
        u = sample_noise_level_fractions(batch, generator, timestep_sampling, **density)
        index = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)  # u = 1.0 in float rounding
        timesteps = num_train_timesteps - 1 - index
    else:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {timestep_sampling!r}")
    eps = torch.randn(tuple(x0_shape), generator=generator)
    posterior_noise = torch.randn(tuple(x0_shape), generator=generator)
    return PairNoise(timesteps, eps, posterior_noise)


def compute_pair_terms(
    adapter: DiffusionAdapter,
    encoded: EncodedPairs,
    noise: PairNoise,
    *,
    beta: float,
    reference_predict: ReferencePredict,
    denoiser: nn.Module | None = None,
    weight_norm: str = "mean",
    pair_weight: str = "product",
    weight_model: str = "policy",
    weight_step: str = "inference",
) -> PairTerms:
    """Run policy and reference on winner and loser in one batch of ``2B`` and return the terms.

    The importance weight uses ``x_prev = mu(x_t, x0) + sqrt(s2) * posterior_noise``, a draw from
    ``q(x_s | x_t, x0)`` (SPEC 3), and the prediction of ``weight_model``; it carries no gradient.
    """
    schedule = adapter.schedule
    device = encoded.x0_winner.device
    x0 = torch.cat([encoded.x0_winner, encoded.x0_loser], dim=0)
    dtype = x0.dtype
    timesteps = noise.timesteps.to(device).repeat(2)
    eps = noise.eps.to(device=device, dtype=dtype).repeat(2, *([1] * (x0.ndim - 1)))
    posterior_noise = noise.posterior_noise.to(device=device, dtype=torch.float32).repeat(
        2, *([1] * (x0.ndim - 1))
    )
    a_t, b_t = (c.to(device) for c in schedule.coefficients(timesteps))
    a_s, b_s = (c.to(device) for c in schedule.previous_coefficients(timesteps, weight_step))

    x_t = add_noise(x0, eps, a_t.to(dtype), b_t.to(dtype))
    target = training_target(x0, eps, a_t.to(dtype), b_t.to(dtype), schedule.prediction_type)
    conditioning = concat_conditioning(encoded.conditioning, encoded.conditioning)

    prediction = adapter.predict(x_t, timesteps, conditioning, denoiser=denoiser)
    with torch.no_grad():
        ref_prediction = reference_predict(x_t, timesteps, conditioning)

    err_winner, err_loser = objectives.per_sample_error(prediction, target).chunk(2)
    ref_err_winner, ref_err_loser = objectives.per_sample_error(ref_prediction, target).chunk(2)
    z = objectives.dpo_logits(err_winner, err_loser, ref_err_winner, ref_err_loser, beta)

    with torch.no_grad():
        weight_prediction = prediction if weight_model == "policy" else ref_prediction
        x_t32, x0_32 = x_t.float(), x0.float()
        x0_hat, _ = predicted_x0_and_eps(
            weight_prediction.detach().float(), x_t32, a_t, b_t, schedule.prediction_type
        )
        mean, var = objectives.gaussian_posterior(x_t32, x0_32, a_t, b_t, a_s, b_s)
        std = var.sqrt().reshape(-1, *([1] * (x0.ndim - 1)))
        x_prev = mean + std * posterior_noise
        log_w = objectives.log_importance_weight(
            x_prev, x_t32, x0_32, x0_hat, a_t, b_t, a_s, b_s, reduction=weight_norm
        )
    log_w_winner, log_w_loser = log_w.chunk(2)
    return PairTerms(
        timesteps=noise.timesteps.to(device),
        z=z,
        loss_pair=objectives.dpo_loss_per_pair(z),
        err_winner=err_winner,
        err_loser=err_loser,
        ref_err_winner=ref_err_winner,
        ref_err_loser=ref_err_loser,
        log_w_winner=log_w_winner,
        log_w_loser=log_w_loser,
        log_w_pair=objectives.pair_log_weight(log_w_winner, log_w_loser, pair_weight),
    )


def objective_loss(
    terms: PairTerms,
    pair_weight: Tensor,
    *,
    beta: float,
    placement: str,
    mask: bool,
    clip: bool,
    reweight: bool,
    tau: float,
    t_min: int | None,
    t_max: int | None,
    clip_eps: float,
    normalize: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The step's loss from its per-pair terms, by ``weight_placement`` (SPEC 4a).

    ``pair_weight`` is the per-pair ``w`` the mask thresholds (``exp(log_w_pair)`` or its EMA).
    ``outside``: one (clipped) weight per pair multiplies the per-pair DPO loss
    (:func:`objectives.preference_loss`, clip range ``[max(0, 1 - clip_eps), 1 + clip_eps]``).
    ``inside``: each trajectory's clipped weight scales its log-ratio term inside ``z``
    (:func:`objectives.inside_preference_loss`). Returns ``(loss, keep [B], effective weight [B])``.
    """
    if placement == "outside":
        w_floor, w_clip = objectives.trust_region_bounds(clip_eps)
        return objectives.preference_loss(
            terms.loss_pair, pair_weight, terms.timesteps, mask=mask, clip=clip, reweight=reweight,
            tau=tau, t_min=t_min, t_max=t_max, w_floor=w_floor, w_clip=w_clip, normalize=normalize,
        )
    if placement != "inside":
        raise ValueError(f"placement must be one of {objectives.WEIGHT_PLACEMENTS}, got {placement!r}")
    # exp(88) overflows float32; such a weight is clipped, never read as undefined.
    weight_w = terms.log_w_winner.double().clamp(max=80.0).exp().float()
    weight_l = terms.log_w_loser.double().clamp(max=80.0).exp().float()
    loss, keep, _, effective_weight = objectives.inside_preference_loss(
        terms.err_winner, terms.err_loser, terms.ref_err_winner, terms.ref_err_loser,
        weight_w, weight_l, pair_weight, terms.timesteps, beta=beta, mask=mask, clip=clip,
        reweight=reweight, tau=tau, t_min=t_min, t_max=t_max, clip_eps=clip_eps,
    )
    return loss, keep, effective_weight
