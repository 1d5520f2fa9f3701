"""The statistics behind the verdict, against known numbers, and planted effects it must find (or not)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.paired import aggregate, control, paired_table
from analysis.stats import (clopper_pearson, detectable_effect, improvement_probability, iqm, mean_ci, paired,
                            sign_flip_test, stratified_bootstrap)

CELLS = [(1, 1), (1, 4), (4, 1), (4, 4)]


def test_clopper_pearson_known_intervals():
    # exact binomial intervals as tabulated (e.g. R's binom.test): 0/3, 1/3, 3/3, 2/10
    assert clopper_pearson(0, 3) == pytest.approx((0.0, 0.707598), abs=1e-6)
    assert clopper_pearson(1, 3) == pytest.approx((0.008404, 0.905701), abs=1e-6)
    assert clopper_pearson(3, 3) == pytest.approx((0.292402, 1.0), abs=1e-6)
    assert clopper_pearson(2, 10) == pytest.approx((0.025211, 0.556095), abs=1e-6)
    assert all(np.isnan(clopper_pearson(0, 0)))


def test_detectable_effect_matches_statsmodels_ttestpower():
    # statsmodels.stats.power.TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8), two-sided
    known = {2: 11.549890, 3: 3.264044, 5: 1.681997, 10: 0.996002, 30: 0.529236}
    for n, d in known.items():
        assert detectable_effect(n) == pytest.approx(d, abs=1e-5)
    assert np.isnan(detectable_effect(1))


def test_paired_statistics_are_the_paired_t_interval():
    d = [0.10, 0.12, 0.08]
    out = paired(d)
    lo, hi = stats.t.interval(0.95, 2, loc=0.1, scale=stats.sem(d))
    assert (out["n"], out["mean_diff"], out["lo"], out["hi"]) == pytest.approx((3, 0.1, lo, hi))
    assert out["effect"] == pytest.approx(0.1 / np.std(d, ddof=1))
    assert out["p"] == pytest.approx(stats.ttest_rel([1.1, 1.12, 1.08], [1.0, 1.0, 1.0]).pvalue)
    assert out["mde"] == pytest.approx(detectable_effect(3) * np.std(d, ddof=1))
    zero = paired([0.0, 0.0, 0.0])
    assert (zero["lo"], zero["hi"], zero["mde"]) == (0.0, 0.0, 0.0)
    assert np.isnan(paired([0.3])["lo"]) and paired([])["n"] == 0


def test_stratified_bootstrap_is_seeded_and_matches_a_direct_resampling():
    strata = [np.array([0.1, 0.2, -0.05]), np.array([0.3, 0.0, 0.1, 0.2]), np.array([0.02, 0.04, 0.01])]
    first = stratified_bootstrap(strata, iqm)
    assert first == stratified_bootstrap(strata, iqm)  # reproducible
    assert first[0] == pytest.approx(stats.trim_mean(np.concatenate(strata), 0.25))
    # the same percentile interval from an explicit loop: resample seeds within each stratum
    rng = np.random.default_rng(1)
    draws = [stats.trim_mean(np.concatenate([rng.choice(s, len(s)) for s in strata]), 0.25) for _ in range(20000)]
    assert first[1:] == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])), abs=0.01)
    assert stratified_bootstrap([np.zeros(3)] * 3, iqm) == (0.0, 0.0, 0.0)
    assert stratified_bootstrap([np.ones(3), np.full(2, 0.5)], improvement_probability) == (1.0, 1.0, 1.0)
    assert improvement_probability(np.array([1.0, -1.0, 0.0]), np.array([1.0])) == pytest.approx((0.5 + 1) / 2)
    # a stratum of one seed is held fixed, not dropped: only the other stratum varies
    point, lo, hi = stratified_bootstrap([np.array([1.0]), np.array([0.0, 0.5])], improvement_probability)
    assert point == pytest.approx((1 + 0.75) / 2) and (lo, hi) == pytest.approx(((1 + 0.5) / 2, 1.0))
    assert stratified_bootstrap([np.array([0.1]), np.array([0.3])], iqm) == pytest.approx((0.2, 0.2, 0.2))


def summaries(effect: float, spread: float, noise: float, seeds: int = 5, rng_seed: int = 0) -> pd.DataFrame:
    """Per-run scores of a two-objective grid: seed s of both objectives shares a start offset N(0, spread);
    cfpo = grpo + effect + N(0, noise) off-policy, exactly grpo on the on-policy cell."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for b, it in CELLS:
        for s in range(seeds):
            base = 0.4 + rng.normal(0, spread)
            extra = 0.0 if b * it == 1 else effect + rng.normal(0, noise)
            for objective, value in (("grpo", base), ("cfpo", base + extra)):
                rows.append({"run_id": f"{objective}-{b}-{it}-{s}", "base_objective": objective, "objective": objective,
                             "extra_axes": "{}", "batch_ratio": b, "iterations": it, "seed": s,
                             **{m: value for m in ("final_val", "lastk_val", "auc_val", "gain_val")}})
    return pd.DataFrame(rows)


