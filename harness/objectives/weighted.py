"""No clipped surrogate: the policy gradient with a truncated (CISPO) or softly gated (SAPO) token weight."""
from __future__ import annotations

import torch

from harness.objectives.registry import Knobs, ObjectiveTerms, Tokens, clamped_ratio, register_objective


@register_objective("cispo", knobs={"epsilon_high": 5.0}, source="2506.13585", rules={"epsilon_high": (
    lambda v: isinstance(v, (int, float)) and v >= 1, "a cap on r of 1 or more (TRL's cispo reads epsilon_high as "
    "the cap itself, not a half-width: below 1 it shrinks every token's weight)")})
def clipped_is_weight(x: Tokens, k: Knobs) -> ObjectiveTerms:
    """CISPO (MiniMax-M1): J = sg(min(r, eps_max)) A log pi. The weight is truncated, never the gradient: every
    token keeps A grad log pi, scaled by its (capped) ratio. At r = 1 it is the policy gradient.

    eps_max is TRL's `epsilon_high` with TRL's meaning for cispo: the cap on r itself, not 1 + eps. MiniMax-M1
    publishes no value; 5.0 is the one TRL documents (ScaleRL, arXiv 2510.13786). Equals TRL 1.16's `cispo` term
    (tests/test_objective_zoo.py); TRL ties it to the `dapo` aggregation, the harness to the study's `loss_type`.
    Diagnostic: `cispo/truncated_mean`, the fraction of tokens whose weight hit the cap.
    """
    if x.logps is None:
        raise ValueError("cispo needs the per-token log-probabilities (Tokens.logps)")
    r = clamped_ratio(x.log_ratio)
    weight = torch.clamp(r, max=k.epsilon_high).detach()
    return ObjectiveTerms(per_token_loss=-(weight * x.advantages * x.logps),
                          extras={"truncated": (r > k.epsilon_high).to(r.dtype)})


@register_objective("sapo", knobs={"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}, source="2511.20347")
def soft_gate(x: Tokens, k: Knobs) -> ObjectiveTerms:
    """SAPO: J = sigma(tau (r - 1)) 4 / tau A, tau = sapo_temperature_pos where A > 0, else _neg. A smooth trust
    region: the gradient weight 4 sigma (1 - sigma) is 1 at r = 1 (the policy gradient; the value there is
    2 A / tau, a constant) and decays as r leaves 1. Equals TRL 1.16's `sapo` term (which TRL aggregates as
    `grpo`; the harness uses the study's `loss_type`). Diagnostic: `sapo/gate_weight_mean`, that gradient weight.
    """
    r, a = clamped_ratio(x.log_ratio), x.advantages
    tau = torch.full_like(a, k.sapo_temperature_neg).masked_fill(a > 0, k.sapo_temperature_pos)
    gate = torch.sigmoid(tau * (r - 1))
    return ObjectiveTerms(per_token_loss=-(gate * 4 / tau * a),
                          extras={"gate_weight": (4 * gate * (1 - gate)).detach()})
