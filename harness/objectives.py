"""Policy objectives: a per-token loss as a function of the importance ratio and the advantage.

Adding an objective is one function and one name:

    @register_objective("my-objective")
    def my_objective(log_ratio, advantages, eps_low, eps_high):
        r = torch.exp(log_ratio)
        return ObjectiveTerms(per_token_loss=-(r * advantages), extras={})

Everything around the per-token loss (masks, aggregation by TRL's `loss_type`, the KL penalty, vLLM
importance-sampling correction, metrics) is shared and lives in harness.trainer.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

# The authors' verl code clamps log r to [-20, 20] before exp: the quadratic penalty is unbounded in |r - 1|.
LOG_RATIO_CLAMP = 20.0
# TRL loss_type values whose aggregation the harness shares across objectives (see harness.trainer).
SHARED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclasses.dataclass
class ObjectiveTerms:
    per_token_loss: torch.Tensor  # (B, T) or (B, 1); minimised
    extras: dict[str, torch.Tensor]  # per-token diagnostic terms, logged as "<objective>/<key>_mean"


ObjectiveFn = Callable[[torch.Tensor, torch.Tensor, float, float], ObjectiveTerms]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    fn: ObjectiveFn
    stock_trl: bool  # True: delegate to GRPOTrainer's own loss code, untouched


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, stock_trl: bool = False) -> Callable[[ObjectiveFn], ObjectiveFn]:
    def wrap(fn: ObjectiveFn) -> ObjectiveFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = Objective(name, fn, stock_trl)
        return fn

    return wrap


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}") from None


@register_objective("grpo", stock_trl=True)
def grpo_clipped(log_ratio, advantages, eps_low, eps_high) -> ObjectiveTerms:
    """PPO/GRPO clipped surrogate, J = min(r A, clip(r, 1-eps_low, 1+eps_high) A).

    Training with `grpo` runs TRL's own code path; this function is the same formula for reference and tests.
    """
    r = torch.exp(log_ratio)
    clipped = torch.clamp(r, 1 - eps_low, 1 + eps_high)
    return ObjectiveTerms(per_token_loss=-torch.min(r * advantages, clipped * advantages), extras={})


@register_objective("cfpo")
def cfpo_quadratic(log_ratio, advantages, eps_low, eps_high) -> ObjectiveTerms:
    """Clipping-free policy optimization (arXiv 2601.22801), also SPO's objective (arXiv 2401.16025):

        J = r A - |A| / (2 eps) (r - 1)^2,  eps = eps_high where A > 0, else eps_low

    eps_low is TRL's `epsilon`, eps_high its `epsilon_high` (TRL: defaults to `epsilon`, which gives the
    paper's single-eps objective). dJ/dr = A - |A|/eps (r - 1) vanishes exactly at r = 1 + eps sign(A): the
    penalty's optimum sits on the clip boundary the same knobs give GRPO, asymmetric ones (DAPO's clip-higher)
    included, so a cfpo-vs-grpo comparison with `epsilon_high` set compares like with like.
    """
    r = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    surrogate = r * advantages
    eps = torch.full_like(advantages, eps_low).masked_fill(advantages > 0, eps_high)
    penalty = advantages.abs() / (2.0 * eps) * (r - 1.0) ** 2
    return ObjectiveTerms(per_token_loss=-(surrogate - penalty),
                          extras={"penalty": penalty.detach(), "surrogate": surrogate.detach()})
