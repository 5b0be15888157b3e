"""sipo.schedules against diffusers' schedulers (an independent implementation) and exact round trips."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from sipo import schedules as S


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
        dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        dict(beta_schedule="squaredcos_cap_v2"),
    ],
)
def test_alphas_cumprod_match_diffusers(kwargs):
    reference = DDPMScheduler(num_train_timesteps=1000, **kwargs).alphas_cumprod
    ours = S.ddpm_alphas_cumprod(1000, **{"beta_start": 0.0001, "beta_end": 0.02, **kwargs})
    torch.testing.assert_close(ours.float(), reference, rtol=1e-5, atol=1e-7)


def test_vp_coefficients_and_previous_timestep():
    abar = S.ddpm_alphas_cumprod()
    schedule = S.vp_schedule(abar, num_inference_steps=50)
    t = torch.tensor([999, 25, 20, 19, 0])
    a_t, b_t = schedule.coefficients(t)
    torch.testing.assert_close(a_t**2 + b_t**2, torch.ones(5))
    assert schedule.previous_timestep(t).tolist() == [979, 5, 0, -1, -20]
    a_s, b_s = schedule.previous_coefficients(t)
    assert a_s[0].item() == pytest.approx(abar[979].sqrt().item())
    assert a_s[3].item() == 1.0 and b_s[3].item() == 0.0  # s < 0 is x0 itself


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_exact_target_round_trips_to_x0_and_eps(prediction_type):
    if prediction_type == "flow":
        schedule = S.flow_schedule(1000, shift=3.0)
    else:
        schedule = S.vp_schedule(S.ddpm_alphas_cumprod(), prediction_type)
    t = torch.tensor([0, 300, 700, 998])
    a_t, b_t = schedule.coefficients(t)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    eps = torch.randn(4, 3, 5, 5, generator=g)
    x_t = S.add_noise(x0, eps, a_t, b_t)
    target = S.training_target(x0, eps, a_t, b_t, prediction_type)
    x0_hat, eps_hat = S.predicted_x0_and_eps(target, x_t, a_t, b_t, prediction_type)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)


def test_flow_sigmas_match_diffusers_flow_match_scheduler():
    """diffusers' FlowMatchEulerDiscreteScheduler training sigmas are (t+1)/T, shifted, in descending order."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours = S.flow_sigmas(1000, shift=3.0)
    torch.testing.assert_close(ours.flip(0).float(), scheduler.sigmas[:1000].float(), rtol=1e-5, atol=1e-6)


def test_unknown_prediction_type_and_bad_shapes_raise():
    with pytest.raises(ValueError):
        S.training_target(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "sample")
    with pytest.raises(ValueError):
        S.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), torch.ones(3))
