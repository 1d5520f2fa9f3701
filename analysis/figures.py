"""Figures of a study: one grid of training curves per metric, and the stable-regime map (the headline).

Curve grids: rows = batch ratio, columns = iterations, one line per objective (analysis.style colours), x =
rollout batches, the mean over seeds with a 95% t-interval band (no band where fewer than 2 seeds have a
value, e.g. after the other seeds stopped early). Non-finite points are left out of the mean; the collapse
rules report them. Stable-regime map: per objective, heatmaps over batch_ratio x iterations of the final and
the time-averaged (AUC) validation reward from the cell table; hatched cells had at least one seed collapse.

Figures are built on matplotlib.figure.Figure directly (no pyplot): no global state, no GUI backend.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from analysis.load import StudyData
from analysis.metrics import CURVES, CURVES_BY_KEY, CurveMetric
from analysis.paired import MEASURE_LABELS
from analysis.stats import LEVEL, mean_ci
from analysis.style import objective_order, objective_styles

PANEL_IN = (3.2, 2.3)  # inches per curve panel
MIN_WIDTH_IN = 6.9  # room for a two-line title and two legend columns of ablation labels
CELL_IN = (1.1, 0.8)  # inches per heatmap cell
HATCH = "xx"  # marks collapsed cells on the stable-regime map
HEADLINE = "stable_regime"
VERDICT = "verdict"


def grid_axes(runs: pd.DataFrame) -> tuple[list[int], list[int]]:
    """(batch ratios, iteration counts) of the study, sorted: the same panel grid in every figure."""
    return sorted(runs["batch_ratio"].unique().tolist()), sorted(runs["iterations"].unique().tolist())


def curve_bands(values: pd.DataFrame) -> pd.DataFrame:
    """Mean and t-interval over seeds per (objective, batch_ratio, iterations, step); finite values only."""
    finite = values[np.isfinite(values["value"].to_numpy(dtype=float))]
    keys = ["objective", "batch_ratio", "iterations", "step", "rollout_batch"]
    return mean_ci(finite, keys, "value")


def curve_figure(data: StudyData, metric: str | CurveMetric) -> Figure:
    """Grid of panels (batch ratio x iterations) of one metric; one Line2D per objective present in a panel."""
    spec = metric if isinstance(metric, CurveMetric) else CURVES_BY_KEY.get(metric, CurveMetric(metric, metric, metric))
    ratios, iters = grid_axes(data.runs)
    styles = objective_styles(data.runs["objective"])
    bands = curve_bands(data.metric(spec.key))
    # at least MIN_WIDTH_IN wide, so the title and the legend fit a one-panel study (an ablation at one cell)
    fig = Figure(figsize=(max(PANEL_IN[0] * len(iters) + 0.5, MIN_WIDTH_IN), PANEL_IN[1] * len(ratios) + 1.0),
                 layout="constrained")
    axes = fig.subplots(len(ratios), len(iters), squeeze=False, sharex=True, sharey=True)
    panels = dict(iter(bands.groupby(["batch_ratio", "iterations"])))
    for r, b in enumerate(ratios):
        for c, it in enumerate(iters):
            ax: Axes = axes[r, c]
            ax.set_title(f"batch ratio {b}, iterations {it}", fontsize=9)
            ax.set_yscale(spec.yscale)
            ax.grid(True, alpha=0.3)
            panel = panels.get((b, it))
            if panel is None:
                ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.5")
            else:
                for objective in objective_order(panel["objective"]):
                    line = panel[panel["objective"] == objective].sort_values("rollout_batch")
                    st = styles[objective]
                    ax.plot(line["rollout_batch"], line["mean"], label=objective, lw=1.3, **st)
                    ax.fill_between(line["rollout_batch"], line["lo"], line["hi"], color=st["color"], alpha=0.2,
                                    lw=0)  # NaN bounds (one seed) leave no band
            if r == len(ratios) - 1:
                ax.set_xlabel("rollout batches")
            if c == 0:
                ax.set_ylabel(spec.label)
    fig.suptitle(f"{spec.label}: {data.study} ({data.scale} scale)\nmean over seeds, {LEVEL:.0%} t-interval",
                 fontsize=10)
    _legend(fig, styles)
    return fig


def stable_regime_figure(table: pd.DataFrame, study: str, scale: str) -> Figure:
    """Rows = objectives, columns = (final val reward, val AUC); each panel a batch_ratio x iterations heatmap.

    `table` is analysis.tables.cell_table; every cell shows k/n collapsed seeds, hatched when k >= 1.
    A colour scale is shared by all objectives of a column, so colours compare across objectives.
    """
    ratios = sorted(table["batch_ratio"].unique().tolist())
    iters = sorted(table["iterations"].unique().tolist())
    objectives = objective_order(table["objective"])
    quantities = [("final_val_mean", "final val reward"), ("auc_val_mean", "val reward AUC / length")]
    fig = Figure(figsize=(CELL_IN[0] * len(iters) * len(quantities) + 2.5,
                          CELL_IN[1] * len(ratios) * len(objectives) + 1.2), layout="constrained")
    axes = fig.subplots(len(objectives), len(quantities), squeeze=False)
    for c, (col, label) in enumerate(quantities):
        vmin, vmax = np.nanmin(table[col]), np.nanmax(table[col])
        if not vmax > vmin:  # a flat map still needs a non-empty colour range
            vmin, vmax = vmin - 0.5, vmax + 0.5
        for r, objective in enumerate(objectives):
            rows = table[table["objective"] == objective].set_index(["batch_ratio", "iterations"])
            grid = np.full((len(ratios), len(iters)), np.nan)
            for i, b in enumerate(ratios):
                for j, it in enumerate(iters):
                    if (b, it) in rows.index:
                        grid[i, j] = rows.loc[(b, it), col]
            ax: Axes = axes[r, c]
            im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
            for i, b in enumerate(ratios):
                for j, it in enumerate(iters):
                    _annotate(ax, i, j, rows.loc[(b, it)] if (b, it) in rows.index else None, col, (vmin, vmax))
            ax.set_xticks(range(len(iters)), [str(i) for i in iters])
            ax.set_yticks(range(len(ratios)), [str(b) for b in ratios])
            ax.set_xlabel("iterations")
            ax.set_ylabel("batch ratio")
            ax.set_title(f"{objective}: {label}", fontsize=10)
        fig.colorbar(im, ax=axes[:, c], label=label, shrink=0.8)
    fig.suptitle(f"Stable regime: {study} ({scale} scale)\nmean over seeds (scored over the full budget); "
                 "k/n seeds collapsed, hatched when k > 0",
                 fontsize=10)
    return fig


def _annotate(ax: Axes, i: int, j: int, row: pd.Series | None, col: str, span: tuple[float, float]) -> None:
    if row is None:
        ax.text(j, i, "no runs", ha="center", va="center", fontsize=8, color="0.4")
        return
    value = row[col]
    text = f"{value:.3f}\n{row['collapsed_n']}/{row['seeds']} collapsed"  # k/n always: 0/3 is a finding too
    if row["collapsed_n"] > 0:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch=HATCH, edgecolor="white", lw=0,
                               alpha=0.7))
    dark = (value - span[0]) / (span[1] - span[0]) < 0.6 if np.isfinite(value) else False  # viridis: dark low end
    box = {"facecolor": "black" if dark else "white", "alpha": 0.6, "lw": 0} if row["collapsed_n"] > 0 else None
    ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black", bbox=box)


def _legend(fig: Figure, styles: dict[str, dict[str, str]]) -> None:
    handles = [Line2D([], [], label=o, **st) for o, st in styles.items()]
    # long labels (objective + ablation axes) go two per row; plain objectives side by side
    ncols = len(handles) if all(len(h.get_label()) <= 12 for h in handles) else min(2, len(handles))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, title="objective")


def save(fig: Figure, folder: str | Path, stem: str) -> list[Path]:
    """PNG (for the README) and PDF (for papers); the PDF without a creation date, so reruns diff clean.

    The constrained layout computed for the PNG is frozen for the PDF (positions are in figure fractions, so
    they do not depend on dpi): laying out again costs a quarter of the time of all figures.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{stem}.png", folder / f"{stem}.pdf"
    fig.savefig(png, dpi=150)
    fig.set_layout_engine("none")
    fig.savefig(pdf, metadata={"CreationDate": None})
    return [png, pdf]


