"""The Gaussian view of every noise schedule the project supports (SPEC 1).

Every family writes its forward process as ``x_t = a_t * x0 + b_t * eps`` with ``eps ~ N(0, I)``:

- DDPM / SD1.5 / SDXL (``epsilon``) and CogVideoX (``v_prediction``): ``a_t = sqrt(abar_t)``,
  ``b_t = sqrt(1 - abar_t)``.
- Wan2.1 (``flow``, rectified flow): ``a = 1 - sigma``, ``b = sigma``.

A :class:`GaussianSchedule` holds ``a`` and ``b`` for each integer training timestep ``t`` in
``[0, T)`` plus the inference grid that defines the "previous" timestep ``s`` of SPEC 3. The
functions below are pure tensor math; loading a diffusers scheduler and turning it into a
``GaussianSchedule`` is the adapters' business (``sipo.models``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
WEIGHT_STEPS = ("inference", "adjacent")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
        )


def expand_like(coefficient: Tensor | float, like: Tensor) -> Tensor | float:
    """Reshape a per-sample coefficient ``[B]`` to ``[B, 1, ..., 1]`` so it broadcasts over ``like``.

    Floats and 0-d tensors pass through unchanged.
    """
    if not isinstance(coefficient, Tensor) or coefficient.ndim == 0:
        return coefficient
    if coefficient.ndim != 1 or coefficient.shape[0] != like.shape[0]:
        raise ValueError(
            f"per-sample coefficient of shape {tuple(coefficient.shape)} does not match batch "
            f"size {like.shape[0]}"
        )
    return coefficient.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class GaussianSchedule:
    """``x_t = a[t] * x0 + b[t] * eps`` for integer training timesteps ``t`` in ``[0, T)``.

    ``num_inference_steps`` fixes the inference grid: the previous timestep of ``t`` is
    ``s = t - T // num_inference_steps`` (SPEC 3). ``s < 0`` means ``x0`` itself (``a_s = 1``,
    ``b_s = 0``), where the step-wise importance weight is undefined.
    """

    a: Tensor
    b: Tensor
    prediction_type: str
    num_inference_steps: int = 50
    #: ``(a_s, b_s)`` of the inference grid's previous step for each training index, where that grid
    #: is not the training grid's every ``T // num_inference_steps``-th index (FLUX's
    #: resolution-dependent shift, `dynamic_shift_flow_schedule`); ``None``: index ``t - stride``.
    inference_previous_a: Tensor | None = None
    inference_previous_b: Tensor | None = None

    def __post_init__(self) -> None:
        _check_prediction_type(self.prediction_type)
        if self.a.shape != self.b.shape or self.a.ndim != 1:
            raise ValueError("a and b must be 1-d tensors of the same length")
        if (self.inference_previous_a is None) != (self.inference_previous_b is None) or (
            self.inference_previous_b is not None and self.inference_previous_b.shape != self.b.shape
        ):
            raise ValueError("inference_previous_a and inference_previous_b come together, shaped like a and b")
        if not 1 <= self.num_inference_steps <= self.a.shape[0]:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.a.shape[0]}], got {self.num_inference_steps}"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.a.shape[0])

    @property
    def step_stride(self) -> int:
        return self.num_train_timesteps // self.num_inference_steps

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, b_t)`` as float32 ``[B]`` for integer timesteps ``t`` ``[B]``."""
        t = t.long().to(self.a.device)  # the table may live on the CPU or beside the model
        return self.a[t].float(), self.b[t].float()

    def previous_timestep(self, t: Tensor, weight_step: str = "inference") -> Tensor:
        """The ``s`` of SPEC 3; negative where ``t`` is on the last step.

        ``inference``: ``s = t - T // num_inference_steps``, the previous step of the inference grid
        (for flow schedules, whose sigma grows with ``t``, the next smaller sigma of that grid);
        ``adjacent``: ``s = t - 1`` on the training grid.
        """
        if weight_step not in WEIGHT_STEPS:
            raise ValueError(f"weight_step must be one of {WEIGHT_STEPS}, got {weight_step!r}")
        stride = self.step_stride if weight_step == "inference" else 1
        return t.long() - stride

    def previous_coefficients(self, t: Tensor, weight_step: str = "inference") -> tuple[Tensor, Tensor]:
        """``(a_s, b_s)`` at the previous timestep ``s`` (:meth:`previous_timestep`); ``(1, 0)`` where ``s < 0``.

        With ``inference_previous_a/b`` (a shifted inference grid) and ``weight_step="inference"``,
        the tables' values at ``t`` instead.
        """
        if weight_step == "inference" and self.inference_previous_b is not None:
            index = t.long().to(self.a.device)
            return self.inference_previous_a[index].float(), self.inference_previous_b[index].float()
        s = self.previous_timestep(t, weight_step).to(self.a.device)
        valid = s >= 0
        s_safe = s.clamp(min=0)
        a_s = torch.where(valid, self.a[s_safe], torch.ones_like(self.a[s_safe]))
        b_s = torch.where(valid, self.b[s_safe], torch.zeros_like(self.b[s_safe]))
        return a_s.float(), b_s.float()


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
) -> Tensor:
    """``abar_t = prod_{i<=t} (1 - beta_i)`` in float64, as diffusers' DDPMScheduler defines beta_i.

    ``linear``: beta evenly spaced; ``scaled_linear`` (SD1.5/SDXL): sqrt(beta) evenly spaced;
    ``squaredcos_cap_v2``: the cosine schedule of Nichol & Dhariwal (2021), beta capped at 0.999.
    """
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
            ** 2
        )
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(time: float) -> float:
            return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [
                min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
                for i in range(num_train_timesteps)
            ],
            dtype=torch.float64,
        )
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def vp_schedule(
    alphas_cumprod: Tensor, prediction_type: str = "epsilon", num_inference_steps: int = 50
) -> GaussianSchedule:
    """Variance-preserving view: ``a_t = sqrt(abar_t)``, ``b_t = sqrt(1 - abar_t)`` (SPEC 1)."""
    alphas_cumprod = alphas_cumprod.double()
    return GaussianSchedule(
        a=alphas_cumprod.sqrt(),
        b=(1.0 - alphas_cumprod).sqrt(),
        prediction_type=prediction_type,
        num_inference_steps=num_inference_steps,
    )


