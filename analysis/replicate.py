"""Does a rerun reproduce a published study? Compared at the level that should agree, not bit for bit.

On the same machine type and pins a rerun is bit-identical; on another machine type the same seed draws other
numbers (the warm start already differs), like a new draw of seeds. So a replication is judged by its
conclusions:
- the primary verdict (analysis.verdicts) must be the same word;
- each objective's seed-level effect: the difference between the rerun's and the published mean contrast, with
  a Welch t-interval over the two sets of per-seed contrasts (independent draws), must include 0;
- collapse counts over the contrast cells, per objective: Fisher's exact test of k/n against k'/n' must not
  reject at alpha.
`python -m analysis replicate STUDY --scale S --against DIR` prints one line per check and exits 0 when every
conclusion reproduces, 1 otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.collapse import detect_collapse
from analysis.errors import AnalysisError
from analysis.load import load_study
from analysis.paired import axis_names, check_baseline
from analysis.question import declared
from analysis.style import objective_order
from analysis.summary import run_summaries
from analysis.verdicts import VERDICT_COLUMNS, contrast_cells, verdict_table
from harness.hypothesis import Hypothesis


@dataclasses.dataclass(frozen=True)
class Check:
    what: str  # e.g. "cfpo - grpo, auc_val: verdict"
    rerun: str
    published: str
    reproduces: bool


def study_scores(study: str, scale: str, *, tracking_uri: str, cache_dir: str | Path, offline: bool | None,
                 hypothesis: Hypothesis) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(verdict table, per-run summaries with `collapsed`, baseline) of one copy of the study."""
    data = load_study(study, scale, tracking_uri=tracking_uri, cache_dir=cache_dir, offline=offline)
    summaries = run_summaries(data.long, data.runs).merge(
        detect_collapse(data.long, data.runs)[["run_id", "collapsed"]], on="run_id")
    objectives = objective_order(summaries["base_objective"])
    if len(objectives) < 2:
        raise AnalysisError(f"{study}/{scale}: one objective ({objectives[0]}); nothing to replicate")
    baseline = check_baseline(objectives, hypothesis.baseline)
    return verdict_table(summaries, baseline, hypothesis, axis_names(summaries)), summaries, baseline


def welch(a: np.ndarray, b: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """mean(a) - mean(b) with its Welch t-interval at 1 - alpha; (d, nan, nan) below 2 values a side."""
    d = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return d, math.nan, math.nan
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(1 - alpha)
    return d, float(ci.low), float(ci.high)


def _contrasts(text: str) -> np.ndarray:
    return np.array([float(item.split(":")[1]) for item in str(text).split()], dtype=float)


def compare(rerun: pd.DataFrame, published: pd.DataFrame, rerun_runs: pd.DataFrame, published_runs: pd.DataFrame,
            hypothesis: Hypothesis) -> list[Check]:
    """The checks of the module docstring, primary measure first."""
    key = ["objective", "measure", *(c for c in rerun.columns if c not in VERDICT_COLUMNS)]  # + extra axes
    pub = {tuple(r[c] for c in key): r for r in published.to_dict("records")}
    checks = []
    for r in rerun.to_dict("records"):
        name = f"{r['objective']} - {r['baseline']}, {r['measure']} ({r['role']})"
        p = pub.get(tuple(r[c] for c in key))
        if p is None:
            checks.append(Check(f"{name}: not in the published study", r["verdict"], "absent", False))
            continue
        checks.append(Check(f"{name}: verdict", r["verdict"], p["verdict"], r["verdict"] == p["verdict"]))
        d, lo, hi = welch(_contrasts(r["contrasts"]), _contrasts(p["contrasts"]), hypothesis.alpha)
        shown = "" if math.isnan(lo) else f" (difference {d:+.4f} [{lo:+.4f}, {hi:+.4f}])"
        checks.append(Check(f"{name}: effect{shown}", f"{r['mean']:+.4f}", f"{p['mean']:+.4f}",
                            not (lo > 0 or hi < 0)))  # an interval that cannot be computed decides nothing
    cells = contrast_cells({(int(b), int(i)) for b, i in zip(rerun_runs["batch_ratio"], rerun_runs["iterations"])},
                           hypothesis)
    for objective in objective_order(set(rerun_runs["objective"]) | set(published_runs["objective"])):
        (k1, n1), (k2, n2) = (_collapses(runs, objective, cells) for runs in (rerun_runs, published_runs))
        p = stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue if n1 and n2 else math.nan
        checks.append(Check(f"{objective}: collapsed in the contrast cells (Fisher p {p:.3g})", f"{k1}/{n1}",
                            f"{k2}/{n2}", bool(n1 and n2) and p >= hypothesis.alpha))
    return checks


def _collapses(runs: pd.DataFrame, objective: str, cells: list[tuple[int, int]]) -> tuple[int, int]:
    mine = runs[(runs["objective"] == objective).to_numpy()
                & np.array([(int(b), int(i)) in cells for b, i in zip(runs["batch_ratio"], runs["iterations"])], bool)]
    return int(mine["collapsed"].sum()), len(mine)


def replicate(study: str, scale: str, against: str | Path, *, results_dir: str | Path, tracking_uri: str,
              spec: str | Path | None = None) -> list[Check]:
    """Compare the study under results_dir (MLflow, else its runs/) with the published copy in `against`
    (a results/<study>/<scale> folder with runs/)."""
    hypothesis = declared(study, spec, scale).hypothesis
    runs_dir = Path(against) / "runs"
    if not runs_dir.is_dir():
        raise AnalysisError(f"--against {against}: no runs/ folder; allowed: a published study folder "
                            "(results/<study>/<scale>) with its runs")
    mine = study_scores(study, scale, tracking_uri=tracking_uri, offline=None, hypothesis=hypothesis,
                        cache_dir=Path(results_dir) / study / scale / "runs")
    theirs = study_scores(study, scale, tracking_uri="", offline=True, hypothesis=hypothesis, cache_dir=runs_dir)
    if mine[2] != theirs[2]:
        raise AnalysisError(f"baselines differ: {mine[2]} here, {theirs[2]} in {against}")
    return compare(mine[0], theirs[0], mine[1], theirs[1], hypothesis)
