"""A study's primary question, declared in its sweep file before the runs (`hypothesis:`), read by the analysis.

Light on purpose (pydantic only): the sweep validates it before anything is written, and the analysis, which
imports nothing else of the harness, tests exactly what it says. Example (sweeps/grpo-vs-cfpo.yaml):

    hypothesis:
      measure: auc_val            # the primary measure (analysis/summary.py scores it per run)
      baseline: grpo              # every other objective is compared with this one
      contrast: mean              # per seed: mean over `cells` of the paired differences (or their slope)
      cells: off-policy           # or a list of [batch_ratio, iterations]
      alpha: 0.05                 # family-wise error rate of the headline family (Holm)
      margin: 0.02                # equivalence margin for a null (TOST), in the measure's units

A sweep file without the section gets `Hypothesis()`: validation AUC over the off-policy cells against the
first objective.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

# Validation measures an objective is compared on (analysis/summary.py). gain over start is not one: its paired
# difference equals final_val's whenever both arms share their start, as every seed pair here does.
COMPARED_MEASURES: tuple[str, ...] = ("auc_val", "final_val", "lastk_val")


class Hypothesis(BaseModel):
    """The one primary comparison of a study: what is tested, against what, where, and at which level."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    measure: Literal["auc_val", "final_val", "lastk_val"] = Field(
        "auc_val", description="primary measure: auc_val (time-averaged val reward), final_val or lastk_val")
    baseline: str | None = Field(None, description="objective every other objective is compared with (default: "
                                                   "the sweep's first objective)")
    contrast: Literal["mean", "slope"] = Field(
        "mean", description="per seed, the paired differences reduced to one number: their mean over `cells`, or "
                            "their least-squares slope in log2(batch_ratio x iterations) (a trend over reuse)")
    cells: Literal["off-policy", "all"] | list[tuple[StrictInt, StrictInt]] = Field(
        "off-policy", description="[batch_ratio, iterations] cells the contrast covers; off-policy: every cell "
                                  "with batch_ratio x iterations > 1; all: every cell")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="family-wise error rate; Holm within each family")
    margin: float = Field(0.02, gt=0, description="equivalence margin (measure units): a null is claimed only "
                                                  "as 'equivalent within +-margin' by two one-sided tests")
