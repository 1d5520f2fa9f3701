"""Objective against a baseline objective, cell by cell, seed by seed, and the on-policy control.

Seed s of every objective starts from the same warm-started model, sees the same prompts in the same order and
samples the same first rollout batch, so the runs of one seed are a pair and the comparison is the per-seed
difference X_s - baseline_s (analysis.stats.paired). A seed present in one arm only is left out and counted
(`unpaired`). A cell is (batch_ratio, iterations, extra sweep axes); the extra axes are columns of their own.

Per-cell rows are detail, never the headline (analysis.verdicts is): each is tested with the exact sign-flip
test over its seeds and Holm-adjusted within its family, every (cell, comparison) row of one measure, so with k
rows at 5% about 5% x k nulls would otherwise read as differences. verdict per (cell, objective, measure):
`higher` / `lower` only when the adjusted p < alpha; `identical` when every difference is exactly 0;
`equivalent` when the Holm-adjusted TOST p against the margin < alpha; `too few seeds` below 2 pairs; else
`inconclusive` (the interval says what the data allow). `both_collapsed`: every seed of both arms collapsed
here, so `higher` means "degrades less". `mde` is design information (the difference 80% power would need at
this spread), never a statement about the result.

control: on the on-policy cell (batch_ratio 1, iterations 1) the ratio is exactly 1 and CONTROL_OBJECTIVES
compute the same gradient, bit for bit, so every paired difference among them must be exactly 0. Anything else
means the runs did not share their start or the code differs from what it claims.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.stats import holm, paired, sign_flip_test, tost
from harness.contract import on_policy
from harness.hypothesis import COMPARED_MEASURES

# Objectives whose on-policy gradient is TRL's grpo gradient bit for bit (tests/test_trainer_equivalence.py), so
# they must agree exactly on the on-policy cell. Not cispo, sapo nor gspo: theirs is the same gradient computed by
# other operations (A log pi, a 4/tau gate, a per-sequence mean log-ratio), equal only up to rounding (and for gspo
# with TRL's bias-corrected KL term, beta > 0, not equal at all).
CONTROL_OBJECTIVES = frozenset({"grpo", "clip-higher", "cfpo", "gppo", "pg-is"})
# Objectives with no trust region at all: if one is not detectably worse than the baseline, the study's setting
# does not exercise the question of which trust region is better (the report says so).
NEGATIVE_CONTROLS = ("pg-is",)
MEASURE_LABELS = {"final_val": "final val reward", "lastk_val": "mean of last 3 evaluations",
                  "auc_val": "val reward AUC / length", "gain_val": "gain over start"}
PAIRED_COLUMNS = ["objective", "baseline", "measure", "n", "unpaired", "mean_diff", "sd", "lo", "hi", "effect",
                  "p", "mde", "verdict", "diffs", "p_signflip", "p_floor", "p_adj", "p_tost", "p_tost_adj",
                  "family_size", "both_collapsed"]
CLAIMS = ("higher", "lower")


def decide(n: int, mean: float, all_zero: bool, p_adj: float, p_tost_adj: float, alpha: float) -> str:
    """The verdict words shared by every table: a difference only past its family's correction, a null only as
    equivalence within the margin (see the module docstring)."""
    if all_zero and n >= 2:
        return "identical"
    if n < 2:
        return "too few seeds"
    if p_adj < alpha:
        return "higher" if mean > 0 else "lower"
    if p_tost_adj < alpha:
        return "equivalent"
    return "inconclusive"


def axis_names(summaries: pd.DataFrame) -> list[str]:
    """Extra sweep axes (beyond objective x batch_ratio x iterations x seed) present in the study, sorted."""
    return sorted({k for js in summaries["extra_axes"] for k in json.loads(js)})


def with_axis_columns(summaries: pd.DataFrame) -> pd.DataFrame:
    """summaries plus one column per extra axis (its value as logged, as text)."""
    out = summaries.copy()
    parsed = out["extra_axes"].map(json.loads)
    for name in axis_names(summaries):
        out[name] = parsed.map(lambda d, k=name: str(d.get(k, "")))
    return out


def check_baseline(objectives: list[str], baseline: str | None) -> str:
    """The baseline to compare against: `baseline`, else the first objective (sweep order: grpo first)."""
    if baseline is None:
        return objectives[0]
    if baseline not in objectives:
        raise AnalysisError(f"--baseline {baseline!r} is not an objective of this study; allowed: "
                            f"{', '.join(objectives)}")
    return baseline


def paired_table(summaries: pd.DataFrame, baseline: str, measures: tuple[str, ...] = COMPARED_MEASURES,
                 alpha: float = 0.05, margin: float = 0.02) -> pd.DataFrame:
    """One row per (cell, objective other than the baseline, measure); columns: GRID + extra axes +
    PAIRED_COLUMNS. `diffs` holds the per-seed differences in seed order (seeds listed in `seeds`). A
    `collapsed` column in summaries (analysis.collapse) fills both_collapsed; without it, False."""
    df = with_axis_columns(summaries)
    axes = axis_names(summaries)
    cell_keys = ["batch_ratio", "iterations", *axes]
    rows = []
    for cell, group in df.groupby(cell_keys, sort=True):
        cell = dict(zip(cell_keys, cell if isinstance(cell, tuple) else (cell,)))
        base = group[group["base_objective"] == baseline].set_index("seed")
        for objective in sorted(set(group["base_objective"]) - {baseline}, key=_order(summaries)):
            arm = group[group["base_objective"] == objective].set_index("seed")
            collapsed = "collapsed" in group and len(arm) > 0 and bool(arm["collapsed"].all() and
                                                                       base["collapsed"].all())
            for measure in measures:
                x, y = arm[measure].dropna(), base[measure].dropna()
                both = sorted(set(x.index) & set(y.index))
                diffs = (x.loc[both] - y.loc[both]).to_numpy(dtype=float)
                p_flip, floor = sign_flip_test(diffs)
                rows.append({**cell, "objective": objective, "baseline": baseline, "measure": measure,
                             **paired(diffs, 1 - alpha), "unpaired": len(set(x.index) ^ set(y.index)),
                             "diffs": diffs.tolist(), "seeds": both, "p_signflip": p_flip if len(diffs) else np.nan,
                             "p_floor": floor, "p_tost": tost(diffs, margin), "both_collapsed": collapsed})
    out = pd.DataFrame(rows, columns=cell_keys + PAIRED_COLUMNS + ["seeds"])
    for _, family in out.groupby("measure", sort=False):  # one family per measure: every cell and comparison
        out.loc[family.index, "p_adj"] = holm(family["p_signflip"])
        out.loc[family.index, "p_tost_adj"] = holm(family["p_tost"])
        out.loc[family.index, "family_size"] = int(family["p_signflip"].notna().sum())
    out["verdict"] = [decide(int(r.n), r.mean_diff, bool(r.n) and not np.any(r.diffs), r.p_adj, r.p_tost_adj, alpha)
                      for r in out.itertuples(index=False)]
    return out


def _order(summaries: pd.DataFrame):
    first_seen = {o: i for i, o in enumerate(dict.fromkeys(summaries["base_objective"]))}
    return lambda o: first_seen.get(o, len(first_seen))


@dataclasses.dataclass(frozen=True)
class Control:
    status: str  # passed | FAILED | not applicable
    detail: str  # one sentence for the report


def control(paired_rows: pd.DataFrame, tuned_apart: list[str] | None = None) -> Control:
    """The on-policy control (see the module docstring) over every comparison of two CONTROL_OBJECTIVES.
    tuned_apart: knobs the objectives were tuned to different values of (analysis.tuning); then their
    on-policy runs differ by those too, and the exact-0 check does not apply."""
    if tuned_apart:
        return Control("not applicable", "the objectives ran at different tuned settings ("
                       + ", ".join(tuned_apart) + "), so on the on-policy cell they differ by those as well as by "
                       "the objective; the exact-0 check holds only between objectives that share every other "
                       "setting.")
    on = paired_rows[np.array([on_policy(int(b), int(i)) for b, i in zip(paired_rows["batch_ratio"],
                                                                        paired_rows["iterations"])], bool)]
    on = on[np.array([{o, b} <= CONTROL_OBJECTIVES for o, b in zip(on["objective"], on["baseline"])], bool)]
    on = on[on["n"] > 0]
    if on.empty:
        return Control("not applicable", "the study has no on-policy cell (batch ratio 1, iterations 1) with "
                       "paired seeds of two of " + ", ".join(sorted(CONTROL_OBJECTIVES)) + ".")
    bad = on[np.array([not np.all(np.asarray(d) == 0) for d in on["diffs"]], bool)]
    pairs = int(on.groupby(["objective"])["n"].max().sum())
    if bad.empty:
        *names, last = sorted(set(on["objective"]) | set(on["baseline"]))
        return Control("passed", f"on the on-policy cell every paired difference between "
                       f"{', '.join(names)} and {last} is exactly 0 "
                       f"({pairs} seed pairs, measures {', '.join(sorted(set(on['measure'])))}), as it must be.")
    worst = bad.loc[bad["mean_diff"].abs().idxmax()]
    return Control("FAILED", f"on the on-policy cell {len(bad)} paired comparisons are not exactly 0 (largest: "
                   f"{worst['objective']} - {worst['baseline']} {worst['measure']} mean difference "
                   f"{worst['mean_diff']:+.4g}); the arms did not share their start, or the objectives differ "
                   "at ratio 1: do not trust the comparisons below until this is explained.")
