"""`python -m harness sweep|worker|status NAME`: run a sweep, join one from another machine, or inspect it.

NAME is sweeps/NAME.yaml or a path to a spec file. Bad input raises ConfigError (exit 2, nothing written).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.config import ConfigError


def add_sweep_commands(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="run (or resume) a sweep: enqueue its cells and run them with workers")
    _common(sweep)
    sweep.add_argument("--workers", type=int, default=1,
                       help="worker processes here (one job each at a time; 0: only enqueue and watch)")
    sweep.add_argument("--max-attempts", type=int, default=2, help="attempts per cell before it stays failed")
    sweep.add_argument("--retry-failed", action="store_true", help="give failed cells a fresh allowance of attempts")
    sweep.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local processes, or submitit jobs (SLURM; submitit's local executor without SLURM)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a base job field (dotted keys), or narrow an axis / the seeds: "
                            "--set rollout_batches=2 --set batch_ratio=[1,2]")
    sweep.add_argument("--stale-after", type=float, default=120.0,
                       help="seconds without a heartbeat after which a worker on another machine counts as dead")
    sweep.add_argument("--timeout-min", type=int, default=24 * 60, help="--launcher slurm: time limit per worker job")
    sweep.add_argument("--partition", default=None, help="--launcher slurm: SLURM partition")
    sweep.set_defaults(func=_sweep)

    worker = sub.add_parser("worker", help="join a running sweep (same --storage and MLFLOW_TRACKING_URI)")
    _common(worker)
    worker.add_argument("--name", dest="worker_name", default=None, help="worker name shown in status (default: host-pid)")
    worker.set_defaults(func=_worker)

    status = sub.add_parser("status", help="print a sweep's cells and their states from its ledger")
    _common(status)
    status.set_defaults(func=_status)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="sweeps/NAME.yaml, or a path to a sweep spec")
    p.add_argument("--scale", choices=("auto", "paper", "proxy"), default="auto",
                   help="auto: paper when CUDA is available, else proxy")
    p.add_argument("--storage", default=None,
                   help="ledger: a journal file path or postgresql://... (default results/<study>/<scale>/ledger.journal)")
    p.add_argument("--results-dir", default=None, help="results root (default $HARNESS_RESULTS, else ./results)")


def _results(args: argparse.Namespace) -> Path:
    # One setting for the sweep and every job it starts: the job reads $HARNESS_RESULTS too.
    if args.results_dir:
        os.environ["HARNESS_RESULTS"] = str(Path(args.results_dir).resolve())
    from harness.tracking import results_root

    return results_root()


def _sweep(args: argparse.Namespace) -> int:
    from harness.sweep.driver import SweepError, SweepOptions, run_sweep
    from harness.sweep.spec import load_spec, make_plan, pick_scale

    spec, path = load_spec(args.name)
    scale, why = pick_scale(args.scale)
    print(f"scale: {scale} ({why})", flush=True)
    plan = make_plan(spec, path, scale, args.set)
    opts = SweepOptions(workers=args.workers, storage=args.storage, max_attempts=args.max_attempts,
                        retry_failed=args.retry_failed, launcher=args.launcher, stale_after=args.stale_after,
                        timeout_min=args.timeout_min, partition=args.partition)
    try:
        return run_sweep(plan, opts, _results(args))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _existing(args: argparse.Namespace) -> tuple[str, str, Path, str]:
    """(study, scale, results, storage) of a sweep that must already exist."""
    from harness.sweep.ledger import check_storage
    from harness.sweep.spec import SCALES, load_spec, pick_scale

    spec, path = load_spec(args.name)
    results = _results(args)
    scale = args.scale
    if scale == "auto":  # the scale whose ledger is here, if only one is
        here = [s for s in SCALES if (results / spec.study / s / "ledger.journal").is_file()]
        scale = here[0] if len(here) == 1 and args.storage is None else pick_scale("auto")[0]
    ledger = results / spec.study / scale / "ledger.journal"
    storage = check_storage(args.storage, ledger)
    if args.storage is None and not ledger.is_file():
        raise ConfigError(f"{ledger}: no ledger; start the sweep with `python -m harness sweep {args.name} "
                          f"--scale {scale}` (or give --storage / --results-dir)")
    return spec.study, scale, results, storage


def _worker(args: argparse.Namespace) -> int:
    import socket

    from harness.sweep.worker import WorkerOptions, run_worker

    study, scale, results, storage = _existing(args)
    name = args.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    return run_worker(WorkerOptions(storage=storage, study=study, scale=scale, results=str(results), name=name))


def _status(args: argparse.Namespace) -> int:
    from harness.sweep.display import console, status_table
    from harness.sweep.ledger import Ledger, open_storage

    study, scale, results, storage = _existing(args)
    cells = Ledger(open_storage(storage), f"{study}/{scale}", create=False).cells()
    out = console()
    out.print(status_table(cells, f"{study}/{scale} ({storage})", results / study / scale))
    states = [c.state for c in cells]
    out.print(", ".join(f"{states.count(s)} {s}" for s in
                        ("complete", "diverged", "running", "queued", "failed", "interrupted") if s in states)
              or "no cells")
    return 0
