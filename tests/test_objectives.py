"""Reference-value and property tests of sipo.objectives (SPEC 2-5).

Every expected number below is derived in the test's docstring or computed by an independent
formula (closed-form DDPM posterior, torch.distributions log densities in float64).
"""

import math

import pytest
import torch

from sipo import objectives as O
from sipo import schedules as S


# ------------------------------------------------------------------------------------ SPEC 2
def test_dpo_logits_hand_value():
    """err_w=0.1, err_l=0.3, ref 0.2/0.2, beta=10: delta=(0.1-0.3)-(0)=-0.2, z=-0.5*10*-0.2=1.

    loss = -logsigmoid(1) = log(1 + e^-1) = 0.31326168751822286 (math.log1p(math.exp(-1))).
    """
    z = O.dpo_logits(torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2]), beta=10.0)
    assert z.item() == pytest.approx(1.0, abs=1e-6)
    assert O.dpo_loss_per_pair(z).item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)


def test_swapping_winner_and_loser_negates_z():
    g = torch.Generator().manual_seed(0)
    e = [torch.rand(7, generator=g) for _ in range(4)]
    z = O.dpo_logits(e[0], e[1], e[2], e[3], beta=123.0)
    z_swapped = O.dpo_logits(e[1], e[0], e[3], e[2], beta=123.0)
    torch.testing.assert_close(z_swapped, -z)


def test_shape_mismatch_raises_instead_of_broadcasting():
    with pytest.raises(ValueError):
        O.dpo_logits(torch.zeros(4), torch.zeros(4, 1), torch.zeros(4), torch.zeros(4), beta=1.0)
    with pytest.raises(ValueError):
        O.reduce_pair_losses(torch.zeros(4), torch.ones(4, 1, dtype=torch.bool))


def test_per_sample_error_is_elementwise_mean():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    target = torch.zeros_like(pred)
    # (1 + 4 + 9 + 16) / 4 = 7.5
    assert O.per_sample_error(pred, target).tolist() == [7.5]


def test_large_beta_and_last_timestep_stay_finite():
    z = O.dpo_logits(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0]), beta=5000.0)
    assert z.item() == pytest.approx(5000.0)
    assert torch.isfinite(O.dpo_loss_per_pair(-z)).all()  # -logsigmoid(-5000) = 5000, not inf
    schedule = S.vp_schedule(S.ddpm_alphas_cumprod())
    t = torch.tensor([999])
    a_t, b_t = schedule.coefficients(t)
    a_s, b_s = schedule.previous_coefficients(t)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_t = S.add_noise(x0, torch.randn_like(x0), a_t, b_t)
    mean, var = O.gaussian_posterior(x_t, x0, a_t, b_t, a_s, b_s)
    log_w = O.log_importance_weight(mean, x_t, x0, x0 + 0.3, a_t, b_t, a_s, b_s)
    assert torch.isfinite(log_w).all()


# ------------------------------------------------------------------------------------ SPEC 3
@pytest.mark.parametrize("t,k", [(1, 1), (500, 1), (999, 1), (999, 20), (40, 20), (300, 100)])
def test_posterior_matches_closed_form_ddpm(t, k):
    """Closed form (Ho et al. 2020, eq. 7, generalised to s = t - k with alpha_{t|s} = abar_t / abar_s):

    mean = sqrt(abar_s) (1 - alpha_ts) / (1 - abar_t) * x0 + sqrt(alpha_ts) (1 - abar_s) / (1 - abar_t) * x_t
    var  = (1 - abar_s) / (1 - abar_t) * (1 - alpha_ts)
    computed here from the betas in float64, independently of the a/b form under test.
    """
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    s = t - k
    abar_t, abar_s = abar[t], abar[s]
    alpha_ts = abar_t / abar_s
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x_t = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    expected_mean = (abar_s.sqrt() * (1 - alpha_ts) / (1 - abar_t)) * x0 + (alpha_ts.sqrt() * (1 - abar_s) / (1 - abar_t)) * x_t
    expected_var = (1 - abar_s) / (1 - abar_t) * (1 - alpha_ts)
    mean, var = O.gaussian_posterior(x_t, x0, abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt())
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, torch.full((3,), float(expected_var), dtype=torch.float32), rtol=1e-6, atol=0)


def test_log_weight_is_zero_for_exact_prediction():
    schedule = S.vp_schedule(S.ddpm_alphas_cumprod())
    t = torch.tensor([30, 250, 600, 999])
    a_t, b_t = schedule.coefficients(t)
    a_s, b_s = schedule.previous_coefficients(t)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x_t = S.add_noise(x0, torch.randn_like(x0), a_t, b_t)
    mean, var = O.gaussian_posterior(x_t, x0, a_t, b_t, a_s, b_s)
    x_prev = mean + var.sqrt().view(-1, 1, 1, 1) * torch.randn_like(x0)
    assert torch.equal(O.log_importance_weight(x_prev, x_t, x0, x0.clone(), a_t, b_t, a_s, b_s), torch.zeros(4))


