"""load -> collapse -> summaries -> tables [-> figures -> report]: what `python -m analysis` runs."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from analysis.collapse import CollapseRules, detect_collapse
from analysis.figures import make_figures
from analysis.layout import default_tracking_uri, study_paths
from analysis.load import StudyData, load_study
from analysis.metrics import REQUIRED_FOR_FIGURES, REQUIRED_FOR_TABLES
from analysis.report import write_report
from analysis.summary import run_summaries
from analysis.tables import cell_table, write_tables


@dataclasses.dataclass
class Outputs:
    data: StudyData
    verdicts: pd.DataFrame  # analysis.collapse.detect_collapse
    summaries: pd.DataFrame  # analysis.summary.run_summaries
    table: pd.DataFrame  # analysis.tables.cell_table
    tables: dict[str, Path]
    figures: dict[str, list[Path]]  # empty for tables only
    report: Path | None  # None for tables only
    seconds: dict[str, float]  # wall time per phase: load, analyse, tables, figures, report


def regenerate(study: str, scale: str = "proxy", *, results_dir: str | Path = "results",
               tracking_uri: str | None = None, cache_dir: str | Path | None = None, offline: bool | None = None,
               rules: CollapseRules | None = None, figures: bool = True, command: str | None = None) -> Outputs:
    """Write tables (and with figures=True, figures and the README) under results_dir/<study>/<scale>/."""
    rules = rules or CollapseRules()
    paths = study_paths(results_dir, study, scale, cache_dir)
    uri = tracking_uri or default_tracking_uri(results_dir)
    clock, seconds = time.perf_counter(), {}

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase], clock = now - clock, now

    data = load_study(study, scale, tracking_uri=uri, cache_dir=paths.cache, offline=offline)
    data.require(REQUIRED_FOR_FIGURES if figures else REQUIRED_FOR_TABLES)
    lap("load")
    verdicts = detect_collapse(data.long, data.runs, rules)
    summaries = run_summaries(data.long, data.runs)
    table = cell_table(summaries, verdicts)
    lap("analyse")
    tables = write_tables(table, paths.tables, study, scale)
    lap("tables")
    figs, report = {}, None
    if figures:
        figs = make_figures(data, table, paths.figures)
        lap("figures")
        command = command or f"python -m analysis figures {study} --scale {scale}"
        report = write_report(data, verdicts, table, figs, tables, paths.readme, rules, command)
        lap("report")
    return Outputs(data, verdicts, summaries, table, tables, figs, report, seconds)
