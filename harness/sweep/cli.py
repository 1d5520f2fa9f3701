"""`python -m harness sweep|worker|status NAME`: run a sweep, join one from another machine, or inspect it.

NAME is sweeps/NAME.yaml or a path to a spec file. Bad input raises ConfigError (exit 2, nothing written).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness import contract
from harness.config import ConfigError
from harness.redact import STORAGE_ENV, redact


def add_sweep_commands(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="run (or resume) a sweep: enqueue its cells and run them with "
                                         "workers")
    _common(sweep)
    sweep.add_argument("--workers", type=int, default=None,
                       help="worker processes here (one job each at a time; 0: only enqueue and watch); "
                            "default: GPUs / the scale's gpus_per_job on a CUDA machine, else one per CPU "
                            "core")
    sweep.add_argument("--max-attempts", type=int, default=2, help="attempts per cell before it stays failed")
    sweep.add_argument("--retry-failed", action="store_true",
                       help="give failed cells a fresh allowance of attempts")
    sweep.add_argument("--launcher", choices=("local", "slurm", "submitit-local"), default="local",
                       help="local: worker processes here; slurm: one SLURM job per worker through "
                            "submitit (refused without a SLURM controller that answers, or with a SQLite "
                            "MLflow store: set MLFLOW_TRACKING_URI to a tracking server); submitit-local: "
                            "submitit's local executor (tests, laptops)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a base job field (dotted keys), or narrow an axis / the seeds: "
                            "--set rollout_batches=2 --set batch_ratio=[1,2]")
    sweep.add_argument("--stale-after", type=float, default=120.0,
                       help="seconds without a heartbeat after which a worker on another machine counts as "
                            "dead")
    sweep.add_argument("--cell-timeout-min", type=float, default=None,
                       help="wall-clock limit of one job, in minutes; past it the job is stopped and its "
                            "attempt recorded as timeout (retried within --max-attempts); default: the "
                            "scale's cell_timeout_min (6 h on cpu, 72 h on cuda unless the sweep file says)")
    sweep.add_argument("--stall-timeout-min", type=float, default=None,
                       help="minutes a job may go without storing a metric before it counts as hung; "
                            "default: the scale's stall_timeout_min (30 min on cpu, 2 h on cuda unless the "
                            "sweep file says)")
    sweep.add_argument("--timeout-min", type=int, default=24 * 60,
                       help="--launcher slurm or submitit-local: time limit per worker job")
    sweep.add_argument("--partition", default=None, help="--launcher slurm: SLURM partition")
    sweep.add_argument("--unequal-budget", action="store_true",
                       help="tune: run objectives with different numbers of trials (refused otherwise)")
    _job_start(sweep)
    sweep.add_argument("--dry-run", action="store_true",
                       help="validate the spec, print the cells (axes, TRL batch knobs, objective knobs) and "
                            "the estimated time per cell and in all for --workers; write nothing")
    sweep.set_defaults(func=_sweep)

    worker = sub.add_parser("worker", help="join a running sweep (same --storage and MLFLOW_TRACKING_URI)")
    _common(worker)
    worker.add_argument("--name", dest="worker_name", default=None,
                        help="worker name shown in status (default: host-pid)")
    worker.add_argument("--workers", type=int, default=None,
                        help="worker processes on this machine, each on its own gpus_per_job GPUs (default: "
                             "GPUs / gpus_per_job on a CUDA machine, else 1)")
    worker.add_argument("--gpus", default=None, metavar="LIST",
                        help="run one worker on exactly these CUDA devices (e.g. 0,1), or 'none' for CPU "
                             "jobs; default: find this machine's GPUs and pack them")
    _job_start(worker)
    # The driver passes the ledger to the workers it starts in the environment, never on their command line.
    worker.set_defaults(func=_worker, storage=os.environ.get(STORAGE_ENV) or None)

    status = sub.add_parser("status", help="print a sweep's cells and their states from its ledger")
    _common(status)
    status.set_defaults(func=_status)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="sweeps/NAME.yaml, or a path to a sweep spec")
    # Any scale the sweep file defines: checked once the spec is loaded (harness.sweep.scale_choice.pick_scale).
    p.add_argument("--scale", default="auto",
                   help="a scale of the sweep file (scales: NAME), or auto: the first of them whose device "
                        "is here (device: cuda needs a GPU)")
    p.add_argument("--stage", default="auto", choices=("auto", "grid", "tune", "compare"),
                   help="a scale with a tune: section runs in two stages, tune (Optuna trials on tuning seeds; "
                        "ledger <scale>/tune) then compare (each objective at its best tuned setting); auto: "
                        "both in order for sweep, compare for worker and status; grid: a scale without tune:")
    p.add_argument("--storage", default=None,
                   help="ledger: a journal file path or postgresql://user:password@host:port/db (default: "
                        f"results/<study>/<scale>/ledger.journal; worker: ${STORAGE_ENV} first, which keeps "
                        "a password out of the command line)")
    p.add_argument("--results-dir", default=None,
                   help="results root (default $HARNESS_RESULTS, else ./results)")


def _job_start(p: argparse.ArgumentParser) -> None:
    from harness.sweep.forkserver import JOB_STARTS

    p.add_argument("--job-start", choices=JOB_STARTS, default="fork",
                   help="fork: single-process CPU jobs are forked from a process that imported the training "
                        "stack once (seconds saved per cell, same numbers); exec: every job is a fresh "
                        "`python -m harness train` (multi-GPU, vLLM and GPU-machine jobs always are)")


def _results(args: argparse.Namespace) -> Path:
    # One setting for the sweep and every job it starts: the job reads $HARNESS_RESULTS too.
    if args.results_dir:
        os.environ["HARNESS_RESULTS"] = str(Path(args.results_dir).resolve())
    from harness.tracking import results_root

    return results_root()


def _check_options(args: argparse.Namespace, writes: bool = True) -> None:
    """Numbers and paths of the command line, before anything is written (harness.checks)."""
    from harness.checks import finite_options, writable_dir, writable_file

    finite_options(args)
    if getattr(args, "timeout_min", 1) < 1:
        raise ConfigError(f"--timeout-min {args.timeout_min}: allowed: 1 or more")
    if writes:  # status only reads: a read-only results folder is fine there
        writable_dir("--results-dir", args.results_dir or os.environ.get("HARNESS_RESULTS") or "results")
        if args.storage and "://" not in args.storage:
            writable_file("--storage", args.storage)


def _check_services(args: argparse.Namespace) -> None:
    """What a sweep must reach (the launcher's scheduler, a PostgreSQL ledger, the tracking server), asked
    before the spec is expanded, which costs seconds of imports: a refusal is one line at once. The driver
    asks again (harness.sweep.driver._preflight) for callers that are not this command line."""
    from harness.sweep.storage import check_reachable
    from harness.sweep.worker_group import check_launcher
    from harness.tracking import require_reachable, tracking_uri

    check_launcher(args.launcher, tracking_uri())
    if args.storage and args.storage.startswith("postgresql"):
        check_reachable(args.storage)
    require_reachable()


def _sweep(args: argparse.Namespace) -> int:
    from harness.sweep.scale_choice import check_other_scales, pick_scale
    from harness.sweep.spec import load_spec
    from harness.sweep.stages import pick_stage

    _check_options(args, writes=not args.dry_run)
    if not args.dry_run:
        _check_services(args)
    spec, path = load_spec(args.name)
    scale, why = pick_scale(spec, path, args.scale)
    print(f"scale: {scale} ({why})", flush=True)
    stages = pick_stage(spec, path, scale, args.stage)
    for warning in check_other_scales(spec, path, scale):
        print(warning, file=sys.stderr)
    for stage in stages:
        plan = _stage_plan(args, spec, path, scale, stage)
        if plan is None:  # dry run of a compare stage: its knobs come from the tuning
            continue
        rc = _run_stage(args, plan)
        if rc != 0:
            return rc
    return 0


def _stage_plan(args: argparse.Namespace, spec, path: Path, scale: str, stage: str):
    from harness.sweep.spec import make_plan
    from harness.sweep.stages import check_budget, compare_plan, tune_plan

    if stage == "tune":
        plan = tune_plan(spec, path, scale, args.set)
        check_budget(plan, args.unequal_budget)
        return plan
    if stage != "compare":
        return make_plan(spec, path, scale, args.set)
    if args.dry_run:
        plan = make_plan(spec, path, scale, args.set)
        print(f"compare stage: {len(plan.cells)} cells of scale {scale}, each objective at its best tuned "
              "setting (known once the tuning stage has run)")
        return None
    return compare_plan(spec, path, scale, _tuned(args, spec, scale), args.set)


def _tuned(args: argparse.Namespace, spec, scale: str) -> dict:
    """Each objective's best tuned knobs, from the tuning stage's studies (ConfigError until it finished)."""
    from harness.sweep.storage import check_storage, open_storage
    from harness.sweep.tune_spec import objectives_of
    from harness.sweep.tuning import best_knobs

    stage = contract.tune_scale(scale)
    url = check_storage(args.storage, contract.ledger_path(_results(args), spec.study, stage))
    tune = spec.scales[scale].tune
    objectives = objectives_of(spec, scale)
    trials = {o: tune.trials_of(o) for o in objectives}
    if "://" not in url and not Path(url).is_file():
        raise ConfigError(f"--stage compare: no tuning ledger {url}; run `sweep {args.name} --scale {scale} "
                          "--stage tune` first")
    return best_knobs(open_storage(url), contract.experiment_name(spec.study, stage), objectives, trials)


def _run_stage(args: argparse.Namespace, plan) -> int:
    from harness.sweep.driver import SweepError, SweepOptions, run_sweep
    from harness.sweep.pg_ledger import LedgerUnavailable

    if plan.stage != "grid":
        print(f"stage: {plan.stage} ({plan.experiment})", flush=True)
    if args.workers is None:  # one job per slot of gpus_per_job GPUs; else one single-threaded job per core
        from harness.launch import default_workers, visible_gpus

        args.workers = default_workers(visible_gpus(), plan.gpus_per_job)
    if args.dry_run:
        from harness.sweep.display import console
        from harness.sweep.estimate import print_dry_run

        print_dry_run(plan, args.workers, console())
        return 0
    opts = SweepOptions(workers=args.workers, storage=args.storage, max_attempts=args.max_attempts,
                        retry_failed=args.retry_failed, launcher=args.launcher, stale_after=args.stale_after,
                        timeout_min=args.timeout_min, partition=args.partition,
                        cell_timeout_min=args.cell_timeout_min, stall_timeout_min=args.stall_timeout_min,
                        job_start=args.job_start)
    try:
        return run_sweep(plan, opts, _results(args))
    except (SweepError, LedgerUnavailable) as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before workers started: nothing is running; the next start tidies MLflow
        print("interrupted", file=sys.stderr)
        return 130


def _existing(args: argparse.Namespace) -> tuple[str, str, Path, str]:
    """(study, scale, results, storage) of a sweep that must already exist."""
    from harness.sweep.scale_choice import pick_scale
    from harness.sweep.spec import load_spec, scale_spec
    from harness.sweep.stages import pick_stage
    from harness.sweep.storage import check_storage

    _check_options(args, writes=args.func is not _status)
    spec, path = load_spec(args.name)
    results = _results(args)
    scale, stage = contract.split_stage(args.scale)
    if scale == "auto":  # the scale whose ledger is here, if only one is
        here = [s for s in spec.scales if contract.ledger_path(results, spec.study, s).is_file()]
        scale = here[0] if len(here) == 1 and args.storage is None else pick_scale(spec, path, "auto")[0]
    else:
        scale_spec(spec, path, scale)  # one the spec defines
    if stage or args.stage == "tune":
        pick_stage(spec, path, scale, "tune")  # a scale with a tune: section
        scale = contract.tune_scale(scale)
    ledger = contract.ledger_path(results, spec.study, scale)
    storage = check_storage(args.storage, ledger)
    if args.storage is None and not ledger.is_file():
        raise ConfigError(f"{ledger}: no ledger; start the sweep with `python -m harness sweep {args.name} "
                          f"--scale {scale}` (or give --storage / --results-dir)")
    return spec.study, scale, results, storage


def _worker(args: argparse.Namespace) -> int:
    """One worker, or (on a machine with several slots of gpus_per_job GPUs) one pinned worker per slot."""
    import dataclasses

    from harness.launch import check_gpus, gpu_slots, visible_gpus
    from harness.sweep.ledger import HOST, Ledger
    from harness.sweep.spec import spec_path
    from harness.sweep.storage import open_storage
    from harness.sweep.worker import WorkerOptions, run_worker
    from harness.sweep.worker_group import run_worker_group

    study, scale, results, storage = _existing(args)
    # the driver's setting
    per_job = Ledger(open_storage(storage), contract.experiment_name(study, scale), create=False).gpus_per_job
    name = args.worker_name or f"{HOST}-{os.getpid()}"
    opts = WorkerOptions(storage=storage, study=study, scale=scale, results=str(results), name=name,
                         job_start=args.job_start)
    where = f"sweep {study}/{scale}"
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if args.gpus is not None:  # pinned by whoever started this worker (the driver, a person, a scheduler)
        if args.workers not in (None, 1):
            raise ConfigError("--gpus pins one worker; leave out --workers")
        gpus = tuple(d.strip() for d in args.gpus.split(",") if d.strip() and d.strip().lower() != "none")
        check_gpus(list(gpus), per_job, where)
        return run_worker(dataclasses.replace(opts, gpus=gpus))
    gpus_here = visible_gpus()
    check_gpus(gpus_here, per_job, where)
    slots = gpu_slots(gpus_here, per_job)
    n = args.workers if args.workers is not None else max(1, len(slots))
    if n == 1:
        return run_worker(dataclasses.replace(opts, gpus=tuple(slots[0]) if slots else None))
    group = [dataclasses.replace(opts, name=f"{name}-{i}", gpus=tuple(slots[i % len(slots)]) if slots else ())
             for i in range(n)]
    return run_worker_group(spec_path(args.name).resolve(), group)


def _status(args: argparse.Namespace) -> int:
    from harness.sweep.display import console, status_table
    from harness.sweep.ledger import Ledger
    from harness.sweep.storage import open_storage

    study, scale, results, storage = _existing(args)
    cells = Ledger(open_storage(storage), contract.experiment_name(study, scale), create=False).cells()
    out = console()
    title = f"{study}/{scale} ({redact(storage)})"
    out.print(status_table(cells, title, contract.sweep_dir(results, study, scale)))
    states = [c.state for c in cells]
    out.print(", ".join(f"{states.count(s)} {s}" for s in
                        (*contract.FINISHED, contract.RUNNING, "queued", contract.FAILED, "interrupted") if s in states)
              or "no cells")
    return 0
