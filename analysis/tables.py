"""Per (cell, line) numbers over seeds: `cell_table`, the frame behind every table, map and summary sentence.

A line is an objective plus any extra sweep axes (analysis.runs.line_label). Columns:
- seeds, run_ids: the chosen runs (analysis.runs); excluded_n: cells of this line with no usable attempt
  (failed, killed or still running), never averaged in;
- <measure>_mean/_lo/_hi for the validation scores of analysis.summary: mean and 95% t-interval over seeds
  (a description of one arm; comparisons between objectives are analysis.paired's);
- collapsed_n, collapse_lo/_hi (Clopper-Pearson 95%), collapse_rbs: analysis.collapse; censored_n: seeds whose
  validation fell only at the last evaluation (unconfirmed, not in collapsed_n);
- fell_n, fell_rbs: seeds whose validation fell below start (analysis.summary); above_start_rmean: restricted
  mean of the rollout batches spent at or above start, a run that never fell counted at the budget (censored);
- ratio statistics and grad_clipped_frac: means over seeds of analysis.summary's per-run values, NaN ("n/a")
  where no run measured a ratio (the on-policy cell);
- steps_min/steps_max (observed extremes over all rollout batches of all seeds), steps_configured, steps_flag
  (some run's harness.steps_per_rollout_batch_ok is false).
"""
from __future__ import annotations

import pandas as pd

from analysis.paired import axis_names, with_axis_columns
from analysis.stats import clopper_pearson, mean_ci
from analysis.style import objective_order

GRID = ["batch_ratio", "iterations", "objective"]
CI_COLUMNS = ["final_val", "lastk_val", "auc_val", "gain_val", "peak_val", "drop_from_peak"]
MEAN_COLUMNS = ["mean_clip_ratio", "mean_ratio_abs_dev", "mean_rollout_kl", "peak_rollout_kl", "grad_clipped_frac"]


def cell_table(summaries: pd.DataFrame, verdicts: pd.DataFrame, excluded: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (batch_ratio, iterations, objective line); see the module docstring for the columns."""
    runs = summaries.drop(columns="collapsed", errors="ignore").merge(
        verdicts[["run_id", "collapsed", "censored", "rollout_batch"]].rename(columns={"rollout_batch": "collapse_rb"}),
        on="run_id", how="left")
    runs["collapsed"] = runs["collapsed"].fillna(False).astype(bool)
    runs["censored"] = runs["censored"].fillna(False).astype(bool)
    runs["fell"] = runs["fell_rb"].notna()
    runs["steps_bad"] = runs["steps_ok"] == "false"
    g = runs.groupby(GRID, sort=True)
    out = g.agg(
        seeds=("run_id", "count"),
        run_ids=("run_id", lambda s: sorted(s)),
        collapsed_n=("collapsed", "sum"),
        collapse_rbs=("collapse_rb", lambda s: sorted(s.dropna())),
        censored_n=("censored", "sum"),
        fell_n=("fell", "sum"),
        fell_rbs=("fell_rb", lambda s: sorted(s.dropna())),
        above_start_rmean=("above_start_rb", "mean"),
        budget=("budget", "max"),
        steps_min=("steps_min", "min"),
        steps_max=("steps_max", "max"),
        steps_configured=("steps_per_rollout_batch", "max"),
        steps_flag=("steps_bad", "any"),
        extra_axes=("extra_axes", "first"),
        **{c: (c, "mean") for c in MEAN_COLUMNS},
    )
    for col in CI_COLUMNS:
        ci = mean_ci(runs, GRID, col).set_index(GRID)
        out[f"{col}_mean"], out[f"{col}_lo"], out[f"{col}_hi"] = ci["mean"], ci["lo"], ci["hi"]
    out = out.reset_index()
    bounds = [clopper_pearson(k, n) for k, n in zip(out["collapsed_n"], out["seeds"])]
    out["collapse_lo"], out["collapse_hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    out["excluded_n"] = _excluded_counts(out, excluded)
    out = with_axis_columns(out)
    order = {o: i for i, o in enumerate(objective_order(out["objective"]))}
    return out.sort_values(["batch_ratio", "iterations", "objective"], key=lambda s: s.map(order) if s.name ==
                           "objective" else s).reset_index(drop=True)


def _excluded_counts(table: pd.DataFrame, excluded: pd.DataFrame | None) -> list[int]:
    if excluded is None or excluded.empty:
        return [0] * len(table)
    counts = excluded.groupby(GRID).size()
    return [int(counts.get(tuple(r), 0)) for r in table[GRID].itertuples(index=False)]


def csv_frame(table: pd.DataFrame) -> pd.DataFrame:
    """cell_table with list columns as space-separated text and the extra axes as their own columns."""
    joined = {c: table[c].map(lambda xs: " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs))
              for c in ("run_ids", "collapse_rbs", "fell_rbs")}
    return table.assign(**joined).drop(columns=["extra_axes"])



RUN_COLUMNS = ["run_id", "objective", "base_objective", "batch_ratio", "iterations", "seed", "status", "budget",
               "start_val", "final_val", "lastk_val", "auc_val", "gain_val", "peak_val", "fell_rb", "collapsed",
               "censored", "collapse_rule", "collapse_step", "collapse_rollout_batch", "grad_clipped_frac",
               "mean_clip_ratio", "mean_ratio_abs_dev", "steps_min", "steps_max"]


def run_table(summaries: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """runs.csv: one row per run, every score and which collapse rule fired (or was censored) at which step,
    so every verdict can be recomputed from the repository; extra sweep axes as their own columns."""
    rules = verdicts.rename(columns={"reason": "collapse_rule", "step": "collapse_step",
                                     "rollout_batch": "collapse_rollout_batch"})
    runs = with_axis_columns(summaries.drop(columns="collapsed", errors="ignore").merge(rules, on="run_id",
                                                                                        how="left"))
    order = RUN_COLUMNS[:6] + axis_names(summaries) + RUN_COLUMNS[6:]
    return runs[order].sort_values(["batch_ratio", "iterations", "objective", "seed"]).reset_index(drop=True)
