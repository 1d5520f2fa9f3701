"""One `sweep` invocation: validate, enqueue what is left, launch workers, watch, clean up.

Order matters: everything that can be rejected (spec, cells, storage, options) is checked before the first
folder, ledger entry or MLflow run is written. Re-running the same command resumes: complete and diverged cells
are skipped, attempts of dead workers are failed and re-queued, failed cells are retried up to the attempt limit
(`--retry-failed` grants a fresh allowance).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import tracking
from harness.config import ConfigError
from harness.launch import check_gpus, gpu_slots, visible_gpus
from harness.sweep import adopt, runs
from harness.sweep.claim import ClaimTaken, DriverClaim
from harness.sweep.display import SweepView, console, fmt_s
from harness.sweep.estimate import utilisation
from harness.sweep.ledger import (
    ATTEMPT,
    CELL,
    CELL_TIMEOUT,
    DEEPSPEED,
    DRIVER,
    GPUS_PER_JOB,
    HOST,
    MAX_ATTEMPTS,
    PARENT_RUN,
    RETRY_FROM,
    STALE_AFTER,
    STALL_TIMEOUT,
    Ledger,
    check_storage,
    open_storage,
)
from harness.sweep.processes import pid_start
from harness.sweep.spec import Plan
from harness.sweep.worker import GRACE_S, WorkerOptions, run_worker, spawn_worker


class SweepError(RuntimeError):
    """The sweep cannot run now (another driver holds it); the CLI prints it and exits with code 1."""


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How to run one sweep invocation (the CLI's options, validated)."""

    workers: int = 1
    storage: str | None = None
    max_attempts: int = 2
    retry_failed: bool = False
    launcher: str = "local"
    stale_after: float = 120.0
    timeout_min: int = 24 * 60
    partition: str | None = None
    cell_timeout_min: float | None = None   # None: the scale's (spec), see harness.sweep.watchdog
    stall_timeout_min: float | None = None
    job_start: str = "fork"                 # harness.sweep.forkserver: fork or exec single-process CPU jobs

    def check(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers}: must be 0 (external workers only) or more")
        if self.max_attempts < 1:
            raise ConfigError(f"--max-attempts {self.max_attempts}: must be at least 1")
        if self.stale_after <= 0:
            raise ConfigError(f"--stale-after {self.stale_after}: must be positive")
        if self.launcher == "slurm" and self.workers < 1:
            raise ConfigError("--launcher slurm: needs --workers 1 or more")
        for flag, value in (("--cell-timeout-min", self.cell_timeout_min),
                            ("--stall-timeout-min", self.stall_timeout_min)):
            if value is not None and not value > 0:
                raise ConfigError(f"{flag} {value}: must be a positive number of minutes")


