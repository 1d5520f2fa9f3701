"""Loss math of every registered objective against its paper's formula (golden values and gradients, ratios far
outside any trust region included), their behaviour at r = 1, and the knobs each objective may be given."""
import math

import pytest
import torch

from harness.config import ConfigError, load_config
from harness.objectives import OBJECTIVES, Knobs, Tokens, get_objective

CONFIG = "configs/proxy.yaml"
ZOO = ["grpo", "clip-higher", "gspo", "cispo", "sapo", "cfpo", "gppo", "pg-is"]


def knobs_of(name: str) -> Knobs:
    """The paper defaults of an objective, as a trainer would resolve them (TRL's defaults for unset knobs)."""
    d = {k: v for k, v in get_objective(name).knobs.items() if v is not None}
    eps = d.get("epsilon", 0.2)
    return Knobs(epsilon_low=eps, epsilon_high=d.get("epsilon_high", eps),
                 sapo_temperature_pos=d.get("sapo_temperature_pos", 1.0),
                 sapo_temperature_neg=d.get("sapo_temperature_neg", 1.05))


def formula(name: str, r: torch.Tensor, a: torch.Tensor, logp: torch.Tensor, k: Knobs):
    """(loss, d loss / d log r) per token, written out by hand from each paper's objective J (loss = -J)."""
    lo, hi = 1 - k.epsilon_low, 1 + k.epsilon_high
    if name in ("grpo", "clip-higher", "gspo"):
        clipped = ((a > 0) & (r > hi)) | ((a < 0) & (r < lo))
        return -torch.min(r * a, r.clamp(lo, hi) * a), torch.where(clipped, 0.0, -r * a)
    if name == "gppo":
        high, low = (a > 0) & (r > hi), (a < 0) & (r < lo)
        value = torch.where(high, hi * a, torch.where(low, lo * a, r * a))
        grad = torch.where(high, hi * a, torch.where(low, lo * a, r * a))  # d(b r/sg(r))/dlog r = b
        return -value, -grad
    if name == "cispo":  # d(-w A log pi)/d log r = -w A, with log pi = log pi_old + log r
        w = r.clamp(max=k.epsilon_high)
        return -w * a * logp, -w * a
    if name == "sapo":
        tau = torch.full_like(a, k.sapo_temperature_neg).masked_fill(a > 0, k.sapo_temperature_pos)
        s = torch.sigmoid(tau * (r - 1))
        return -s * 4 / tau * a, -4 * s * (1 - s) * r * a
    if name == "cfpo":
        eps = torch.full_like(a, k.epsilon_low).masked_fill(a > 0, k.epsilon_high)
        return -(r * a - a.abs() / (2 * eps) * (r - 1) ** 2), -(a - a.abs() / eps * (r - 1)) * r
    if name == "pg-is":
        return -r * a, -r * a
    raise AssertionError(f"no formula for {name}")


def loss_and_grad(name: str, log_ratio: torch.Tensor, adv: torch.Tensor, old_logp: torch.Tensor, k: Knobs):
    lr = log_ratio.clone().requires_grad_(True)
    terms = get_objective(name).fn(Tokens(lr, adv, old_logp + lr), k)
    terms.per_token_loss.sum().backward()
    return terms.per_token_loss.detach(), lr.grad, terms.extras


def test_the_zoo_is_registered():
    assert set(ZOO) <= set(OBJECTIVES)
    for name in ZOO:
        objective = get_objective(name)
        assert objective.fn.__doc__ and "r = 1" in objective.fn.__doc__, name  # says what happens on-policy


@pytest.mark.parametrize("name", ZOO)
def test_golden_values_and_gradients_on_random_tensors(name):
    """Ratios from e^-3 to e^3: far outside every trust region, on both sides, for both signs of A."""
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    k = knobs_of(name)
    shape = (64, 1) if get_objective(name).sequence_level else (64, 9)
    log_ratio = (torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5) * 6
    log_ratio[0, 0], log_ratio[1, 0] = 0.0, math.log(1 + k.epsilon_high) + 1e-3  # on-policy, just past the bound
    adv = torch.randn(64, 1, generator=g, dtype=torch.float64)
    old_logp = -torch.rand(*shape, generator=g, dtype=torch.float64) * 4
    loss, grad, _ = loss_and_grad(name, log_ratio, adv, old_logp, k)
    want_loss, want_grad = formula(name, log_ratio.exp(), adv, old_logp + log_ratio, k)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ZOO)
def test_at_ratio_one_every_objective_is_the_policy_gradient(name):
    """d loss / d log r = -A at r = 1 for every objective: on-policy they all train alike (gspo per sequence
    ratio, which the trainer broadcasts back over the tokens). The value there is -A, except cispo (-A log pi: its
    value carries log pi itself) and sapo (-2A/tau)."""
    k = knobs_of(name)
    shape = (16, 1) if get_objective(name).sequence_level else (16, 5)
    adv = torch.linspace(-2, 2, 16, dtype=torch.float64).unsqueeze(1)
    old_logp = torch.full(shape, -1.5, dtype=torch.float64)
    loss, grad, _ = loss_and_grad(name, torch.zeros(shape, dtype=torch.float64), adv, old_logp, k)
    torch.testing.assert_close(grad, (-adv).expand(shape), rtol=0, atol=1e-12)
    if name == "cispo":
        want = -adv * old_logp
    elif name == "sapo":
        want = -2 * adv / torch.full_like(adv, k.sapo_temperature_neg).masked_fill(adv > 0, k.sapo_temperature_pos)
    else:
        want = -adv
    torch.testing.assert_close(loss, want.expand(shape), rtol=0, atol=1e-12)


