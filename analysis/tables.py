"""Per (cell, objective) table over seeds, written as Markdown, LaTeX (booktabs) and CSV.

`cell_table` is numeric (mean and 95% t-interval over seeds, counts); `val_table` and `stability_table` are
its formatted halves (a single table would not fit a page): validation reward, then stability diagnostics.
Every per-run quantity comes from analysis.summary; "collapsed" from analysis.collapse.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.stats import mean_ci
from analysis.style import objective_order

GRID = ["batch_ratio", "iterations", "objective"]
CI_COLUMNS = ["final_val", "peak_val", "auc_val", "drop_from_peak"]  # reported as mean [lo, hi]
MEAN_COLUMNS = ["max_rollout_kl", "mean_clip_ratio", "grad_clipped_frac"]  # mean over seeds


def cell_table(summaries: pd.DataFrame, verdicts: pd.DataFrame) -> pd.DataFrame:
    """One row per (batch_ratio, iterations, objective); columns documented inline below."""
    runs = summaries.merge(verdicts[["run_id", "collapsed", "rollout_batch"]].rename(
        columns={"rollout_batch": "collapse_rb"}), on="run_id", how="left")
    runs["collapsed"] = runs["collapsed"].fillna(False).astype(bool)
    g = runs.groupby(GRID, sort=True)
    out = g.agg(
        seeds=("run_id", "count"),
        run_ids=("run_id", lambda s: sorted(s)),
        below_start_rb=("below_start_rb", "mean"),  # mean over the seeds that fell below start
        below_start_n=("below_start_rb", "count"),  # seeds that fell below start at all
        collapsed_n=("collapsed", "sum"),
        collapse_rbs=("collapse_rb", lambda s: sorted(s.dropna())),
        steps_on_batch=("steps_on_batch", "max"),  # observed
        steps_configured=("steps_per_rollout_batch", "max"),
        **{c: (c, "mean") for c in MEAN_COLUMNS},
    )
    for col in CI_COLUMNS:
        ci = mean_ci(runs, GRID, col).set_index(GRID)
        out[f"{col}_mean"], out[f"{col}_lo"], out[f"{col}_hi"] = ci["mean"], ci["lo"], ci["hi"]
    out = out.reset_index()
    order = {o: i for i, o in enumerate(objective_order(out["objective"]))}
    return out.sort_values(["batch_ratio", "iterations", "objective"], key=lambda s: s.map(order) if s.name ==
                           "objective" else s).reset_index(drop=True)


def _num(x: float, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ci(row: pd.Series, col: str) -> str:
    mean, lo, hi = row[f"{col}_mean"], row[f"{col}_lo"], row[f"{col}_hi"]
    if np.isnan(lo):  # one seed: no interval
        return _num(mean, ".3f")
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _grid_columns(t: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"batch ratio": t["batch_ratio"], "iterations": t["iterations"],
                         "objective": t["objective"], "seeds": t["seeds"]})


def val_table(t: pd.DataFrame) -> pd.DataFrame:
    """Validation reward columns, formatted: mean [95% CI] over seeds."""
    out = _grid_columns(t)
    for col, name in [("final_val", "final val"), ("peak_val", "peak val"), ("auc_val", "AUC val"),
                      ("drop_from_peak", "drop from peak")]:
        out[name] = [_ci(r, col) for _, r in t.iterrows()]

    def below(r: pd.Series) -> str:
        if r["below_start_n"] == 0:
            return "never"
        part = f" ({r['below_start_n']}/{r['seeds']})" if r["below_start_n"] < r["seeds"] else ""
        return f"{r['below_start_rb']:.1f}{part}"

    out["below start after (rb)"] = [below(r) for _, r in t.iterrows()]
    return out


def stability_table(t: pd.DataFrame) -> pd.DataFrame:
    """Collapse counts and stability diagnostics, formatted (means over seeds)."""
    out = _grid_columns(t)

    def collapsed(r: pd.Series) -> str:
        head = f"{r['collapsed_n']}/{r['seeds']}"
        return head + (" at rb " + ", ".join(f"{x:g}" for x in r["collapse_rbs"]) if r["collapse_rbs"] else "")

    out["collapsed"] = [collapsed(r) for _, r in t.iterrows()]
    out["max rollout KL"] = [_num(x, ".3g") for x in t["max_rollout_kl"]]
    out["clip ratio"] = [_num(x, ".4f") for x in t["mean_clip_ratio"]]
    out["grad clipped"] = [_num(x, ".1%") for x in t["grad_clipped_frac"]]
    out["steps/batch (obs/cfg)"] = [f"{_num(o, '.0f')}/{c:.0f}" for o, c in zip(t["steps_on_batch"],
                                                                             t["steps_configured"])]
    return out


def markdown(df: pd.DataFrame) -> str:
    """GitHub table of a frame of strings (pandas' to_markdown needs tabulate, which the project does not pin)."""
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """booktabs tabular (\\toprule/\\midrule/\\bottomrule) with LaTeX-escaped cells and headers."""
    styler = df.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    return styler.to_latex(hrules=True, caption=caption, label=label, position="htbp",
                           column_format="r" * 2 + "l" + "r" * (df.shape[1] - 3), position_float="centering")


def _tex(text: str) -> str:
    """Escape the characters a study name may plausibly contain (captions are not escaped by the Styler)."""
    for ch in "\\&%$#_{}":
        text = text.replace(ch, "\\" + ch)
    return text


def write_tables(t: pd.DataFrame, folder: str | Path, study: str, scale: str) -> dict[str, Path]:
    """tables/{val_reward,stability}.{md,tex} and tables/cells.csv (all numbers, for scripts)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, frame, what in [
        ("val_reward", val_table(t), "validation reward per cell and objective, mean [95\\% t-interval] over "
         "seeds; below start: rollout batches (rb) until it first falls below its step-0 value"),
        ("stability", stability_table(t), "stability per cell and objective: seeds collapsed and the rollout "
         "batch (rb) of each collapse; other columns are means over seeds"),
    ]:
        caption = f"{_tex(study)} ({_tex(scale)}): {what}."
        (folder / f"{name}.md").write_text(markdown(frame))
        (folder / f"{name}.tex").write_text(latex(frame, caption, f"tab:{study}-{scale}-{name}"))
        written[f"{name}.md"], written[f"{name}.tex"] = folder / f"{name}.md", folder / f"{name}.tex"
    csv = t.assign(run_ids=t["run_ids"].map(" ".join), collapse_rbs=t["collapse_rbs"].map(
        lambda xs: " ".join(f"{x:g}" for x in xs)))
    csv.to_csv(folder / "cells.csv", index=False, float_format="%.6g")
    written["cells.csv"] = folder / "cells.csv"
    return written
