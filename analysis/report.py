"""results/<study>/<scale>/README.md: figures, tables, a summary computed from the data, exclusions, run ids.

The summary states only what the data support: which cells collapsed under which objective, and the cells
where two objectives' 95% t-intervals of final val reward or val AUC do not overlap (no claim from one seed).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from analysis.collapse import CollapseRules
from analysis.figures import HEADLINE
from analysis.load import StudyData
from analysis.metrics import CURVES
from analysis.stats import LEVEL
from analysis.style import objective_order
from analysis.tables import markdown

COMPARED = [("final_val", "final val reward"), ("auc_val", "val reward AUC")]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _cell(b: int, it: int) -> str:
    return f"batch ratio {b} × iterations {it}"


def collapse_summary(table: pd.DataFrame, verdicts: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """One bullet per objective: the cells with collapsed seeds, how many, when and why."""
    v = verdicts.merge(runs[["run_id", "objective", "batch_ratio", "iterations"]], on="run_id")
    lines = []
    for objective in objective_order(table["objective"]):
        rows = table[(table["objective"] == objective) & (table["collapsed_n"] > 0)]
        total = int((table["objective"] == objective).sum())
        if rows.empty:
            lines.append(f"- **{objective}**: no collapse in any of its {_n(total, 'cell')}.")
            continue
        parts = []
        for r in rows.itertuples(index=False):
            seeds = v[(v["objective"] == objective) & (v["batch_ratio"] == r.batch_ratio)
                      & (v["iterations"] == r.iterations) & v["collapsed"]]
            reasons = sorted({x for reason in seeds["reason"] for x in reason.split("; ")})
            when = ", ".join(f"{x:g}" for x in r.collapse_rbs)
            parts.append(f"{_cell(r.batch_ratio, r.iterations)} ({r.collapsed_n}/{r.seeds} seeds, at rollout "
                         f"batch {when}: {'; '.join(reasons)})")
        lines.append(f"- **{objective}** collapsed in {len(rows)} of {_n(total, 'cell')}: " + "; ".join(parts) + ".")
    return lines


def separated(table: pd.DataFrame, col: str) -> list[tuple[int, int, str, str]]:
    """(batch_ratio, iterations, higher objective, lower objective) where the two t-intervals do not overlap."""
    out = []
    for (b, it), cell in table.groupby(["batch_ratio", "iterations"], sort=True):
        rows = {r["objective"]: r for _, r in cell.iterrows()}
        for x, y in itertools.combinations(objective_order(rows), 2):
            rx, ry = rows[x], rows[y]
            if pd.isna(rx[f"{col}_lo"]) or pd.isna(ry[f"{col}_lo"]):
                continue  # a single seed has no interval: no claim
            if rx[f"{col}_lo"] > ry[f"{col}_hi"]:
                out.append((b, it, x, y))
            elif ry[f"{col}_lo"] > rx[f"{col}_hi"]:
                out.append((b, it, y, x))
    return out


def difference_summary(table: pd.DataFrame) -> list[str]:
    lines = []
    fmt = lambda r, col: f"{r[col + '_mean']:.3f} [{r[col + '_lo']:.3f}, {r[col + '_hi']:.3f}]"  # noqa: E731
    for col, name in COMPARED:
        found = separated(table, col)
        if not found:
            lines.append(f"- {name}: no cell where the objectives' {LEVEL:.0%} intervals separate.")
            continue
        items = []
        for b, it, hi, lo in found:
            row = lambda o: table[(table["batch_ratio"] == b) & (table["iterations"] == it)  # noqa: E731
                                  & (table["objective"] == o)].iloc[0]
            items.append(f"{_cell(b, it)}: {hi} {fmt(row(hi), col)} > {lo} {fmt(row(lo), col)}")
        lines.append(f"- {name}, {_n(len(found), 'cell')} where the {LEVEL:.0%} intervals do not overlap: "
                     + "; ".join(items) + ".")
    single = int((table["seeds"] < 2).sum())
    if single:
        lines.append(f"- {_n(single, '(cell, objective) row')} with a single seed: no interval, so no claim.")
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


def write_report(data: StudyData, verdicts: pd.DataFrame, table: pd.DataFrame, figures: dict[str, list[Path]],
                 tables: dict[str, Path], path: str | Path, rules: CollapseRules, command: str) -> Path:
    path = Path(path)
    rel = lambda p: Path(p).relative_to(path.parent).as_posix()  # noqa: E731 - links relative to the README
    n_cells = table[["batch_ratio", "iterations"]].drop_duplicates().shape[0]
    md = [
        f"# {data.study}: {data.scale} scale",
        "",
        f"Generated by `{command}` from MLflow experiment `{data.experiment}` "
        f"({_public_uri(data.source)}): {len(data.runs)} runs over {n_cells} (batch ratio × iterations) cells "
        f"and {table['objective'].nunique()} objectives; {_n(len(data.excluded), 'cell')} excluded (no complete or "
        "diverged attempt). "
        f"Do not edit by hand: rerun the command.",
        "",
        "## Summary",
        "",
        "Collapse (rules below):",
        "",
        *collapse_summary(table, verdicts, data.runs),
        "",
        f"Differences between objectives beyond {LEVEL:.0%} t-interval overlap (over seeds):",
        "",
        *difference_summary(table),
        "",
        "## Stable regime",
        "",
        f"![stable regime]({rel(figures[HEADLINE][0])})",
        "",
        "Final validation reward and its time average (area under the curve / length), mean over seeds; "
        "hatched cells had collapsed seeds (k/n written in the cell). "
        f"[PDF]({rel(figures[HEADLINE][1])})",
        "",
        "## Tables",
        "",
    ]
    for name, title in [("val_reward", "Validation reward"), ("stability", "Stability")]:
        md += [f"### {title}", "", tables[f"{name}.md"].read_text(),
               f"LaTeX: [{name}.tex]({rel(tables[name + '.tex'])})", ""]
    md += [f"All numbers: [cells.csv]({rel(tables['cells.csv'])}).", "", "## Training curves", "",
           "Rows: batch ratio; columns: iterations; x: rollout batches; line: mean over seeds; band: "
           f"{LEVEL:.0%} t-interval (none with one seed).", ""]
    for spec in CURVES:
        if spec.slug in figures:
            png, pdf = figures[spec.slug]
            md += [f"### {spec.label}", "", f"![{spec.label}]({rel(png)})", "", f"[PDF]({rel(pdf)})", ""]
    md += ["## Collapse rules", "", "A run is collapsed when any rule fires; its collapse point is the earliest.", ""]
    md += [f"- `{name}` = {getattr(rules, name)}: {field.description}"
           for name, field in CollapseRules.model_fields.items()]
    md += ["", "## Excluded cells (failed, killed or running: not plotted)", ""]
    md += [_info_table(data.excluded, {"MLflow status": data.excluded["mlflow_status"],
                                       "note": data.excluded["note"].map(_short)}) if len(data.excluded)
           else "None.", ""]
    collapsed = verdicts.set_index("run_id")["collapsed"]
    md += ["## Runs behind every number", "",
           "Each table row and figure line averages the runs of its (batch ratio, iterations, objective); "
           "only the latest complete or diverged attempt of a cell counts.", "",
           _info_table(data.runs, {"collapsed": data.runs["run_id"].map(collapsed).map({True: "yes", False: "no"}),
                                   "note": data.runs["note"].map(_short)})]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md))
    return path
