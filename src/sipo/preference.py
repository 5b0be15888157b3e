"""One forward pass over a batch of preference pairs -> every per-pair term of SPEC 2-3.

Shared by the trainer and the analysis, so both compute exactly the same ``z``, loss and
importance weights. The caller draws the randomness (``draw_pair_noise``) so winner and loser
share ``t``, ``eps`` and the posterior noise by construction.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from sipo import objectives
from sipo.models.base import Conditioning, DiffusionAdapter, EncodedPairs, concat_conditioning, lora_disabled
from sipo.schedules import add_noise, predicted_x0_and_eps, training_target

ReferencePredict = Callable[[Tensor, Tensor, Conditioning], Tensor]


@dataclass
class PairNoise:
    """The randomness of one step: timesteps ``[B]``, forward noise and posterior noise ``[B, ...]``.

    ``eps`` is shared by winner and loser unless ``eps_loser`` is given: then ``eps`` is the winner's
    and ``eps_loser`` the loser's own forward noise (``objective.noise=stored``, docs/spec.md section 11).
    """

    timesteps: Tensor
    eps: Tensor
    posterior_noise: Tensor
    eps_loser: Tensor | None = None
    #: PNAPO's per-pair beta factor ``2*sigmoid(delta_r) - 1`` ``[B]`` (objective.reward_beta), else None
    beta_scale: Tensor | None = None


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
    #: alpha-DPO's alpha of this micro-batch (a scalar; None for other objectives)
    alpha: Tensor | None = None
    #: the winner safeguard's loser-gradient scale lambda (a scalar; None when the safeguard is off)
    safeguard_scale: Tensor | None = None
    #: each pair's beta factor (objective.reward_beta; None: 1), already inside ``z``
    beta_scale: Tensor | None = None
    #: output-space tensors, only for an objective that needs them after this step (DSPO): ``pred_winner``,
    #: ``target_winner``, ``ref_pred_winner`` (``[B, ...]``); the safeguard reads them inside the step
    outputs: dict[str, Tensor] | None = None


#: per-pair losses of docs/spec.md section 9 and the reference-free ones among them
PAIR_LOSSES = ("dpo", "hinge", "ipo", "sft", "kto", "mapo", "dspo", "dmpo", "alpha-dpo", "sipo-elementwise")
REFERENCE_FREE = ("sft", "mapo")


@dataclass(frozen=True)
class PairLossSettings:
    """Which per-pair loss ``compute_pair_terms`` computes, and its constants (docs/spec.md section 9).

    The default is Diffusion-DPO's ``-logsigmoid(z)``, exactly as before these objectives existed.
    """

    loss: str = "dpo"
    label_smoothing: float = 0.0
    safeguard: bool = False
    safeguard_mu: float = 0.9
    ipo_tau: float = 0.5
    kto_lambda_desirable: float = 1.0
    kto_lambda_undesirable: float = 1.0
    mapo_weight: float = 0.1
    mapo_snr: float = 0.5
    dspo_variant: str = "sd15"
    dmpo_alpha: float = 0.01
    alpha_dpo_alpha: float = 0.9999
    alpha_dpo_adaptive: bool = True
    elementwise_eps: float = 0.1

    def __post_init__(self) -> None:
        if self.loss not in PAIR_LOSSES:
            raise ValueError(f"loss must be one of {PAIR_LOSSES}, got {self.loss!r}")

    @property
    def needs_reference(self) -> bool:
        """False for MaPO and SFT: their step runs no reference forward."""
        return self.loss not in REFERENCE_FREE

    @property
    def uses_step_statistic(self) -> bool:
        """True for the losses that enter a statistic of the step's whole batch nonlinearly (alpha-DPO's
        adaptive alpha, KTO's reference point): the trainer needs it before any backward (:class:`StepStatistics`)."""
        return self.loss == "kto" or (self.loss == "alpha-dpo" and self.alpha_dpo_adaptive)

    def z_loss(self, alpha: Tensor | None = None) -> Callable[[Tensor], Tensor] | None:
        """The per-pair loss as a function of ``z`` alone, or None when it needs more than ``z``."""
        if self.loss == "dpo":
            return functools.partial(objectives.smoothed_dpo_loss, label_smoothing=self.label_smoothing)
        if self.loss == "hinge":
            return objectives.hinge_loss
        if self.loss == "ipo":
            return functools.partial(objectives.ipo_loss, tau=self.ipo_tau)
        if self.loss == "dmpo":
            return functools.partial(objectives.dmpo_loss, alpha=self.dmpo_alpha)
        if self.loss == "alpha-dpo":
            return functools.partial(objectives.alpha_dpo_loss, alpha=alpha)
        return None


