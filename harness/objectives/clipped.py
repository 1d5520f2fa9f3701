"""Trust region by clipping the ratio: PPO/GRPO, DAPO's clip-higher, GSPO's sequence-level clip, GPPO."""
from __future__ import annotations

import torch

from harness.objectives.registry import Knobs, ObjectiveTerms, Tokens, clamped_ratio, register_objective


@register_objective("grpo", stock_trl=True, knobs={"epsilon": None, "epsilon_high": None, "delta": None},
                    source="2402.03300")
def clipped_surrogate(x: Tokens, k: Knobs) -> ObjectiveTerms:
    """PPO/GRPO clipped surrogate: J = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).

    Training runs TRL's own code (so `delta`, TRL's two-sided clip, is TRL's too); this function is the same
    formula, for tests and for gspo. At r = 1 it is the policy gradient A grad log pi.
    """
    r = torch.exp(x.log_ratio)
    clipped = torch.clamp(r, 1 - k.epsilon_low, 1 + k.epsilon_high)
    return ObjectiveTerms(per_token_loss=-torch.min(r * x.advantages, clipped * x.advantages), extras={})


# DAPO (arXiv 2503.14476): the same surrogate with a wider upper bound, so low-probability tokens can grow.
register_objective("clip-higher", stock_trl=True, knobs={"epsilon": 0.2, "epsilon_high": 0.28, "delta": None},
                   source="2503.14476")(clipped_surrogate)

# GSPO (arXiv 2507.18071): the clipped surrogate on one ratio per sequence, s = exp(mean_t log r), with the
# paper's much narrower range. The sequence's term is broadcast over its tokens and aggregated by the study's
# loss_type (TRL does the same; with `dapo` a sequence then weighs by its length, which the paper's sequence mean
# does not). At s = 1 the gradient is A grad(mean_t log pi) per sequence: once aggregated, GRPO's on-policy
# gradient (equal up to rounding, tests/test_trainer_equivalence.py).
register_objective("gspo", knobs={"epsilon": 3e-4, "epsilon_high": 4e-4}, sequence_level=True,
                   source="2507.18071")(clipped_surrogate)


@register_objective("gppo", knobs={"epsilon": 0.2, "epsilon_high": 0.28}, source="2508.07629")
def gradient_preserving_clip(x: Tokens, k: Knobs) -> ObjectiveTerms:
    """GPPO (Klear-Reasoner): clip-higher's value, but a clipped token keeps a gradient, scaled to the bound:

        J = b r / sg(r) A  where clip-higher clips (A > 0, r > 1 + eps_high: b = 1 + eps_high;
                                                      A < 0, r < 1 - eps_low: b = 1 - eps_low),  else r A

    so a clipped token's gradient is b A grad log pi instead of 0. At r = 1 it is the policy gradient.
    Diagnostic: `gppo/clipped_mean`, the fraction of tokens whose gradient was bounded this way.
    """
    r, a = clamped_ratio(x.log_ratio), x.advantages
    high = (a > 0) & (r > 1 + k.epsilon_high)
    low = (a < 0) & (r < 1 - k.epsilon_low)
    bound = torch.full_like(r, 1 - k.epsilon_low).masked_fill(high, 1 + k.epsilon_high)
    weight = torch.where(high | low, bound * r / r.detach(), r)
    return ObjectiveTerms(per_token_loss=-(weight * a), extras={"clipped": (high | low).to(r.dtype)})