def test_log_weight_hand_built_two_element_example():
    """a_t=0.6, b_t=0.8, a_s=0.8, b_s=0.6 -> r=0.75, s2_ts=0.64-0.5625*0.36=0.4375.

    mu = 0.421875*x_t + 0.546875*x0, var = 0.4375*0.36/0.64 = 0.24609375.
    x0=[1,-1], x0_hat=[1.5,-1], x_t=[0.5,0.5], x_prev=[1,0]:
    mu=[0.7578125,-0.3359375], mu_hat=[1.03125,-0.3359375];
    ||x_prev-mu||^2 - ||x_prev-mu_hat||^2 = 0.2421875^2 - 0.03125^2 = 0.05767822265625;
    sum form: 0.05767822265625 / (2*0.24609375) = 0.1171875; mean form (D=2): 0.05859375.
    """
    x0 = torch.tensor([[1.0, -1.0]])
    x0_hat = torch.tensor([[1.5, -1.0]])
    x_t = torch.tensor([[0.5, 0.5]])
    x_prev = torch.tensor([[1.0, 0.0]])
    args = (x_prev, x_t, x0, x0_hat, 0.6, 0.8, 0.8, 0.6)
    assert O.log_importance_weight(*args, reduction="sum").item() == pytest.approx(0.1171875, abs=1e-7)
    assert O.log_importance_weight(*args).item() == pytest.approx(0.05859375, abs=1e-7)
    mean, var = O.gaussian_posterior(x_t, x0, 0.6, 0.8, 0.8, 0.6)
    torch.testing.assert_close(mean, torch.tensor([[0.7578125, -0.3359375]]))
    assert var.item() == pytest.approx(0.24609375)


def test_log_weight_matches_gaussian_log_density_ratio():
    """Second formula: log N(x_prev; mu_hat, s2) - log N(x_prev; mu, s2) with torch.distributions, float64."""
    schedule = S.vp_schedule(S.ddpm_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear"))
    t = torch.tensor([100, 400, 800])
    a_t, b_t = schedule.coefficients(t)
    a_s, b_s = schedule.previous_coefficients(t)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 6, 6, generator=g)
    x0_hat = x0 + 0.1 * torch.randn(3, 4, 6, 6, generator=g)
    x_t = S.add_noise(x0, torch.randn(3, 4, 6, 6, generator=g), a_t, b_t)
    mean, var = O.gaussian_posterior(x_t.double(), x0.double(), a_t, b_t, a_s, b_s)
    x_prev = mean + var.double().sqrt().view(-1, 1, 1, 1) * torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    mean_hat, _ = O.gaussian_posterior(x_t.double(), x0_hat.double(), a_t, b_t, a_s, b_s)
    std = var.double().sqrt().view(-1, 1, 1, 1)
    dist_p = torch.distributions.Normal(mean_hat, std)
    dist_q = torch.distributions.Normal(mean, std)
    expected = (dist_p.log_prob(x_prev) - dist_q.log_prob(x_prev)).flatten(1).mean(1)
    got = O.log_importance_weight(x_prev, x_t.double(), x0.double(), x0_hat.double(), a_t, b_t, a_s, b_s)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_stable_form_beats_naive_subtraction_at_t999():
    """SPEC 3: in float32 the difference of squared norms loses the signal at t=999.

    Reference: the same quantity in float64. The stable form must be within 1e-4 relative.
    """
    schedule = S.vp_schedule(S.ddpm_alphas_cumprod())
    t = torch.tensor([999] * 8)
    a_t, b_t = schedule.coefficients(t)
    a_s, b_s = schedule.previous_coefficients(t)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.5 * torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64)
    x_t = S.add_noise(x0, torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64), a_t.double(), b_t.double())
    mean, var = O.gaussian_posterior(x_t, x0, a_t, b_t, a_s, b_s)
    x_prev = mean + var.double().sqrt().view(-1, 1, 1, 1) * torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64)
    reference = O.log_importance_weight(x_prev, x_t, x0, x0_hat, a_t, b_t, a_s, b_s).double()
    stable = O.log_importance_weight(x_prev.float(), x_t.float(), x0.float(), x0_hat.float(), a_t, b_t, a_s, b_s).double()
    assert ((stable - reference).abs() / reference.abs()).max() < 1e-4


def test_log_weight_undefined_on_last_step_and_detached():
    x = torch.randn(2, 3, requires_grad=True)
    log_w = O.log_importance_weight(x, x, x, x * 2, torch.tensor([0.9, 0.9]), torch.tensor([0.3, 0.3]),
                                    torch.tensor([1.0, 0.95]), torch.tensor([0.0, 0.2]))
    assert math.isnan(log_w[0].item()) and math.isfinite(log_w[1].item())
    assert not log_w.requires_grad