def curve_metrics(data: StudyData) -> list[CurveMetric]:
    """The curve figures this study gets: every non-optional metric, optional ones only when logged."""
    return [m for m in CURVES if not m.optional or data.runs_with(m.key)]


def verdict_figure(agg: pd.DataFrame, axes: list[str], study: str, scale: str) -> Figure:
    """The aggregate verdict: per measure, probability of improvement and IQM of paired differences over the
    off-policy cells, one row per comparison (objective [and extra axes] minus baseline), point and interval."""
    measures = list(dict.fromkeys(agg["measure"]))
    labels = list(dict.fromkeys(_comparison_labels(agg, axes)))
    fig = Figure(figsize=(MIN_WIDTH_IN + 1.5, 0.45 * len(labels) * len(measures) + 1.6), layout="constrained")
    grid = fig.subplots(len(measures), 2, squeeze=False, sharey=True)
    styles = objective_styles(agg["objective"])
    for r, measure in enumerate(measures):
        rows = agg[agg["measure"] == measure].assign(label=lambda d: _comparison_labels(d, axes))
        for c, (stat, ref, title) in enumerate([("p_improve", 0.5, "P(improvement over baseline)"),
                                                ("iqm", 0.0, "IQM of paired differences")]):
            ax: Axes = grid[r, c]
            ax.axvline(ref, color="0.5", lw=0.8, ls="--")
            for y, label in enumerate(labels):
                hit = rows[rows["label"] == label]
                if hit.empty:
                    continue
                row = hit.iloc[0]
                color = styles[row["objective"]]["color"]
                ax.errorbar(row[stat], y, xerr=[[row[stat] - row[f"{stat}_lo"]], [row[f"{stat}_hi"] - row[stat]]],
                            fmt="o", color=color, capsize=3)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_title(f"{title}: {MEASURE_LABELS.get(measure, measure)}", fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
            if c == 0:
                ax.set_xlim(-0.02, 1.02)
    grid[0, 0].invert_yaxis()  # shared y: first comparison on top in every panel
    fig.suptitle(f"Aggregate verdict: {study} ({scale} scale)\noff-policy cells as strata, paired seeds, "
                 f"stratified bootstrap {LEVEL:.0%} intervals", fontsize=10)
    return fig


def _comparison_labels(agg: pd.DataFrame, axes: list[str]) -> list[str]:
    return [" ".join([f"{r['objective']} - {r['baseline']}", *(f"{a}={r[a]}" for a in axes if r[a] != "")])
            for _, r in agg.iterrows()]


def make_figures(data: StudyData, table: pd.DataFrame, folder: str | Path, agg: pd.DataFrame | None = None,
                 axes: list[str] = ()) -> dict[str, list[Path]]:
    """Write every figure; returns {stem: [png, pdf]}, the headline first, then the verdict (when there is one)."""
    written = {HEADLINE: save(stable_regime_figure(table, data.study, data.scale), folder, HEADLINE)}
    if agg is not None and len(agg):
        written[VERDICT] = save(verdict_figure(agg, list(axes), data.study, data.scale), folder, VERDICT)
    for spec in curve_metrics(data):
        written[spec.slug] = save(curve_figure(data, spec), folder, spec.slug)
    return written