def flow_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0) -> Tensor:
    """Rectified-flow noise levels for training index ``t``: ``sigma = (t + 1) / T``, then shifted.

    The shift is the one Wan2.1 and SD3 use: ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.
    """
    sigma = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_schedule(
    num_train_timesteps: int = 1000, shift: float = 1.0, num_inference_steps: int = 50
) -> GaussianSchedule:
    """Rectified-flow view: ``a = 1 - sigma``, ``b = sigma`` (SPEC 1)."""
    sigma = flow_sigmas(num_train_timesteps, shift)
    return GaussianSchedule(
        a=1.0 - sigma, b=sigma, prediction_type="flow", num_inference_steps=num_inference_steps
    )


def add_noise(x0: Tensor, eps: Tensor, a_t: Tensor | float, b_t: Tensor | float) -> Tensor:
    """``x_t = a_t * x0 + b_t * eps``; per-sample coefficients broadcast over the sample."""
    return expand_like(a_t, x0) * x0 + expand_like(b_t, x0) * eps


def training_target(
    x0: Tensor, eps: Tensor, a_t: Tensor | float, b_t: Tensor | float, prediction_type: str
) -> Tensor:
    """What the network regresses, in its own target space (SPEC 1).

    ``epsilon``: ``eps``; ``v_prediction``: ``v = a_t * eps - b_t * x0``; ``flow``: ``u = eps - x0``.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return expand_like(a_t, x0) * eps - expand_like(b_t, x0) * x0
    return eps - x0


def predicted_x0_and_eps(
    prediction: Tensor, x_t: Tensor, a_t: Tensor | float, b_t: Tensor | float, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Convert a network output to ``(x0_hat, eps_hat)`` (SPEC 1).

    - ``epsilon``: ``x0_hat = (x_t - b * eps_hat) / a``.
    - ``v_prediction``: ``x0_hat = a * x_t - b * v_hat``, ``eps_hat = b * x_t + a * v_hat``
      (valid when ``a^2 + b^2 = 1``).
    - ``flow`` (``b = sigma``): ``x0_hat = x_t - sigma * u_hat``, ``eps_hat = x_t + (1 - sigma) * u_hat``.
    """
    _check_prediction_type(prediction_type)
    a = expand_like(a_t, x_t)
    b = expand_like(b_t, x_t)
    if prediction_type == "epsilon":
        return (x_t - b * prediction) / a, prediction
    if prediction_type == "v_prediction":
        return a * x_t - b * prediction, b * x_t + a * prediction
    return x_t - b * prediction, x_t + (1.0 - b) * prediction