def global_mean(values: Tensor) -> Tensor:
    """Mean of the finite entries of ``values`` over every process (accelerate's ``reduce``), detached.

    One process (or none initialised): the local mean. Every process must call it (it all-reduces).
    """
    from accelerate.utils import reduce

    values = values.detach().float().flatten()
    finite = torch.isfinite(values)
    totals = torch.stack([torch.where(finite, values, torch.zeros_like(values)).sum(), finite.sum().float()])
    totals = reduce(totals, reduction="sum")
    return totals[0] / totals[1].clamp(min=1.0)


@dataclass
class StepStatistics:
    """Batch statistics of the optimizer step's whole batch (every micro-batch on every process), known
    before any backward: alpha-DPO's ``mean sigmoid(z)`` and KTO's mean implicit reward (SPEC 4/9).

    They enter the per-pair loss nonlinearly, so no rescaling after the backward can fix a per-micro-batch
    value; the trainer measures them in a no-grad pass over the step's micro-batches first
    (``sipo.train.step_statistics``). ``None`` (the default everywhere) computes each from the batch at
    hand, all-reduced over processes: exact when the step is one micro-batch.
    """

    mean_sigmoid_z: Tensor | None = None
    mean_implicit_reward: Tensor | None = None


def implicit_rewards(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor) -> Tensor:
    """KTO's per-image implicit rewards ``g = -(err_theta - err_ref)``, winners then losers, detached."""
    return torch.cat([-(err_w - ref_err_w), -(err_l - ref_err_l)]).detach()


def encoded_batch(adapter: DiffusionAdapter, batch: dict[str, Any], device: torch.device) -> EncodedPairs:
    """A batch in model space: from the latent cache as is, or through the frozen encoders."""
    if "x0_chosen" in batch:
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return EncodedPairs(move(batch["x0_chosen"]), move(batch["x0_rejected"]),
                            {k: move(v) for k, v in batch["conditioning"].items()})
    from sipo.data.pairs import encode_extras

    extra = encode_extras(batch, device)
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


#: ``objective.timestep_sampling``: how the trainer draws ``t`` (SPEC 10; Esser et al. 2024, SD3 paper 3.1;
#: ``ltx2``: Lightricks' LTX-2 trainer, `ltx2_sigmas`)
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "ltx2")


def ltx2_shift(tokens: int, min_tokens: int = 1024, max_tokens: int = 4096, min_shift: float = 0.95,
               max_shift: float = 2.05) -> float:
    """The mean of LTX-2's logit-normal noise level: linear in the video's token count through
    (1024, 0.95) and (4096, 2.05), ``1.5`` at 2560; not clamped outside that range, as in the trainer
    (ltx-trainer timestep_samplers.py ``_get_shift_for_sequence_length``): 6144 tokens give 2.78."""
    slope = (max_shift - min_shift) / (max_tokens - min_tokens)
    return min_shift + slope * (tokens - min_tokens)


#: the trainer's stretch bounds: the 99.9th and 0.5th percentiles of the standard normal (times std)
LTX2_UPPER_QUANTILE, LTX2_LOWER_QUANTILE = 3.0902, -2.5758


