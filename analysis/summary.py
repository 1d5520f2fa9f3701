"""Per-run scores: what the tables average over seeds, the paired comparisons difference and the maps show.

The validation curve (val/reward against rollout batches) is scored over the run's whole budget (param
`rollout_batches`), so a run cannot look better by stopping early:
- a diverged run counts 0 from its divergence on. Evaluations at or after the divergence step are dropped (an
  evaluation of a diverged policy is not a measurement); the curve falls linearly from the last evaluation
  before the divergence to 0 at the divergence and stays 0 to the budget;
- the evaluation schedule is every `eval_every` rollout batches and the budget (for a complete run, the points
  it logged); a diverged run's missing points are read off that scored curve.
Columns (reward units unless named):
- start_val: the step-0 evaluation (the warm-started model; identical for seeds that share a start);
- final_val: the scored value at the budget; lastk_val: mean of the last `LAST_K` scheduled evaluations;
- auc_val: area under the scored curve over [0, budget] / budget: the time-averaged validation reward;
- gain_val: final_val - start_val;
- peak_val: best evaluation after step 0 (before any divergence); drop_from_peak: peak_val - final_val;
- fell_rb: first rollout batch of the first two consecutive scheduled evaluations below start by more than
  twice the binomial standard error of the start value on `val_prompts` prompts (NaN: never fell, censored at
  the budget); above_start_rb: fell_rb, or the budget for a run that never fell (restricted mean input).
Ratio statistics (clip ratio, mean |r - 1|, rollout KL) use only the steps where the ratio was measured
(`rollout/ratio_measured` = 1), averaged within each rollout batch first and then over rollout batches, so a
cell with 16 steps per batch and one with 2 weigh their batches alike; NaN where nothing was measured.
peak_rollout_kl is the largest per-rollout-batch mean. steps_min/steps_max: optimizer steps the rollout
batches really received (a diverged run's cut-off last batch left out).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from analysis.metrics import (
    CLIP_RATIO,
    GRAD_CLIPPED,
    RATIO_ABS_DEV,
    RATIO_MEASURED,
    ROLLOUT_BATCH,
    ROLLOUT_KL,
    STEPS_ON_BATCH,
    VAL_REWARD,
)

log = logging.getLogger(__name__)

LAST_K = 3  # evaluations averaged by lastk_val
SE_MARGIN = 2.0  # "fell below start": a drop of more than this many binomial standard errors
MEASURES = ("final_val", "lastk_val", "auc_val", "gain_val")  # the validation measures compared between objectives
VAL_COLUMNS = ["start_val", *MEASURES, "peak_val", "drop_from_peak", "fell_rb", "above_start_rb"]
RATIO_STATS = [("mean_clip_ratio", CLIP_RATIO), ("mean_ratio_abs_dev", RATIO_ABS_DEV),
               ("mean_rollout_kl", ROLLOUT_KL)]
OTHER_COLUMNS = ["mean_clip_ratio", "mean_ratio_abs_dev", "mean_rollout_kl", "peak_rollout_kl",
                 "grad_clipped_frac", "steps_min", "steps_max"]


def scored_curve(rb: np.ndarray, val: np.ndarray, budget: float, diverged_rb: float | None,
                 eval_every: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y) of the scored curve and (xs, ys) of its scheduled evaluations; see the module docstring.

    rb, val: the logged evaluations, sorted, finite. diverged_rb: rollout batches completed at the divergence.
    """
    if diverged_rb is not None:
        keep = rb < diverged_rb
        rb, val = rb[keep], val[keep]
        x = np.concatenate([rb, [diverged_rb], [budget] if budget > diverged_rb else []])
        y = np.concatenate([val, np.zeros(len(x) - len(rb))])
    else:
        x, y = rb, val
    if diverged_rb is None:
        return x, y, x, y  # a complete run's schedule is what it logged
    step = eval_every or (float(np.median(np.diff(rb))) if len(rb) > 1 else budget)
    grid = np.arange(0.0, budget + 1e-9, step) if step > 0 else np.array([0.0])
    xs = np.unique(np.concatenate([rb, grid[grid >= diverged_rb], [budget]]))
    return x, y, xs, np.interp(xs, x, y)


def val_scores(rb: np.ndarray, val: np.ndarray, budget: float | None = None, diverged_rb: float | None = None,
               eval_every: float | None = None, val_prompts: int | None = None) -> dict[str, float]:
    """The VAL_COLUMNS of one run. budget None: the last logged evaluation (a run outside the contract)."""
    out = dict.fromkeys(VAL_COLUMNS, np.nan)
    if len(val) == 0:
        return out
    budget = float(budget if budget is not None else rb[-1])
    x, y, xs, ys = scored_curve(rb, val, budget, diverged_rb, eval_every)
    start = float(val[0]) if rb[0] == 0 else np.nan
    end = float(np.interp(budget, x, y)) if x[-1] >= budget else float(y[-1])
    span = budget if x[-1] >= budget else float(x[-1] - x[0])
    auc = float(np.trapezoid(y, x) / span) if span > 0 else float(y[0])
    later = val[(rb > 0) & (rb < (diverged_rb if diverged_rb is not None else np.inf))]
    out.update(start_val=start, final_val=end, lastk_val=float(ys[-LAST_K:].mean()), auc_val=auc,
               gain_val=end - start, peak_val=float(later.max()) if len(later) else np.nan)
    out["drop_from_peak"] = out["peak_val"] - end
    se = np.sqrt(start * (1 - start) / val_prompts) if val_prompts else 0.0
    below = (ys < start - SE_MARGIN * se) & (xs > 0)
    twice = np.flatnonzero(below[:-1] & below[1:])
    out["fell_rb"] = float(xs[twice[0]]) if len(twice) else np.nan
    out["above_start_rb"] = out["fell_rb"] if len(twice) else budget
    return out


