"""The paper's reading of SIPO (SPEC 4a): weights inside z, per-trajectory mask, presets, weight_step."""

import math

import pytest
import torch
import torch.nn.functional as F

from sipo import objectives as O
from sipo.config import load_config
from sipo.preference import PairTerms, objective_loss
from sipo.schedules import ddpm_alphas_cumprod, flow_schedule, vp_schedule


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_weighted_logits_hand_value():
    # z = -0.5*10*(0.95*(0.3-0.1) - 1.1*(0.5-0.2)) = -5*(0.19 - 0.33) = 0.7
    z = O.weighted_dpo_logits(t(0.3), t(0.5), t(0.1), t(0.2), t(0.95), t(1.1), beta=10.0)
    assert z.item() == pytest.approx(0.7, abs=1e-6)


def test_weighted_logits_with_unit_weights_are_dpo_logits_exactly():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(4, 16, generator=g)
    ones = torch.ones(16)
    z = O.weighted_dpo_logits(e[0], e[1], e[2], e[3], ones, ones, beta=5000.0)
    assert torch.equal(z, O.dpo_logits(e[0], e[1], e[2], e[3], beta=5000.0))


def test_weights_are_detached_inside_z():
    w = torch.tensor([1.05], requires_grad=True)
    err = torch.tensor([0.3], requires_grad=True)
    z = O.weighted_dpo_logits(err, t(0.5), t(0.1), t(0.2), w, t(1.0), beta=10.0)
    z.sum().backward()
    assert w.grad is None
    assert err.grad.item() == pytest.approx(-0.5 * 10.0 * 1.05)


def test_inside_loss_hand_values_mask_clip_and_nan():
    # pair 0: w = (0.95, 1.2) -> kept (min 0.95 >= 0.9), clipped to (0.95, 1.1): z = 0.7 (above)
    # pair 1: w_w = 0.5 < 0.9 -> masked; pair 2: undefined (NaN) weight -> masked
    # pair 3: w = (1.0, 0.92): z = -5*(1.0*(0.2-0.4) - 0.92*(0.1-0.1)) = 1.0
    err_w, err_l = t(0.3, 0.3, 0.3, 0.2), t(0.5, 0.5, 0.5, 0.1)
    ref_w, ref_l = t(0.1, 0.1, 0.1, 0.4), t(0.2, 0.2, 0.2, 0.1)
    w_w, w_l = t(0.95, 0.5, float("nan"), 1.0), t(1.2, 1.0, 1.0, 0.92)
    pair = torch.minimum(w_w, w_l)
    loss, keep, z, eff = O.inside_preference_loss(
        err_w, err_l, ref_w, ref_l, w_w, w_l, pair, torch.tensor([500, 500, 10, 700]),
        beta=10.0, tau=0.9, clip_eps=0.1,
    )
    assert keep.tolist() == [True, False, False, True]
    assert z[0].item() == pytest.approx(0.7, abs=1e-6) and z[3].item() == pytest.approx(1.0, abs=1e-6)
    expected = (math.log1p(math.exp(-0.7)) + math.log1p(math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert eff[0].item() == pytest.approx(0.95) and eff[3].item() == pytest.approx(0.92)


def test_cm_inside_uses_plain_dpo_z_and_the_mask():
    err_w, err_l, ref_w, ref_l = t(0.3, 0.2), t(0.5, 0.1), t(0.1, 0.4), t(0.2, 0.1)
    w_w, w_l = t(0.95, 0.5), t(1.2, 1.0)
    loss, keep, z, _ = O.inside_preference_loss(
        err_w, err_l, ref_w, ref_l, w_w, w_l, torch.minimum(w_w, w_l), torch.tensor([300, 300]),
        beta=10.0, reweight=False, tau=0.9, clip_eps=0.1,
    )
    # z_0 = -5*((0.3-0.1) - (0.5-0.2)) = 0.5; pair 1 masked
    assert keep.tolist() == [True, False]
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)


def _terms(err_w, err_l, ref_w, ref_l, log_w_w, log_w_l, timesteps, beta):
    z = O.dpo_logits(err_w, err_l, ref_w, ref_l, beta)
    return PairTerms(timesteps, z, O.dpo_loss_per_pair(z), err_w, err_l, ref_w, ref_l, log_w_w, log_w_l,
                     O.pair_log_weight(log_w_w, log_w_l, "min"))


@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_all_switches_off_is_dpo(placement):
    g = torch.Generator().manual_seed(1)
    e = torch.rand(4, 8, generator=g)
    log_w = torch.randn(2, 8, generator=g)
    log_w[0, 3] = float("nan")
    terms = _terms(e[0], e[1], e[2], e[3], log_w[0], log_w[1], torch.arange(8) * 100, beta=500.0)
    loss, keep, _ = objective_loss(
        terms, terms.log_w_pair.exp(), beta=500.0, placement=placement, mask=False, clip=False, reweight=False,
        tau=0.9, t_min=None, t_max=None, clip_eps=0.1, normalize="self",
    )
    # independent reference: the Diffusion-DPO mean written out
    delta = (e[0] - e[1]) - (e[2] - e[3])
    assert keep.all()
    assert loss.item() == pytest.approx((-F.logsigmoid(-0.5 * 500.0 * delta)).mean().item(), rel=1e-5)


def test_masked_pairs_have_zero_finite_gradients_with_nan_weights():
    err_w = torch.tensor([0.3, 0.3, 0.2, 0.4], requires_grad=True)
    err_l = torch.tensor([0.5, 0.5, 0.1, 0.4], requires_grad=True)
    ref_w, ref_l = t(0.1, 0.1, 0.4, 0.3), t(0.2, 0.2, 0.1, 0.3)
    w_w = t(float("nan"), 0.95, 0.3, float("inf"))
    w_l = t(1.0, float("nan"), 1.0, 1.0)
    loss, keep, z, _ = O.inside_preference_loss(
        err_w, err_l, ref_w, ref_l, w_w, w_l, torch.minimum(w_w, w_l), torch.tensor([10, 20, 30, 999]),
        beta=1000.0, mask=True, tau=0.9, clip_eps=0.1,
    )
    loss.backward()
    assert keep.tolist() == [False, False, False, True]
    assert torch.isfinite(z).all() and torch.isfinite(loss)
    assert torch.isfinite(err_w.grad).all() and torch.isfinite(err_l.grad).all()
    assert err_w.grad[:3].abs().sum() == 0 and err_l.grad[:3].abs().sum() == 0
    # the kept pair: inf weight clipped to 1.1 -> d loss / d err_w = sigmoid(-z) * 0.5 * beta * 1.1
    assert err_w.grad[3].item() == pytest.approx(torch.sigmoid(-z[3]).item() * 0.5 * 1000.0 * 1.1, rel=1e-5)


def test_everything_masked_gives_zero_loss_and_zero_gradient():
    err_w = torch.tensor([0.3, 0.2], requires_grad=True)
    w = t(float("nan"), 0.1)
    loss, keep, _, _ = O.inside_preference_loss(
        err_w, t(0.5, 0.1), t(0.1, 0.4), t(0.2, 0.1), w, t(1.0, 1.0), w, torch.tensor([1, 2]), beta=1000.0,
    )
    loss.backward()
    assert loss.item() == 0.0 and not keep.any() and torch.equal(err_w.grad, torch.zeros(2))


def test_clip_eps_one_is_the_project_range_zero_two():
    assert O.trust_region_bounds(1.0) == (0.0, 2.0)
    assert O.trust_region_bounds(0.1) == pytest.approx((0.9, 1.1))


def test_outside_placement_hand_value():
    # per-pair losses via z = 0 -> log 2 each... use a direct hand case: loss_pair (1, 2), w (0.5, 3 -> 2)
    # self-normalised: (0.5*1 + 2*2) / 2.5 = 1.8
    terms = PairTerms(torch.tensor([100, 200]), t(0.0, 0.0), t(1.0, 2.0), *(t(0.0, 0.0) for _ in range(4)),
                      t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0))
    loss, keep, eff = objective_loss(
        terms, t(0.5, 3.0), beta=1.0, placement="outside", mask=True, clip=True, reweight=True, tau=0.4,
        t_min=None, t_max=None, clip_eps=1.0, normalize="self",
    )
    assert loss.item() == pytest.approx(1.8) and eff.tolist() == [0.5, 2.0]


