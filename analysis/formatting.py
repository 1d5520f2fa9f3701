"""The tables as people read them: formatted frames, Markdown and LaTeX (booktabs), and the files they go to.

- val_reward: validation scores per cell and line, mean [95% t-interval] over seeds;
- stability: collapse k/n with its exact interval, falls below start, ratio statistics, steps per batch;
- aggregate: the verdicts with seeds as the unit, headline family first (analysis.verdicts);
- collapse: paired collapse counts over the contrast cells, exact McNemar (analysis.verdicts);
- paired: each objective minus the baseline, per cell and measure, Holm-adjusted (analysis.paired).
Numbers for scripts: cells.csv, paired.csv, aggregate.csv, collapse.csv, runs.csv (all columns, unformatted).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.paired import CLAIMS, MEASURE_LABELS
from analysis.tables import csv_frame


def num(x: float, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def interval(mean: float, lo: float, hi: float, fmt: str = ".3f", sign: str = "") -> str:
    if mean is None or np.isnan(mean):
        return "n/a"
    if np.isnan(lo):  # one seed: no interval
        return format(mean, sign + fmt)
    return f"{mean:{sign}{fmt}} [{lo:{sign}{fmt}}, {hi:{sign}{fmt}}]"


def _rbs(xs: list[float]) -> str:
    return ", ".join(f"{x:g}" for x in xs)


def _grid_columns(t: pd.DataFrame) -> pd.DataFrame:
    seeds = [f"{s}" + (f" ({e} excluded)" if e else "") for s, e in zip(t["seeds"], t["excluded_n"])]
    return pd.DataFrame({"batch ratio": t["batch_ratio"], "iterations": t["iterations"],
                         "objective": t["objective"], "seeds": seeds})


def val_table(t: pd.DataFrame) -> pd.DataFrame:
    """Validation scores, mean [95% t-interval] over seeds; fell below start as k/n with the rollout batches."""
    out = _grid_columns(t)
    for col, name in [("final_val", "final val"), ("lastk_val", "last 3 evals"), ("auc_val", "AUC val"),
                      ("gain_val", "gain over start"), ("peak_val", "peak (after start)")]:
        out[name] = [interval(r[f"{col}_mean"], r[f"{col}_lo"], r[f"{col}_hi"], sign="+" if col == "gain_val"
                              else "") for _, r in t.iterrows()]
    out["fell below start"] = [f"{r['fell_n']}/{r['seeds']}" + (f" at rb {_rbs(r['fell_rbs'])}" if r["fell_n"]
                                                                else "") for _, r in t.iterrows()]
    out["rb at/above start"] = [f"{r['above_start_rmean']:.1f} of {r['budget']:.0f}" if pd.notna(r["budget"])
                                else num(r["above_start_rmean"], ".1f") for _, r in t.iterrows()]
    return out


def stability_table(t: pd.DataFrame) -> pd.DataFrame:
    """Collapse counts with exact intervals and the stability diagnostics (means over seeds)."""
    out = _grid_columns(t)
    out["collapsed"] = [f"{r['collapsed_n']}/{r['seeds']} [{r['collapse_lo']:.2f}, {r['collapse_hi']:.2f}]"
                        + (f" at rb {_rbs(r['collapse_rbs'])}" if r["collapse_rbs"] else "")
                        + (f"; {r['censored_n']} censored" if r["censored_n"] else "")
                        for _, r in t.iterrows()]
    out["mean rollout KL"] = [num(x, ".3g") for x in t["mean_rollout_kl"]]
    out["peak rollout KL"] = [num(x, ".3g") for x in t["peak_rollout_kl"]]
    out["clip ratio"] = [num(x, ".4f") for x in t["mean_clip_ratio"]]
    out["mean |r-1|"] = [num(x, ".4f") for x in t["mean_ratio_abs_dev"]]
    out["grad clipped"] = [num(x, ".1%") for x in t["grad_clipped_frac"]]
    out["steps/batch (min-max/cfg)"] = [
        f"{num(lo, '.0f')}-{num(hi, '.0f')}/{c:.0f}" + (" (runs flagged!)" if flag else "")
        for lo, hi, c, flag in zip(t["steps_min"], t["steps_max"], t["steps_configured"], t["steps_flag"])]
    return out


def verdict_text(verdict: str, objective: str, lo: float, hi: float, margin: float, both_collapsed: bool = False,
                 floor: float = 0.0, alpha: float = 0.05, seeds: int = 0) -> str:
    """A verdict in words: claims as claims, nulls by their interval or the equivalence margin."""
    if verdict in CLAIMS:
        if both_collapsed:
            return f"both collapse; {objective} degrades {'less' if verdict == 'higher' else 'more'}"
        return f"{objective} {verdict}"
    if verdict == "equivalent":
        return f"equivalent within ±{margin:g}"
    if verdict == "inconclusive":
        limit = f"; {seeds} seeds cannot reach p < {alpha:g}" if floor >= alpha else ""
        return f"not shown, not equivalent: CI [{lo:+.3f}, {hi:+.3f}]{limit}"
    return verdict


def _comparison(frame: pd.DataFrame) -> pd.Series:
    return frame["objective"].astype(str) + " - " + frame["baseline"].astype(str)


def _p(p: float, adj: float, size: float) -> str:
    return "n/a" if pd.isna(p) else f"{p:.3g} → {adj:.3g} (of {size:.0f})"


def aggregate_display(a: pd.DataFrame, axes: list[str], alpha: float = 0.05) -> pd.DataFrame:
    """The verdicts, seeds as the unit: effect, sign-flip p and its Holm adjustment, TOST, verdict in words."""
    return pd.DataFrame({
        "comparison": _comparison(a), **{x: a[x] for x in axes},
        "measure": a["measure"].map(MEASURE_LABELS), "role": a["role"],
        "seeds": [f"{n}" + (f" ({d} dropped)" if d else "") for n, d in zip(a["seeds"], a["dropped_seeds"])],
        f"{a['contrast'].iloc[0] if len(a) else 'mean'} diff [CI]": [
            interval(m, lo, hi, ".3f", "+") for m, lo, hi in zip(a["mean"], a["lo"], a["hi"])],
        "sign-flip p → Holm": [_p(p, q, k) for p, q, k in zip(a["p_signflip"], a["p_adj"], a["family_size"])],
        "TOST p (Holm)": [num(q, ".3g") for q in a["p_tost_adj"]],
        "verdict": [verdict_text(r.verdict, r.objective, r.lo, r.hi, r.margin, floor=r.p_floor, alpha=alpha,
                                 seeds=r.seeds) for r in a.itertuples(index=False)],
        "seeds for ±margin (80%)": [num(x, ".0f") for x in a["seeds_for_margin"]],
    })


def paired_display(p: pd.DataFrame, axes: list[str], margin: float = 0.02, alpha: float = 0.05) -> pd.DataFrame:
    """One row per (cell, objective, measure): the paired difference, its interval, its Holm-adjusted p within
    the measure's per-cell family, and the verdict in words; MDE as design information."""
    out = pd.DataFrame({"batch ratio": p["batch_ratio"], "iterations": p["iterations"], **{a: p[a] for a in axes},
                        "comparison": _comparison(p),
                        "measure": p["measure"].map(MEASURE_LABELS)})
    out["pairs"] = [f"{n}" + (f" ({u} unpaired)" if u else "") for n, u in zip(p["n"], p["unpaired"])]
    out["mean diff [CI]"] = [interval(m, lo, hi, ".3f", "+") for m, lo, hi in zip(p["mean_diff"], p["lo"], p["hi"])]
    out["sign-flip p → Holm"] = [_p(a, q, k) for a, q, k in zip(p["p_signflip"], p["p_adj"], p["family_size"])]
    out["verdict"] = [verdict_text(r.verdict, r.objective, r.lo, r.hi, margin, r.both_collapsed, r.p_floor, alpha,
                                   int(r.n)) for r in p.itertuples(index=False)]
    out["MDE (design, 80%)"] = [num(x, ".3f") for x in p["mde"]]
    return out