def per_batch_mean(steps: np.ndarray, values: np.ndarray, k: int) -> pd.Series:
    """Mean of a per-step metric within each rollout batch (steps (j-1)k+1 .. jk are batch j), by batch."""
    return pd.Series(values).groupby(np.ceil(steps / k).astype(int)).mean()


def run_summaries(long: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of `runs`: its identity columns, VAL_COLUMNS and OTHER_COLUMNS."""
    finite = long[np.isfinite(long["value"].to_numpy(dtype=float))]
    by_run = {run_id: dict(iter(g.groupby("metric"))) for run_id, g in finite.groupby("run_id")}
    fallback_budget = _fallback_budget(finite, runs)
    rows = []
    for run in runs.itertuples(index=False):
        curves = by_run.get(run.run_id, {})
        k = int(run.steps_per_rollout_batch)
        budget = run.budget if pd.notna(run.budget) else fallback_budget
        diverged_rb = None
        if run.status == "diverged":
            at = run.diverged_at if pd.notna(run.diverged_at) else _last_step(curves)
            diverged_rb = float(at) / k
        val = curves.get(VAL_REWARD)
        rb, v = (val.sort_values("step")[["rollout_batch", "value"]].to_numpy(dtype=float).T if val is not None
                 else (np.array([]), np.array([])))
        row = val_scores(rb, v, budget, diverged_rb, _num(run.eval_every), _num(run.val_prompts))
        row.update(_ratio_stats(curves, k, run.run_id), **_steps_received(curves, run.status == "diverged"))
        clipped = curves.get(GRAD_CLIPPED)
        row["grad_clipped_frac"] = float(clipped["value"].mean()) if clipped is not None else np.nan
        rows.append(row)
    out = runs[["run_id", "cell", "objective", "base_objective", "extra_axes", "batch_ratio", "iterations", "seed",
                "status", "steps_per_rollout_batch", "steps_ok", "budget"]].reset_index(drop=True)
    return pd.concat([out, pd.DataFrame(rows, columns=VAL_COLUMNS + OTHER_COLUMNS)], axis=1)


def _num(x) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def _last_step(curves: dict[str, pd.DataFrame]) -> int:
    return max((int(df["step"].max()) for df in curves.values() if not df.empty), default=0)


def _fallback_budget(finite: pd.DataFrame, runs: pd.DataFrame) -> float | None:
    """For runs without the rollout_batches param: the furthest evaluation of any run (a sweep gives every
    cell one budget), so an early stop still counts against the run."""
    if runs["budget"].notna().all():
        return None
    val = finite[finite["metric"] == VAL_REWARD]
    log.warning("%d runs lack the rollout_batches param; scoring them over the study's furthest evaluation",
                int(runs["budget"].isna().sum()))
    return float(val["rollout_batch"].max()) if len(val) else None


def _ratio_stats(curves: dict[str, pd.DataFrame], k: int, run_id: str) -> dict[str, float]:
    measured = curves.get(RATIO_MEASURED)
    if measured is not None:
        steps = set(measured.loc[measured["value"] == 1, "step"])
    else:  # runs from before the flag: TRL measures the ratio exactly when a batch gets more than one step
        log.warning("run %s has no %s; treating its steps as measured iff %d > 1", run_id, RATIO_MEASURED, k)
        steps = None if k > 1 else set()
    out = {}
    for column, key in RATIO_STATS:
        df = curves.get(key)
        if df is not None and steps is not None:
            df = df[df["step"].isin(steps)]
        means = (per_batch_mean(df["step"].to_numpy(), df["value"].to_numpy(dtype=float), k)
                 if df is not None and len(df) else pd.Series(dtype=float))
        out[column] = float(means.mean()) if len(means) else np.nan
        if key == ROLLOUT_KL:
            out["peak_rollout_kl"] = float(means.max()) if len(means) else np.nan
    return out


def _steps_received(curves: dict[str, pd.DataFrame], diverged: bool) -> dict[str, float]:
    """Min and max over rollout batches of the optimizer steps each received (rollout/steps_on_batch counts
    1, 2, ... within a batch; rollout/batch says which batch a step trained on)."""
    on, batch = curves.get(STEPS_ON_BATCH), curves.get(ROLLOUT_BATCH)
    if on is None:
        return {"steps_min": np.nan, "steps_max": np.nan}
    if batch is None:  # without the batch index, only the largest count is known
        top = float(on["value"].max())
        return {"steps_min": np.nan, "steps_max": top}
    joined = on.merge(batch, on="step", suffixes=("", "_batch"))
    received = joined.groupby("value_batch")["value"].max().sort_index()
    if diverged and len(received) > 1:
        received = received.iloc[:-1]  # the batch it diverged on was cut off by design
    return {"steps_min": float(received.min()), "steps_max": float(received.max())}
