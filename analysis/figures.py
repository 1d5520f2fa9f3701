"""Figures of a study: one grid of training curves per metric, and the stable-regime map (the headline).

Curve grids: rows = batch ratio, columns = iterations (a sparse sweep such as a ladder: its cells only), one
line per objective (analysis.style: one colour, line style and marker per objective in every figure), x =
rollout batches, the mean over seeds with a 95% t-interval band (no band where fewer than 2 seeds have a
value, e.g. after the other seeds stopped early), the legend below the panels. Non-finite points are left out
of the mean; the collapse rules report them. Stable-regime map: small multiples, one batch_ratio x iterations
heatmap per objective of the final and of the time-averaged (AUC) validation reward from the cell table, one
colour scale per quantity; hatched cells had at least one seed collapse.

Figures are built on matplotlib.figure.Figure directly (no pyplot): no global state, no GUI backend.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from analysis.load import StudyData
from analysis.metrics import CURVES, CURVES_BY_KEY, CurveMetric
from analysis.paired import MEASURE_LABELS
from analysis.stats import LEVEL, mean_ci
from analysis.style import objective_order, objective_styles

PANEL_IN = (3.2, 2.3)  # inches per curve panel
MIN_WIDTH_IN = 6.9  # room for a two-line title and two legend columns of ablation labels
CELL_IN = (1.1, 0.8)  # inches per heatmap cell
HATCH = "xx"  # marks collapsed cells on the stable-regime map
MAP_COLUMNS = 4  # stable-regime panels per row: 8 objectives make two rows, not one very wide figure
MAP_QUANTITIES = [("final_val_mean", "final val reward"), ("auc_val_mean", "val reward AUC / length")]
MAP_CMAP = colormaps["viridis"].with_extremes(bad="0.85")  # grey: a cell without a value
MARKEVERY = 0.1  # a marker every tenth of the axes: shapes tell lines apart in greyscale, without clutter
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


def panel_layout(runs: pd.DataFrame) -> list[list[tuple[int, int] | None]]:
    """Rows of (batch_ratio, iterations) panels: the full grid when the sweep filled it (a missing cell then
    reads "no runs"); else, e.g. a ladder (1,1), (4,4), (8,8), only the swept cells, MAP_COLUMNS a row, since
    the grid would be mostly empty panels. None pads the last row."""
    ratios, iters = grid_axes(runs)
    cells = sorted(set(zip(runs["batch_ratio"], runs["iterations"])))
    if len(cells) == len(ratios) * len(iters):
        return [[(b, it) for it in iters] for b in ratios]
    n = min(MAP_COLUMNS, len(cells))
    return [(cells[k:k + n] + [None] * n)[:n] for k in range(0, len(cells), n)]


def curve_figure(data: StudyData, metric: str | CurveMetric) -> Figure:
    """Panels (batch ratio x iterations, see panel_layout) of one metric; one Line2D per objective in a panel."""
    spec = metric if isinstance(metric, CurveMetric) else CURVES_BY_KEY.get(metric, CurveMetric(metric, metric, metric))
    layout = panel_layout(data.runs)
    styles = objective_styles(data.runs["objective"])
    bands = curve_bands(data.metric(spec.key))
    # at least MIN_WIDTH_IN wide, so the title and the legend fit a one-panel study (an ablation at one cell)
    width = max(PANEL_IN[0] * len(layout[0]) + 0.5, MIN_WIDTH_IN)
    ncols = _legend_columns(styles, width)
    fig = Figure(figsize=(width, PANEL_IN[1] * len(layout) + 1.0 + 0.25 * math.ceil(len(styles) / ncols)),
                 layout="constrained")
    axes = fig.subplots(len(layout), len(layout[0]), squeeze=False, sharex=True, sharey=True)
    panels = dict(iter(bands.groupby(["batch_ratio", "iterations"])))
    for r, row in enumerate(layout):
        for c, cell in enumerate(row):
            ax: Axes = axes[r, c]
            if cell is None:
                ax.remove()
                continue
            ax.set_title(f"batch ratio {cell[0]}, iterations {cell[1]}", fontsize=9)
            ax.set_yscale(spec.yscale)
            ax.grid(True, alpha=0.3)
            panel = panels.get(cell)
            if panel is None:
                ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.5")
            else:
                for objective in objective_order(panel["objective"]):
                    line = panel[panel["objective"] == objective].sort_values("rollout_batch")
                    st = styles[objective]
                    ax.plot(line["rollout_batch"], line["mean"], label=objective, lw=1.3, markersize=4,
                            markevery=MARKEVERY, **st)
                    ax.fill_between(line["rollout_batch"], line["lo"], line["hi"], color=st["color"], alpha=0.2,
                                    lw=0)  # NaN bounds (one seed) leave no band
            if r == len(layout) - 1 or layout[r + 1][c] is None:  # bottom panel of its column
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("rollout batches")
            if c == 0:
                ax.set_ylabel(spec.label)
    fig.suptitle(f"{spec.label}: {data.study} ({data.scale} scale)\nmean over seeds, {LEVEL:.0%} t-interval",
                 fontsize=10)
    _legend(fig, styles, ncols)
    return fig


def stable_regime_figure(table: pd.DataFrame, study: str, scale: str) -> Figure:
    """Small multiples: per quantity (final val reward, val AUC) one block of panels, one panel per objective
    (up to MAP_COLUMNS a row), each a batch_ratio x iterations heatmap.

    `table` is analysis.tables.cell_table; every cell shows k/n collapsed seeds, hatched when k >= 1. All panels
    of a quantity share its colour scale and colourbar, so colours compare across objectives. Every panel has
    the study's full grid: a cell no objective ran (a ladder sweeps only the diagonal) stays grey and blank, a
    cell only this objective lacks reads "no runs".
    """
    ratios, iters = grid_axes(table)
    objectives = objective_order(table["objective"])
    swept = set(zip(table["batch_ratio"], table["iterations"]))
    ncols = min(MAP_COLUMNS, len(objectives))
    nrows = math.ceil(len(objectives) / ncols)
    panel = (CELL_IN[0] * len(iters) + 0.7, CELL_IN[1] * len(ratios) + 0.7)
    fig = Figure(figsize=(max(panel[0] * ncols + 1.3, MIN_WIDTH_IN),
                          (panel[1] * nrows + 0.2) * len(MAP_QUANTITIES) + 0.9), layout="constrained")
    for block, (col, label) in zip(fig.subfigures(len(MAP_QUANTITIES), 1, squeeze=False)[:, 0], MAP_QUANTITIES):
        span = _colour_span(table[col])
        panels = block.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in panels[len(objectives):]:  # the last row may be short
            ax.remove()
        for k, objective in enumerate(objectives):
            rows = table[table["objective"] == objective].set_index(["batch_ratio", "iterations"])
            cells = {(i, j): rows.loc[(b, it)] for i, b in enumerate(ratios) for j, it in enumerate(iters)
                     if (b, it) in rows.index}
            grid = np.full((len(ratios), len(iters)), np.nan)
            for (i, j), row in cells.items():
                grid[i, j] = row[col]
            ax: Axes = panels[k]
            im = ax.imshow(grid, cmap=MAP_CMAP, vmin=span[0], vmax=span[1], aspect="auto")
            for i, b in enumerate(ratios):
                for j, it in enumerate(iters):
                    if (i, j) in cells or (b, it) in swept:
                        _annotate(ax, i, j, cells.get((i, j)), col, span)
            ax.set_xticks(range(len(iters)), [str(i) for i in iters])
            ax.set_yticks(range(len(ratios)), [str(b) for b in ratios])
            bottom, left = k + ncols >= len(objectives), k % ncols == 0  # the grid is labelled once per row/column
            ax.tick_params(labelbottom=bottom, labelleft=left)
            ax.set_xlabel("iterations" if bottom else "")
            ax.set_ylabel("batch ratio" if left else "")
            ax.set_title(f"{objective}: {label}", fontsize=9)
        block.colorbar(im, ax=list(panels[:len(objectives)]), label=label, shrink=0.8, pad=0.02)
    fig.suptitle(f"Stable regime: {study} ({scale} scale)\nmean over seeds (scored over the full budget); "
                 "k/n seeds collapsed, hatched when k > 0", fontsize=10)
    return fig


def _colour_span(values: pd.Series) -> tuple[float, float]:
    finite = values[np.isfinite(values.to_numpy(dtype=float))]
    if finite.empty:  # no value at all: any range will do, every cell is grey
        return 0.0, 1.0
    vmin, vmax = float(finite.min()), float(finite.max())
    return (vmin, vmax) if vmax > vmin else (vmin - 0.5, vmax + 0.5)  # a flat map needs a non-empty range


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


def _legend_columns(styles: dict[str, dict[str, str]], width_in: float) -> int:
    """As many columns as fit the figure width, then balanced rows (8 entries: 4 + 4, not 7 + 1)."""
    longest = max((len(o) for o in styles), default=1)
    fit = max(1, int(width_in // (0.75 + 0.085 * longest)))  # handle + padding + ~0.085 in a character
    n = max(len(styles), 1)
    return math.ceil(n / math.ceil(n / min(fit, n)))


def _legend(fig: Figure, styles: dict[str, dict[str, str]], ncols: int) -> None:
    """Below the panel grid, outside every axes, so 8-10 entries never cover a curve."""
    handles = [Line2D([], [], label=o, markersize=5, **st) for o, st in styles.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, title="objective", fontsize=9)


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
    """The curve figures this study gets: every metric some run logged (a setting without clipping, KL or
    vLLM still gets the rest)."""
    return [m for m in CURVES if data.runs_with(m.key)]


def verdict_figure(agg: pd.DataFrame, axes: list[str], study: str, scale: str) -> Figure:
    """The verdicts with seeds as the unit (analysis.verdicts): one panel per measure, the primary first, one
    row per comparison (objective [and extra axes] minus baseline), the mean per-seed contrast with its
    t-interval and the equivalence margin shaded. Markers in the objective's style, filled where a difference
    survives its family's correction; alternate rows shaded, so a comparison reads across the panels."""
    measures = list(dict.fromkeys(agg["measure"]))
    labels = list(dict.fromkeys(_comparison_labels(agg, axes)))
    fig = Figure(figsize=(max(MIN_WIDTH_IN, 2.6 * len(measures) + 2.4), max(0.3 * len(labels), 0.6) + 1.6),
                 layout="constrained")
    grid = fig.subplots(1, len(measures), squeeze=False, sharey=True)[0]
    styles = objective_styles(agg["objective"])
    for ax, measure in zip(grid, measures):
        rows = agg[agg["measure"] == measure].assign(label=lambda d: _comparison_labels(d, axes))
        margin = float(rows["margin"].iloc[0])
        ax.axvspan(-margin, margin, color="0.9", lw=0, zorder=0)
        ax.axvline(0.0, color="0.5", lw=0.8, ls="--")
        for y, label in enumerate(labels):
            if y % 2:
                ax.axhspan(y - 0.5, y + 0.5, color="0.96", lw=0, zorder=0)
            hit = rows[rows["label"] == label]
            if hit.empty or pd.isna(hit.iloc[0]["mean"]):
                continue
            row = hit.iloc[0]
            st = styles[row["objective"]]
            claimed = row["verdict"] in ("higher", "lower")
            lo, hi = (row["lo"], row["hi"]) if pd.notna(row["lo"]) else (row["mean"], row["mean"])
            ax.errorbar(row["mean"], y, xerr=[[row["mean"] - lo], [hi - row["mean"]]], fmt=st["marker"],
                        color=st["color"], mfc=st["color"] if claimed else "white", capsize=3, ms=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) > 6 else 10)
        role = rows["role"].iloc[0]
        ax.set_title(f"{MEASURE_LABELS.get(measure, measure)}\n({role})", fontsize=9,
                     fontweight="bold" if role == "primary" else "normal")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, symmetric=True))  # tick labels never run together
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    grid[0].set_ylim(len(labels) - 0.5, -0.5)  # shared y: first comparison on top in every panel
    first = agg.iloc[0]
    fig.suptitle(f"Verdicts: {study} ({scale} scale), seeds as the unit\nper-seed {first['contrast']} of paired "
                 f"differences over cells {first['cells']}; t-interval at 1 - alpha; grey band: ±margin; "
                 "filled: survives Holm", fontsize=9)
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
