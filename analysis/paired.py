"""Objective against a baseline objective, seed by seed: per-cell paired comparisons, the aggregate verdict
over the off-policy cells, and the on-policy control.

Seed s of every objective starts from the same warm-started model, sees the same prompts in the same order and
samples the same first rollout batch, so the runs of one seed are a pair and the comparison is the per-seed
difference X_s - baseline_s (analysis.stats.paired). A seed present in one arm only is left out and counted
(`unpaired`). A cell is (batch_ratio, iterations, extra sweep axes); the extra axes are columns of their own.

- verdict per (cell, objective, measure): `higher` / `lower` when the 95% t-interval of the differences
  excludes 0, `identical` when every difference is exactly 0, else `no detectable difference`, reported with
  the minimum detectable difference (80% power, two-sided 5%) so a null reads "no difference larger than X";
  fewer than 2 pairs: `too few seeds`. These are per-cell tests, not adjusted for their number: at 5%, about
  one in twenty null comparisons reads as a difference. The aggregate is the verdict to quote.
- aggregate: per objective (and extra axes) against the baseline, over the off-policy cells as strata
  (batch_ratio x iterations > 1), the interquartile mean of all paired differences and the probability of
  improvement, each with a stratified-bootstrap 95% interval (analysis.stats). A difference is claimed only
  when both intervals agree and the exact sign-flip test of the pooled pairs gives p < 5%: with few pairs
  the bootstrap alone calls differences no test could see (aggregate_verdict).
- control: on the on-policy cell (batch_ratio 1, iterations 1) the ratio is exactly 1 and CONTROL_OBJECTIVES
  compute the same gradient, bit for bit, so every paired difference among them must be exactly 0. Anything else
  means the runs did not share their start or the code differs from what it claims.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.stats import improvement_probability, iqm, paired, sign_flip_test, stratified_bootstrap
from analysis.summary import MEASURES

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
                  "p", "mde", "verdict", "diffs"]
AGGREGATE_COLUMNS = ["objective", "baseline", "measure", "strata", "pairs", "iqm", "iqm_lo", "iqm_hi",
                     "p_improve", "p_improve_lo", "p_improve_hi", "p_signflip", "p_floor", "verdict"]
ALPHA = 0.05


def aggregate_verdict(objective: str, lo: float, hi: float, p_lo: float, p_hi: float, p_flip: float) -> str:
    """`higher`/`lower` only when the IQM interval excludes 0, the P(improvement) interval excludes 1/2 on the
    same side, and the exact sign-flip test agrees (p < 5%); else `no detectable difference`."""
    if p_flip < ALPHA and lo > 0 and p_lo > 0.5:
        return "higher"
    if p_flip < ALPHA and hi < 0 and p_hi < 0.5:
        return "lower"
    return "no detectable difference"


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


def paired_table(summaries: pd.DataFrame, baseline: str, measures: tuple[str, ...] = MEASURES) -> pd.DataFrame:
    """One row per (cell, objective other than the baseline, measure); columns: GRID + extra axes +
    PAIRED_COLUMNS. `diffs` holds the per-seed differences in seed order (seeds listed in `seeds`)."""
    df = with_axis_columns(summaries)
    axes = axis_names(summaries)
    cell_keys = ["batch_ratio", "iterations", *axes]
    rows = []
    for cell, group in df.groupby(cell_keys, sort=True):
        cell = dict(zip(cell_keys, cell if isinstance(cell, tuple) else (cell,)))
        base = group[group["base_objective"] == baseline].set_index("seed")
        for objective in sorted(set(group["base_objective"]) - {baseline}, key=_order(summaries)):
            arm = group[group["base_objective"] == objective].set_index("seed")
            for measure in measures:
                x, y = arm[measure].dropna(), base[measure].dropna()
                both = sorted(set(x.index) & set(y.index))
                diffs = (x.loc[both] - y.loc[both]).to_numpy(dtype=float)
                stats = paired(diffs)
                rows.append({**cell, "objective": objective, "baseline": baseline, "measure": measure,
                             **stats, "unpaired": len(set(x.index) ^ set(y.index)), "verdict": _verdict(stats, diffs),
                             "diffs": diffs.tolist(), "seeds": both})
    columns = cell_keys + PAIRED_COLUMNS + ["seeds"]
    return pd.DataFrame(rows, columns=columns)


def _order(summaries: pd.DataFrame):
    first_seen = {o: i for i, o in enumerate(dict.fromkeys(summaries["base_objective"]))}
    return lambda o: first_seen.get(o, len(first_seen))


def _verdict(stats: dict[str, float], diffs: np.ndarray) -> str:
    if stats["n"] >= 1 and np.all(diffs == 0):
        return "identical" if stats["n"] >= 2 else "too few seeds"
    if stats["n"] < 2:
        return "too few seeds"
    if stats["lo"] > 0:
        return "higher"
    if stats["hi"] < 0:
        return "lower"
    return "no detectable difference"


def aggregate(paired_rows: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Per (objective, extra axes, measure): IQM of the paired differences over the off-policy cells and the
    probability of improvement, each with its stratified-bootstrap interval."""
    off = paired_rows[paired_rows["batch_ratio"] * paired_rows["iterations"] > 1]
    off = off[off["n"] > 0]
    rows = []
    for key, group in off.groupby(["objective", "baseline", *axes, "measure"], sort=False):
        key = dict(zip(["objective", "baseline", *axes, "measure"], key))
        strata = [np.asarray(d, dtype=float) for d in group["diffs"]]
        m, lo, hi = stratified_bootstrap(strata, iqm)
        p, p_lo, p_hi = stratified_bootstrap(strata, improvement_probability)
        p_flip, floor = sign_flip_test(np.concatenate(strata))
        rows.append({**key, "strata": len(strata), "pairs": int(sum(len(s) for s in strata)), "iqm": m,
                     "iqm_lo": lo, "iqm_hi": hi, "p_improve": p, "p_improve_lo": p_lo, "p_improve_hi": p_hi,
                     "p_signflip": p_flip, "p_floor": floor, "verdict": aggregate_verdict(
                         key["objective"], lo, hi, p_lo, p_hi, p_flip)})
    return pd.DataFrame(rows, columns=["objective", "baseline", *axes, "measure", *AGGREGATE_COLUMNS[3:]])


@dataclasses.dataclass(frozen=True)
class Control:
    status: str  # passed | FAILED | not applicable
    detail: str  # one sentence for the report


def control(paired_rows: pd.DataFrame) -> Control:
    """The on-policy control (see the module docstring) over every comparison of two CONTROL_OBJECTIVES."""
    on = paired_rows[(paired_rows["batch_ratio"] == 1) & (paired_rows["iterations"] == 1)]
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
