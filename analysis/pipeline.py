"""load -> collapse -> scores -> paired comparisons -> tables [-> figures -> report]: what `python -m analysis` runs."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis.browse import attach
from analysis.collapse import CollapseRules, detect_collapse
from analysis.errors import AnalysisError
from analysis.figures import make_figures
from analysis.formatting import write_tables
from analysis.layout import default_tracking_uri, is_published, study_paths
from analysis.load import StudyData, load_study
from analysis.metrics import REQUIRED
from analysis.paired import PAIRED_COLUMNS, Control, axis_names, check_baseline, control, paired_table
from analysis.pooling import code_versions, one_clean_commit
from analysis.question import Declared, declared
from analysis.report import write_report
from analysis.runs import RunInfo
from analysis.style import objective_order
from analysis.summary import run_summaries
from analysis.tables import cell_table, run_table
from analysis.tuning import load_tuning, tuning_figures, write_tuning_tables
from analysis.verdicts import COLLAPSE_COLUMNS, VERDICT_COLUMNS, collapse_table, contrast_cells, verdict_table
from harness.hypothesis import COMPARED_MEASURES


@dataclasses.dataclass
class Outputs:
    data: StudyData
    verdicts: pd.DataFrame  # analysis.collapse.detect_collapse
    summaries: pd.DataFrame  # analysis.summary.run_summaries, plus `collapsed`
    table: pd.DataFrame  # analysis.tables.cell_table
    paired: pd.DataFrame  # analysis.paired.paired_table (empty with one objective)
    aggregate: pd.DataFrame  # analysis.verdicts.verdict_table: the headline family first (empty: one objective)
    collapse: pd.DataFrame  # analysis.verdicts.collapse_table
    control: Control
    declared: Declared  # the study's declared question (analysis.question)
    baseline: str | None
    tables: dict[str, Path]
    figures: dict[str, list[Path]]  # empty for tables only
    report: Path | None  # None for tables only
    seconds: dict[str, float]  # wall time per phase: load, analyse, tables, figures, report


def regenerate(study: str, scale: str = "proxy", *, results_dir: str | Path = "results",
               tracking_uri: str | None = None, cache_dir: str | Path | None = None, offline: bool | None = None,
               rules: CollapseRules | None = None, figures: bool = True, command: str | None = None,
               baseline: str | None = None, spec: str | Path | None = None,
               only: Mapping[str, str] | None = None, allow_dirty: bool = False) -> Outputs:
    """Write tables (and with figures=True, figures and the README) under results_dir/<study>/<scale>/.

    The question tested is the one the sweep file declares (analysis.question; spec: its path, default
    sweeps/<study>.yaml). baseline overrides the declared baseline (default: the first in objective order, grpo
    first); only: param filter (analysis.pooling.select). Bad values raise AnalysisError before anything is
    written. A study written under the repository's results/ is published: its runs must all come from one clean
    commit, else AnalysisError, unless allow_dirty, which stamps the report and every table provisional.
    """
    rules = rules or CollapseRules()
    decl = declared(study, spec, scale)
    baseline = baseline or decl.hypothesis.baseline
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
        contrast_cells({(i.batch_ratio, i.iterations) for i in chosen}, decl.hypothesis)  # before the cache is written
        check_code(chosen)

    def check_code(chosen: list[RunInfo]) -> None:
        versions = code_versions(chosen)
        if is_published(paths.root) and not allow_dirty and not one_clean_commit(versions):
            listing = "; ".join(f"{k}: {v} runs" for k, v in versions.items())
            raise AnalysisError(f"{study}/{scale}: runs from {listing}; publishing under results/ needs every run "
                                "from one clean commit: rerun from a committed tree, or pass --allow-dirty to "
                                "stamp the outputs provisional")

    data = load_study(study, scale, tracking_uri=uri, cache_dir=paths.cache, offline=offline, only=only,
                      validate=validate)
    data.require(REQUIRED)
    tuning = load_tuning(study, scale, decl.tune, decl.hypothesis.measure, data.runs, tracking_uri=uri,
                         cache_dir=paths.tune_cache, offline=offline, validate=check_code) if decl.tune else None
    lap("load")
    versions = code_versions(_infos(data))
    stamp = None
    if allow_dirty and not one_clean_commit(versions):
        stamp = "provisional: code not committed (" + "; ".join(f"{k}: {v} runs" for k, v in versions.items()) + ")"
    verdicts = detect_collapse(data.long, data.runs, rules)
    summaries = run_summaries(data.long, data.runs).merge(verdicts[["run_id", "collapsed"]], on="run_id")
    table = cell_table(summaries, verdicts, data.excluded)
    axes = axis_names(summaries)
    objectives = objective_order(summaries["base_objective"])
    base = check_baseline(objectives, baseline) if len(objectives) > 1 else None
    hyp = decl.hypothesis
    if base:
        paired_rows = paired_table(summaries, base, COMPARED_MEASURES, hyp.alpha, hyp.margin)
        agg, collapse = verdict_table(summaries, base, hyp, axes), collapse_table(summaries, base, hyp, axes)
    else:
        paired_rows = pd.DataFrame(columns=["batch_ratio", "iterations", *axes, *PAIRED_COLUMNS, "seeds"])
        agg, collapse = pd.DataFrame(columns=VERDICT_COLUMNS), pd.DataFrame(columns=COLLAPSE_COLUMNS)
    ctl = control(paired_rows, tuning.apart() if tuning is not None else None)
    lap("analyse")
    tables = write_tables(table, paired_rows, agg, collapse, run_table(summaries, verdicts), axes, paths.tables,
                          study, scale, hyp.margin, hyp.alpha, stamp)
    if tuning is not None:
        tables.update(write_tuning_tables(tuning, paths.tables, stamp))
    lap("tables")
    figs, report = {}, None
    if figures:
        figs = make_figures(data, table, paths.figures, agg, axes)
        if tuning is not None:
            figs.update(tuning_figures(tuning, paths.figures, study, scale))
        lap("figures")
        command = command or f"python -m analysis figures {study} --scale {scale}"
        analysis = {"baseline": base, "axes": axes, "paired": paired_rows, "aggregate": agg, "collapse": collapse,
                    "control": ctl, "versions": versions, "stamp": stamp, "summaries": summaries,
                    "declared": decl, "baseline_overridden": baseline is not None and baseline != hyp.baseline,
                    "tuning": tuning}
        report = write_report(data, verdicts, table, analysis, figs, tables, paths.readme, rules, command,
                              paths.cache)
        if not data.source.startswith("cache "):  # read from MLflow: the report goes next to the runs there
            attach(uri, study, scale, paths.root, primary_sentence(agg) or "No verdict (one objective).")
        lap("report")
    return Outputs(data, verdicts, summaries, table, paired_rows, agg, collapse, ctl, decl, base, tables, figs,
                   report, seconds)


def primary_sentence(agg: pd.DataFrame) -> str:
    """One line per primary comparison, as the CLI prints it."""
    primary = agg[agg["role"] == "primary"] if len(agg) else agg
    return "\n".join(f"primary ({r.measure}, {r.contrast} over {r.cells}): {r.objective} - {r.baseline}: "
                     f"{r.verdict}, {r.mean:+.4f} [{r.lo:+.4f}, {r.hi:+.4f}] on {r.seeds} seeds, Holm p {r.p_adj:.3g}"
                     for r in primary.itertuples(index=False))


def _infos(data: StudyData) -> list[RunInfo]:
    return [RunInfo(**row) for row in data.runs.to_dict("records")]
