"""Per-run scalar summaries of the curves: what the tables average over seeds and the heatmaps show.

Validation curve (val/reward against rollout batches):
- start: the value at step 0 (the first evaluation, if step 0 was not logged);
- final: the last value; peak: the maximum; drop: peak - final (reward units);
- auc: trapezoidal area under the curve divided by its length in rollout batches, i.e. the time-averaged
  val reward (a run that stopped early is averaged over the part it ran);
- below_start_rb: rollout batches until the value is first strictly below start (NaN: never).
Other columns: max rollout_kl, mean clip ratio, fraction of steps with gradient clipping, and the observed
optimizer steps per rollout batch (max of rollout/steps_on_batch). Non-finite values are left out.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.metrics import CLIP_RATIO, GRAD_CLIPPED, ROLLOUT_KL, STEPS_ON_BATCH, VAL_REWARD

VAL_COLUMNS = ["start_val", "final_val", "peak_val", "drop_from_peak", "auc_val", "below_start_rb"]
# (column, metric key, reduction over steps)
OTHER = [("max_rollout_kl", ROLLOUT_KL, "max"), ("mean_clip_ratio", CLIP_RATIO, "mean"),
         ("grad_clipped_frac", GRAD_CLIPPED, "mean"), ("steps_on_batch", STEPS_ON_BATCH, "max")]


def val_curve_stats(rollout_batch: np.ndarray, val: np.ndarray) -> dict[str, float]:
    """The VAL_COLUMNS of one validation curve (sorted by rollout batch, finite values only)."""
    if len(val) == 0:
        return dict.fromkeys(VAL_COLUMNS, np.nan)
    start, final, peak = float(val[0]), float(val[-1]), float(val.max())
    length = float(rollout_batch[-1] - rollout_batch[0])
    auc = float(np.trapezoid(val, rollout_batch) / length) if length > 0 else start
    below = np.flatnonzero(val[1:] < start)
    return {"start_val": start, "final_val": final, "peak_val": peak, "drop_from_peak": peak - final,
            "auc_val": auc, "below_start_rb": float(rollout_batch[below[0] + 1]) if len(below) else np.nan}


def run_summaries(long: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of `runs`: its grid columns, VAL_COLUMNS and the OTHER columns."""
    finite = long[np.isfinite(long["value"].to_numpy(dtype=float))]
    val = finite[finite["metric"] == VAL_REWARD].sort_values(["run_id", "step"])
    stats = {run_id: val_curve_stats(g["rollout_batch"].to_numpy(dtype=float), g["value"].to_numpy(dtype=float))
             for run_id, g in val.groupby("run_id")}
    out = runs[["run_id", "cell", "objective", "batch_ratio", "iterations", "seed", "status",
                "steps_per_rollout_batch"]].copy()
    val_df = pd.DataFrame.from_dict(stats, orient="index", columns=VAL_COLUMNS)
    out = out.join(val_df, on="run_id")
    for column, key, how in OTHER:
        per_run = finite[finite["metric"] == key].groupby("run_id")["value"].agg(how).rename(column)
        out = out.join(per_run, on="run_id")
    return out.reset_index(drop=True)
