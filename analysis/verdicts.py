"""The study's verdicts with the seed as the unit: the declared primary question first, corrected for its family.

Seed s fixes the warm start, the prompt order and the random stream in every cell, so the differences of one
seed across cells are one replicate seen many times, not independent draws. Each seed is therefore reduced to
one number first, its contrast (harness.hypothesis): the mean over the contrast's cells of its paired
differences (objective - baseline), or their least-squares slope in log2(batch_ratio x iterations). A seed
missing a contrast cell in either arm is left out and counted (`dropped_seeds`). Across seeds:

- the t-interval of the mean contrast (the effect and what the data allow), and
- the exact sign-flip test (analysis.stats.sign_flip_test) for the claim: distribution-free, and its floor
  2/2^n says what n seeds can show (3 seeds: p >= 0.25, never a claim at 5%; 10 seeds: p >= 0.002);
- TOST against the declared margin: a null is claimed only as "equivalent within +-margin".

Families, each Holm-corrected (analysis.stats.holm) at the declared alpha:
- headline: every objective (and extra-axis line) against the baseline on the primary measure;
- secondary: the same comparisons on every other compared measure;
- collapse (`collapse_table`): paired collapse counts over the contrast cells, exact McNemar per comparison.
`verdict` is `higher` / `lower` only for a claim that survives its family (analysis.paired.decide).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.paired import decide, with_axis_columns
from analysis.stats import holm, mcnemar_exact, paired, seeds_for_power, sign_flip_test, tost
from analysis.style import objective_order
from harness.contract import on_policy
from harness.hypothesis import COMPARED_MEASURES, Hypothesis

VERDICT_COLUMNS = ["objective", "baseline", "measure", "verdict", "role", "family_size", "contrast", "cells", "seeds",
                   "dropped_seeds", "mean", "lo", "hi", "sd", "p_t", "p_signflip", "p_floor", "p_adj", "p_tost",
                   "p_tost_adj", "margin", "seeds_for_margin", "contrasts"]
COLLAPSE_COLUMNS = ["objective", "baseline", "cells", "pairs", "only_objective", "only_baseline", "both", "p_mcnemar",
                    "p_adj", "verdict"]


def contrast_cells(present: set[tuple[int, int]], hypothesis: Hypothesis) -> list[tuple[int, int]]:
    """The (batch_ratio, iterations) cells of `present` the contrast covers; an AnalysisError for a declared
    cell the study did not run."""
    present = sorted(present)
    if hypothesis.cells == "all":
        return present
    if hypothesis.cells == "off-policy":
        return [c for c in present if not on_policy(*c)]
    missing = [c for c in map(tuple, hypothesis.cells) if c not in present]
    if missing:
        raise AnalysisError(f"hypothesis.cells: {', '.join(map(str, missing))} not in this study; allowed: "
                            f"cells with runs, {', '.join(map(str, present))}")
    return sorted(map(tuple, hypothesis.cells))


def _cells(summaries: pd.DataFrame) -> set[tuple[int, int]]:
    return {(int(b), int(i)) for b, i in zip(summaries["batch_ratio"], summaries["iterations"])}


def _arms(summaries: pd.DataFrame, baseline: str, cells: list[tuple[int, int]], axes: list[str], column: str):
    """(objective, its `column` and the baseline's, indexed by cell, extra axes and seed) over the contrast
    cells, for every objective but the baseline, in objective order."""
    df = with_axis_columns(summaries)
    df = df[[(int(b), int(i)) in cells for b, i in zip(df["batch_ratio"], df["iterations"])]]
    keys = ["batch_ratio", "iterations", *axes, "seed"]
    base = df[df["base_objective"] == baseline].set_index(keys)[column]
    for objective in [o for o in objective_order(summaries["base_objective"]) if o != baseline]:
        yield objective, df[df["base_objective"] == objective].set_index(keys)[column], base


def seed_contrasts(summaries: pd.DataFrame, baseline: str, measure: str, cells: list[tuple[int, int]],
                   contrast: str, axes: list[str]) -> pd.DataFrame:
    """One row per (objective, extra axes, seed) with every contrast cell paired: `value`, the seed's contrast;
    plus `dropped` rows (value NaN) for seeds that miss a cell in either arm."""
    rows = []
    for objective, arm, base in _arms(summaries, baseline, cells, axes, measure):
        diff = (arm - base).dropna().rename("diff").reset_index()
        for key, group in diff.groupby([*axes, "seed"], sort=True):
            key = dict(zip([*axes, "seed"], key if isinstance(key, tuple) else (key,)))
            got = {(int(b), int(i)): d for b, i, d in zip(group["batch_ratio"], group["iterations"], group["diff"])}
            value = _reduce([got[c] for c in cells], cells, contrast) if set(got) >= set(cells) else np.nan
            rows.append({"objective": objective, **key, "value": value})
        seen = {(*(r[a] for a in axes), r["seed"]) for r in rows if r["objective"] == objective}
        for key in arm.reset_index()[[*axes, "seed"]].drop_duplicates().itertuples(index=False):
            if tuple(key) not in seen:  # no paired cell at all
                rows.append({"objective": objective, **dict(zip([*axes, "seed"], key)), "value": np.nan})
    return pd.DataFrame(rows, columns=["objective", *axes, "seed", "value"])


def _reduce(diffs: list[float], cells: list[tuple[int, int]], contrast: str) -> float:
    if contrast == "mean":
        return float(np.mean(diffs))
    x = np.log2([b * i for b, i in cells])
    if len(set(x)) < 2:
        raise AnalysisError("hypothesis.contrast: slope needs cells at two or more reuse levels "
                            "(batch_ratio x iterations); allowed: mean, or cells that differ in reuse")
    return float(np.polyfit(x, diffs, 1)[0])


def seed_test(values: np.ndarray, margin: float, alpha: float) -> dict[str, float]:
    """Across seeds: mean with its (1 - alpha) t-interval, t-test p, sign-flip p and floor, TOST p, and the
    seeds a difference of `margin` would need for 80% power at this spread (design information)."""
    t = paired(values, 1 - alpha)
    p_flip, floor = sign_flip_test(values)
    return {"seeds": t["n"], "mean": t["mean_diff"], "lo": t["lo"], "hi": t["hi"], "sd": t["sd"], "p_t": t["p"],
            "p_signflip": p_flip if len(values) else np.nan, "p_floor": floor, "p_tost": tost(values, margin),
            "seeds_for_margin": seeds_for_power(margin, t["sd"], alpha)}


def verdict_table(summaries: pd.DataFrame, baseline: str, hypothesis: Hypothesis, axes: list[str]) -> pd.DataFrame:
    """aggregate.csv: the headline family (primary measure) first, then the secondary measures; see the module
    docstring. `contrasts` lists the per-seed contrasts (seed:value) a reader can recompute everything from."""
    cells = contrast_cells(_cells(summaries), hypothesis)
    columns = VERDICT_COLUMNS[:4] + axes + VERDICT_COLUMNS[4:]
    if not cells:  # e.g. only the on-policy cell: nothing to contrast
        return pd.DataFrame(columns=columns)
    measures = [hypothesis.measure, *(m for m in COMPARED_MEASURES if m != hypothesis.measure)]
    frames = []
    for measure in measures:
        per_seed = seed_contrasts(summaries, baseline, measure, cells, hypothesis.contrast, axes)
        rows = []
        for key, group in per_seed.groupby(["objective", *axes], sort=False):
            key = dict(zip(["objective", *axes], key if isinstance(key, tuple) else (key,)))
            ok = group.dropna(subset=["value"])
            values = ok["value"].to_numpy(dtype=float)
            rows.append({**key, "baseline": baseline, "measure": measure,
                         "role": "primary" if measure == hypothesis.measure else "secondary",
                         "contrast": hypothesis.contrast, "cells": " ".join(f"{b}x{i}" for b, i in cells),
                         "dropped_seeds": int(group["value"].isna().sum()), "margin": hypothesis.margin,
                         **seed_test(values, hypothesis.margin, hypothesis.alpha),
                         "contrasts": " ".join(f"{s}:{v:.6g}" for s, v in zip(ok["seed"], values)),
                         "all_zero": len(values) > 0 and not np.any(values)})
        frames.append(pd.DataFrame(rows))
    primary = frames[0]
    secondary = pd.concat(frames[1:], ignore_index=True) if len(frames) > 1 else primary.iloc[0:0]
    for family in (primary, secondary):
        if family.empty:
            continue
        family["p_adj"] = holm(family["p_signflip"])
        family["p_tost_adj"] = holm(family["p_tost"])
        family["family_size"] = int(family["p_signflip"].notna().sum())
        family["verdict"] = [decide(int(r.seeds), r.mean, r.all_zero, r.p_adj, r.p_tost_adj, hypothesis.alpha)
                             for r in family.itertuples(index=False)]
    return pd.concat([primary, secondary], ignore_index=True).reindex(columns=columns)


def collapse_table(summaries: pd.DataFrame, baseline: str, hypothesis: Hypothesis, axes: list[str]) -> pd.DataFrame:
    """Paired collapse counts over the contrast cells per comparison, exact McNemar, Holm over the comparisons.

    The (cell, seed) pairs of different cells share their seed, so this p is optimistic; it is a secondary
    family, and `more collapses` / `fewer collapses` are claimed only past its correction. Needs a
    `collapsed` column in summaries (analysis.collapse)."""
    cells = contrast_cells(_cells(summaries), hypothesis)
    rows = []
    for objective, arm, base in _arms(summaries, baseline, cells, axes, "collapsed"):
        joined = pd.concat({"x": arm, "y": base}, axis=1, join="inner").reset_index()
        for key, g in joined.groupby(axes, sort=True) if axes else [((), joined)]:
            key = dict(zip(axes, key if isinstance(key, tuple) else (key,)))
            x, y = g["x"].astype(bool), g["y"].astype(bool)
            only_x, only_y = int((x & ~y).sum()), int((~x & y).sum())
            rows.append({"objective": objective, "baseline": baseline, **key,
                         "cells": " ".join(f"{b}x{i}" for b, i in cells), "pairs": len(g),
                         "only_objective": only_x, "only_baseline": only_y, "both": int((x & y).sum()),
                         "p_mcnemar": mcnemar_exact(only_x, only_y)})
    out = pd.DataFrame(rows, columns=COLLAPSE_COLUMNS[:2] + axes + COLLAPSE_COLUMNS[2:-2])
    out["p_adj"] = holm(out["p_mcnemar"]) if len(out) else []
    out["verdict"] = [("more collapses" if r.only_objective > r.only_baseline else "fewer collapses")
                      if r.p_adj < hypothesis.alpha else "not shown" for r in out.itertuples(index=False)]
    return out
