"""results/<study>/<scale>/README.md: what was compared and how, the verdict, figures, tables, run ids.

Every sentence of the summary is computed from the data: the on-policy control, the code versions behind the
runs, the aggregate verdict (IQM and probability of improvement over the off-policy cells), the per-cell paired
differences with the smallest difference each null could have detected, and the collapses with exact intervals.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from analysis.collapse import CollapseRules
from analysis.figures import HEADLINE, VERDICT
from analysis.formatting import interval, markdown
from analysis.load import StudyData
from analysis.metrics import CURVES
from analysis.paired import ALPHA, MEASURE_LABELS, NEGATIVE_CONTROLS, Control
from analysis.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, LEVEL, POWER
from analysis.style import objective_order
from analysis.summary import LAST_K, SE_MARGIN


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _cell(b: int, it: int) -> str:
    return f"batch ratio {b} × iterations {it}"


def _axes_text(row: pd.Series, axes: list[str]) -> str:
    return "".join(f", {a}={row[a]}" for a in axes if row.get(a, "") != "")


def method_lines(summaries: pd.DataFrame, baseline: str | None, measures: list[str]) -> list[str]:
    seeds = summaries.groupby(["batch_ratio", "iterations", "objective"])["seed"].nunique()
    lo, hi = (int(seeds.min()), int(seeds.max())) if len(seeds) else (0, 0)
    others = [o for o in objective_order(summaries["base_objective"]) if o != baseline]
    lines = [f"- Compared: {', '.join(others) or 'nothing'} against the baseline **{baseline}**, in every "
             f"(batch ratio × iterations) cell, on {lo if lo == hi else f'{lo}-{hi}'} seeds per cell and objective."
             if baseline else "- One objective: no comparison between objectives.",
             "- Pairing: seed s of every objective shares the warm-started model, the prompt order and the first "
             "rollout, so each comparison is the per-seed difference (objective − baseline); a seed present in "
             "one arm only is left out and counted.",
             f"- Per cell: mean difference with a {LEVEL:.0%} t-interval on n − 1 degrees of freedom, effect size "
             f"d_z = mean / sd, and the minimum detectable difference (MDE: {POWER:.0%} power, two-sided "
             f"{1 - LEVEL:.0%}, from the observed sd of the differences). A difference is claimed only when the "
             "interval excludes 0; otherwise the cell reads \"no difference larger than the MDE\". Per-cell tests "
             "are not adjusted for their number: the aggregate is the verdict to quote.",
             f"- Aggregate over the off-policy cells (batch ratio × iterations > 1) as strata: interquartile mean "
             f"(IQM) of the paired differences and the probability of improvement P(objective > baseline) (paired "
             f"seeds, ties 1/2, averaged over cells), each with a stratified-bootstrap {LEVEL:.0%} percentile "
             f"interval ({BOOTSTRAP_RESAMPLES} resamples of seeds within cells, seed {BOOTSTRAP_SEED}, "
             "scipy.stats.bootstrap). The percentile bootstrap only reshuffles the seeds it has and runs narrow "
             "with few seeds, so an aggregate difference is claimed only when both intervals exclude "
             "no-difference and the exact sign-flip (paired randomization) test of the mean of the pooled pairs "
             "gives p < 0.05; with n pairs its smallest attainable p is 2/2^n (all pairs of one sign), so 6 pairs "
             "are the least that can show anything.",
             f"- Measures: {', '.join(MEASURE_LABELS[m] for m in measures)}. Scoring covers the full budget: a "
             "diverged run counts 0 from its divergence on (its curve falls linearly from its last evaluation to "
             f"0 at the divergence); \"last 3 evals\" is the mean of the last {LAST_K} scheduled evaluations; the "
             "peak excludes the step-0 evaluation.",
             f"- \"Fell below start\": more than {SE_MARGIN:g} binomial standard errors of the start value below it "
             "on two consecutive evaluations; a run that never fell is censored at the budget, not left out.",
             "- Collapse counts are k/n seeds with Clopper-Pearson (exact) 95% intervals."]
    return lines


def control_lines(ctl: Control) -> list[str]:
    if ctl.status == "FAILED":
        return [f"**CONTROL FAILED**: {ctl.detail}"]
    return [f"On-policy control {ctl.status}: {ctl.detail}"]


def negative_control_lines(agg: pd.DataFrame, table: pd.DataFrame, baseline: str | None) -> list[str]:
    """Is an objective without any trust region worse than the baseline here? If not, the setting does not test
    trust regions, whatever the other comparisons say."""
    lines = []
    off = table[table["batch_ratio"] * table["iterations"] > 1]
    for name in NEGATIVE_CONTROLS:
        rows = agg[agg["objective"] == name] if len(agg) else agg
        if not baseline or rows.empty:
            continue
        worse = rows[rows["verdict"] == "lower"]
        collapsed = {o: (int(off.loc[off["objective"] == o, "collapsed_n"].sum()), int(off.loc[
            off["objective"] == o, "seeds"].sum())) for o in (name, baseline)}
        counts = (f"off-policy runs collapsed: {name} {collapsed[name][0]}/{collapsed[name][1]}, {baseline} "
                  f"{collapsed[baseline][0]}/{collapsed[baseline][1]}")
        if len(worse):
            measures = ", ".join(MEASURE_LABELS[m] for m in worse["measure"])
            lines.append(f"Negative control met: {name} (no trust region) is detectably worse than {baseline} in "
                         f"the aggregate ({measures}); {counts}. The setting exercises the question.")
        else:
            lines.append(f"**Negative control not met**: {name}, with no trust region at all, is not detectably "
                         f"worse than {baseline} in the aggregate on any measure; {counts}. This setting does not "
                         "exercise the question: where dropping the trust region costs nothing detectable, "
                         "differences between trust regions cannot show, so no sentence about which one is more "
                         "stable follows from this study.")
    return lines


def version_lines(versions: dict[str, int]) -> list[str]:
    if len(versions) == 1 and "dirty" not in next(iter(versions)) and "unknown" not in next(iter(versions)):
        return [f"Code: every run from commit `{next(iter(versions))}`."]
    listing = "; ".join(f"`{k}`: {_n(v, 'run')}" for k, v in versions.items())
    return [f"**Code versions differ or are not clean**: {listing}. Runs of one line may come from different code."]


def aggregate_lines(agg: pd.DataFrame, axes: list[str]) -> list[str]:
    if agg.empty:
        return ["- No off-policy cell has paired seeds: no aggregate verdict."]
    lines = []
    for _, r in agg.iterrows():
        m, lo, hi = r["iqm"], r["iqm_lo"], r["iqm_hi"]
        if r["verdict"] in ("higher", "lower"):
            verdict = f"**{r['objective']} {r['verdict']}** (sign-flip p = {r['p_signflip']:.3g})"
        elif r["p_floor"] >= ALPHA:
            verdict = (f"no detectable difference: {int(r['pairs'])} pairs cannot reach p < {ALPHA:g} in the exact "
                       f"sign-flip test (smallest attainable p = {r['p_floor']:.3g}), whatever the intervals say")
        else:
            verdict = f"no detectable difference (sign-flip p = {r['p_signflip']:.3g})"
        lines.append(f"- {r['objective']} − {r['baseline']}{_axes_text(r, axes)}, {MEASURE_LABELS[r['measure']]} "
                     f"({_n(int(r['strata']), 'cell')}, {int(r['pairs'])} pairs): IQM {interval(m, lo, hi, sign='+')}, "
                     f"P(improvement) {interval(r['p_improve'], r['p_improve_lo'], r['p_improve_hi'], '.2f')}: "
                     f"{verdict}.")
    return lines


def cell_lines(paired_rows: pd.DataFrame, axes: list[str], measures: list[str]) -> list[str]:
    """Per (objective, measure): every cell's paired difference, its effect size and what a null could see."""
    lines = []
    for (objective, measure), rows in paired_rows.groupby(["objective", "measure"], sort=False):
        if measure not in measures:
            continue
        parts = []
        for _, r in rows.iterrows():
            where = f"{_cell(r.batch_ratio, r.iterations)}{_axes_text(r, axes)}"
            if r.verdict == "identical":
                parts.append(f"{where}: identical (all {r.n} differences exactly 0)")
            elif r.verdict == "too few seeds":
                parts.append(f"{where}: {r.n} pair(s), no claim")
            else:
                claim = (f"**{objective} {r.verdict}**" if r.verdict in ("higher", "lower")
                         else f"no difference larger than {r.mde:.3f}")
                parts.append(f"{where}: {claim}, {interval(r.mean_diff, r.lo, r.hi, sign='+')} "
                             f"(d_z {r.effect:+.2f}, n {r.n}, MDE {r.mde:.3f})")
        lines.append(f"- {objective} − {rows['baseline'].iloc[0]}, {MEASURE_LABELS[measure]}: " + "; ".join(parts) + ".")
    return lines


