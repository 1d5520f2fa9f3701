"""Power planning for a confirmatory study, from the published exploration it follows.

The exploration's per-run scores (results/<study>/<exploration>/tables/runs.csv) give, for the declared
hypothesis, each exploratory seed's contrast (analysis.verdicts.seed_contrasts, the same reduction the verdict
uses); their spread is the design's sd. With n planned seeds: the effect a two-sided paired t-test at the
hypothesis's alpha detects with 80% power (a t approximation of the sign-flip test the verdict uses, whose own
floor 2/2^n must also be below alpha), and the seeds the exploration's effect and the margin would need. An sd
from 3 seeds is itself uncertain (its 95% range spans about 0.5x to 6x): design information, not a promise.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.stats import POWER, detectable_effect, seeds_for_power
from analysis.style import objective_order
from analysis.verdicts import contrast_cells, seed_contrasts
from harness.hypothesis import Hypothesis


@dataclasses.dataclass(frozen=True)
class PowerPlan:
    objective: str
    exploration_seeds: int
    effect: float  # the exploration's mean per-seed contrast
    sd: float  # spread of its per-seed contrasts
    seeds: int  # planned
    detectable: float  # effect the planned seeds detect with POWER
    seeds_for_effect: float  # seeds the exploration's effect would need
    seeds_for_margin: float  # seeds the hypothesis's margin would need
    floor: float  # smallest sign-flip p the planned seeds can reach

    def describe(self, baseline: str, margin: float) -> str:
        return (f"{self.objective} - {baseline}: exploration {self.effect:+.4f} (sd {self.sd:.4f}, "
                f"{self.exploration_seeds} seeds); {self.seeds} seeds detect {self.detectable:.4f} with "
                f"{POWER:.0%} power (sign-flip floor p {self.floor:.3g}); the exploration's effect needs "
                f"{_n(self.seeds_for_effect)} seeds, the margin {margin:g} {_n(self.seeds_for_margin)}")


def power_plan(runs_csv: Path, hypothesis: Hypothesis, seeds: int) -> list[PowerPlan]:
    if not runs_csv.is_file():
        raise AnalysisError(f"{runs_csv}: no published exploration to plan from; allowed: publish it first "
                            "(python -m analysis figures STUDY --scale EXPLORATION)")
    runs = pd.read_csv(runs_csv)
    runs = runs.assign(extra_axes="{}")
    present = {(int(b), int(i)) for b, i in zip(runs["batch_ratio"], runs["iterations"])}
    cells = contrast_cells(present, hypothesis)
    baseline = hypothesis.baseline or objective_order(runs["base_objective"])[0]
    per_seed = seed_contrasts(runs, baseline, hypothesis.measure, cells, hypothesis.contrast, [])
    plans = []
    for objective, group in per_seed.dropna(subset=["value"]).groupby("objective", sort=False):
        values = group["value"].to_numpy(dtype=float)
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        effect = float(np.mean(values))
        plans.append(PowerPlan(objective, len(values), effect, sd, seeds,
                               detectable_effect(seeds, hypothesis.alpha) * sd,
                               seeds_for_power(effect, sd, hypothesis.alpha),
                               seeds_for_power(hypothesis.margin, sd, hypothesis.alpha), 2.0 / 2 ** seeds))
    return plans


def _n(x: float) -> str:
    return "n/a" if np.isnan(x) else ("more than 10000" if np.isinf(x) else f"{int(x)}")