def resolution_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The ``mu`` of FLUX's resolution-dependent shift: linear in the packed image sequence length.

    ``mu = base_shift + (max_shift - base_shift) * (L - base_seq_len) / (max_seq_len - base_seq_len)``
    (diffusers pipelines/flux/pipeline_flux.py ``calculate_shift``; the defaults are FLUX.1-dev's
    scheduler config). ``L = (H / 16) * (W / 16)``: 4096 at 1024 px, so ``mu = 1.15`` there.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def exponential_time_shift(mu: float, tau: Tensor) -> Tensor:
    """``sigma = e^mu / (e^mu + (1/tau - 1))``: FlowMatchEulerDiscreteScheduler's exponential time
    shift with exponent 1, mapping the uniform inference coordinate ``tau`` in ``(0, 1]`` to sigma.

    Equals the constant shift ``s tau / (1 + (s - 1) tau)`` with ``s = e^mu``; ``tau <= 0`` gives 0.
    """
    tau = tau.double()
    positive = tau > 0
    safe = torch.where(positive, tau, torch.ones_like(tau))
    sigma = math.exp(mu) / (math.exp(mu) + (1.0 / safe - 1.0))
    return torch.where(positive, sigma, torch.zeros_like(sigma))


def inference_grid_flow_schedule(
    num_train_timesteps: int,
    num_inference_steps: int,
    grid_sigma: Callable[[Tensor], Tensor],
    grid_coordinate: Callable[[Tensor], Tensor],
    shifted_training: bool = False,
) -> GaussianSchedule:
    """Rectified flow sampled on a shifted grid ``sigma_k = grid_sigma(u_k)``, ``u_k = 1 - k/n`` (SPEC 10).

    Training sigmas: the scheduler's own table under dynamic shifting, unshifted ``sigma_t = (t + 1)/T``,
    which is what diffusers' FLUX and Qwen-Image LoRA scripts draw from; with ``shifted_training``,
    the grid's shift applied to it, ``grid_sigma((t + 1)/T)`` (``model.training_sigmas=shifted``).
    ``s`` of SPEC 3 is one inference step lower in the grid's own coordinate:
    ``sigma_s = grid_sigma(grid_coordinate(sigma_t) - 1/n)`` (0 at or below ``u = 0``, where the
    weight is undefined); on the grid's points it is exactly the next smaller inference sigma.
    ``grid_coordinate`` is the inverse of ``grid_sigma`` on ``(0, 1]``. Float64 tables.
    """
    u = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    sigma = grid_sigma(u).double() if shifted_training else u
    u_s = grid_coordinate(sigma).double() - 1.0 / num_inference_steps
    sigma_s = torch.where(u_s > 1e-12, grid_sigma(u_s.clamp(min=1e-12)).double(), torch.zeros_like(u_s))
    return GaussianSchedule(
        a=1.0 - sigma, b=sigma, prediction_type="flow", num_inference_steps=num_inference_steps,
        inference_previous_a=1.0 - sigma_s, inference_previous_b=sigma_s,
    )


def inverse_exponential_time_shift(mu: float, sigma: Tensor) -> Tensor:
    """``tau = 1 / (1 + e^mu (1/sigma - 1))``: the inverse of :func:`exponential_time_shift` on ``(0, 1]``."""
    sigma = sigma.double()
    positive = sigma > 0
    safe = torch.where(positive, sigma, torch.ones_like(sigma))
    tau = 1.0 / (1.0 + math.exp(mu) * (1.0 / safe - 1.0))
    return torch.where(positive, tau, torch.zeros_like(tau))


