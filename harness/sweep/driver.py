"""One `sweep` invocation: validate, enqueue what is left, launch workers, watch, clean up.

Order matters: everything that can be rejected (spec, cells, storage, options) is checked before the first
folder, ledger entry or MLflow run is written. Re-running the same command resumes: complete and diverged
cells are skipped, attempts of dead workers are failed and re-queued, failed cells are retried up to the
attempt limit (`--retry-failed` grants a fresh allowance).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import contract, tracking
from harness.config import ConfigError
from harness.launch import check_gpus, visible_gpus
from harness.redact import redact
from harness.sweep import adopt, mlflow_runs
from harness.sweep.claim import ClaimTaken, DriverClaim
from harness.sweep.display import SweepView, console, fmt_s
from harness.sweep.estimate import utilisation
from harness.sweep.launcher import Launcher
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
    claimed_at,
)
from harness.sweep.pg_ledger import LedgerUnavailable
from harness.sweep.processes import pid_start
from harness.sweep.spec import Plan
from harness.sweep.stages import tune_of
from harness.sweep.storage import check_storage, open_storage
from harness.sweep.tuning import Tuner, run_score
from harness.sweep.worker_group import SUBMITIT, check_launcher


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
        if self.launcher in SUBMITIT and self.workers < 1:
            raise ConfigError(f"--launcher {self.launcher}: needs --workers 1 or more")
        for flag, value in (("--cell-timeout-min", self.cell_timeout_min),
                            ("--stall-timeout-min", self.stall_timeout_min)):
            if value is not None and not value > 0:
                raise ConfigError(f"{flag} {value}: must be a positive number of minutes")


def run_sweep(plan: Plan, opts: SweepOptions, results: Path) -> int:
    storage_url, gpus = _preflight(plan, opts, results)
    # ---- nothing above this line writes anything
    sweep = _Sweep(plan, opts, results, storage_url)
    sweep.claim()  # first: a refused driver writes nothing (but the claim's lock file)
    sweep.open_ledger()
    sweep.enqueue()
    sweep.start_parent()
    interrupted = sweep.supervise(Launcher(plan, opts, storage_url, results, sweep.dir, gpus))
    return sweep.finish(interrupted)


def _preflight(plan: Plan, opts: SweepOptions, results: Path) -> tuple[str, list[str]]:
    """Everything that can be rejected (options, storage, GPUs, the tracking server), checked before anything
    is written. Returns the ledger's storage and the GPUs for local workers."""
    opts.check()
    check_launcher(opts.launcher, tracking.tracking_uri())
    storage_url = check_storage(opts.storage, contract.ledger_path(results, plan.study, plan.scale))
    gpus: list[str] = []
    if opts.launcher == "local" and opts.workers > 0:  # local workers need the GPUs here (SLURM: the nodes')
        gpus = visible_gpus()
        check_gpus(gpus, plan.gpus_per_job, f"{plan.spec_path}: scales.{plan.scale}")
    tracking.require_reachable()
    return storage_url, gpus