def run_sweep(plan: Plan, opts: SweepOptions, results: Path) -> int:
    opts.check()
    sweep_dir = results / plan.study / plan.scale
    storage_url = check_storage(opts.storage, sweep_dir / "ledger.journal")
    gpus: list[str] = []
    if opts.launcher == "local" and opts.workers > 0:  # local workers need the GPUs here (SLURM: the nodes')
        gpus = visible_gpus()
        check_gpus(gpus, plan.gpus_per_job, f"{plan.spec_path}: scales.{plan.scale}")
    out = console()
    down = tracking.unreachable()
    if down:
        raise SweepError(f"{down}; start it, or point MLFLOW_TRACKING_URI at one that answers")
    # ---- nothing above this line writes anything
    claim = _claim(storage_url, plan)  # first: a refused driver writes nothing (but the claim's lock file)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(open_storage(storage_url), plan.experiment, create=True)
    ledger.set_attr(MAX_ATTEMPTS, opts.max_attempts)
    ledger.set_attr(STALE_AFTER, opts.stale_after)
    ledger.set_attr(CELL_TIMEOUT, 60 * opts.cell_timeout_min if opts.cell_timeout_min else plan.cell_timeout_s)
    ledger.set_attr(STALL_TIMEOUT, 60 * opts.stall_timeout_min if opts.stall_timeout_min else plan.stall_timeout_s)
    _set_launch(ledger, plan, out)
    if opts.retry_failed:
        ledger.set_attr(RETRY_FROM, len(ledger.storage.get_all_trials(ledger.study_id, deepcopy=False)))
    find = _finder(sweep_dir, plan.experiment)
    ledger.reap(find)
    counts = _sync(ledger, plan)
    out.print(f"sweep {plan.experiment}: {len(plan.cells)} cells ({counts['new']} new, {counts['retry']} retried, "
              f"{counts['done']} done, {counts['active']} queued or running, {counts['failed']} failed for good); "
              f"ledger {storage_url}", soft_wrap=True)

    client, exp_id = runs.open_experiment(plan)
    runs.tidy(client, exp_id, ledger)
    parent = runs.start_parent(client, exp_id, plan, {
        "workers": opts.workers, "launcher": opts.launcher, "max_attempts": opts.max_attempts,
        "retry_failed": opts.retry_failed, "storage": storage_url, "gpus_per_job": plan.gpus_per_job,
        "deepspeed": plan.deepspeed})
    ledger.set_attr(PARENT_RUN, parent)
    _beat(ledger, parent)

    workers = _Launcher(plan, opts, storage_url, results, sweep_dir, gpus)
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    view = SweepView(ledger, f"{plan.experiment} ({opts.workers} workers)", [c.hash for c in plan.cells],
                     opts.workers)
    started = datetime.now()  # naive local time, as Optuna stamps attempts
    try:
        if not ledger.settled():
            workers.start()
        with view:
            last_beat = 0.0
            while True:
                view.update()
                if time.time() - last_beat > 10:
                    if not claim.held():
                        raise SweepError(f"lost the driver claim on {storage_url} (connection to the ledger lost); "
                                         "run the same command again to resume")
                    ledger.reap(find)  # workers on other machines can die too; their attempts are settled here
                    _beat(ledger, parent)
                    last_beat = time.time()
                if not ledger.settled():
                    workers.replace_killed()
                if workers.finished() and (opts.workers > 0 or ledger.settled()):
                    break
                time.sleep(0.5)
            view.update()
    except KeyboardInterrupt:
        interrupted = True
        out.print("interrupted: stopping workers (their cells go back to the queue)...")
        workers.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
    view.update()
    done, failed = view.count("complete", "diverged"), view.count("failed", "interrupted")
    status = "KILLED" if interrupted else "FINISHED" if done == len(plan.cells) else "FAILED"
    try:
        runs.end_parent(client, parent, status, {"complete": view.count("complete"),
                                                 "diverged": view.count("diverged"), "failed": failed})
        runs.tidy(client, exp_id, ledger)
    except Exception as e:  # a tracking outage at the end loses nothing: the next start tidies MLflow
        logging.getLogger(__name__).debug("MLflow tidy-up failed", exc_info=True)
        out.print(f"warning: MLflow tidy-up skipped ({type(e).__name__}: {str(e)[:200]}); the next `sweep` "
                  "start does it", soft_wrap=True)
    ledger.set_attr(DRIVER, None)
    claim.release()
    ended = datetime.now()
    busy = utilisation(((t.datetime_start, t.datetime_complete) for t in ledger.trials()), started, ended,
                       opts.workers if opts.launcher == "local" else 0)
    busy_text = (f"; worker utilisation {busy:.0%} of {opts.workers} x {fmt_s((ended - started).total_seconds())}"
                 if busy is not None else "")
    out.print(f"sweep {plan.experiment}: {view.summary()}{busy_text}; results in {sweep_dir}; MLflow experiment "
              f"{plan.experiment!r}, parent run {parent}", soft_wrap=True)
    for c in view.cells:
        if c.state == "failed":
            out.print(f"  failed {c.hash} {' '.join(f'{k}={v}' for k, v in c.axes.items())} after "
                      f"{c.attempts} attempt(s): {c.error} (log {c.log}); rerun with --retry-failed", soft_wrap=True)
    return 130 if interrupted else 0 if done == len(plan.cells) else 1


def _sync(ledger: Ledger, plan: Plan) -> dict[str, int]:
    """Enqueue new cells once (this process is the only producer before workers start); re-queue failed ones."""
    counts = dict(new=0, retry=0, done=0, active=0, failed=0)
    existing = ledger.by_cell()
    for cell in plan.cells:
        trials = existing.get(cell.hash)
        if not trials:
            ledger.enqueue(cell.hash, cell.axes, cell.job_fields(), cell.cost, attempt=1)
            counts["new"] += 1
        elif ledger.requeue(cell.hash):
            counts["retry"] += 1
        else:
            states = {t.state.name for t in trials}
            key = "done" if "COMPLETE" in states else "active" if states & {"RUNNING", "WAITING"} else "failed"
            counts[key] += 1
    return counts


def _set_launch(ledger: Ledger, plan: Plan, out: Any) -> None:
    """How every worker (here or on other machines) launches a job: the scale's gpus_per_job and deepspeed."""
    before = (ledger.gpus_per_job, ledger.deepspeed)
    now = (plan.gpus_per_job, plan.deepspeed)
    if before != now and any(c.state in ("complete", "diverged") for c in ledger.cells()):
        out.print(f"warning: gpus_per_job/deepspeed changed from {before[0]}/{before[1]} to {now[0]}/{now[1]}; "
                  "cells already finished keep their results (their runs are tagged harness.gpus_per_job)",
                  soft_wrap=True)
    ledger.set_attr(GPUS_PER_JOB, plan.gpus_per_job)
    ledger.set_attr(DEEPSPEED, plan.deepspeed)


