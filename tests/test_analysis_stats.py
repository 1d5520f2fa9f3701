"""The statistics behind the verdict, against known numbers, and planted effects it must find (or not)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.paired import control, paired_table
from analysis.stats import (
    clopper_pearson,
    detectable_effect,
    holm,
    mcnemar_exact,
    mean_ci,
    paired,
    seeds_for_power,
    sign_flip_test,
    tost,
)
from analysis.verdicts import collapse_table, seed_contrasts, verdict_table
from harness.hypothesis import Hypothesis

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


def test_holm_on_hand_made_p_values():
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04); NaN is not in the family
    assert holm([0.04, 0.01, np.nan, 0.03]) == pytest.approx([0.06, 0.03, np.nan, 0.06], nan_ok=True)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    # the objective-zoo case: 7 comparisons at p = 0.031 each, none survives at 5%
    assert holm([0.031] * 7) == pytest.approx([0.217] * 7)


def test_tost_on_known_intervals():
    d = np.array([0.01, -0.01, 0.0, 0.005])
    lo, hi = stats.t.interval(0.90, 3, loc=d.mean(), scale=stats.sem(d))  # the 90% interval lies inside +-0.02
    assert -0.02 < lo and hi < 0.02 and tost(d, 0.02) < 0.05
    # p = the larger one-sided p, by hand: t = (mean + m) / se and (m - mean) / se on 3 df
    se = stats.sem(d)
    by_hand = max(stats.t.sf((d.mean() + 0.02) / se, 3), stats.t.sf((0.02 - d.mean()) / se, 3))
    assert tost(d, 0.02) == pytest.approx(by_hand)
    wide = np.array([0.1, -0.1, 0.05])  # interval far wider than the margin: not equivalent
    assert tost(wide, 0.02) > 0.4
    assert tost(np.zeros(3), 0.02) == 0.0 and tost(np.full(3, 0.05), 0.02) == 1.0 and np.isnan(tost([0.1], 0.02))


def test_mcnemar_exact_on_known_tables():
    # 6 vs 2 discordant pairs: 2 x P(Bin(8, 1/2) <= 2) = 2 x 37/256
    assert mcnemar_exact(6, 2) == pytest.approx(2 * 37 / 256)
    assert mcnemar_exact(2, 6) == mcnemar_exact(6, 2)
    assert mcnemar_exact(8, 0) == pytest.approx(2 / 256) and mcnemar_exact(0, 0) == 1.0


def test_seeds_for_power_is_the_first_n_that_detects_the_difference():
    n = seeds_for_power(0.5, 0.5)  # d = 1: detectable_effect(10) = 0.996 <= 1 < detectable_effect(9)
    assert n == 10 and detectable_effect(9) > 1.0
    assert np.isnan(seeds_for_power(0.1, 0.0)) and seeds_for_power(1e-6, 1.0, limit=50) == np.inf


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
                             "collapsed": False,
                             **{m: value for m in ("final_val", "lastk_val", "auc_val", "gain_val")}})
    return pd.DataFrame(rows)


def test_paired_effect_hidden_under_seed_spread_is_found_with_ten_seeds():
    """+0.03 for every seed under a seed-to-seed spread of 0.15: separate t-intervals overlap (a per-arm report's
    'no cell separates'), while the seed-level contrast of 10 seeds is claimed past Holm."""
    df = summaries(effect=0.03, spread=0.15, noise=0.005, seeds=10)
    ci = mean_ci(df, ["batch_ratio", "iterations", "base_objective"], "final_val").set_index(
        ["batch_ratio", "iterations", "base_objective"])
    for b, it in CELLS[1:]:
        assert ci.loc[(b, it, "cfpo"), "lo"] < ci.loc[(b, it, "grpo"), "hi"]  # unpaired: overlapping
    head = verdict_table(df, "grpo", Hypothesis(measure="final_val"), []).iloc[0]
    assert (head["role"], head["seeds"], head["verdict"]) == ("primary", 10, "higher")
    assert head["lo"] > 0 and head["p_signflip"] == pytest.approx(2 / 2 ** 10) and head["p_adj"] < 0.05


def test_three_positive_seeds_are_not_called_a_difference():
    """Every seed positive in every cell, on 3 seeds: the smallest sign-flip p is 0.25, so neither the
    headline nor any cell may claim a difference, and the report says what 3 seeds cannot show."""
    df = summaries(effect=0.08, spread=0.15, noise=0.01, seeds=3)
    head = verdict_table(df, "grpo", Hypothesis(measure="final_val"), []).iloc[0]
    assert head["lo"] > 0 and head["p_floor"] == 0.25  # the t-interval alone would call it
    assert head["verdict"] == "inconclusive"
    cells = paired_table(df, "grpo", ("final_val",))
    assert not cells["verdict"].isin(["higher", "lower"]).any()


def test_a_seed_effect_shared_by_all_cells_is_one_replicate_not_many():
    """Hand-computed: 3 seeds, 3 off-policy cells, the difference is the seed's effect in every cell (+0.01,
    +0.01, +0.05). Pooled, 9 positive pairs would give sign-flip p = 2/512; per seed, the contrasts are
    (0.01, 0.01, 0.05): mean 0.0233, p = 0.25, not a claim."""
    rows = []
    for s, effect in enumerate([0.01, 0.01, 0.05]):
        for b, it in CELLS:
            for objective, value in (("grpo", 0.4), ("cfpo", 0.4 + (effect if b * it > 1 else 0.0))):
                rows.append({"run_id": f"{objective}-{b}-{it}-{s}", "base_objective": objective,
                             "objective": objective, "extra_axes": "{}", "batch_ratio": b, "iterations": it,
                             "seed": s, "auc_val": value, "final_val": value, "lastk_val": value, "collapsed": False})
    df = pd.DataFrame(rows)
    per_seed = seed_contrasts(df, "grpo", "auc_val", [(1, 4), (4, 1), (4, 4)], "mean", [])
    assert per_seed["value"].to_numpy() == pytest.approx([0.01, 0.01, 0.05])
    assert sign_flip_test(np.full(9, 0.01))[0] == pytest.approx(2 / 512)  # what pooling would have claimed
    head = verdict_table(df, "grpo", Hypothesis(), []).iloc[0]
    assert head["seeds"] == 3 and head["mean"] == pytest.approx(0.07 / 3) and head["p_signflip"] == 0.25
    assert head["verdict"] == "inconclusive"
    slope = seed_contrasts(df, "grpo", "auc_val", CELLS, "slope", [])  # log2 reuse 0, 2, 2, 4
    # x - 2 = (-2, 0, 0, 2), y = (0, e, e, e): slope = sum((x - 2) y) / sum((x - 2)^2) = 2e / 8
    assert slope["value"].to_numpy() == pytest.approx([0.01 / 4, 0.01 / 4, 0.05 / 4])


def test_families_are_corrected_and_nulls_stated_by_equivalence():
    """Two objectives against grpo, 10 seeds: gppo is exactly grpo off-policy plus tiny noise (equivalent
    within the margin, never 'no difference'); cfpo is higher. Holm counts both in the headline family and the
    two other measures x 2 objectives in the secondary one."""
    rng = np.random.default_rng(5)
    rows = []
    for s in range(10):
        for b, it in CELLS:
            base = 0.4 + rng.normal(0, 0.1)
            arms = {"grpo": base, "cfpo": base + (0.05 + rng.normal(0, 0.01) if b * it > 1 else 0),
                    "gppo": base + (rng.normal(0, 0.002) if b * it > 1 else 0)}
            for objective, v in arms.items():
                rows.append({"run_id": f"{objective}-{b}-{it}-{s}", "base_objective": objective,
                             "objective": objective, "extra_axes": "{}", "batch_ratio": b, "iterations": it,
                             "seed": s, "auc_val": v, "final_val": v, "lastk_val": v, "collapsed": False})
    agg = verdict_table(pd.DataFrame(rows), "grpo", Hypothesis(margin=0.02), []).set_index(["role", "objective",
                                                                                            "measure"])
    assert agg.loc[("primary", "cfpo", "auc_val"), "verdict"] == "higher"
    assert agg.loc[("primary", "gppo", "auc_val"), "verdict"] == "equivalent"
    assert (agg.xs("primary")["family_size"] == 2).all() and (agg.xs("secondary")["family_size"] == 4).all()
    p = agg.loc[("primary", "cfpo", "auc_val")]
    assert p["p_adj"] == pytest.approx(min(1, 2 * p["p_signflip"]), rel=1e-9) or p["p_adj"] >= p["p_signflip"]


def test_collapse_counts_get_a_paired_exact_test():
    rows = []
    for s in range(8):
        for objective, collapsed in (("grpo", s < 6), ("cfpo", s in (0, 6, 7))):  # 5 only grpo, 2 only cfpo
            rows.append({"run_id": f"{objective}-{s}", "base_objective": objective, "objective": objective,
                         "extra_axes": "{}", "batch_ratio": 4, "iterations": 4, "seed": s, "collapsed": collapsed})
    (row,) = collapse_table(pd.DataFrame(rows), "grpo", Hypothesis(), []).itertuples(index=False)
    assert (row.pairs, row.only_objective, row.only_baseline, row.both) == (8, 2, 5, 1)
    assert row.p_mcnemar == pytest.approx(mcnemar_exact(2, 5)) and row.verdict == "not shown"


def test_null_is_not_called_a_difference_and_keeps_its_design_power():
    df = summaries(effect=0.0, spread=0.15, noise=0.02, rng_seed=3)
    p = paired_table(df, "grpo", ("final_val", "auc_val"))
    off = p[p["batch_ratio"] * p["iterations"] > 1]
    assert not off["verdict"].isin(["higher", "lower"]).any()
    assert (off["mde"] > 0).all() and (off["mde"] < 0.1).all()  # design information, kept
    assert (p["family_size"] == 4).all()  # one family per measure: every cell of it
    agg = verdict_table(df, "grpo", Hypothesis(), [])
    assert ((agg["lo"] < 0) & (agg["hi"] > 0)).all() and not agg["verdict"].isin(["higher", "lower"]).any()


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