@pytest.mark.parametrize(
    "name, placement, tau, eps, pair_weight, beta",
    [
        ("sipo", "inside", 0.9, 0.1, "min", 1000.0),
        ("dpo-cm", "inside", 0.9, 0.1, "min", 1000.0),
        ("dpo", "inside", 0.9, 0.1, "min", 5000.0),
        ("sipo-outside", "outside", 0.5, 1.0, "product", 5000.0),
        ("dpo-cm-outside", "outside", 0.5, 1.0, "product", 5000.0),
    ],
)
def test_presets_resolve_to_spec_4a(name, placement, tau, eps, pair_weight, beta):
    oc = load_config(None, [f"objective.name={name}"]).objective
    assert (oc.weight_placement, oc.tau, oc.clip_eps, oc.pair_weight, oc.beta) == (placement, tau, eps, pair_weight, beta)


def test_explicit_values_override_the_preset():
    oc = load_config(None, ["objective.name=sipo", "objective.beta=3000", "objective.tau=0.5",
                            "objective.weight_placement=outside"]).objective
    assert (oc.beta, oc.tau, oc.weight_placement, oc.clip_eps) == (3000.0, 0.5, "outside", 0.1)
    assert load_config(None, ["objective.name=dpo-cm"]).objective.switches() == {"mask": True, "clip": True, "reweight": False}


def test_weight_step_adjacent_vs_inference_hand_formula():
    abar = ddpm_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear")
    schedule = vp_schedule(abar, num_inference_steps=50)
    tt = torch.tensor([500, 19, 0])
    assert schedule.previous_timestep(tt).tolist() == [480, -1, -20]
    assert schedule.previous_timestep(tt, "adjacent").tolist() == [499, 18, -1]
    a_s, b_s = schedule.previous_coefficients(tt, "adjacent")
    assert a_s[0].item() == pytest.approx(math.sqrt(abar[499].item()), rel=1e-6)
    assert b_s[1].item() == pytest.approx(math.sqrt(1 - abar[18].item()), rel=1e-6)
    assert (a_s[2].item(), b_s[2].item()) == (1.0, 0.0)
    # SPEC 3: (SNR_s/SNR_t - 1)/2 at t = 500 is ~22x larger on the 50-step grid than for s = t - 1
    snr = abar / (1 - abar)
    ratio = (snr[480] / snr[500] - 1) / (snr[499] / snr[500] - 1)
    assert 20 < ratio.item() < 25


def test_flow_weight_step_takes_the_next_smaller_sigma():
    schedule = flow_schedule(1000, shift=3.0, num_inference_steps=50)
    tt = torch.tensor([600])
    _, b_inf = schedule.previous_coefficients(tt)
    _, b_adj = schedule.previous_coefficients(tt, "adjacent")
    sigma = lambda i: 3.0 * (i + 1) / 1000 / (1 + 2.0 * (i + 1) / 1000)  # noqa: E731
    assert b_inf.item() == pytest.approx(sigma(580), rel=1e-6)
    assert b_adj.item() == pytest.approx(sigma(599), rel=1e-6)