def collapse_lines(table: pd.DataFrame) -> list[str]:
    lines = []
    for objective in objective_order(table["objective"]):
        rows = table[table["objective"] == objective]
        hit = rows[rows["collapsed_n"] > 0]
        if hit.empty:
            lines.append(f"- **{objective}**: 0 collapsed seeds in all {_n(len(rows), 'cell')} "
                         f"({int(rows['seeds'].sum())} runs).")
            continue
        parts = [f"{_cell(r.batch_ratio, r.iterations)} {r.collapsed_n}/{r.seeds} "
                 f"[{r.collapse_lo:.2f}, {r.collapse_hi:.2f}] at rollout batch {', '.join(f'{x:g}' for x in r.collapse_rbs)}"
                 for r in hit.itertuples(index=False)]
        lines.append(f"- **{objective}** collapsed in {len(hit)} of {_n(len(rows), 'cell')}: " + "; ".join(parts) + ".")
    return lines


def _public_uri(uri: str) -> str:
    """The tracking URI without user:password@, which must not land in a committed page."""
    parts = urlsplit(uri)
    if parts.netloc and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())  # one line: a table cell
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _info_table(runs: pd.DataFrame, extra: dict[str, pd.Series] | None = None) -> str:
    df = pd.DataFrame({"batch ratio": runs["batch_ratio"], "iterations": runs["iterations"],
                       "objective": runs["objective"], "seed": runs["seed"], "attempt": runs["attempt"],
                       "status": runs["status"], **(extra or {}), "MLflow run id": runs["run_id"].map(
                           lambda r: f"`{r}`")})
    return markdown(df.sort_values(["batch ratio", "iterations", "objective", "seed"]))


