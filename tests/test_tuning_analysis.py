"""The tuning section's arithmetic on hand-made trials: the best trial, the knob range within the tolerance of
the best (decades for a log-scale knob), and what the pruner saved."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.tuning import Tuning, at_edge, near_best, pruning_saved, trial_table


def tuning(tolerance: float = 0.02) -> Tuning:
    lr = "trl.learning_rate"
    trials = pd.DataFrame({
        "objective": ["grpo"] * 4 + ["cfpo"] * 2, "trial": [0, 1, 2, 3, 0, 1],
        lr: [1e-5, 3e-5, 1e-4, 3e-4, 1e-5, 1e-4],
        "jobs": [1] * 6, "pruned": [False, False, False, True, False, False],
        "diverged": [0, 0, 0, 0, 0, 1], "score": [0.20, 0.25, 0.24, np.nan, 0.30, 0.30],
        "stopped_rb": [25, 25, 25, 10, 25, 25.0], "budget": [25] * 6,
        "start": [0.3] * 6, "final": [0.2, 0.25, 0.26, np.nan, 0.3, 0.31]})
    trials["gain"] = trials["final"] - trials["start"]
    trials["state"] = np.where(trials["pruned"], "pruned", "complete")
    return Tuning(trials, [lr], {lr}, {"grpo": {lr: 3e-5}, "cfpo": {lr: 1e-4}},
                  {"tolerance": tolerance}, "auc_val", data=None)  # type: ignore[arg-type]


def test_best_trial_and_range_within_the_tolerance_in_decades():
    t = tuning()
    assert t.best("grpo")["trial"] == 1
    assert t.best("cfpo")["trial"] == 0  # a tie goes to the earlier trial, as Optuna's best_trial does
    n_near, n, lo, hi, span = near_best(t, "grpo", "trl.learning_rate")
    assert (n_near, n, lo, hi) == (2, 3, 3e-5, 1e-4)  # 0.25 and 0.24 are within 0.02; the pruned trial has no score
    assert span == pytest.approx(math.log10(1e-4 / 3e-5))
    assert near_best(tuning(tolerance=0.06), "grpo", "trl.learning_rate")[:2] == (3, 3)


def test_pruning_saved_counts_the_rollout_batches_a_full_run_would_have_cost():
    assert pruning_saved(tuning()) == (15.0, 150.0)


def test_trial_table_marks_the_setting_each_objective_was_compared_at():
    table = trial_table(tuning())
    assert list(table["compared_at"]) == [False, True, False, False, False, True]


def test_a_best_value_in_the_outer_tenth_of_a_log_range_is_at_its_edge():
    t = tuning()
    t.spec["knobs"] = {"all": {"trl.learning_rate": {"low": 1e-5, "high": 3e-4, "log": True}}}
    assert at_edge(t, "grpo", "trl.learning_rate", 1e-5) == "lower"
    assert at_edge(t, "grpo", "trl.learning_rate", 3e-5) is None  # ln 3 / ln 30 = 0.32 of the way up
    assert at_edge(t, "grpo", "trl.learning_rate", 2.9e-4) == "upper"
    assert at_edge(t, "grpo", "eval_every", 4) is None  # a knob without a numeric range
