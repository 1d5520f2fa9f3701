"""analysis building blocks without MLflow: statistics, curve summaries, collapse rules, attempts, styles, tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy import stats

from analysis.collapse import CollapseRules, first_streak, judge_run, val_collapse_step
from analysis.formatting import latex, markdown
from analysis.layout import missing_sqlite_file, study_paths
from analysis.runs import RunInfo, choose_attempts
from analysis.stats import mean_ci
from analysis.style import OKABE_ITO, objective_order, objective_styles
from analysis.summary import val_scores


def test_mean_ci_is_the_t_interval_and_absent_for_one_seed():
    df = pd.DataFrame({"g": ["a"] * 3 + ["b"], "v": [1.0, 2.0, 4.0, 5.0]})
    out = mean_ci(df, ["g"], "v").set_index("g")
    lo, hi = stats.t.interval(0.95, 2, loc=7 / 3, scale=stats.sem([1.0, 2.0, 4.0]))
    assert (out.loc["a", "n"], out.loc["a", "mean"]) == (3, pytest.approx(7 / 3))
    assert (out.loc["a", "lo"], out.loc["a", "hi"]) == pytest.approx((lo, hi))
    assert out.loc["b", "mean"] == 5.0 and np.isnan(out.loc["b", "lo"]) and np.isnan(out.loc["b", "hi"])


def test_val_scores_of_a_complete_run():
    rb = np.array([0.0, 1.0, 2.0, 4.0])
    s = val_scores(rb, np.array([0.5, 0.7, 0.4, 0.6]), budget=4, val_prompts=10_000)
    assert s["start_val"] == 0.5 and s["final_val"] == 0.6 and s["peak_val"] == 0.7
    assert s["gain_val"] == pytest.approx(0.1) and s["drop_from_peak"] == pytest.approx(0.1)
    assert s["lastk_val"] == pytest.approx((0.7 + 0.4 + 0.6) / 3)
    assert s["auc_val"] == pytest.approx((0.6 + 0.55 + 2 * 0.5) / 4)  # uneven spacing is respected
    assert np.isnan(s["fell_rb"]) and s["above_start_rb"] == 4  # one evaluation below start is not a fall
    assert val_scores(np.array([0.0]), np.array([0.3]), budget=0)["auc_val"] == 0.3
    assert np.isnan(val_scores(np.array([]), np.array([]))["final_val"])


def test_peak_excludes_the_start():
    s = val_scores(np.array([0.0, 1.0, 2.0]), np.array([0.9, 0.3, 0.4]), budget=2)
    assert s["peak_val"] == 0.4 and s["drop_from_peak"] == pytest.approx(0.0)


def test_fell_below_start_needs_two_evaluations_beyond_twice_the_binomial_se():
    rb = np.arange(6.0)
    se = np.sqrt(0.5 * 0.5 / 256)  # 0.03125
    just_inside = 0.5 - 1.9 * se
    s = val_scores(rb, np.array([0.5, just_inside, just_inside, 0.5, 0.5, 0.5]), budget=5, val_prompts=256)
    assert np.isnan(s["fell_rb"]) and s["above_start_rb"] == 5  # never fell: censored at the budget
    out = 0.5 - 2.1 * se
    s = val_scores(rb, np.array([0.5, out, 0.5, out, out, 0.5]), budget=5, val_prompts=256)
    assert s["fell_rb"] == 3.0 and s["above_start_rb"] == 3.0  # the single dip at rb 1 does not count


def test_diverged_run_is_scored_zero_from_the_divergence_over_the_full_budget():
    """A run that blew up at rollout batch 8 while near its best scores below a complete run that drifted down."""
    rb = np.arange(0.0, 31.0, 5.0)
    complete = val_scores(rb, np.array([0.3, 0.32, 0.3, 0.28, 0.27, 0.26, 0.25]), budget=30, eval_every=5)
    early = np.array([0.0, 5.0])  # evaluated at 0 and 5, diverged at rollout batch 8 near its best
    diverged = val_scores(early, np.array([0.3, 0.6]), budget=30, diverged_rb=8.0, eval_every=5)
    assert diverged["final_val"] == 0.0 and diverged["lastk_val"] == 0.0
    # curve: 0.3 -> 0.6 over [0, 5], 0.6 -> 0 over [5, 8], then 0 to 30
    assert diverged["auc_val"] == pytest.approx((0.45 * 5 + 0.3 * 3) / 30)
    for m in ("final_val", "lastk_val", "auc_val", "gain_val"):
        assert diverged[m] < complete[m]
    assert diverged["peak_val"] == 0.6 and diverged["fell_rb"] == 10.0
    # an evaluation at or after the divergence step (a diverged policy) is not a measurement
    late = val_scores(np.array([0.0, 5.0, 8.0]), np.array([0.3, 0.6, 0.9]), budget=30, diverged_rb=8.0, eval_every=5)
    assert late == pytest.approx(diverged, nan_ok=True)


def test_val_rule_needs_drop_and_no_recovery():
    rules = CollapseRules()
    steps = np.arange(5) * 10
    assert val_collapse_step(steps, np.array([0.2, 0.6, 0.2, 0.1, 0.1]), rules) == (20, False)
    assert val_collapse_step(steps, np.array([0.2, 0.6, 0.2, 0.5, 0.55]), rules) == (None, False)  # back to >= 80%
    assert val_collapse_step(steps, np.array([0.2, 0.6, 0.35, 0.3, 0.3]), rules) == (None, False)  # never below 50%
    loose = CollapseRules(val_drop=0.3)
    assert val_collapse_step(steps, np.array([0.2, 0.6, 0.35, 0.3, 0.3]), loose) == (20, False)


def test_val_rule_needs_two_consecutive_evaluations_else_censored():
    """One low evaluation between healthy ones is not a collapse; a fall seen only at the last evaluation
    cannot be confirmed: flagged censored, with its step, and not counted."""
    rules = CollapseRules()  # below 50% of the peak starts a collapse; a final value under 80% is no recovery
    steps = np.arange(5) * 10
    assert val_collapse_step(steps, np.array([0.6, 0.2, 0.4, 0.2, 0.4]), rules) == (None, False)  # single dips
    assert val_collapse_step(steps, np.array([0.6, 0.5, 0.5, 0.2, 0.1]), rules) == (30, False)  # two in a row
    assert val_collapse_step(steps, np.array([0.6, 0.5, 0.5, 0.5, 0.1]), rules) == (40, True)  # last one only
    curve = {"val/reward": pd.DataFrame({"step": steps, "value": [0.6, 0.5, 0.5, 0.5, 0.1]})}
    v = judge_run(curve, "complete", 2, rules)
    assert not v.collapsed and v.censored and v.step == 40 and v.rollout_batch == 20
    assert "censored" in v.reason
    v = judge_run({"val/reward": pd.DataFrame({"step": steps, "value": [0.6, 0.5, 0.5, 0.2, 0.1]})}, "complete", 1,
                  rules)
    assert v.collapsed and not v.censored and v.step == 30


def test_entropy_rules_need_patience():
    assert first_streak(np.arange(6), np.array([0, 1, 1, 0, 1, 1], bool), 2) == 1
    assert first_streak(np.arange(6), np.array([0, 1, 0, 1, 0, 1], bool), 2) is None
    curve = lambda v: {"entropy": pd.DataFrame({"step": np.arange(1, len(v) + 1), "value": v})}  # noqa: E731
    rules = CollapseRules(entropy_patience=2)
    assert not judge_run(curve([0.5, 1.1, 0.5, 0.04, 0.5]), "complete", 1, rules).collapsed
    v = judge_run(curve([0.5, 0.5, 1.2, 1.2, 1.3, 1.3]), "complete", 2, rules)
    assert (v.collapsed, v.step, v.rollout_batch) == (True, 3.0, 1.5) and v.reason.startswith("entropy >")
    v = judge_run(curve([0.5, 0.04, 0.03]), "complete", 1, rules)
    assert v.collapsed and v.reason.startswith("entropy <")


def test_entropy_is_judged_per_rollout_batch_not_per_optimizer_step():
    """Patience counts rollout batches: 3 low steps are 3 batches at 1 step per batch but a fraction of one at
    8 steps per batch, where the batch mean stays healthy."""
    curve = lambda v: {"entropy": pd.DataFrame({"step": np.arange(1, len(v) + 1), "value": v})}  # noqa: E731
    low = [0.5] * 8 + [0.01, 0.01, 0.01] + [0.5] * 13
    assert judge_run(curve(low), "complete", 1, CollapseRules()).collapsed
    assert not judge_run(curve(low), "complete", 8, CollapseRules()).collapsed


def test_rules_can_be_switched_off_and_validate():
    curves = {"loss": pd.DataFrame({"step": [1, 2, 3], "value": [0.1, np.nan, 0.1]}),
              "grad_norm": pd.DataFrame({"step": [1, 2, 3], "value": [1.0, 1.0, -np.inf]})}
    v = judge_run(curves, "diverged", 1, CollapseRules())
    assert (v.step, v.reason) == (2, "non-finite loss; non-finite grad_norm; diverged (the harness stopped the run)")
    v = judge_run(curves, "diverged", 2, CollapseRules(nonfinite=False), diverged_at=2)  # the harness's tag
    assert (v.step, v.rollout_batch) == (2, 1.0)
    assert judge_run(curves, "diverged", 1, CollapseRules(nonfinite=False)).step == 3  # else the last step
    assert not judge_run(curves, "diverged", 1, CollapseRules(nonfinite=False, diverged_status=False)).collapsed
    assert not judge_run({}, "complete", 1, CollapseRules()).collapsed  # no metrics: no rule can fire
    with pytest.raises(ValidationError):
        CollapseRules(val_drop=1.5)
    with pytest.raises(ValidationError):
        CollapseRules(entropy_flor=0.1)


def _info(cell: str, attempt: int, status: str, **kw) -> RunInfo:
    base = dict(run_id=f"{cell}-{attempt}", cell=cell, objective="grpo", batch_ratio=1, iterations=1, seed=0,
                status=status, attempt=attempt, steps_per_rollout_batch=1, start_time=attempt,
                mlflow_status="FINISHED")
    return RunInfo(**(base | kw))


def test_choose_latest_usable_attempt():
    chosen, excluded = choose_attempts([
        _info("a", 1, "complete"), _info("a", 2, "diverged"), _info("a", 3, "running", mlflow_status="RUNNING"),
        _info("b", 1, "failed", mlflow_status="FAILED"), _info("b", 2, "running", mlflow_status="RUNNING"),
    ])
    assert [i.run_id for i in chosen] == ["a-2"] and [i.run_id for i in excluded] == ["b-2"]
    assert chosen[0].final and not excluded[0].final
    assert not _info("c", 1, "complete", mlflow_status="RUNNING").final  # still open: not cacheable


def test_objective_styles_are_fixed_and_distinct():
    styles = objective_styles(["zeta", "cfpo", "grpo", "alpha"])
    assert objective_order(styles) == ["grpo", "cfpo", "alpha", "zeta"]
    assert styles["grpo"]["color"] == objective_styles(["grpo"])["grpo"]["color"] == OKABE_ITO[0]
    assert len({s["color"] for s in styles.values()}) == 4
    assert all(s["color"] in OKABE_ITO for s in styles.values())


def test_markdown_and_booktabs_latex():
    df = pd.DataFrame({"batch ratio": [1], "iterations": [2], "objective": ["a_b"], "x": ["5% | y"]})
    md = markdown(df).splitlines()
    assert md[0] == "| batch ratio | iterations | objective | x |" and md[2] == "| 1 | 2 | a_b | 5% \\| y |"
    tex = latex(df, "cap", "tab:x")
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "a\\_b" in tex and "5\\% | y" in tex and "\\caption{cap}" in tex


def test_layout(tmp_path):
    p = study_paths(tmp_path, "s", "proxy")
    assert p.cache == tmp_path / "s/proxy/runs" and p.readme == tmp_path / "s/proxy/README.md"
    assert study_paths(tmp_path, "s", "proxy", cache_dir=tmp_path / "c").cache == tmp_path / "c"
    assert missing_sqlite_file(f"sqlite:///{tmp_path / 'x.db'}") == tmp_path / "x.db"
    (tmp_path / "x.db").touch()
    assert missing_sqlite_file(f"sqlite:///{tmp_path / 'x.db'}") is None
    assert missing_sqlite_file("http://mlflow:5000") is None


def test_ablation_axes_split_lines_instead_of_pooling_them_as_seeds():
    from analysis.runs import line_label

    assert line_label({"objective": "cfpo"}) == "cfpo"  # a run made outside a sweep
    axes = '{"batch_ratio": 4, "iterations": 4, "objective": "cfpo", "seed": 1, "trl.max_grad_norm": 0.0}'
    assert line_label({"objective": "cfpo", "harness.axes": axes}) == "cfpo trl.max_grad_norm=0.0"
    grid_only = '{"batch_ratio": 4, "iterations": 1, "objective": "grpo", "seed": 0}'
    assert line_label({"objective": "grpo", "harness.axes": grid_only}) == "grpo"


def test_negative_control_says_when_the_setting_does_not_test_trust_regions():
    from analysis.report import negative_control_lines

    table = pd.DataFrame({"batch_ratio": [1, 1, 8, 8], "iterations": [1, 1, 8, 8],
                          "objective": ["grpo", "pg-is", "grpo", "pg-is"], "collapsed_n": [0, 0, 0, 3],
                          "seeds": [3, 3, 3, 3]})
    agg = pd.DataFrame({"objective": ["pg-is", "pg-is"], "measure": ["final_val", "auc_val"],
                        "verdict": ["lower", "inconclusive"]})
    met = negative_control_lines(agg, table, "grpo")
    assert len(met) == 1 and met[0].startswith("Negative control met: pg-is")
    assert "final val reward" in met[0] and "pg-is 3/3, grpo 0/3" in met[0]  # off-policy cells only
    agg["verdict"] = "inconclusive"
    (unmet,) = negative_control_lines(agg, table, "grpo")
    assert unmet.startswith("**Negative control not met**") and "does not exercise the question" in unmet
    assert negative_control_lines(agg[agg["objective"] == "cfpo"], table, "grpo") == []  # no pg-is: no line
    assert negative_control_lines(agg, table, None) == []
    few = agg.assign(seeds=3, mean=-0.05, lo=-0.09, hi=-0.01, p_floor=0.25)  # 3 seeds: cannot be shown at all
    (undecided,) = negative_control_lines(few, table, "grpo")
    assert undecided.startswith("**Negative control undecided**: 3 seeds cannot show pg-is") and "[-0.090" in undecided