def _claim(storage_url: str, plan: Plan) -> DriverClaim:
    """The one-driver rule, atomic in the ledger's storage (harness.sweep.claim), on any number of machines."""
    try:
        return DriverClaim(storage_url, plan.experiment).take()
    except ClaimTaken as e:
        holder = ""
        try:
            d = Ledger(open_storage(storage_url), plan.experiment, create=False).attr(DRIVER) or {}
            holder = f" (pid {d['pid']} on {d['host']})" if d else ""
        except ConfigError:
            pass
        raise SweepError(f"another `sweep` driver{holder} is running this sweep ({e}); add workers with "
                         "`python -m harness worker NAME` instead") from None


def _finder(sweep_dir: Path, experiment: str) -> Any:
    """What a dead worker's attempt came to (harness.sweep.adopt), for Ledger.reap."""
    return lambda t: adopt.find(sweep_dir, experiment, t.user_attrs[CELL], int(t.user_attrs[ATTEMPT]))


def _beat(ledger: Ledger, parent: str) -> None:
    ledger.set_attr(DRIVER, {"host": HOST, "pid": os.getpid(), "pid_start": pid_start(os.getpid()),
                             "run_id": parent, "heartbeat": time.time()})


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Launcher:
    """Local worker processes, or submitit jobs (SLURM, or submitit's local executor where there is none)."""

    def __init__(self, plan: Plan, opts: SweepOptions, storage: str, results: Path, sweep_dir: Path,
                 gpus: list[str]):
        self.plan, self.opts, self.storage, self.results, self.sweep_dir = plan, opts, storage, results, sweep_dir
        self.gpus = gpus
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []
        self.slots: list[tuple[str, ...]] = []
        self.jobs: list[Any] = []

    def worker_options(self, name: str, gpus: tuple[str, ...] | None = None) -> WorkerOptions:
        return WorkerOptions(storage=self.storage, study=self.plan.study, scale=self.plan.scale,
                             results=str(self.results), name=name, gpus=gpus, job_start=self.opts.job_start)

    def start(self) -> None:
        if self.opts.workers == 0:
            return
        if self.opts.launcher == "slurm":
            self._start_submitit()
            return
        # Each worker gets its own slot of gpus_per_job devices; workers beyond the slots share them
        # round-robin. Without GPUs: `--gpus none` (CPU jobs, and the worker need not look for CUDA itself).
        slots = gpu_slots(self.gpus, self.plan.gpus_per_job)
        if slots and self.opts.workers > len(slots):
            console().print(f"warning: {self.opts.workers} workers share {len(slots)} slot(s) of "
                            f"{self.plan.gpus_per_job} GPU(s) round-robin", soft_wrap=True)
        for i in range(self.opts.workers):
            self.names.append(f"{HOST}-w{i}")
            self.slots.append(tuple(slots[i % len(slots)]) if slots else ())
            self.procs.append(spawn_worker(self.plan.spec_path.resolve(), self.worker_options(self.names[i],
                                                                                              self.slots[i])))

    def _start_submitit(self) -> None:
        import submitit

        executor = submitit.AutoExecutor(folder=self.sweep_dir / "submitit")
        params: dict[str, Any] = {"timeout_min": self.opts.timeout_min, "name": f"sweep-{self.plan.study}",
                                  "slurm_array_parallelism": self.opts.workers}
        if self.plan.scale == "paper" or self.plan.gpus_per_job > 1:
            params["gpus_per_node"] = self.plan.gpus_per_job  # one worker per array task, one job at a time
        if self.opts.partition:
            params["slurm_partition"] = self.opts.partition
        executor.update_parameters(**params)
        names = [f"{executor.cluster}-w{i}" for i in range(self.opts.workers)]
        self.jobs = executor.map_array(run_worker, [self.worker_options(n) for n in names])

    def replace_killed(self) -> None:
        """A local worker killed by a signal (OOM killer, a stray kill -9) is replaced while work is left; its
        attempt is settled by the reaper (adopted if its job had finished)."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None and p.returncode < 0:
                console().print(f"worker {self.names[i]} (pid {p.pid}) was killed by "
                                f"{signal.Signals(-p.returncode).name}; starting another", soft_wrap=True)
                self.procs[i] = spawn_worker(self.plan.spec_path.resolve(), self.worker_options(self.names[i],
                                                                                                self.slots[i]))

    def finished(self) -> bool:
        return all(p.poll() is not None for p in self.procs) and all(j.done() for j in self.jobs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for j in self.jobs:
            j.cancel(check=False)
        deadline = time.time() + GRACE_S + 15
        try:
            while not self.finished() and time.time() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # its job gets SIGKILL too (parent-death signal); the next start reaps the cell
                p.wait()

