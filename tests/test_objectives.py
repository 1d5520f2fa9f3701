"""Loss math of the objective registry: golden values, the CFPO optimum, and CFPO == GRPO at r = 1."""
import math

import pytest
import torch

from harness.objectives import OBJECTIVES, Knobs, Tokens, get_objective, register_objective
from harness.objectives import clipped_surrogate as grpo_clipped
from harness.objectives import quadratic_penalty as cfpo_quadratic

EPS = 0.2


def loss_and_grad(fn, log_ratio, adv, eps_low=EPS, eps_high=EPS):
    lr = log_ratio.clone().requires_grad_(True)
    loss = fn(Tokens(lr, adv), Knobs(eps_low, eps_high)).per_token_loss
    loss.sum().backward()
    return loss.detach(), lr.grad


@pytest.mark.parametrize(
    "r, a, loss, dloss_dlogr",
    [
        # J = rA - |A|/(2 eps) (r-1)^2;  dJ/dr = A - |A|/eps (r-1);  dloss/dlog r = -dJ/dr * r
        (1.5, 2.0, -(1.5 * 2 - 2 / 0.4 * 0.25), -(2 - 2 / 0.2 * 0.5) * 1.5),  # -1.75, 4.5
        (0.9, -1.0, -(-0.9 - 1 / 0.4 * 0.01), -(-1 - 1 / 0.2 * -0.1) * 0.9),  # 0.925, 0.45
        (1.0, 0.7, -0.7, -0.7),  # on-policy: plain policy gradient
        (3.0, 0.0, 0.0, 0.0),  # zero advantage: no signal, no penalty
    ],
)
def test_cfpo_golden_values(r, a, loss, dloss_dlogr):
    got, grad = loss_and_grad(cfpo_quadratic, torch.tensor([[math.log(r)]], dtype=torch.float64),
                              torch.tensor([[a]], dtype=torch.float64))
    assert got.item() == pytest.approx(loss, abs=1e-12)
    assert grad.item() == pytest.approx(dloss_dlogr, abs=1e-12)


def test_cfpo_matches_formula_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    log_ratio = torch.randn(32, 17, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(32, 1, generator=g, dtype=torch.float64)
    loss, grad = loss_and_grad(cfpo_quadratic, log_ratio, adv)
    r = log_ratio.exp()
    expected = -(r * adv - adv.abs() / (2 * EPS) * (r - 1) ** 2)
    expected_grad = -(adv - adv.abs() / EPS * (r - 1)) * r
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_cfpo_gradient_vanishes_at_clip_boundary():
    adv = torch.tensor([[1.3], [-0.4], [2.0], [-5.0]], dtype=torch.float64)
    r_star = 1 + EPS * adv.sign()
    _, grad = loss_and_grad(cfpo_quadratic, r_star.log(), adv)
    assert torch.all(grad.abs() < 1e-12)
    # and it is a maximum of J: moving either way lowers J (raises the loss)
    for delta in (-1e-3, 1e-3):
        worse, _ = loss_and_grad(cfpo_quadratic, (r_star + delta).log(), adv)
        best, _ = loss_and_grad(cfpo_quadratic, r_star.log(), adv)
        assert torch.all(worse > best)


def test_cfpo_epsilon_high_moves_the_optimum_on_the_positive_side_only():
    """With TRL's epsilon_high set, CFPO's zero-gradient point follows GRPO's asymmetric clip boundary:
    r = 1 + eps_high for A > 0, r = 1 - eps_low for A < 0; golden values from the formula with eps_high."""
    eps_low, eps_high = 0.2, 0.28
    adv = torch.tensor([[1.3], [-0.4]], dtype=torch.float64)
    r_star = torch.tensor([[1 + eps_high], [1 - eps_low]], dtype=torch.float64)
    _, grad = loss_and_grad(cfpo_quadratic, r_star.log(), adv, eps_low, eps_high)
    assert torch.all(grad.abs() < 1e-12)
    loss, _ = loss_and_grad(cfpo_quadratic, torch.tensor([[math.log(1.5)]], dtype=torch.float64),
                            torch.tensor([[2.0]], dtype=torch.float64), eps_low, eps_high)
    assert loss.item() == pytest.approx(-(1.5 * 2 - 2 / (2 * eps_high) * 0.25), abs=1e-12)


def test_cfpo_equals_grpo_at_ratio_one():
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(16, 1, generator=g, dtype=torch.float64)
    zeros = torch.zeros(16, 9, dtype=torch.float64)
    l_c, g_c = loss_and_grad(cfpo_quadratic, zeros, adv)
    l_g, g_g = loss_and_grad(grpo_clipped, zeros, adv)
    assert torch.equal(l_c, l_g) and torch.equal(g_c, g_g)


def test_cfpo_differs_from_grpo_off_policy():
    adv = torch.tensor([[1.0]], dtype=torch.float64)
    log_ratio = torch.tensor([[math.log(1.5)]], dtype=torch.float64)  # beyond 1 + eps: GRPO clipped, no gradient
    _, g_g = loss_and_grad(grpo_clipped, log_ratio, adv)
    _, g_c = loss_and_grad(cfpo_quadratic, log_ratio, adv)
    assert g_g.item() == 0.0
    assert g_c.item() > 0  # restoring force: the loss grows with r past the boundary


def test_cfpo_guards_huge_log_ratio():
    loss, grad = loss_and_grad(cfpo_quadratic, torch.tensor([[500.0]], dtype=torch.float64),
                               torch.tensor([[1.0]], dtype=torch.float64))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_registry_lookup_and_duplicates():
    assert {"grpo", "cfpo"} <= set(OBJECTIVES)
    assert get_objective("grpo").stock_trl and not get_objective("cfpo").stock_trl
    with pytest.raises(ValueError, match=r"choose one of \['cfpo', 'cispo', 'clip-higher'"):
        get_objective("ppo-typo")
    with pytest.raises(ValueError, match="already registered"):
        register_objective("cfpo")(cfpo_quadratic)