def ltx2_sigmas(normal: Tensor, uniform: Tensor, coin: Tensor, tokens: int, std: float = 1.0, eps: float = 1e-3,
                uniform_prob: float = 0.1) -> Tensor:
    """LTX-2's training noise levels ``sigma`` in ``[0, 1]`` from standard draws (ltx-trainer
    ShiftedLogitNormalTimestepSampler, its defaults std 1, eps 1e-3, uniform_prob 0.1).

    ``normal``, ``uniform``, ``coin``: ``N(0, 1)``, ``U[0, 1)``, ``U[0, 1)`` draws, one per sample. With
    ``mu = ltx2_shift(tokens)``: ``l = sigmoid(mu + std * normal)``, stretched between the logit-normal's
    0.5th and 99.9th percentiles, ``z = (l - sigmoid(mu - 2.5758 std)) / (sigmoid(mu + 3.0902 std) -
    sigmoid(mu - 2.5758 std))``, reflected below ``eps`` (``2 eps - z``) and clamped to ``[0, 1]``; where
    ``coin <= uniform_prob`` (10%) the level is ``eps + (1 - eps) * uniform`` instead. So for
    ``eps <= x < 1`` the CDF is ``0.1 (x - eps) / (1 - eps) + 0.9 P(2 eps - x <= z <= x)``.
    """
    mu = ltx2_shift(tokens)
    upper = torch.sigmoid(torch.tensor(mu + LTX2_UPPER_QUANTILE * std, dtype=torch.float64))
    lower = torch.sigmoid(torch.tensor(mu + LTX2_LOWER_QUANTILE * std, dtype=torch.float64))
    z = (torch.sigmoid(normal.double() * std + mu) - lower) / (upper - lower)
    stretched = torch.where(z >= eps, z, 2 * eps - z).clamp(0.0, 1.0)
    flat = (1.0 - eps) * uniform.double() + eps
    return torch.where(coin.double() > uniform_prob, stretched, flat)


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


def _ltx2_timesteps(x0_shape: torch.Size, num_train_timesteps: int, generator: torch.Generator, t_low: int,
                    t_high: int) -> Tensor:
    """`ltx2_sigmas` for a batch of LTX-2 latents ``[B, C, F, h, w]`` (patch size 1: ``F h w`` tokens), as
    the nearest training index of the unshifted grid ``sigma_t = (t + 1) / T``: ``t = round(sigma T) - 1``."""
    if len(x0_shape) != 5:
        raise ValueError(f"timestep_sampling='ltx2' draws for LTX-2 video latents [B, C, F, h, w], got {tuple(x0_shape)}")
    if (t_low, t_high) != (0, num_train_timesteps):
        raise ValueError(f"timestep_sampling='ltx2' draws over all {num_train_timesteps} timesteps only")
    batch = x0_shape[0]
    normal = torch.randn((batch,), generator=generator, dtype=torch.float64)
    uniform = torch.rand((batch,), generator=generator, dtype=torch.float64)
    coin = torch.rand((batch,), generator=generator, dtype=torch.float64)
    sigma = ltx2_sigmas(normal, uniform, coin, math.prod(x0_shape[2:]))
    return (sigma * num_train_timesteps).round().long().sub(1).clamp(0, num_train_timesteps - 1)


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
    elif timestep_sampling == "ltx2":
        timesteps = _ltx2_timesteps(x0_shape, num_train_timesteps, generator, t_low, t_high)
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