def collapse_display(c: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "comparison": _comparison(c), **{x: c[x] for x in axes}, "cells": c["cells"],
        "pairs (cell x seed)": c["pairs"], "only objective collapsed": c["only_objective"],
        "only baseline collapsed": c["only_baseline"], "both": c["both"],
        "McNemar p → Holm": [_p(p, q, len(c)) for p, q in zip(c["p_mcnemar"], c["p_adj"])], "verdict": c["verdict"]})


def markdown(df: pd.DataFrame) -> str:
    """GitHub table of a frame of strings (pandas' to_markdown needs tabulate and does not escape `|`)."""
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """booktabs tabular (\\toprule/\\midrule/\\bottomrule) with LaTeX-escaped cells and headers."""
    styler = df.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    numeric = sum(1 for c in df.columns[:2] if c in ("batch ratio", "iterations"))
    return styler.to_latex(hrules=True, caption=caption, label=label, position="htbp",
                           column_format="r" * numeric + "l" * (df.shape[1] - numeric), position_float="centering")


def _tex(text: str) -> str:
    """Escape the characters a study name may plausibly contain (captions are not escaped by the Styler)."""
    for ch in "\\&%$#_{}":
        text = text.replace(ch, "\\" + ch)
    return text


CAPTIONS = {
    "val_reward": "validation reward per cell and objective, mean [95\\% t-interval] over seeds, scored over the "
                  "full budget (a diverged run counts 0 from its divergence on); fell below start: seeds whose "
                  "reward fell more than 2 binomial SE below the start on two consecutive evaluations",
    "stability": "stability per cell and objective: collapsed seeds k/n [Clopper-Pearson 95\\%] and the rollout "
                 "batch (rb) of each collapse (censored: fell at the last evaluation only, not counted); ratio "
                 "statistics averaged over rollout batches where the ratio was measured",
    "paired": "paired per-seed differences per cell, objective minus baseline: mean [t-interval], exact "
              "sign-flip p and its Holm adjustment over every cell and comparison of the measure; MDE: design "
              "information, not a result",
    "aggregate": "verdicts with seeds as the unit: each seed's contrast over the declared cells, t-interval "
                 "across seeds, exact sign-flip p Holm-adjusted within its family (primary; secondary), TOST "
                 "against the declared margin",
    "collapse": "paired collapse counts over the contrast cells (cell x seed pairs, which share seeds across "
                "cells: the p is optimistic), exact McNemar, Holm over the comparisons",
}