class _Sweep:
    """One `sweep` invocation past its checks; run_sweep calls its steps in order, each setting up what the
    next needs."""

    driver_claim: DriverClaim
    ledger: Ledger
    client: Any  # MlflowClient
    exp_id: str
    parent: str  # this invocation's MLflow parent run
    view: SweepView
    started: datetime

    def __init__(self, plan: Plan, opts: SweepOptions, results: Path, storage_url: str):
        self.plan, self.opts, self.storage_url = plan, opts, storage_url
        self.tuner: Tuner | None = None  # a tuning stage: cells come from its trials (harness.sweep.tuning)
        self.dir = contract.sweep_dir(results, plan.study, plan.scale)
        self.out = console()
        self.find = _finder(self.dir, plan.experiment, lambda: self.ledger)  # the ledger: opened later

    def claim(self) -> None:
        self.driver_claim = _claim(self.storage_url, self.plan)

    def open_ledger(self) -> None:
        """The sweep's folder and ledger, with the options every worker reads from it."""
        plan, opts = self.plan, self.opts
        self.dir.mkdir(parents=True, exist_ok=True)
        # A short retry window: the watch loop rides out a longer outage itself, answering Ctrl-C meanwhile.
        self.ledger = ledger = Ledger(open_storage(self.storage_url, retry_s=30), plan.experiment, create=True,
                                      scale=plan.ledger_scale())
        ledger.set_attr(MAX_ATTEMPTS, opts.max_attempts)
        ledger.set_attr(STALE_AFTER, opts.stale_after)
        ledger.set_attr(CELL_TIMEOUT,
                        60 * opts.cell_timeout_min if opts.cell_timeout_min else plan.cell_timeout_s)
        ledger.set_attr(STALL_TIMEOUT,
                        60 * opts.stall_timeout_min if opts.stall_timeout_min else plan.stall_timeout_s)
        _set_launch(ledger, plan, self.out)
        if opts.retry_failed:
            ledger.set_attr(RETRY_FROM, len(ledger.storage.get_all_trials(ledger.study_id, deepcopy=False)))
        if plan.stage == "tune":
            self.tuner = Tuner(plan, ledger.storage, opts.workers)
            self.score = run_score(plan.hypothesis.measure)

    def enqueue(self) -> None:
        """Settle dead workers' attempts, then queue what is left to run."""
        self.ledger.reap(self.find)
        if self.tuner is not None:
            self._tune()
            tune = tune_of(self.plan)
            per = {o: tune.trials_of(o) for o in self.tuner.templates}
            self.out.print(f"tune {self.plan.experiment}: {', '.join(f'{o} {n}' for o, n in per.items())} trials, "
                           f"{len(next(iter(self.tuner.templates.values())))} job(s) each; sampler "
                           f"{tune.sampler.name}, pruner {tune.pruner.name}; "
                           f"ledger {redact(self.storage_url)}",
                           soft_wrap=True)
            return
        counts = _sync(self.ledger, self.plan)
        self.out.print(f"sweep {self.plan.experiment}: {len(self.plan.cells)} cells ({counts['new']} new, "
                       f"{counts['retry']} retried, {counts['done']} done, "
                       f"{counts['active']} queued or running, {counts['failed']} failed for good); "
                       f"ledger {redact(self.storage_url)}", soft_wrap=True)

    def start_parent(self) -> None:
        """MLflow brought in line with the ledger, and this invocation's parent run."""
        opts, plan = self.opts, self.plan
        self.client, self.exp_id = mlflow_runs.open_experiment(plan)
        mlflow_runs.tidy(self.client, self.exp_id, self.ledger)
        self.parent = mlflow_runs.start_parent(self.client, self.exp_id, plan, {
            "workers": opts.workers, "launcher": opts.launcher, "max_attempts": opts.max_attempts,
            "retry_failed": opts.retry_failed, "storage": redact(self.storage_url),
            "gpus_per_job": plan.gpus_per_job,
            "deepspeed": plan.deepspeed}, self.ledger.ledger_id)
        self.ledger.set_attr(PARENT_RUN, self.parent)
        _beat(self.ledger, self.parent)

    def supervise(self, workers: Launcher) -> bool:
        """Start the workers and watch them until they have left; True when Ctrl-C or SIGTERM stopped them.

        The signals set a flag the loop checks rather than raising where they land: an exception in the middle
        of a ledger write could leave the journal's lock held by this process, and stopping the workers and
        settling the sweep need the ledger afterwards."""
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda signum, frame: stop.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        title = f"{self.plan.experiment} ({self.opts.workers} workers)"
        if self.tuner is not None:
            self.view = SweepView(self.ledger, title, None, self.opts.workers, self.tuner.expected_jobs())
        else:
            self.view = SweepView(self.ledger, title, [c.hash for c in self.plan.cells], self.opts.workers)
        self.started = datetime.now()  # naive local time, as Optuna stamps attempts
        try:
            if not self.ledger.settled() and not stop.is_set():
                workers.start()
            with self.view:
                self._watch(workers, stop)
            if stop.is_set():
                self.out.print("interrupted: stopping workers (their cells go back to the queue)...")
                workers.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return stop.is_set()

    def _watch(self, workers: Launcher, stop: threading.Event) -> None:
        last_beat = last_tune = 0.0
        down: float | None = None  # since when the ledger's database has not answered
        while not stop.is_set():
            try:
                self.view.update()
                if time.time() - last_beat > 10:
                    self._check_in()
                    last_beat = time.time()
                if self.tuner is not None and time.time() - last_tune > 2:
                    self._tune()
                    last_tune = time.time()
                if not self.ledger.settled():
                    workers.replace_killed()
                if workers.finished() and (self.opts.workers > 0 or self.ledger.settled()):
                    break
                if down is not None:
                    self.out.print(f"the ledger answers again after {time.time() - down:.0f} s")
                    down = None
            except LedgerUnavailable as e:  # workers and jobs ride it out too; nothing is settled meanwhile
                if down is None:
                    down = time.time()
                    self.out.print(f"{redact(str(e))}; waiting for it (Ctrl-C stops the sweep)")
            stop.wait(0.5)
        self.view.update()

    def _check_in(self) -> None:
        """The claim still held, attempts of dead workers settled, the driver's heartbeat refreshed."""
        if not self.driver_claim.held():
            raise SweepError(f"lost the driver claim on {self.storage_url} (connection to the ledger lost); "
                             "run the same command again to resume")
        self.ledger.reap(self.find)  # workers on other machines can die too; their attempts are settled here
        _beat(self.ledger, self.parent)

    def finish(self, interrupted: bool) -> int:
        """End the parent run, tidy MLflow, release the claim, print the summary; the exit code."""
        if self.tuner is not None and not interrupted:
            self._tune()  # the last trials' results
        self.view.update()
        done = self.view.count(*contract.FINISHED)
        ok = self.tuner.finished() if self.tuner is not None else done == len(self.plan.cells)
        status = "KILLED" if interrupted else "FINISHED" if ok else "FAILED"
        self._end_parent(status)
        self.ledger.set_attr(DRIVER, None)
        self.driver_claim.release()
        self._summary()
        return 130 if interrupted else 0 if ok else 1

    def _tune(self) -> None:
        assert self.tuner is not None
        self.tuner.sync(self.ledger, self.score)

    def _end_parent(self, status: str) -> None:
        view = self.view
        try:
            mlflow_runs.end_parent(self.client, self.parent, status, {
                "complete": view.count(contract.COMPLETE), "diverged": view.count(contract.DIVERGED),
                "failed": view.count(contract.FAILED, "interrupted")})
            mlflow_runs.tidy(self.client, self.exp_id, self.ledger)
        except Exception as e:  # a tracking outage at the end loses nothing: the next start tidies MLflow
            logging.getLogger(__name__).debug("MLflow tidy-up failed", exc_info=True)
            self.out.print(f"warning: MLflow tidy-up skipped ({type(e).__name__}: {str(e)[:200]}); the next "
                           "`sweep` start does it", soft_wrap=True)

    def _summary(self) -> None:
        opts, plan, out = self.opts, self.plan, self.out
        ended = datetime.now()
        busy = utilisation(((t.datetime_start, t.datetime_complete) for t in self.ledger.trials()),
                           self.started, ended, opts.workers if opts.launcher == "local" else 0)
        busy_text = (f"; worker utilisation {busy:.0%} of {opts.workers} x "
                     f"{fmt_s((ended - self.started).total_seconds())}" if busy is not None else "")
        out.print(f"sweep {plan.experiment}: {self.view.summary()}{busy_text}; results in {self.dir}; MLflow "
                  f"experiment {plan.experiment!r}, parent run {self.parent}", soft_wrap=True)
        if self.tuner is not None:
            for line in self.tuner.summary():
                out.print(f"  {line}", soft_wrap=True)
        for c in self.view.cells:
            if c.state == contract.FAILED:
                out.print(f"  failed {c.hash} {' '.join(f'{k}={v}' for k, v in c.axes.items())} after "
                          f"{c.attempts} attempt(s): {c.error} (log {c.log}); rerun with --retry-failed",
                          soft_wrap=True)