def test_pair_log_weight_modes():
    a, b = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert O.pair_log_weight(a, b, "product").exp().item() == pytest.approx(0.125)
    assert O.pair_log_weight(a, b, "min").exp().item() == pytest.approx(0.25)
    assert O.pair_log_weight(a, b, "mean").exp().item() == pytest.approx(0.375)
    with pytest.raises(ValueError):
        O.pair_log_weight(a, b, "max")


# ------------------------------------------------------------------------------------ SPEC 4-5
def test_every_switch_off_equals_dpo():
    g = torch.Generator().manual_seed(5)
    z = 3 * torch.randn(16, generator=g)
    loss_pair = O.dpo_loss_per_pair(z)
    weight = torch.rand(16, generator=g)
    weight[3] = float("nan")  # an undefined weight must not matter when nothing uses weights
    loss, keep, _ = O.preference_loss(loss_pair, weight, torch.arange(16), tau=0.9, w_clip=0.1)
    expected = torch.nn.functional.softplus(-z).mean()  # -logsigmoid(z) = softplus(-z)
    assert abs(loss.item() - expected.item()) < 1e-6
    assert keep.all()


def test_self_normalised_reweighting_hand_value():
    """losses [1,2,3,4], w [1, 0.5, 0.05, 3], tau=0.1, w_clip=2: pair 3 masked, w_c = [1, 0.5, -, 2].

    SIPO = (1*1 + 0.5*2 + 2*4) / (1 + 0.5 + 2) = 10 / 3.5; C&M = (1 + 2 + 4) / 3 = 7/3;
    batch normalisation = 10 / 4.
    """
    loss_pair = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([1.0, 0.5, 0.05, 3.0])
    t = torch.tensor([10, 20, 30, 40])
    common = dict(tau=0.1, w_clip=2.0)
    sipo, keep, w_c = O.preference_loss(loss_pair, w, t, mask=True, clip=True, reweight=True, **common)
    assert sipo.item() == pytest.approx(10 / 3.5)
    assert keep.tolist() == [True, True, False, True]
    torch.testing.assert_close(w_c, torch.tensor([1.0, 0.5, 0.05, 2.0]))
    cm, _, _ = O.preference_loss(loss_pair, w, t, mask=True, clip=True, **common)
    assert cm.item() == pytest.approx(7 / 3)
    batch, _, _ = O.preference_loss(loss_pair, w, t, mask=True, clip=True, reweight=True, normalize="batch", **common)
    assert batch.item() == pytest.approx(10 / 4)
    banded, keep_band, _ = O.preference_loss(loss_pair, w, t, mask=True, tau=0.0, t_min=15, t_max=35)
    assert keep_band.tolist() == [False, True, True, False] and banded.item() == pytest.approx(2.5)


def test_all_pairs_masked_gives_zero_loss_and_finite_gradients():
    # A NaN weight (last inference step) is masked like a low one. (A NaN *loss* would still give
    # a zero loss value, but autograd multiplies 0 by NaN on its way back: that case belongs to
    # the trainer's non-finite step guard, not to the reduction.)
    z = torch.tensor([1.0, -2.0, 30.0], requires_grad=True)
    weight = torch.tensor([0.01, 0.02, float("nan")])
    for reweight in (False, True):
        loss_pair = O.dpo_loss_per_pair(z)
        loss, keep, _ = O.preference_loss(loss_pair, weight, torch.tensor([1, 2, 3]), mask=True, clip=True, reweight=reweight, tau=0.5)
        assert not keep.any() and loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_weight_carries_no_gradient_into_loss():
    z = torch.tensor([0.3, -0.2], requires_grad=True)
    w = torch.tensor([0.8, 1.2], requires_grad=True)
    loss, _, _ = O.preference_loss(O.dpo_loss_per_pair(z), w, torch.tensor([1, 2]), reweight=True)
    loss.backward()
    assert w.grad is None and z.grad is not None


def test_timestep_ema_update_hand_values():
    """Buckets of width 250 over T=1000. Batch 1: t=[10, 20, 600], w=[1, 3, 2] -> ema[0]=2 (mean), ema[2]=2.

    Batch 2: t=[30], w=[4], decay 0.5 -> ema[0] = 0.5*2 + 0.5*4 = 3; bucket 2 unchanged; 1, 3 unseen (NaN).
    """
    ema, seen = torch.full((4,), float("nan"), dtype=torch.float64), torch.zeros(4, dtype=torch.bool)
    buckets = O.timestep_bucket(torch.tensor([10, 20, 600]), 1000, 4)
    assert buckets.tolist() == [0, 0, 2]
    ema, seen = O.update_timestep_ema(ema, seen, buckets, torch.tensor([1.0, 3.0, 2.0]), decay=0.5)
    assert ema[0].item() == 2.0 and ema[2].item() == 2.0 and seen.tolist() == [True, False, True, False]
    ema, seen = O.update_timestep_ema(ema, seen, O.timestep_bucket(torch.tensor([30]), 1000, 4), torch.tensor([4.0]), decay=0.5)
    assert ema[0].item() == 3.0 and ema[2].item() == 2.0 and math.isnan(ema[1].item())