def write_tables(t: pd.DataFrame, paired_rows: pd.DataFrame, agg: pd.DataFrame, collapse: pd.DataFrame,
                 runs: pd.DataFrame, axes: list[str], folder: str | Path, study: str, scale: str,
                 margin: float = 0.02, alpha: float = 0.05, stamp: str | None = None) -> dict[str, Path]:
    """tables/{aggregate,collapse,paired,val_reward,stability}.{md,tex} and cells.csv, paired.csv,
    aggregate.csv, collapse.csv, runs.csv. stamp (e.g. provisional: code not committed) heads every md and tex
    table and fills a last `stamp` column of every csv."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    frames = {"aggregate": aggregate_display(agg, axes, alpha), "collapse": collapse_display(collapse, axes),
              "paired": paired_display(paired_rows, axes, margin, alpha), "val_reward": val_table(t),
              "stability": stability_table(t)}
    for name, frame in frames.items():
        caption = f"{_tex(study)} ({_tex(scale)}): {CAPTIONS[name]}."
        md, tex = markdown(frame), latex(frame, caption, f"tab:{study}-{scale}-{name}")
        if stamp:
            md, tex = f"**{stamp}**\n\n{md}", f"% {stamp}\n{tex}"
        for ext, text in (("md", md), ("tex", tex)):
            written[f"{name}.{ext}"] = folder / f"{name}.{ext}"
            written[f"{name}.{ext}"].write_text(text)
    csvs = {"cells.csv": csv_frame(t),
            "paired.csv": paired_rows.assign(diffs=paired_rows["diffs"].map(lambda d: " ".join(f"{x:.6g}" for x in d)),
                                             seeds=paired_rows["seeds"].map(lambda s: " ".join(map(str, s)))),
            "aggregate.csv": agg, "collapse.csv": collapse, "runs.csv": runs}
    for name, frame in csvs.items():
        (frame.assign(stamp=stamp) if stamp else frame).to_csv(folder / name, index=False, float_format="%.6g")
        written[name] = folder / name
    return written