#: ``objective.noise``: a fresh draw shared by the pair, or each side's own stored starting noise
NOISE_SOURCES = ("shared", "stored")
#: the dtype names a pair row's ``noise_dtype`` may hold (``sipo pairs`` writes the pipeline's draw dtype)
NOISE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def starting_noise(seed: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The starting noise ``x_T`` ``[1, *shape]`` a diffusers pipeline draws for one image from
    ``torch.Generator().manual_seed(seed)``, as float32.

    ``sipo.evaluate.generate`` gives each picture its own CPU generator, and every family's
    ``prepare_latents`` draws ``randn_tensor((1, *latent_shape), generator, dtype)`` per generator of
    the list, on the CPU, before any packing (FLUX and Qwen-Image pack the drawn tensor into tokens
    afterwards, so the draw in the unpacked layout is the adapter's ``x0`` layout element for element).
    ``dtype`` is the draw's (the prompt embeddings' dtype in most pipelines, float32 in Wan's): a
    float16 draw is not the float32 draw rounded, so it is drawn as the pipeline drew it.
    Schedulers that scale the draw (``init_noise_sigma``: SDXL's Euler) scale this unit Gaussian.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator, dtype=dtype).float()


def stored_pair_noise(noise: PairNoise, chosen_seeds: Sequence[int], rejected_seeds: Sequence[int],
                      dtypes: Sequence[torch.dtype] | None = None) -> PairNoise:
    """``noise`` with each side's forward noise replaced by the starting noise its picture was sampled
    from (:func:`starting_noise` of the row's seed, in the layout and on the device of ``noise.eps``);
    ``t`` and the posterior noise stay the pair's shared draw (docs/spec.md section 11, PNAPO)."""
    shape = tuple(noise.eps.shape[1:])
    dtypes = list(dtypes) if dtypes is not None else [torch.float32] * len(chosen_seeds)

    def side(seeds: Sequence[int]) -> Tensor:
        return torch.cat([starting_noise(s, shape, d) for s, d in zip(seeds, dtypes)]).to(noise.eps.device)

    return PairNoise(noise.timesteps, side(chosen_seeds), noise.posterior_noise, side(rejected_seeds), noise.beta_scale)


def reward_beta_scale(score_margin: Tensor) -> Tensor:
    """PNAPO's per-pair beta factor ``2*sigmoid(delta_r) - 1`` of the reward gap ``delta_r`` (docs/spec.md
    section 11): near 0 for a pair the reward barely separates, near 1 for a clear one; ``[B]``."""
    return 2.0 * torch.sigmoid(score_margin.float()) - 1.0


def batch_pair_noise(noise: PairNoise, batch: dict[str, Any], source: str = "shared",
                     reward_beta: bool = False) -> PairNoise:
    """The pair noise a step trains with: ``noise`` itself (``objective.noise=shared``), or with each
    side's stored starting noise from the batch's ``chosen_seed`` / ``rejected_seed`` (``stored``);
    with ``reward_beta``, also each pair's beta factor from the batch's ``score_margin``."""
    from sipo.errors import SipoError

    if reward_beta:
        if batch.get("score_margin") is None:
            raise SipoError("objective.reward_beta scales each pair's beta by its reward gap, but these pairs carry no "
                            "score_margin; train on pairs from `sipo pairs` or `sipo relabel`, or set objective.reward_beta=false")
        scale = reward_beta_scale(batch["score_margin"]).to(noise.timesteps.device)
        noise = PairNoise(noise.timesteps, noise.eps, noise.posterior_noise, noise.eps_loser, scale)
    if source == "shared":
        return noise

    if batch.get("stored_noise_problem"):
        raise SipoError(f"objective.noise=stored: {batch['stored_noise_problem']}")
    chosen, rejected = batch.get("chosen_seed"), batch.get("rejected_seed")
    if chosen is None or rejected is None:
        raise SipoError("objective.noise=stored trains each side from the noise its picture was sampled from, but "
                        "these pairs carry no chosen_seed/rejected_seed; train on a manifest written by `sipo pairs` "
                        "(rebuild an older latent cache with `sipo cache`) or set objective.noise=shared")
    names = batch.get("noise_dtype") or ["float32"] * len(chosen)
    return stored_pair_noise(noise, [int(s) for s in chosen], [int(s) for s in rejected],
                             [NOISE_DTYPES[name] for name in names])
def pair_noise_seed(seed: int, step: int, place: int) -> int:
    """The seed of one pair's ``t`` and noise: a 63-bit hash of ``(train.seed, optimizer step, place)``.

    ``place`` is the pair's position in the step's global batch, ``(micro * processes + rank) * batch_size
    + row``, the order in which ``DataOrder`` hands out the step's pairs in every layout.
    """
    digest = hashlib.blake2b(f"sipo-pair-noise:{seed}:{step}:{place}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_step_noise(x0_shape: torch.Size, num_train_timesteps: int, seed: int, step: int, places: Sequence[int],
                    **settings: Any) -> PairNoise:
    """``t``, forward and posterior noise of the pairs at ``places`` of step ``step`` (SPEC 4: a pair's t and
    noise depend on (seed, step, its place in the step's batch), never on the layout).

    Each pair draws from its own CPU generator seeded by :func:`pair_noise_seed`, through
    :func:`draw_pair_noise` (``settings``: its timestep sampling), so batch_size, gradient accumulation and
    the number of processes change which process computes a pair, never its draw; and each process draws
    only its own pairs. Nothing is carried from step to step: a resume needs only the step number.
    """
    if len(places) != x0_shape[0]:
        raise ValueError(f"{len(places)} places for a batch of {x0_shape[0]} pairs")
    one = torch.Size((1, *x0_shape[1:]))
    draws = [draw_pair_noise(one, num_train_timesteps, torch.Generator().manual_seed(pair_noise_seed(seed, step, p)),
                             **settings) for p in places]
    return PairNoise(*(torch.cat([getattr(d, name) for d in draws])
                       for name in ("timesteps", "eps", "posterior_noise")))


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
    objective: PairLossSettings | None = None,
    statistics: StepStatistics | None = None,
) -> PairTerms:
    """Run policy and reference on winner and loser in one batch of ``2B`` and return the terms.

    The importance weight uses ``x_prev = mu(x_t, x0) + sqrt(s2) * posterior_noise``, a draw from
    ``q(x_s | x_t, x0)`` (SPEC 3), and the prediction of ``weight_model``; it carries no gradient.

    ``objective`` picks the per-pair loss ``loss_pair`` (None: Diffusion-DPO's). Reference-free ones
    (MaPO, SFT) skip the reference forward: their reference errors are NaN and ``z`` is the policy's
    own margin ``-0.5*beta*(err_w - err_l)`` (for the logs). With the safeguard on, the loser's error
    carries its gradient scaled by ``lambda`` (:func:`objectives.winner_safeguard_scale`).
    ``statistics``: the step's alpha-DPO / KTO statistics (None: this batch's, all-reduced).
    """
    schedule = adapter.schedule
    device = encoded.x0_winner.device
    x0 = torch.cat([encoded.x0_winner, encoded.x0_loser], dim=0)
    dtype = x0.dtype
    timesteps = noise.timesteps.to(device).repeat(2)
    if noise.eps_loser is None:
        eps = noise.eps.to(device=device, dtype=dtype).repeat(2, *([1] * (x0.ndim - 1)))
    else:  # each side its own starting noise (objective.noise=stored)
        eps = torch.cat([noise.eps, noise.eps_loser]).to(device=device, dtype=dtype)
    posterior_noise = noise.posterior_noise.to(device=device, dtype=torch.float32).repeat(
        2, *([1] * (x0.ndim - 1))
    )
    a_t, b_t = (c.to(device) for c in schedule.coefficients(timesteps))
    a_s, b_s = (c.to(device) for c in schedule.previous_coefficients(timesteps, weight_step))

    x_t = add_noise(x0, eps, a_t.to(dtype), b_t.to(dtype))
    target = training_target(x0, eps, a_t.to(dtype), b_t.to(dtype), schedule.prediction_type)
    conditioning = concat_conditioning(encoded.conditioning, encoded.conditioning)

    settings = objective or PairLossSettings()
    prediction = adapter.predict(x_t, timesteps, conditioning, denoiser=denoiser)
    ref_prediction = None
    if settings.needs_reference:
        with torch.no_grad():
            ref_prediction = reference_predict(x_t, timesteps, conditioning)

    err_winner, err_loser = objectives.per_sample_error(prediction, target).chunk(2)
    safeguard_scale = None
    if settings.safeguard:
        pred_w, pred_l = prediction.chunk(2)
        target_w, target_l = target.chunk(2)
        safeguard_scale = objectives.winner_safeguard_scale(pred_w, target_w, pred_l, target_l, settings.safeguard_mu)
        err_loser = objectives.safeguarded_error(err_loser, safeguard_scale)
    if ref_prediction is not None:
        ref_err_winner, ref_err_loser = objectives.per_sample_error(ref_prediction, target).chunk(2)
        z = objectives.dpo_logits(err_winner, err_loser, ref_err_winner, ref_err_loser, beta)
    else:
        ref_err_winner = torch.full_like(err_winner.detach(), float("nan"))
        ref_err_loser = torch.full_like(err_loser.detach(), float("nan"))
        z = objectives.dpo_logits(err_winner, err_loser, torch.zeros_like(ref_err_winner),
                                  torch.zeros_like(ref_err_loser), beta)
    if noise.beta_scale is not None:  # objective.reward_beta: beta_i = beta * scale_i, so z_i = scale_i * z_i
        z = z * noise.beta_scale.to(z.device, z.dtype)
    loss_pair, alpha, outputs = _pair_loss(
        settings, prediction, target, ref_prediction, z, err_winner, err_loser, ref_err_winner, ref_err_loser,
        beta, schedule.num_train_timesteps, safeguard_scale, statistics,
    )

    if weight_model != "policy" and ref_prediction is None:
        raise ValueError(f"the {settings.loss} objective runs no reference forward; use weight_model='policy'")
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
        loss_pair=loss_pair,
        err_winner=err_winner,
        err_loser=err_loser,
        ref_err_winner=ref_err_winner,
        ref_err_loser=ref_err_loser,
        log_w_winner=log_w_winner,
        log_w_loser=log_w_loser,
        log_w_pair=objectives.pair_log_weight(log_w_winner, log_w_loser, pair_weight),
        alpha=alpha,
        safeguard_scale=safeguard_scale,
        beta_scale=noise.beta_scale,
        outputs=outputs,
    )


def _pair_loss(settings: PairLossSettings, prediction, target, ref_prediction, z, err_w, err_l, ref_err_w, ref_err_l,
               beta: float, num_train_timesteps: int, safeguard_scale, statistics: StepStatistics | None = None):
    """``(loss_pair [B], alpha or None, outputs or None)`` for ``settings.loss`` (docs/spec.md section 9)."""
    kind, alpha, outputs = settings.loss, None, None
    if kind == "alpha-dpo":
        known = statistics.mean_sigmoid_z if statistics is not None else None
        mean_p = (global_mean(torch.sigmoid(z)) if known is None else known) if settings.alpha_dpo_adaptive else 1.0
        alpha = objectives.adaptive_alpha(mean_p, settings.alpha_dpo_alpha).to(z.device)
    z_loss = settings.z_loss(alpha)
    if z_loss is not None:
        return z_loss(z), alpha, outputs
    if kind == "sft":
        return objectives.sft_loss(err_w), alpha, outputs
    if kind == "mapo":
        return objectives.mapo_loss(err_w, err_l, num_train_timesteps, settings.mapo_snr, settings.mapo_weight), alpha, outputs
    if kind == "kto":
        known = statistics.mean_implicit_reward if statistics is not None else None
        mean_g = global_mean(implicit_rewards(err_w, err_l, ref_err_w, ref_err_l)) if known is None else known
        reference_point = objectives.kto_reference_point(mean_g)
        return objectives.kto_loss(err_w, err_l, ref_err_w, ref_err_l, beta, reference_point,
                                   settings.kto_lambda_desirable, settings.kto_lambda_undesirable), alpha, outputs
    if kind == "dspo":
        pred_w, target_w, ref_pred_w = prediction.chunk(2)[0], target.chunk(2)[0], ref_prediction.chunk(2)[0]
        outputs = {"pred_winner": pred_w, "target_winner": target_w, "ref_pred_winner": ref_pred_w}
        return objectives.dspo_loss(pred_w, target_w, ref_pred_w, z, beta, settings.dspo_variant), alpha, outputs
    if kind == "sipo-elementwise":
        elem = (prediction.float() - target.float()).pow(2)
        ref_elem = (ref_prediction.float() - target.float()).pow(2)
        e_w, e_l = elem.chunk(2)
        if safeguard_scale is not None:
            e_l = objectives.safeguarded_error(e_l, safeguard_scale)
        ref_e_w, ref_e_l = ref_elem.chunk(2)
        return objectives.elementwise_sipo_loss(e_w, e_l, ref_e_w, ref_e_l, beta, settings.elementwise_eps), alpha, outputs
    raise ValueError(f"loss must be one of {PAIR_LOSSES}, got {kind!r}")


def objective_sums(
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
    objective: PairLossSettings | None = None,
    sft_weight: float = 0.0,
) -> tuple[objectives.LossSums, Tensor, Tensor]:
    """The objective of this batch's pairs as the two sums of SPEC 4-5, by ``weight_placement`` (SPEC 4a).

    ``pair_weight`` is the per-pair ``w`` the mask thresholds (``exp(log_w_pair)`` or its EMA).
    ``outside``: one (clipped) weight per pair multiplies the per-pair loss
    (:func:`objectives.preference_loss_sums`, clip range ``[max(0, 1 - clip_eps), 1 + clip_eps]``).
    ``inside``: each trajectory's clipped weight scales its log-ratio term inside ``z``
    (:func:`objectives.inside_preference_loss_sums`). Returns ``(LossSums, keep [B], effective weight [B])``;
    the trainer totals the sums over the optimizer step's whole batch before dividing (``objectives.step_loss``).

    ``objective`` is the per-pair loss ``compute_pair_terms`` computed (None: DPO's). Losses of ``z``
    alone take the inside weights through ``z``; the others (SFT, KTO, MaPO, DSPO, the element-wise
    reading) combine with the mask only, ``sum(keep * loss_pair)`` over ``sum(keep)``.
    ``sft_weight`` adds ``sft_weight * err_theta(w)`` to each pair's loss, inside the same sums (docs/spec.md
    section 9): with no mask and no weights that is ``sft_weight * mean(err_theta(w))`` over the step's pairs,
    and one normaliser serves the whole loss.
    """
    settings = objective or PairLossSettings()
    z_loss = settings.z_loss(terms.alpha)
    if z_loss is None and reweight:
        raise ValueError(f"the {settings.loss} loss is not a function of z alone and takes no importance reweighting")
    sft = float(sft_weight) * terms.err_winner.float() if sft_weight else None
    if placement == "outside" or z_loss is None:
        w_floor, w_clip = objectives.trust_region_bounds(clip_eps)
        loss_pair = terms.loss_pair if sft is None else terms.loss_pair + sft
        return objectives.preference_loss_sums(
            loss_pair, pair_weight, terms.timesteps, mask=mask, clip=clip, reweight=reweight,
            tau=tau, t_min=t_min, t_max=t_max, w_floor=w_floor, w_clip=w_clip, normalize=normalize,
        )
    if placement != "inside":
        raise ValueError(f"placement must be one of {objectives.WEIGHT_PLACEMENTS}, got {placement!r}")
    pair_loss = None if objective is None else z_loss
    if sft is not None:
        base = pair_loss or objectives.dpo_loss_per_pair
        pair_loss = lambda z: base(z) + sft  # noqa: E731
    # exp(88) overflows float32; such a weight is clipped, never read as undefined.
    weight_w = terms.log_w_winner.double().clamp(max=80.0).exp().float()
    weight_l = terms.log_w_loser.double().clamp(max=80.0).exp().float()
    errors = (terms.err_winner, terms.err_loser, terms.ref_err_winner, terms.ref_err_loser)
    if terms.beta_scale is not None:  # objective.reward_beta: scaling the four errors scales z by the pair's factor
        scale = terms.beta_scale.to(terms.err_winner.device).float()
        errors = tuple(error.float() * scale for error in errors)
    sums, keep, _, effective_weight = objectives.inside_preference_loss_sums(
        *errors, weight_w, weight_l, pair_weight, terms.timesteps, beta=beta, mask=mask, clip=clip,
        reweight=reweight, tau=tau, t_min=t_min, t_max=t_max, clip_eps=clip_eps, pair_loss=pair_loss,
    )
    return sums, keep, effective_weight


def objective_loss(terms: PairTerms, pair_weight: Tensor, **settings: Any) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`objective_sums` of one batch as ``(loss, keep [B], effective weight [B])``: the loss of these
    pairs alone (validation, analysis). The trainer's step divides the sums over its whole batch instead."""
    sums, keep, effective_weight = objective_sums(terms, pair_weight, **settings)
    return objectives.step_loss(*sums), keep, effective_weight


# ----------------------------------------------------------------------------- automatic beta (SPEC 9)
def step_beta(configured_beta: float, beta_mode: str, abs_margin_ema: float | None, target_gradient_factor: float,
              beta_min: float, beta_max: float) -> float:
    """The beta of the next step: ``objective.beta`` when fixed or before the first update, else
    :func:`objectives.auto_beta` of the EMA, clamped to ``[beta_min, beta_max]``."""
    if beta_mode == "fixed" or abs_margin_ema is None:
        return float(configured_beta)
    return objectives.auto_beta(abs_margin_ema, target_gradient_factor, beta_min, beta_max)


def update_auto_beta(abs_margin_ema: float | None, step_terms: Sequence[PairTerms], decay: float = 0.99,
                     device: torch.device | None = None, *, configured_beta: float,
                     target_gradient_factor: float) -> float | None:
    """One optimizer step's update of the EMA of ``mean |delta|`` over the step's pairs on every process.

    ``delta = (err_w - ref_err_w) - (err_l - ref_err_l)`` (detached; non-finite ones left out). The
    mean is all-reduced (:func:`global_mean`), so every process holds the same EMA and beta. Every
    process must call it each step, with or without pairs. The EMA starts at the margin the
    configured beta implies at the target gradient factor (:func:`objectives.abs_margin_for_beta`),
    so beta starts at ``objective.beta`` and follows the measured margins at the EMA's pace: the
    ~1e-7 margins of the first steps after a zero LoRA move it by (1 - decay) per step, not to
    ``beta_max``. A step with no finite delta, or whose deltas are all exactly zero (the policy still
    equals the reference), leaves the EMA as it is: such a margin says nothing of the scale. Returns
    the new EMA (a float, checkpointed in ``TrainState``); ``None`` until a step has measured one.
    """
    deltas = [((t.err_winner - t.ref_err_winner) - (t.err_loser - t.ref_err_loser)).detach().abs().float()
              for t in step_terms]
    values = torch.cat(deltas) if deltas else torch.zeros(0, device=device)  # device: where the all-reduce runs
    from accelerate.utils import reduce

    finite = torch.isfinite(values)
    totals = torch.stack([torch.where(finite, values, torch.zeros_like(values)).sum(), finite.sum().float()])
    total, count = reduce(totals, reduction="sum").tolist()
    if count == 0 or total == 0:
        return abs_margin_ema
    if abs_margin_ema is None:
        abs_margin_ema = objectives.abs_margin_for_beta(configured_beta, target_gradient_factor)
    return objectives.update_abs_margin_ema(abs_margin_ema, total / count, decay)

