"""No clip at all: CFPO's quadratic penalty, and the bare importance-weighted policy gradient (the control)."""
from __future__ import annotations

import torch

from harness.objectives.registry import Knobs, ObjectiveTerms, Tokens, clamped_ratio, register_objective


@register_objective("cfpo", knobs={"epsilon": None, "epsilon_high": None}, source="2601.22801")
def quadratic_penalty(x: Tokens, k: Knobs) -> ObjectiveTerms:
    """Clipping-free policy optimization (arXiv 2601.22801), also SPO's objective (arXiv 2401.16025):

        J = r A - |A| / (2 eps) (r - 1)^2,  eps = eps_high where A > 0, else eps_low

    eps_low is TRL's `epsilon`, eps_high its `epsilon_high` (TRL: defaults to `epsilon`, which gives the
    paper's single-eps objective). dJ/dr = A - |A|/eps (r - 1) vanishes exactly at r = 1 + eps sign(A): the
    penalty's optimum sits on the clip boundary the same knobs give GRPO, asymmetric ones (DAPO's clip-higher)
    included, so a cfpo-vs-grpo comparison with `epsilon_high` set compares like with like. At r = 1 it is the
    policy gradient.
    """
    r, a = clamped_ratio(x.log_ratio), x.advantages
    surrogate = r * a
    eps = torch.full_like(a, k.epsilon_low).masked_fill(a > 0, k.epsilon_high)
    penalty = a.abs() / (2.0 * eps) * (r - 1.0) ** 2
    return ObjectiveTerms(per_token_loss=-(surrogate - penalty),
                          extras={"penalty": penalty.detach(), "surrogate": surrogate.detach()})


@register_objective("pg-is")
def importance_weighted_pg(x: Tokens, k: Knobs) -> ObjectiveTerms:
    """The importance-weighted policy gradient with no trust region: J = r A. The negative control: if it is
    not less stable than the trust-region objectives, the setting does not exercise the question. At r = 1 it is
    the policy gradient. (log r is clamped to +-20 before exp, a guard against overflow only.)
    """
    return ObjectiveTerms(per_token_loss=-(clamped_ratio(x.log_ratio) * x.advantages), extras={})
