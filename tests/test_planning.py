"""Power planning from an exploration's per-run scores (analysis.planning), on a hand-computed case."""
import math

import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.planning import power_plan
from harness.hypothesis import Hypothesis


def runs_csv(tmp_path, diffs):
    """grpo scores 0.2 everywhere; cfpo = 0.2 + diff at (4, 8) per seed, and 0.2 at the on-policy (1, 1)."""
    rows = []
    for seed, d in enumerate(diffs):
        for b, i in ((1, 1), (4, 8)):
            rows.append({"objective": "grpo", "base_objective": "grpo", "batch_ratio": b, "iterations": i,
                         "seed": seed, "auc_val": 0.2})
            rows.append({"objective": "cfpo", "base_objective": "cfpo", "batch_ratio": b, "iterations": i,
                         "seed": seed, "auc_val": 0.2 + (d if (b, i) == (4, 8) else 0.0)})
    path = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_hand_computed_plan(tmp_path):
    """Per-seed contrasts 0.1, 0.2, 0.3: mean 0.2, sd 0.1. With 10 seeds, alpha 0.05, power 0.8 the normal
    approximation gives (t_.975,9 + t_.8,9) / sqrt(10) = (2.262 + 0.883) / 3.162 = 0.995 sd, about 0.0995; the
    effect 0.2 = 2 sd needs 5 seeds (4 reach only 2.08 sd: (3.182 + 0.978) / 2); the margin 0.02 = 0.2 sd needs
    about ((1.96 + 0.84) / 0.2)^2 + 2 = 198."""
    (plan,) = power_plan(runs_csv(tmp_path, [0.1, 0.2, 0.3]), Hypothesis(cells=[[4, 8]], baseline="grpo"), 10)
    assert plan.objective == "cfpo" and plan.exploration_seeds == 3
    assert plan.effect == pytest.approx(0.2) and plan.sd == pytest.approx(0.1)
    assert plan.detectable == pytest.approx(0.0995, abs=0.002)
    assert plan.seeds_for_effect == 5
    assert 195 <= plan.seeds_for_margin <= 202
    assert plan.floor == pytest.approx(2 / 1024)
    assert "10 seeds detect 0.0996 with 80% power" in plan.describe("grpo", 0.02)


def test_off_policy_default_and_missing_exploration(tmp_path):
    (plan,) = power_plan(runs_csv(tmp_path, [0.1, 0.2, 0.3]), Hypothesis(baseline="grpo"), 3)
    assert plan.effect == pytest.approx(0.2)  # the off-policy cells: (4, 8) only
    assert math.isclose(plan.floor, 0.25)
    with pytest.raises(AnalysisError, match="no published exploration"):
        power_plan(tmp_path / "nosuch.csv", Hypothesis(), 10)