def dynamic_shift_flow_schedule(
    num_train_timesteps: int = 1000, mu: float = 1.15, num_inference_steps: int = 50, shifted_training: bool = False
) -> GaussianSchedule:
    """Rectified flow trained on the unshifted grid and sampled on a resolution-shifted one (FLUX).

    Training: ``sigma_t = (t + 1) / T`` (a scheduler with ``use_dynamic_shifting`` leaves its training
    sigmas unshifted, and diffusers' train_dreambooth_lora_flux.py draws from them), ``a = 1 - sigma``,
    ``b = sigma``; ``shifted_training``: ``exponential_time_shift(mu, (t + 1)/T)``. Inference
    (FluxPipeline): ``sigma_k = exponential_time_shift(mu, tau_k)`` on the uniform grid ``tau_k = 1 - k / n``.
    The previous step ``s`` of SPEC 3 is one inference step lower in that grid's own coordinate:
    ``tau_t`` solves ``exponential_time_shift(mu, tau_t) = sigma_t``, i.e. ``1 / tau_t = 1 + e^mu (1 / sigma_t - 1)``,
    and ``sigma_s = exponential_time_shift(mu, tau_t - 1/n)`` (0 past the last step, where the weight is
    undefined); :func:`inference_grid_flow_schedule` with FLUX's shift.
    """
    return inference_grid_flow_schedule(
        num_train_timesteps, num_inference_steps, lambda tau: exponential_time_shift(mu, tau),
        lambda sigma: inverse_exponential_time_shift(mu, sigma), shifted_training,
    )


def shifted_grid_flow_schedule(
    num_train_timesteps: int = 1000, shift: float = 3.0, num_inference_steps: int = 50
) -> GaussianSchedule:
    """Rectified flow with a constant shift, and the inference grid FlowMatchEulerDiscreteScheduler samples on (SD3).

    Training: ``sigma_t = shift(u_t)``, ``u_t = (t + 1) / T``, ``shift(u) = s u / (1 + (s - 1) u)``
    (`flow_schedule`). Inference (``set_timesteps(n)`` without dynamic shifting): ``shift`` of
    ``linspace(1, u_min, n)`` with ``u_min = shift(1 / T)``, the scheduler's smallest training sigma
    taken as a coordinate and shifted again. Its spacing is ``(1 - u_min) / (n - 1)``, not ``1 / n``
    (3.4% wider at n = 28, shift 3), so ``s`` is one such step below ``u_t``:
    ``sigma_s = shift(u_t - (1 - u_min) / (n - 1))``, 0 below the grid's end. On the grid's points it is
    exactly the next smaller inference sigma.
    """
    schedule = flow_schedule(num_train_timesteps, shift, num_inference_steps)
    u = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    u_min = shift * (1.0 / num_train_timesteps) / (1.0 + (shift - 1.0) / num_train_timesteps)
    step = (1.0 - u_min) / max(1, num_inference_steps - 1)
    u_s = (u - step).clamp(min=0.0)
    sigma_s = shift * u_s / (1.0 + (shift - 1.0) * u_s)
    return GaussianSchedule(
        a=schedule.a, b=schedule.b, prediction_type="flow", num_inference_steps=num_inference_steps,
        inference_previous_a=1.0 - sigma_s, inference_previous_b=sigma_s,
    )


def terminal_stretch(sigma: Tensor, last: float, shift_terminal: float | None) -> Tensor:
    """FlowMatchEulerDiscreteScheduler's ``stretch_shift_to_terminal``: ``1 - (1 - sigma) / c`` with
    ``c = (1 - last) / (1 - shift_terminal)``, so the grid's last sigma ``last`` lands on ``shift_terminal``.
    ``shift_terminal`` None or 0: unchanged."""
    if not shift_terminal:
        return sigma
    return 1.0 - (1.0 - sigma) * (1.0 - shift_terminal) / (1.0 - last)


