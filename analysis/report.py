"""results/<study>/<scale>/README.md, in the order a reviewer reads it: the declared question and its verdict
(seeds as the unit, corrected), the controls, what the results are conditional on, then the detail as tables,
figures, the collapse rules and every run id.

Every sentence is computed from the data (analysis.verdicts, analysis.paired, analysis.limitations).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collapse import CollapseRules
from analysis.figures import HEADLINE, VERDICT
from analysis.formatting import markdown, verdict_text
from analysis.limitations import limitation_lines
from analysis.load import StudyData
from analysis.metrics import CURVES
from analysis.paired import CLAIMS, MEASURE_LABELS, NEGATIVE_CONTROLS, Control
from analysis.question import Declared
from analysis.stats import LEVEL, POWER
from analysis.style import objective_order
from analysis.summary import LAST_K, SE_MARGIN
from analysis.tuning import tuning_lines
from harness.contract import on_policy


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _cell(b: int, it: int) -> str:
    return f"batch ratio {b} × iterations {it}"


def _axes_text(row: pd.Series, axes: list[str]) -> str:
    return "".join(f", {a}={row[a]}" for a in axes if row.get(a, "") != "")


def question_lines(declared: Declared, baseline: str | None, agg: pd.DataFrame, overridden: bool) -> list[str]:
    h = declared.hypothesis
    cells = agg["cells"].iloc[0].replace(" ", ", ") if len(agg) else "none"
    what = ("mean over the cells" if h.contrast == "mean" else
            "least-squares slope in log2(batch ratio × iterations) across the cells")
    k = int(agg.loc[agg["role"] == "primary", "family_size"].max()) if len(agg) else 0
    confirm = []
    if declared.exploration:
        explored = ", ".join(map(str, declared.exploration_seeds))
        confirm = [f"- **Confirmatory**: this scale tests the hypothesis the exploration "
                   f"[{declared.exploration}](../{declared.exploration}/README.md) suggested, on seeds none of its "
                   f"runs used (the exploration's: {explored}); the verdict uses this scale's runs only."]
    for name in declared.confirmed_by:
        confirm.append(f"- **Exploratory**: what this study suggests is tested on fresh seeds by the confirmation "
                       f"[{name}](../{name}/README.md), with its own declared question; read these verdicts as "
                       "where to look, that one as the answer.")
    return [f"Declared in `{declared.source}`" + (f"; baseline set to {baseline} on the command line" if overridden
                                                  else "") + ":",
            f"- Primary measure: **{MEASURE_LABELS[h.measure]}**, each objective against **{baseline}**.",
            f"- Contrast: per seed, the paired differences (objective − baseline) reduced to their {what}: "
            f"{cells}. The seed is the unit: a seed's cells share its warm start, prompt order and random stream.",
            f"- Test: exact sign-flip test across seeds, Holm over the {k} comparison(s) of the headline family at "
            f"alpha {h.alpha:g}; interval: t-interval across seeds at {1 - h.alpha:.0%}; a null is claimed only as "
            f"equivalence within ±{h.margin:g} (two one-sided tests, Holm-adjusted).", *confirm]


def _family_sizes(agg: pd.DataFrame, collapse: pd.DataFrame, paired_rows: pd.DataFrame) -> str:
    def size(frame: pd.DataFrame) -> int:
        return int(frame["family_size"].max()) if len(frame) else 0

    per_cell = size(paired_rows[paired_rows["measure"] == paired_rows["measure"].iloc[0]]) if len(paired_rows) else 0
    return (f"headline {size(agg[agg['role'] == 'primary'])} test(s), secondary "
            f"{size(agg[agg['role'] == 'secondary'])}, collapse {len(collapse)}, per cell {per_cell} per measure")


def method_lines(summaries: pd.DataFrame, families: str) -> list[str]:
    seeds = summaries.groupby(["batch_ratio", "iterations", "objective"])["seed"].nunique()
    lo, hi = (int(seeds.min()), int(seeds.max())) if len(seeds) else (0, 0)
    return [f"- Seeds: {lo if lo == hi else f'{lo}-{hi}'} per cell and objective; seed s of every objective shares "
            "the warm-started model, the prompt order and the first rollout, so every comparison is a per-seed "
            "difference; a seed present in one arm only is left out and counted.",
            "- Families, each Holm-corrected: headline (primary measure, every comparison); secondary (the other "
            "measures, every comparison); collapse (paired counts, exact McNemar); per cell (every cell and "
            f"comparison of one measure); here: {families}. A `higher`/`lower` anywhere survived its family's "
            "correction; nothing else is a claim.",
            f"- Measures: val reward AUC / length (the time-averaged validation reward), final val reward, and the "
            f"mean of the last {LAST_K} scheduled evaluations. Gain over start is not compared (both arms of a "
            "pair share the start, so it would count the final value twice); it is in the per-run table. Scoring "
            "covers the full budget: a diverged run counts 0 from its divergence on.",
            f"- \"Fell below start\": more than {SE_MARGIN:g} binomial standard errors below the start value on two "
            "consecutive evaluations. Collapse counts are k/n seeds with Clopper-Pearson (exact) 95% intervals.",
            f"- Design information (not results): \"seeds for ±margin\" is the number of seeds a true difference "
            f"equal to the margin would need for {POWER:.0%} power at the observed spread (itself uncertain with "
            "few seeds); the per-cell MDE likewise."]


def control_lines(ctl: Control) -> list[str]:
    if ctl.status == "FAILED":
        return [f"**CONTROL FAILED**: {ctl.detail}"]
    return [f"On-policy control {ctl.status}: {ctl.detail}"]


def negative_control_lines(agg: pd.DataFrame, table: pd.DataFrame, baseline: str | None,
                           alpha: float = 0.05) -> list[str]:
    """Is an objective without any trust region worse than the baseline here? If not, the setting does not test
    trust regions, whatever the other comparisons say; if the seeds cannot show it either way, say that."""
    lines = []
    off = table[np.array([not on_policy(int(b), int(i))
                          for b, i in zip(table["batch_ratio"], table["iterations"])], bool)]
    for name in NEGATIVE_CONTROLS:
        rows = agg[agg["objective"] == name] if len(agg) else agg
        if not baseline or rows.empty:
            continue
        worse = rows[rows["verdict"] == "lower"]
        collapsed = {o: (int(off.loc[off["objective"] == o, "collapsed_n"].sum()), int(off.loc[
            off["objective"] == o, "seeds"].sum())) for o in (name, baseline)}
        counts = (f"off-policy runs collapsed: {name} {collapsed[name][0]}/{collapsed[name][1]}, {baseline} "
                  f"{collapsed[baseline][0]}/{collapsed[baseline][1]}")
        head = rows.iloc[0]  # the primary measure leads
        if len(worse):
            measures = ", ".join(MEASURE_LABELS[m] for m in worse["measure"])
            lines.append(f"Negative control met: {name} (no trust region) is worse than {baseline}, past its "
                         f"family's correction ({measures}); {counts}. The setting exercises the question.")
        elif "p_floor" in rows and head["p_floor"] >= alpha:
            lines.append(f"**Negative control undecided**: {int(head['seeds'])} seeds cannot show {name} (no trust "
                         f"region) worse than {baseline} at alpha {alpha:g} (primary: {head['mean']:+.3f} "
                         f"[{head['lo']:+.3f}, {head['hi']:+.3f}]); {counts}. Whether this setting exercises "
                         "trust regions at all is not established, and neither is any ranking of them.")
        else:
            lines.append(f"**Negative control not met**: {name}, with no trust region at all, is not shown worse "
                         f"than {baseline} on any measure; {counts}. This setting does not exercise the question: "
                         "where dropping the trust region costs nothing detectable, differences between trust "
                         "regions cannot show, so no sentence about which one is more stable follows from this "
                         "study.")
    return lines


def version_lines(versions: dict[str, int]) -> list[str]:
    if len(versions) == 1 and "dirty" not in next(iter(versions)) and "unknown" not in next(iter(versions)):
        return [f"Code: every run from commit `{next(iter(versions))}`."]
    listing = "; ".join(f"`{k}`: {_n(v, 'run')}" for k, v in versions.items())
    return [f"**Code versions differ or are not clean**: {listing}. Runs of one line may come from different code."]


def headline_lines(agg: pd.DataFrame, axes: list[str], alpha: float) -> list[str]:
    """One sentence per headline comparison, its verdict first (claims in bold)."""
    if agg.empty:
        return ["- No contrast cell with paired seeds (e.g. only the on-policy cell ran): no verdict."]
    lines = []
    for _, r in agg[agg["role"] == "primary"].iterrows():
        words = verdict_text(r["verdict"], r["objective"], r["lo"], r["hi"], r["margin"], floor=r["p_floor"],
                             alpha=alpha, seeds=int(r["seeds"]))
        head = f"**{words}**" if r["verdict"] in (*CLAIMS, "equivalent") else words
        lines.append(f"- {r['objective']} − {r['baseline']}{_axes_text(r, axes)}: {head}; mean contrast "
                     f"{r['mean']:+.3f} on {int(r['seeds'])} seeds, sign-flip p {r['p_signflip']:.3g}, "
                     f"Holm-adjusted {r['p_adj']:.3g}.")
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
                 f"[{r.collapse_lo:.2f}, {r.collapse_hi:.2f}] at rollout batch "
                 f"{', '.join(f'{x:g}' for x in r.collapse_rbs)}"
                 for r in hit.itertuples(index=False)]
        censored = int(rows["censored_n"].sum())
        if censored:
            parts.append(f"and {_n(censored, 'run')} fell at the last evaluation only (censored, not counted)")
        lines.append(f"- **{objective}** collapsed in {len(hit)} of {_n(len(rows), 'cell')}: " + "; ".join(parts) + ".")
    return lines


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
                 command: str, cache: Path) -> Path:
    """analysis: baseline, axes, paired, aggregate, collapse, control, versions, summaries, declared,
    baseline_overridden (see pipeline)."""
    path = Path(path)
    rel = lambda p: Path(p).relative_to(path.parent).as_posix()  # noqa: E731 - links relative to the README
    a = analysis
    alpha = a["declared"].hypothesis.alpha
    n_cells = table[["batch_ratio", "iterations"]].drop_duplicates().shape[0]
    diverged = int((data.runs["status"] == "diverged").sum())
    runs_dir = Path(os.path.relpath(cache, path.parent)).as_posix()
    md = [f"# {data.study}: {data.scale} scale", "",
          f"Generated by `{command}` from the runs of MLflow experiment `{data.experiment}`: {len(data.runs)} runs "
          f"over {n_cells} (batch ratio × iterations) cells and {table['objective'].nunique()} lines; "
          f"{_n(len(data.excluded), 'cell')} excluded (no complete or diverged attempt). The runs are published "
          f"with this page in [{runs_dir}/]({runs_dir}/) (one parquet file per run: its params, tags and the metric "
          "curves the analysis reads), so the same command on a fresh clone, without the MLflow store, "
          "regenerates everything here. Do not edit by hand: rerun the command.", ""]
    if a.get("stamp"):
        md += [f"**{a['stamp'][0].upper()}{a['stamp'][1:]}**: these numbers cannot be traced to committed code; "
               "do not cite them.", ""]
    if a["baseline"]:
        agg = a["aggregate"]
        md += ["## Verdict", "", *question_lines(a["declared"], a["baseline"], agg, a["baseline_overridden"]), "",
               *headline_lines(agg, a["axes"], alpha), "",
               tables["aggregate.md"].read_text(), ""]
    md += [*control_lines(a["control"]), "", *version_lines(a["versions"]), ""]
    md += [*negative_control_lines(a["aggregate"], table, a["baseline"], alpha)]
    if diverged:
        md += ["", f"{_n(diverged, 'run')} diverged; scored 0 from the divergence on."]
    if a.get("tuning") is not None:
        md += ["", *tuning_lines(a["tuning"], a["declared"].source.split(" ")[0], figures, rel)]
    md += ["", "## Limitations: what these results are conditional on", "",
           *limitation_lines(data, a["summaries"], a["declared"]), "",
           "## How it was compared", "",
           *method_lines(a["summaries"], _family_sizes(a["aggregate"], a["collapse"], a["paired"])), ""]
    if a["baseline"]:
        md += ["## Collapse", "", "Collapsed seeds per cell (rules below), k/n [Clopper-Pearson 95%]:", "",
               *collapse_lines(table), "", "Paired collapse counts over the contrast cells:", "",
               tables["collapse.md"].read_text(), ""]
    md += ["## Stable regime", "", f"![stable regime]({rel(figures[HEADLINE][0])})", "",
           "Final validation reward and its time average (AUC / budget), mean over seeds, scored over the full "
           f"budget; every cell shows k/n seeds collapsed, hatched when k > 0. [PDF]({rel(figures[HEADLINE][1])})", ""]
    if VERDICT in figures:
        md += ["## Verdicts, seeds as the unit", "", f"![verdict]({rel(figures[VERDICT][0])})", "",
               f"[PDF]({rel(figures[VERDICT][1])})", ""]
    md += ["## Tables", ""]
    for name, title in [("paired", "Per cell (detail: Holm over every cell of a measure)"),
                        ("val_reward", "Validation reward"), ("stability", "Stability")]:
        md += [f"### {title}", "", tables[f"{name}.md"].read_text(),
               f"LaTeX: [{name}.tex]({rel(tables[name + '.tex'])})", ""]
    md += ["All numbers: " + ", ".join(f"[{n}]({rel(tables[n])})" for n in
                                       ("runs.csv", "aggregate.csv", "collapse.csv", "paired.csv", "cells.csv"))
           + " (runs.csv: every run's scores and collapse rule, enough to recompute every verdict).", "",
           "## Training curves", "",
           "Rows: batch ratio; columns: iterations; x: rollout batches; line: mean over seeds; band: "
           f"{LEVEL:.0%} t-interval (none with one seed). "
           "Curves show what was logged (a diverged run's line stops).", ""]
    for spec in CURVES:
        if spec.slug in figures:
            png, pdf = figures[spec.slug]
            md += [f"### {spec.label}", "", f"![{spec.label}]({rel(png)})", "", f"[PDF]({rel(pdf)})", ""]
    md += ["## Collapse rules", "", "A run is collapsed when any rule fires; its collapse point is the earliest.", ""]
    md += [f"- `{name}` = {getattr(rules, name)}: {field.description}"
           for name, field in CollapseRules.model_fields.items()]
    md += ["", "## Excluded cells (failed, killed or running: not in any number)", ""]
    md += [_info_table(data.excluded, {"MLflow status": data.excluded["mlflow_status"],
                                       "note": data.excluded["note"].map(_short)})
           if len(data.excluded) else "None.", ""]
    rule = verdicts.set_index("run_id")
    md += ["## Runs behind every number", "",
           "Each table row and figure line averages the runs of its (batch ratio, iterations, objective); only the "
           "latest complete or diverged attempt of a cell counts.", "",
           _info_table(data.runs, {"collapse": data.runs["run_id"].map(lambda r: _short(rule.at[r, "reason"], 60)
                                                                       if r in rule.index else ""),
                                   "note": data.runs["note"].map(_short)})]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md))
    return path