def write_report(data: StudyData, verdicts: pd.DataFrame, table: pd.DataFrame, analysis: dict,
                 figures: dict[str, list[Path]], tables: dict[str, Path], path: str | Path, rules: CollapseRules,
                 command: str) -> Path:
    """analysis: baseline, measures, axes, paired, aggregate, control, versions, summaries (see pipeline)."""
    path = Path(path)
    rel = lambda p: Path(p).relative_to(path.parent).as_posix()  # noqa: E731 - links relative to the README
    a = analysis
    n_cells = table[["batch_ratio", "iterations"]].drop_duplicates().shape[0]
    diverged = int((data.runs["status"] == "diverged").sum())
    md = [f"# {data.study}: {data.scale} scale", "",
          f"Generated by `{command}` from MLflow experiment `{data.experiment}` ({_public_uri(data.source)}): "
          f"{len(data.runs)} runs over {n_cells} (batch ratio × iterations) cells and "
          f"{table['objective'].nunique()} lines; {_n(len(data.excluded), 'cell')} excluded (no complete or "
          "diverged attempt). Do not edit by hand: rerun the command.", "",
          "## What was compared, and how", "", *method_lines(a["summaries"], a["baseline"], a["measures"]), "",
          "## Summary", "", *control_lines(a["control"]), "", *version_lines(a["versions"]), ""]
    negative = negative_control_lines(a["aggregate"], table, a["baseline"])
    if negative:
        md += [*negative, ""]
    if diverged:
        md += [f"{_n(diverged, 'run')} diverged; scored 0 from the divergence on.", ""]
    if a["baseline"]:
        md += ["Aggregate verdict (the headline):", "", *aggregate_lines(a["aggregate"], a["axes"]), "",
               "Per cell (paired differences):", "", *cell_lines(a["paired"], a["axes"], a["measures"]), ""]
    md += ["Collapse (rules below), k/n seeds [Clopper-Pearson 95%]:", "", *collapse_lines(table), "",
           "## Stable regime", "", f"![stable regime]({rel(figures[HEADLINE][0])})", "",
           "Final validation reward and its time average (AUC / budget), mean over seeds, scored over the full "
           f"budget; every cell shows k/n seeds collapsed, hatched when k > 0. [PDF]({rel(figures[HEADLINE][1])})", ""]
    if VERDICT in figures:
        md += ["## Aggregate verdict", "", f"![verdict]({rel(figures[VERDICT][0])})", "",
               f"[PDF]({rel(figures[VERDICT][1])})", ""]
    md += ["## Tables", ""]
    for name, title in [("aggregate", "Aggregate over off-policy cells"), ("paired", "Paired differences per cell"),
                        ("val_reward", "Validation reward"), ("stability", "Stability")]:
        md += [f"### {title}", "", tables[f"{name}.md"].read_text(), f"LaTeX: [{name}.tex]({rel(tables[name + '.tex'])})", ""]
    md += [f"All numbers: [cells.csv]({rel(tables['cells.csv'])}), [paired.csv]({rel(tables['paired.csv'])}), "
           f"[aggregate.csv]({rel(tables['aggregate.csv'])}).", "", "## Training curves", "",
           "Rows: batch ratio; columns: iterations; x: rollout batches; line: mean over seeds; band: "
           f"{LEVEL:.0%} t-interval (none with one seed). Curves show what was logged (a diverged run's line stops).", ""]
    for spec in CURVES:
        if spec.slug in figures:
            png, pdf = figures[spec.slug]
            md += [f"### {spec.label}", "", f"![{spec.label}]({rel(png)})", "", f"[PDF]({rel(pdf)})", ""]
    md += ["## Collapse rules", "", "A run is collapsed when any rule fires; its collapse point is the earliest.", ""]
    md += [f"- `{name}` = {getattr(rules, name)}: {field.description}" for name, field in CollapseRules.model_fields.items()]
    md += ["", "## Excluded cells (failed, killed or running: not in any number)", ""]
    md += [_info_table(data.excluded, {"MLflow status": data.excluded["mlflow_status"],
                                       "note": data.excluded["note"].map(_short)}) if len(data.excluded) else "None.", ""]
    collapsed = verdicts.set_index("run_id")["collapsed"]
    md += ["## Runs behind every number", "",
           "Each table row and figure line averages the runs of its (batch ratio, iterations, objective); only the "
           "latest complete or diverged attempt of a cell counts.", "",
           _info_table(data.runs, {"collapsed": data.runs["run_id"].map(collapsed).map({True: "yes", False: "no"}),
                                   "note": data.runs["note"].map(_short)})]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md))
    return path