def test_what_separates_them_far_off_policy():
    """r = 3 on a token with A = 1: the clip family stops its gradient (gppo keeps one at the bound), cispo caps the
    weight only past eps_max, sapo's gate is half closed, cfpo pushes back, pg-is pushes on."""
    grads = {}
    for name in ZOO:
        shape = (1, 1)
        _, grad, _ = loss_and_grad(name, torch.full(shape, math.log(3.0), dtype=torch.float64),
                                   torch.ones(1, 1, dtype=torch.float64), torch.full(shape, -1.0), knobs_of(name))
        grads[name] = grad.item()  # d loss / d log r: negative pushes r up
    assert grads["grpo"] == grads["clip-higher"] == grads["gspo"] == 0.0
    assert grads["gppo"] == pytest.approx(-1.28)
    assert grads["cispo"] == pytest.approx(-3.0)  # 3 < eps_max 5: the full importance weight
    assert -0.5 * 3 < grads["sapo"] < 0  # gate weight 4 sigma (1 - sigma) = 0.42 at tau = 1, times r
    assert grads["cfpo"] > 0
    assert grads["pg-is"] == pytest.approx(-3.0)


@pytest.mark.parametrize("name, key", [("cispo", "truncated"), ("gppo", "clipped"), ("sapo", "gate_weight"),
                                       ("cfpo", "penalty")])
def test_objectives_report_their_own_diagnostic(name, key):
    log_ratio = torch.tensor([[0.0, math.log(1.5), math.log(8.0)]], dtype=torch.float64)
    _, _, extras = loss_and_grad(name, log_ratio, torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 3),
                                 knobs_of(name))
    value = extras[key]
    assert value.shape == log_ratio.shape and not value.requires_grad
    if key in ("truncated", "clipped"):  # 0/1 per token: cispo caps only r = 8 > 5; gppo clips 1.5 and 8
        assert value.tolist() == ([[0.0, 0.0, 1.0]] if name == "cispo" else [[0.0, 1.0, 1.0]])
    if key == "gate_weight":
        assert value[0, 0].item() == pytest.approx(1.0) and value[0, 2].item() < 0.01


@pytest.mark.parametrize("name", ZOO)
def test_unclamped_huge_ratios_stay_finite(name):
    loss, grad, _ = loss_and_grad(name, torch.tensor([[60.0], [-60.0]], dtype=torch.float64),
                                  torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.zeros(2, 1),
                                  knobs_of(name))
    if name in ("grpo", "clip-higher", "gspo"):  # TRL's own formula: finite in float64 at these ratios
        assert torch.isfinite(loss).all()
    else:
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------------ knobs
def test_paper_defaults_are_filled_in_and_explicit_knobs_kept():
    cfg = load_config(CONFIG, ["objective=clip-higher"])
    assert cfg.trl["epsilon"] == 0.2 and cfg.trl["epsilon_high"] == 0.28
    cfg = load_config(CONFIG, ["objective=gspo", "trl.epsilon_high=0.001"])
    assert cfg.trl["epsilon"] == 3e-4 and cfg.trl["epsilon_high"] == 0.001
    cfg = load_config(CONFIG, ["objective=sapo"])
    assert cfg.trl["sapo_temperature_pos"] == 1.0 and cfg.trl["sapo_temperature_neg"] == 1.05
    assert load_config(CONFIG, ["objective=cispo"]).trl["epsilon_high"] == 5.0
    # grpo and cfpo keep TRL's defaults (nothing added): their config hashes, and published runs, are unchanged.
    for name in ("grpo", "cfpo", "pg-is"):
        assert not {"epsilon", "epsilon_high"} & set(load_config(CONFIG, [f"objective={name}"]).trl)


@pytest.mark.parametrize("override, message", [
    (["objective=pg-is", "trl.epsilon=0.2"], "trl.epsilon is not used by objective 'pg-is'; its knobs: none"),
    (["objective=cispo", "trl.epsilon=0.2"], "trl.epsilon is not used by objective 'cispo'; its knobs: "
                                             "trl.epsilon_high"),
    (["objective=sapo", "trl.epsilon_high=0.28"], "trl.epsilon_high is not used by objective 'sapo'"),
    (["objective=gspo", "trl.delta=2.0"], "trl.delta is not used by objective 'gspo'"),
    (["objective=grpo", "trl.importance_sampling_level=sequence"], "trl.importance_sampling_level is not used by "
                                                                   "objective 'grpo'"),
    (["objective=sapo", "trl.loss_type=sapo"], "trl.loss_type='sapo': allowed: one of grpo, bnpo, dr_grpo, dapo"),
    (["objective=clip"], "unknown objective 'clip'; choose one of ['cfpo', 'cispo', 'clip-higher',"),
    (["objective=cispo", "trl.epsilon_high=0.28"], "trl.epsilon_high=0.28: allowed for objective 'cispo': a cap "
                                                   "on r of 1 or more"),
    (["objective=sapo", "trl.sapo_temperature_neg=-1"], "trl.sapo_temperature_neg=-1.0: allowed: a finite number > 0"),
])
def test_knobs_an_objective_does_not_use_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, override)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