def ltx2_flow_schedule(
    num_train_timesteps: int = 1000, mu: float = 2.05, shift_terminal: float | None = 0.1, num_inference_steps: int = 30
) -> GaussianSchedule:
    """Rectified flow trained on unshifted sigmas, sampled on LTX2Pipeline's shifted, stretched grid (LTX-2).

    Training: ``sigma_t = (t + 1) / T`` (Lightricks' trainer draws sigma itself, unshifted), ``a = 1 - sigma``,
    ``b = sigma``. Inference (LTX2Pipeline with its scheduler config): ``tau_k = linspace(1, 1/n, n)``,
    ``sigma_k = g(tau_k)``, ``g(tau) = stretch(exponential_time_shift(mu, tau))`` where `terminal_stretch` takes
    the last point ``exponential_time_shift(mu, 1/n)`` to ``shift_terminal`` (0.1); then 0. Below the last
    point ``g`` is the straight line ``g(tau) = shift_terminal * n * tau`` to ``g(0) = 0`` (the stretched curve
    itself goes negative there). The previous step ``s`` of SPEC 3 is one step lower in ``tau``:
    ``sigma_s = g(g^-1(sigma_t) - 1/n)``, 0 where that is ``<= 0`` (past the last step, where the weight is
    undefined). On the grid's points this is exactly the next inference sigma.
    """
    sigma = flow_sigmas(num_train_timesteps, 1.0)
    n = num_inference_steps
    last = float(exponential_time_shift(mu, torch.tensor([1.0 / n]))[0])

    def inverse_shift(value: Tensor) -> Tensor:  # tau with exponential_time_shift(mu, tau) = value in (0, 1]
        return 1.0 / (1.0 + math.exp(mu) * (1.0 / value - 1.0))

    if shift_terminal:
        shifted = 1.0 - (1.0 - sigma) * (1.0 - last) / (1.0 - shift_terminal)  # the stretch inverted
        on_curve = sigma >= shift_terminal
        tau = torch.where(on_curve, inverse_shift(torch.where(on_curve, shifted, torch.ones_like(shifted))),
                          sigma / (shift_terminal * n))
    else:
        tau = inverse_shift(sigma)
    tau_s = tau - 1.0 / n
    curve = terminal_stretch(exponential_time_shift(mu, tau_s), last, shift_terminal)
    line = (shift_terminal or 0.0) * n * tau_s
    sigma_s = torch.where(tau_s >= 1.0 / n, curve, line) if shift_terminal else curve
    sigma_s = torch.where(tau_s > 0, sigma_s, torch.zeros_like(sigma_s))
    return GaussianSchedule(
        a=1.0 - sigma, b=sigma, prediction_type="flow", num_inference_steps=num_inference_steps,
        inference_previous_a=1.0 - sigma_s, inference_previous_b=sigma_s,
    )


def two_shift_flow_schedule(
    num_train_timesteps: int = 1000, train_shift: float = 3.0, inference_shift: float = 5.0, num_inference_steps: int = 50
) -> GaussianSchedule:
    """Rectified flow trained on one constant shift and sampled on another (HunyuanVideo 1.5).

    Training: ``sigma_t = shift_train(u_t)``, ``u_t = (t + 1) / T``, ``shift_c(u) = c u / (1 + (c - 1) u)``
    (`flow_sigmas`; Tencent's train.py shifts its noise levels by ``train_timestep_shift`` 3.0). Inference
    (HunyuanVideo15Pipeline): ``tau_k = linspace(1, 0, n + 1)[:-1] = 1 - k / n``, ``sigma_k =
    shift_inference(tau_k)`` (its FlowMatchEulerDiscreteScheduler's ``shift``, 5.0 at 480p), then 0. The
    previous step ``s`` of SPEC 3 is one step lower in ``tau``: ``tau_t = shift_inference^-1(sigma_t)``,
    ``1 / tau_t = 1 + c (1 / sigma_t - 1)``, ``sigma_s = shift_inference(tau_t - 1/n)`` (0 past the last
    step). On the grid's own points this is exactly the next smaller inference sigma.
    """
    sigma = flow_sigmas(num_train_timesteps, train_shift)
    tau = 1.0 / (1.0 + inference_shift * (1.0 / sigma - 1.0))
    sigma_s = exponential_time_shift(math.log(inference_shift), tau - 1.0 / num_inference_steps)
    return GaussianSchedule(
        a=1.0 - sigma, b=sigma, prediction_type="flow", num_inference_steps=num_inference_steps,
        inference_previous_a=1.0 - sigma_s, inference_previous_b=sigma_s,
    )