def _sync(ledger: Ledger, plan: Plan) -> dict[str, int]:
    """Enqueue new cells once (this process is the only producer before workers start); re-queue failed
    ones."""
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
            active = states & {"RUNNING", "WAITING"}
            key = "done" if "COMPLETE" in states else "active" if active else "failed"
            counts[key] += 1
    return counts


def _set_launch(ledger: Ledger, plan: Plan, out: Any) -> None:
    """How every worker (here or on other machines) launches a job: the scale's gpus_per_job and deepspeed."""
    before = (ledger.gpus_per_job, ledger.deepspeed)
    now = (plan.gpus_per_job, plan.deepspeed)
    if before != now and any(contract.is_result(c.state) for c in ledger.cells()):
        out.print(f"warning: gpus_per_job/deepspeed changed from {before[0]}/{before[1]} to "
                  f"{now[0]}/{now[1]}; cells already finished keep their results (their runs are tagged "
                  "harness.gpus_per_job)", soft_wrap=True)
    ledger.set_attr(GPUS_PER_JOB, plan.gpus_per_job)
    ledger.set_attr(DEEPSPEED, plan.deepspeed)


def _claim(storage_url: str, plan: Plan) -> DriverClaim:
    """The one-driver rule, atomic in the ledger's storage (harness.sweep.claim), on any number of
    machines."""
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


def _finder(sweep_dir: Path, experiment: str, ledger: Any) -> Any:
    """What a dead worker's attempt came to (harness.sweep.adopt), for Ledger.reap; ledger() is the ledger,
    whose id binds the attempt to its own runs."""
    return lambda t: adopt.find(sweep_dir, experiment, t.user_attrs[CELL], int(t.user_attrs[ATTEMPT]),
                                ledger().ledger_id, claimed_at(t))


def _beat(ledger: Ledger, parent: str) -> None:
    ledger.set_attr(DRIVER, {"host": HOST, "pid": os.getpid(), "pid_start": pid_start(os.getpid()),
                             "run_id": parent, "heartbeat": time.time()})
