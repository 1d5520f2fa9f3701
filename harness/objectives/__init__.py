"""Policy objectives: the per-token (or per-sequence) term as a function of the importance ratio and advantage.

Adding an objective is one function and one name (in one of the family modules, or your own, imported below):

    @register_objective("my-objective", knobs={"epsilon": 0.2}, source="<arXiv id>")
    def my_objective(x: Tokens, k: Knobs) -> ObjectiveTerms:
        r = torch.exp(x.log_ratio)
        return ObjectiveTerms(per_token_loss=-(r * x.advantages), extras={})

Shared by every objective, in harness.trainer: masks, the aggregation chosen by TRL's `loss_type` (one of
SHARED_LOSS_TYPES, the study's, also for objectives whose TRL implementation ties them to another), the k3 KL to
the reference, vLLM's importance-sampling correction, the entropy mask, and the diagnostics (ratio statistics,
KL to the rollout policy, clip rates: TRL's for `stock_trl` objectives, would-be rates at the objective's
epsilon, or PPO's 0.2, for the others; plus each objective's own `extras`).

Families: `clipped` (grpo, clip-higher, gspo, gppo), `weighted` (cispo, sapo), `clip_free` (cfpo, pg-is).
"""
# Importing a family registers its objectives: this order is the order they are listed in.
# isort: off
from harness.objectives.registry import (LOG_RATIO_CLAMP, OBJECTIVE_KNOBS, OBJECTIVES, SHARED_LOSS_TYPES, Knobs,
                                         Objective, ObjectiveFn, ObjectiveTerms, Tokens, get_objective,
                                         register_objective, resolve_knobs)
from harness.objectives.clipped import clipped_surrogate, gradient_preserving_clip
from harness.objectives.weighted import clipped_is_weight, soft_gate
from harness.objectives.clip_free import importance_weighted_pg, quadratic_penalty
# isort: on

__all__ = ["LOG_RATIO_CLAMP", "OBJECTIVE_KNOBS", "OBJECTIVES", "SHARED_LOSS_TYPES", "Knobs", "Objective",
           "ObjectiveFn", "ObjectiveTerms", "Tokens", "get_objective", "register_objective", "resolve_knobs",
           "clipped_surrogate", "gradient_preserving_clip", "clipped_is_weight", "soft_gate",
           "importance_weighted_pg", "quadratic_penalty"]
