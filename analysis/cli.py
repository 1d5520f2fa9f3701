"""`python -m analysis figures|tables|replicate|import|bench ...`; bad input is one line on stderr and exit 2.

    python -m analysis figures NAME [--scale auto] [--results-dir results] [--tracking-uri URI]
                                    [--cache-dir DIR] [--offline] [--rule KEY=VALUE ...] [--allow-dirty]
                                    [--baseline OBJECTIVE] [--spec SWEEP.yaml] [--only PARAM=VALUE ...]
        figures, tables and README.md under RESULTS_DIR/NAME/SCALE/ (and, read from MLflow, attached to the
        study's sweep run there)
    python -m analysis tables NAME ...   tables only
    python -m analysis replicate NAME --against DIR [--scale S] [--results-dir R] [--tracking-uri URI]
        does a rerun reproduce the published study in DIR (results/NAME/SCALE with runs/)? exit 0 yes, 1 no
    python -m analysis import NAME [--scale S]   published runs/ into MLflow, for the UI
    python -m analysis bench [NAME] ...  cold-store vs warm-cache regeneration time (synthetic study by default)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from analysis.collapse import CollapseRules
from analysis.errors import AnalysisError
from analysis.layout import resolve_scale


def _pairs(flag: str, items: list[str]) -> dict[str, str]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AnalysisError(f"{flag} expects KEY=VALUE, got {item!r}")
        values[key] = value
    return values


def _rules(items: list[str]) -> CollapseRules:
    values = _pairs("--rule", items)
    try:
        return CollapseRules(**values)
    except ValidationError as e:
        first = e.errors()[0]
        raise AnalysisError(f"--rule {'.'.join(map(str, first['loc']))}: {first['msg']} "
                            f"(fields: {', '.join(CollapseRules.model_fields)})") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", default="auto", help="scale of the study (a scale of its sweep file, e.g. proxy); "
                   "experiment NAME/SCALE (default auto: the study's one scale under RESULTS_DIR)")
    # Same root as the harness (harness.tracking.results_root), so both find the same sqlite store by default.
    p.add_argument("--results-dir", default=os.environ.get("HARNESS_RESULTS", "results"),
                   help="outputs go to RESULTS_DIR/NAME/SCALE/ (default: $HARNESS_RESULTS, else results)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///RESULTS_DIR/mlflow.db)")


def _regenerate(args: argparse.Namespace, figures: bool) -> int:
    from analysis.pipeline import primary_sentence, regenerate

    out = regenerate(args.name, args.scale, results_dir=args.results_dir, tracking_uri=args.tracking_uri,
                     cache_dir=args.cache_dir, offline=True if args.offline else None, rules=_rules(args.rule),
                     figures=figures, command=" ".join(["python -m analysis", *args.argv]),
                     baseline=args.baseline, spec=args.spec, only=_pairs("--only", args.only),
                     allow_dirty=args.allow_dirty)
    d = out.data
    print(f"{d.experiment}: {len(d.runs)} runs ({d.fetched_runs} read from MLflow, {d.cached_runs} from cache), "
          f"{len(d.excluded)} excluded cells, {int(out.verdicts['collapsed'].sum())} collapsed runs")
    print(f"baseline: {out.baseline or 'none (one objective)'}; on-policy control: {out.control.status}")
    if len(out.aggregate):
        print(primary_sentence(out.aggregate))
    print(f"tables: {len(out.tables)} files in {next(iter(out.tables.values())).parent}")
    if figures:
        print(f"figures: {sum(map(len, out.figures.values()))} files in {out.figures['stable_regime'][0].parent}")
        print(f"report: {out.report}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from analysis.regen_bench import benchmark

    if args.repeats < 1:
        raise AnalysisError(f"--repeats {args.repeats}: allowed: an integer >= 1")

    result = benchmark(args.name, args.scale, tracking_uri=args.tracking_uri, results_dir=args.results_dir,
                       repeats=args.repeats)
    print(result.describe())
    return 0


def _replicate(args: argparse.Namespace) -> int:
    from analysis.layout import default_tracking_uri
    from analysis.replicate import replicate

    checks = replicate(args.name, args.scale, args.against, results_dir=args.results_dir, spec=args.spec,
                       tracking_uri=args.tracking_uri or default_tracking_uri(args.results_dir))
    for c in checks:
        print(f"{'reproduces' if c.reproduces else 'DIFFERS   '}  {c.what}: rerun {c.rerun}, published {c.published}")
    failed = sum(not c.reproduces for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} conclusions reproduce" + (
        "" if failed else "; reproduces: every conclusion"))
    return 1 if failed else 0


def _import(args: argparse.Namespace) -> int:
    from analysis.browse import import_published
    from analysis.layout import default_tracking_uri, study_paths

    runs = study_paths(args.results_dir, args.name, args.scale).cache
    uri = args.tracking_uri or default_tracking_uri(args.results_dir)
    name, made, there = import_published(args.name, args.scale, runs, uri)
    print(f"{name}: {made} runs imported from {runs}, {there} already there; browse: just ui")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, figures, what in [("figures", True, "figures, tables and README.md of a study"),
                                ("tables", False, "tables only")]:
        p = sub.add_parser(name, help=what, description=what)
        p.add_argument("name", help="study name (the sweep's study, e.g. grpo-vs-cfpo)")
        _common(p)
        p.add_argument("--cache-dir", default=None, help="per-run parquet cache (default RESULTS_DIR/NAME/SCALE/cache)")
        p.add_argument("--offline", "--from-published", dest="offline", action="store_true",
                       help="read the published runs (RESULTS_DIR/NAME/SCALE/runs/) only, never MLflow")
        p.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE",
                       help="override a collapse rule threshold, e.g. --rule val_drop=0.4 (see analysis/collapse.py)")
        p.add_argument("--baseline", default=None, metavar="OBJECTIVE",
                       help="objective the others are compared against (default: the hypothesis's baseline, else "
                            "the first objective); the report says when it overrides the declared one")
        p.add_argument("--spec", default=None, metavar="SWEEP.yaml",
                       help="sweep file whose hypothesis: is tested (default: sweeps/NAME.yaml; without one, the "
                            "default question: val AUC over the off-policy cells against the first objective)")
        p.add_argument("--allow-dirty", action="store_true",
                       help="publish under results/ runs from a modified tree or several commits, stamping the "
                            "report and every table provisional (without it, such runs are refused there)")
        p.add_argument("--only", action="append", default=[], metavar="PARAM=VALUE",
                       help="analyse only runs whose MLflow param has this value, e.g. --only rollout_batches=30")
        p.set_defaults(func=lambda a, f=figures: _regenerate(a, f))
    r = sub.add_parser("replicate", help="does a rerun reproduce a published study (verdicts, effects, collapses)?",
                       description="compare the study under --results-dir (MLflow, else its runs/) with a published "
                                   "copy: the primary and secondary verdicts, each seed-level effect (Welch interval "
                                   "of the difference) and the collapse counts (Fisher's exact test); exit 0 when "
                                   "every conclusion reproduces, 1 otherwise")
    r.add_argument("name", help="study name")
    _common(r)
    r.add_argument("--against", required=True, metavar="DIR", help="published study folder (results/NAME/SCALE)")
    r.add_argument("--spec", default=None, metavar="SWEEP.yaml", help="sweep file whose hypothesis: is compared")
    r.set_defaults(func=_replicate)
    i = sub.add_parser("import", help="load a published study's runs into an MLflow store, to browse them",
                       description="load results/NAME/SCALE/runs/ into the MLflow store as experiment "
                                   "'NAME/SCALE (published)' (each run once)")
    i.add_argument("name", help="study name")
    _common(i)
    i.set_defaults(func=_import)
    b = sub.add_parser("bench", help="time regeneration from a cold MLflow store vs a warm cache",
                       description="time regeneration from a cold MLflow store vs a warm cache; without NAME, on a "
                                   "synthetic study built in a temporary folder")
    b.add_argument("name", nargs="?", default=None, help="study to time (default: a synthetic study)")
    _common(b)
    b.add_argument("--repeats", type=int, default=1, help="timings per mode; the fastest is reported")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # the README records the command that made it
    if getattr(args, "name", None) is not None:
        try:
            args.scale = resolve_scale(args.results_dir, args.name, args.scale, args.tracking_uri)
        except AnalysisError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
