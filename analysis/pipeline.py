"""load -> collapse -> scores -> paired comparisons -> tables [-> figures -> report]: what `python -m analysis` runs."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from analysis.collapse import CollapseRules, detect_collapse
from analysis.errors import AnalysisError
from analysis.figures import make_figures
from analysis.formatting import write_tables
from analysis.layout import default_tracking_uri, study_paths
from analysis.load import StudyData, load_study
from analysis.metrics import REQUIRED_FOR_FIGURES, REQUIRED_FOR_TABLES
from analysis.paired import (AGGREGATE_COLUMNS, PAIRED_COLUMNS, Control, aggregate, axis_names, check_baseline,
                             control, paired_table)
from analysis.pooling import code_versions
from analysis.report import write_report
from analysis.runs import RunInfo
from analysis.style import objective_order
from analysis.summary import MEASURES, run_summaries
from analysis.tables import cell_table


@dataclasses.dataclass
class Outputs:
    data: StudyData
    verdicts: pd.DataFrame  # analysis.collapse.detect_collapse
    summaries: pd.DataFrame  # analysis.summary.run_summaries
    table: pd.DataFrame  # analysis.tables.cell_table
    paired: pd.DataFrame  # analysis.paired.paired_table (empty with one objective)
    aggregate: pd.DataFrame  # analysis.paired.aggregate
    control: Control
    baseline: str | None
    tables: dict[str, Path]
    figures: dict[str, list[Path]]  # empty for tables only
    report: Path | None  # None for tables only
    seconds: dict[str, float]  # wall time per phase: load, analyse, tables, figures, report


def check_measures(measures: Sequence[str] | None) -> list[str]:
    chosen = list(dict.fromkeys(measures or MEASURES))
    for m in chosen:
        if m not in MEASURES:
            raise AnalysisError(f"--measure {m!r} does not exist; allowed: {', '.join(MEASURES)}")
    return chosen


def regenerate(study: str, scale: str = "proxy", *, results_dir: str | Path = "results",
               tracking_uri: str | None = None, cache_dir: str | Path | None = None, offline: bool | None = None,
               rules: CollapseRules | None = None, figures: bool = True, command: str | None = None,
               baseline: str | None = None, measures: Sequence[str] | None = None,
               only: Mapping[str, str] | None = None) -> Outputs:
    """Write tables (and with figures=True, figures and the README) under results_dir/<study>/<scale>/.

    baseline: the objective the others are compared against (default: the first in objective order, grpo
    first); measures: the validation measures compared (analysis.summary.MEASURES); only: param filter
    (analysis.pooling.select). Bad values raise AnalysisError before anything is written.
    """
    rules = rules or CollapseRules()
    measures = check_measures(measures)
    paths = study_paths(results_dir, study, scale, cache_dir)
    for flag, folder in (("--results-dir", Path(results_dir)), ("--cache-dir", paths.cache)):
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise AnalysisError(f"{flag} {folder}: {existing} is a file; allowed: a folder (created if missing)")
    uri = tracking_uri or default_tracking_uri(results_dir)
    clock, seconds = time.perf_counter(), {}

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase], clock = now - clock, now

    def validate(chosen: list[RunInfo]) -> None:
        objectives = objective_order({i.base_objective for i in chosen})
        if baseline is not None and len(objectives) < 2:
            raise AnalysisError(f"--baseline {baseline}: the study has one objective ({objectives[0]}); a "
                                "comparison needs at least two")
        check_baseline(objectives, baseline)

    data = load_study(study, scale, tracking_uri=uri, cache_dir=paths.cache, offline=offline, only=only,
                      validate=validate)
    data.require(REQUIRED_FOR_FIGURES if figures else REQUIRED_FOR_TABLES)
    lap("load")
    verdicts = detect_collapse(data.long, data.runs, rules)
    summaries = run_summaries(data.long, data.runs)
    table = cell_table(summaries, verdicts, data.excluded)
    axes = axis_names(summaries)
    objectives = objective_order(summaries["base_objective"])
    base = check_baseline(objectives, baseline) if len(objectives) > 1 else None
    paired_rows = paired_table(summaries, base, tuple(measures)) if base else pd.DataFrame(
        columns=["batch_ratio", "iterations", *axes, *PAIRED_COLUMNS, "seeds"])
    agg = aggregate(paired_rows, axes) if base else pd.DataFrame(columns=["objective", "baseline", *axes,
                                                                          "measure", *AGGREGATE_COLUMNS[3:]])
    ctl = control(paired_rows)
    lap("analyse")
    tables = write_tables(table, paired_rows, agg, axes, paths.tables, study, scale)
    lap("tables")
    figs, report = {}, None
    if figures:
        figs = make_figures(data, table, paths.figures, agg, axes)
        lap("figures")
        command = command or f"python -m analysis figures {study} --scale {scale}"
        analysis = {"baseline": base, "measures": measures, "axes": axes, "paired": paired_rows, "aggregate": agg,
                    "control": ctl, "versions": code_versions(_infos(data)), "summaries": summaries}
        report = write_report(data, verdicts, table, analysis, figs, tables, paths.readme, rules, command)
        lap("report")
    return Outputs(data, verdicts, summaries, table, paired_rows, agg, ctl, base, tables, figs, report, seconds)


def _infos(data: StudyData) -> list[RunInfo]:
    return [RunInfo(**row) for row in data.runs.to_dict("records")]