def test_paired_effect_hidden_under_seed_spread_is_found():
    """+0.03 for every seed under a seed-to-seed spread of 0.15: separate t-intervals overlap (the old report's
    'no cell separates'), the paired intervals exclude 0 in every off-policy cell, and so does the aggregate."""
    df = summaries(effect=0.03, spread=0.15, noise=0.005)
    ci = mean_ci(df, ["batch_ratio", "iterations", "base_objective"], "final_val").set_index(
        ["batch_ratio", "iterations", "base_objective"])
    for b, it in CELLS[1:]:
        assert ci.loc[(b, it, "cfpo"), "lo"] < ci.loc[(b, it, "grpo"), "hi"]  # unpaired: overlapping
    p = paired_table(df, "grpo", ("final_val",))
    off = p[p["batch_ratio"] * p["iterations"] > 1]
    assert (off["verdict"] == "higher").all() and (off["lo"] > 0).all()
    agg = aggregate(p, []).iloc[0]
    assert agg["iqm_lo"] > 0 and agg["p_improve_lo"] > 0.5 and agg["strata"] == 3 and agg["pairs"] == 15
    assert agg["p_signflip"] < 0.05 and agg["verdict"] == "higher"


def test_sign_flip_test_exact_values():
    # all 2^3 sign patterns of (1, 2, 3): |mean| >= the observed one for (+,+,+) and (-,-,-) only
    assert sign_flip_test(np.array([1.0, 2.0, 3.0])) == pytest.approx((0.25, 0.25))
    assert sign_flip_test(np.zeros(4)) == (1.0, 1.0)
    assert sign_flip_test(np.array([0.3])) == (1.0, 1.0)  # a single pair: nothing to test
    # 6 positive pairs reach the floor 2 / 2^6 < 5% (an IQM statistic would not: flipping a trimmed value ties it)
    p, floor = sign_flip_test(np.array([0.5, 0.4, 0.6, 0.55, 0.45, 0.52]))
    assert p == pytest.approx(2 / 2 ** 6) == floor
    # (1, 2, 3, -0.5): |mean| = 1.375; flips reaching it: none of (1, 2, 3) flipped, -0.5 either way -> 4 of 16
    assert sign_flip_test(np.array([1.0, 2.0, 3.0, -0.5]))[0] == pytest.approx(4 / 16)


def test_three_positive_pairs_are_not_called_a_difference():
    """One cell of 3 seeds, every pair positive: the bootstrap interval excludes 0 (it only reshuffles three
    positive numbers), but no test on 3 pairs can reach 5%; the verdict must not claim a difference."""
    df = summaries(effect=0.08, spread=0.15, noise=0.05, seeds=3)
    p = paired_table(df[df["batch_ratio"] * df["iterations"] == 16], "grpo", ("final_val",))
    assert (np.asarray(p["diffs"].iloc[0]) > 0).all()
    agg = aggregate(p, []).iloc[0]
    assert agg["iqm_lo"] > 0 and agg["p_improve_lo"] == 1.0  # the bootstrap alone would call it
    assert agg["p_floor"] == 0.25 and agg["verdict"] == "no detectable difference"


def test_null_is_not_called_a_difference_and_reports_its_power():
    df = summaries(effect=0.0, spread=0.15, noise=0.02, rng_seed=3)
    p = paired_table(df, "grpo", ("final_val", "auc_val"))
    off = p[p["batch_ratio"] * p["iterations"] > 1]
    assert (off["verdict"] == "no detectable difference").all()
    assert (off["mde"] > 0).all() and (off["mde"] < 0.1).all()  # a null comes with what it could have seen
    agg = aggregate(p, [])
    assert ((agg["iqm_lo"] < 0) & (agg["iqm_hi"] > 0)).all()


def test_on_policy_control_passes_only_on_exact_zero():
    df = summaries(effect=0.03, spread=0.15, noise=0.005)
    ok = control(paired_table(df, "grpo"))
    assert ok.status == "passed" and "exactly 0" in ok.detail
    broken = df.copy()
    broken.loc[(broken["batch_ratio"] == 1) & (broken["iterations"] == 1) & (broken["base_objective"] == "cfpo")
               & (broken["seed"] == 2), "final_val"] += 1e-3
    bad = control(paired_table(broken, "grpo"))
    assert bad.status == "FAILED" and "final_val" in bad.detail
    assert control(paired_table(df[df["batch_ratio"] == 4], "grpo")).status == "not applicable"


def test_a_seed_in_one_arm_only_is_left_out_and_counted():
    df = summaries(effect=0.03, spread=0.15, noise=0.005)
    df = df[~((df["base_objective"] == "cfpo") & (df["seed"] == 4) & (df["batch_ratio"] == 4)
              & (df["iterations"] == 4))]
    row = paired_table(df, "grpo", ("final_val",)).set_index(["batch_ratio", "iterations"]).loc[(4, 4)]
    assert (row["n"], row["unpaired"], row["seeds"]) == (4, 1, [0, 1, 2, 3])
