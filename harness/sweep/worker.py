"""A worker: pulls queued cells from the ledger and runs each as `python -m harness train` in a subprocess
(`accelerate launch --num_processes k ... -m harness train` when the sweep's scale sets gpus_per_job k > 1).

Each attempt runs in its own session with its own log, a heartbeat thread keeps the attempt's claim fresh,
and the job dies with the worker (Linux parent-death signal), so no job outlives the worker that answers for
it. An attempt runs in four steps: prepare (folder, config, command), launch (fork or exec), supervise (the
wait, with heartbeat, watchdog and signals) and settle, whose decision is harness.sweep.outcome's. The
attempt's own result decides, whatever the exit code (harness.sweep.adopt: its result file, else its MLflow
run): complete/diverged -> COMPLETE; otherwise exit 2 (bad config) -> failed, not retried; a job past its cell
time limit or silent past the stall limit (harness.sweep.watchdog) -> timeout; anything else -> failed; both
re-queued up to the sweep's attempt limit. SIGINT and SIGTERM stop the job gracefully and re-queue the cell
without spending an attempt (recorded before the job is stopped, so a scheduler's SIGKILL after its SIGTERM
cannot turn it into a failure), as does a job that died of a tracking-server outage; while the server is down
the worker takes no cell. SIGUSR2 (a scheduler's warning before the time limit) makes it take no new cell. A
worker that is a SLURM job takes only cells expected to end before its time limit (harness.sweep.slurm).

GPUs: a worker started with `gpus` (the driver's local workers, `harness worker --gpus`) pins its jobs to
those devices with CUDA_VISIBLE_DEVICES; without, its jobs see what the worker sees (a SLURM allocation, say).
`run_worker_group` runs several pinned workers on one machine, as `harness worker` does on a multi-GPU
machine.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from harness import contract
from harness.launch import job_command, train_command
from harness.redact import redact, redact_output
from harness.sweep import adopt, job_log, outcome, processes
from harness.sweep.forkserver import Forkserver
from harness.sweep.heartbeat import Heartbeat
from harness.sweep.ledger import ATTEMPT, AXES, CELL, CONFIG, HOST, JOB, PARENT_RUN, TUNE, Ledger, claimed_at
from harness.sweep.pg_ledger import LedgerUnavailable
from harness.sweep.processes import has_nvidia_devices, job_env, job_preexec, pid_start
from harness.sweep.slurm import NEVER_FITS, NOTHING_FITS, margin_s, time_left_s
from harness.sweep.storage import open_storage
from harness.sweep.watchdog import Watchdog
from harness.tracking import PROGRESS_ENV, code_state, tracking_uri, unreachable

log = logging.getLogger("harness.sweep.worker")
REPO_ROOT = Path(__file__).resolve().parents[2]
# How long a job gets to mark its MLflow run KILLED after SIGTERM before every process of it is SIGKILLed:
# longer than a launcher's own wait for its ranks after forwarding SIGTERM (torchrun: 30 s).
GRACE_S = 45.0


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """Everything a worker needs; picklable, so submitit can ship it to a SLURM (or local) job."""

    storage: str
    study: str
    scale: str
    results: str
    name: str
    poll_s: float = 1.0
    # devices of this worker's jobs (CUDA_VISIBLE_DEVICES); None: inherited
    gpus: tuple[str, ...] | None = None
    job_start: str = "fork"  # fork single-process CPU jobs from a preloaded forkserver, or exec every job

    @property
    def study_name(self) -> str:
        return contract.experiment_name(self.study, self.scale)

    @property
    def sweep_dir(self) -> Path:
        return contract.sweep_dir(self.results, self.study, self.scale)


def run_worker(opts: WorkerOptions) -> int:
    """Entry point of `python -m harness worker`, of local workers and of submitit jobs."""
    redact_output()  # a submitit job's log too: MLflow's client prints its URI, password included
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {opts.name} %(message)s", stream=sys.stdout)
    os.environ["HARNESS_RESULTS"] = opts.results  # the job's results root and default MLflow store follow it
    processes.become_subreaper()  # a job's processes whose parent dies come here (processes.JobTree)
    try:
        return Worker(opts).run()
    except LedgerUnavailable as e:  # its attempt, if any, is settled by a reaper; a launcher replaces the worker
        log.error("worker %s leaves: %s", opts.name, e)
        return 1


@dataclasses.dataclass(frozen=True)
class _Job:
    """One attempt's job, prepared: its files and how it is launched."""

    trial: FrozenTrial
    cell: str
    attempt: int
    config: dict[str, Any]
    config_file: Path
    result: Path  # the job's --result file
    progress: Path  # touched by the job whenever it stores a metric (the watchdog's stall clock)
    log: Path
    per_job: int  # processes (GPUs) per job
    deepspeed: str

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.trial.user_attrs[AXES].items())


@dataclasses.dataclass(frozen=True)
class _Ended:
    """How an attempt's job ended, as its worker saw it."""

    exit_code: int
    stopped: bool  # the worker stopped it
    timed_out: str | None  # why the watchdog stopped it, if it did
    heartbeat_lost: bool  # another process declared the attempt dead meanwhile
    duration_s: float


class Worker:
    def __init__(self, opts: WorkerOptions):
        self.opts = opts
        self.ledger = Ledger(open_storage(opts.storage), opts.study_name, create=False)
        self.stop = threading.Event()
        self.ran = 0  # attempts this worker ran (a SLURM worker that ran none and finds nothing fitting says so)
        self.draining = False  # SIGUSR2: finish the current job, take no new one
        self.forkserver = Forkserver(job_env(opts.gpus))
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR2:  # a scheduler's warning that the time limit nears: SIGTERM follows at it
            log.info("got SIGUSR2: taking no new cell; the current job runs on until the time limit")
            self.draining = True
            return
        log.info("got %s: stopping after the current job is stopped", signal.Signals(signum).name)
        self.stop.set()

    def run(self) -> int:
        log.info("worker %s on %s (pid %d) joined %s", self.opts.name, HOST, os.getpid(),
                 self.opts.study_name)
        waiting_for: str | None = None
        while not self.stop.is_set():
            down = unreachable()
            if down:  # a job started now would only fail: its cell waits in the queue instead
                if down != waiting_for:
                    log.warning("%s; waiting before taking a cell", down)
                waiting_for = down
                self.stop.wait(max(self.opts.poll_s, 2.0))
                continue
            if waiting_for:
                log.info("MLflow tracking server %s answers again", redact(tracking_uri()))
                waiting_for = None
            left = time_left_s()  # a SLURM job's time limit: take only cells that end before it
            if self.draining:
                return NOTHING_FITS if self.ledger.trials((TrialState.WAITING,)) else 0
            trial = self.ledger.pop(self.opts.name, lambda t: contract.attempt_log(
                self.opts.sweep_dir, t.user_attrs[CELL], t.user_attrs[ATTEMPT]),
                max_seconds=None if left is None else left - margin_s(left))
            if trial is not None:
                self.run_attempt(trial)
                self.ran += 1
                continue
            if left is not None and self.ledger.trials((TrialState.WAITING,)):
                log.info("worker %s leaves: no queued cell is expected to end in the %.0fs its job has left",
                         self.opts.name, left)
                return NOTHING_FITS if self.ran else NEVER_FITS
            # Idle: take over attempts of dead workers, leave once nothing can come back to the queue.
            self.ledger.reap(self._find)
            if self.ledger.settled():
                break
            self.stop.wait(self.opts.poll_s)
        log.info("worker %s leaves (%s)", self.opts.name, "stopped" if self.stop.is_set() else "queue empty")
        return 130 if self.stop.is_set() else 0

    def run_attempt(self, trial: FrozenTrial) -> None:
        job = self._prepare(trial)
        if job.per_job > 1 and self.opts.gpus is not None and len(self.opts.gpus) < job.per_job:
            self._hand_back(job, f"worker {self.opts.name} has GPUs {','.join(self.opts.gpus) or 'none'}, "
                                 f"jobs need {job.per_job}")
            return
        cmd = self._command(job)
        log.info("cell %s attempt %d (%s): starting, log %s", job.cell, job.attempt, job.label, job.log)
        t0 = time.time()
        proc = self._launch(job, cmd)
        ended = self._supervise(job, proc, t0)
        self._settle(job, ended)

    def _prepare(self, trial: FrozenTrial) -> _Job:
        """The attempt's folder and config file, with no stale result or progress file in the way."""
        cell, attempt = trial.user_attrs[CELL], int(trial.user_attrs[ATTEMPT])
        sweep = self.opts.sweep_dir
        job_dir = contract.job_dir(sweep, cell)
        job_dir.mkdir(parents=True, exist_ok=True)
        cfg = {**trial.user_attrs[CONFIG], "output_dir": str(job_dir), "experiment": self.opts.study_name}
        cfg_path = job_dir / "config.yaml"
        result = contract.attempt_result(sweep, cell, attempt)
        progress = contract.attempt_progress(sweep, cell, attempt)
        log_path = contract.attempt_log(sweep, cell, attempt)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        for stale in (result, progress):  # left by an earlier ledger in this results folder, if any
            stale.unlink(missing_ok=True)
        # How to launch is the sweep's (study attrs), read per attempt: a resumed sweep may have changed it.
        return _Job(trial, cell, attempt, cfg, cfg_path, result, progress, log_path, self.ledger.gpus_per_job,
                    self.ledger.deepspeed)

    def _hand_back(self, job: _Job, why: str) -> None:
        """Not the job's fault: hand the cell back without spending an attempt, and leave."""
        log.error("cell %s: %s; leaving", job.cell, why)
        if self.ledger.note(job.trial._trial_id, {"state": outcome.INTERRUPTED, "error": why}):
            self.ledger.requeue(job.cell, settling=job.trial, failed=False)
            self.ledger.settle(job.trial._trial_id, TrialState.FAIL)
        self.stop.set()

    def _command(self, job: _Job) -> list[str]:
        """`harness train` (or `accelerate launch`) of the job's config, with the run's identity as tags."""
        tags = contract.RunIdentity(study=self.opts.study, scale=self.opts.scale, cell=job.cell,
                                    attempt=job.attempt, axes=job.trial.user_attrs[AXES],
                                    gpus_per_job=job.per_job, deepspeed=job.deepspeed,
                                    ledger=self.ledger.ledger_id).to_tags()
        tune = job.trial.user_attrs.get(TUNE)
        if tune:
            tags.update({contract.TUNE_STUDY: tune["study"], contract.TUNE_TRIAL: str(tune["trial"])})
        cmd = [*job_command(job.per_job, job.deepspeed), str(job.config_file),
               *[a for k, v in tags.items() for a in ("--tag", f"{k}={v}")], "--result", str(job.result)]
        parent = self.ledger.attr(PARENT_RUN)
        if parent:
            cmd += ["--parent-run-id", parent]
        return cmd

    def _launch(self, job: _Job, cmd: list[str]) -> Any:
        """Fork the job from the forkserver, or exec it: in its own session, dying with this worker."""
        env = {**job_env(self.opts.gpus), PROGRESS_ENV: str(job.progress)}
        tune = job.trial.user_attrs.get(TUNE)
        if tune:  # the job reports its evaluations to its trial, whose pruner may stop it (harness.pruning)
            storage = self.opts.storage if "://" in self.opts.storage else str(Path(self.opts.storage).resolve())
            env[contract.TUNE_ENV] = json.dumps({**tune, "storage": storage})
        fork = self._forks(job.per_job, job.config)
        if fork and not self.forkserver.serves(code_state()):
            log.info("cell %s: the source changed since the forkserver loaded it; exec'ing the job", job.cell)
            fork = False
        with open(job.log, "ab") as out:
            out.write(f"# {time.strftime('%F %T')} worker {self.opts.name} on {HOST}: {shlex.join(cmd)}"
                      f"{' (forked)' if fork else ''}\n".encode())
            out.flush()
            if fork:
                proc = self.forkserver.start(["train", *cmd[len(train_command()):]], job.log, env, REPO_ROOT)
            else:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=REPO_ROOT, env=env, start_new_session=True,
                                        preexec_fn=job_preexec())
        # A reaper that outlives this worker waits for this process to be gone before judging the attempt.
        try:
            self.ledger.storage.set_trial_user_attr(job.trial._trial_id, JOB,
                                                    {"pid": proc.pid, "pid_start": pid_start(proc.pid)})
        except UpdateFinishedTrialError:
            pass  # already settled by another process: the heartbeat says so within one beat
        return proc

    def _supervise(self, job: _Job, proc: Any, t0: float) -> _Ended:
        """Wait for the job, keeping the attempt's heartbeat; stop it (SIGTERM, then SIGKILL after GRACE_S)
        on a signal to this worker, when another process declares the attempt dead, or past the watchdog's
        limits. Stopping it stops every process of it, in its group or not (processes.JobTree)."""
        tree = processes.JobTree(proc.pid)
        beat = Heartbeat(self.ledger, job.trial._trial_id, interval=min(30.0, self.ledger.stale_after / 4))
        beat.start()
        dog = Watchdog(job.progress, self.ledger.cell_timeout_s, self.ledger.stall_timeout_s, started=t0)
        stopped_at: float | None = None
        timed_out: str | None = None
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            tree.poll()
            if stopped_at is None:
                timed_out = None if (self.stop.is_set() or beat.lost.is_set()) else dog.check()
                if self.stop.is_set() or beat.lost.is_set() or timed_out:
                    if timed_out:
                        log.warning("cell %s attempt %d: %s; stopping its job", job.cell, job.attempt,
                                    timed_out)
                    elif self.stop.is_set():  # a scheduler's SIGKILL may follow its SIGTERM before we settle
                        self.ledger.note(job.trial._trial_id, {"state": outcome.INTERRUPTED,
                                                               "error": "stopped by a signal to the worker"})
                    stopped_at = time.time()
                    tree.terminate()
            elif time.time() - stopped_at > GRACE_S:
                tree.kill()
        left = tree.clear(stopped_at, GRACE_S)  # a rank outside the job's group would hold its GPU on
        if left:
            log.warning("cell %s attempt %d: its job left %d process(es) behind (%s); stopped them", job.cell,
                        job.attempt, len(left), " ".join(map(str, sorted(left))))
        beat.stop()
        return _Ended(rc, stopped_at is not None, timed_out, beat.lost.is_set(), round(time.time() - t0, 1))

    def _settle(self, job: _Job, ended: _Ended) -> None:
        """Decide what the attempt came to (harness.sweep.outcome) and record it."""
        verdict, outage = self._verdict(job.cell, job.attempt, claimed_at(job.trial))
        decided = outcome.decide(self._attempt_end(job, ended, verdict, outage))
        if decided.state in (outcome.SUPERSEDED, outcome.DECLARED_DEAD):
            log.warning("cell %s attempt %d was declared dead by another process; its job was stopped",
                        job.cell, job.attempt)
            if decided.state == outcome.SUPERSEDED:
                adopt.supersede(verdict.run_id, str(decided.error))
            return
        if decided.state == outcome.LEFT_FOR_REAPER:  # stopping in a tracking outage: a reaper settles it
            log.warning("cell %s attempt %d: left for a reaper (%s)", job.cell, job.attempt, decided.error)
            return
        base = {"exit_code": ended.exit_code, "duration_s": ended.duration_s, "log": str(job.log)}
        if contract.is_result(decided.state):
            settled, record = self._adopt(job, verdict, base)
        else:
            settled, record = self._fail(job, verdict, decided, base)
        if not settled:
            log.warning("cell %s attempt %d was settled by another process first", job.cell, job.attempt)
        log.info("cell %s attempt %d (%s): %s in %.0fs%s", job.cell, job.attempt, job.label, record["state"],
                 ended.duration_s, f" ({record['error']})" if record.get("error") else "")

    def _attempt_end(self, job: _Job, ended: _Ended, verdict: adopt.Verdict,
                     outage: str | None) -> outcome.AttemptEnd:
        end = outcome.AttemptEnd(attempt=job.attempt, verdict=verdict.kind, exit_code=ended.exit_code,
                                 status=verdict.result.get("status"), stopped=ended.stopped,
                                 timed_out=ended.timed_out, heartbeat_lost=ended.heartbeat_lost,
                                 why=redact(verdict.why))
        if verdict.kind != "none" or ended.heartbeat_lost:
            return end
        # Only a failure this worker records is explained: that may ask the tracking server, which takes
        # seconds when it is down.
        last = job_log.last_line(job.log)
        return dataclasses.replace(end, status=adopt.read_result(job.result).get("status"), last_line=last,
                                   tracking_error=outage or job_log.tracking_failure(last))

    def _adopt(self, job: _Job, verdict: adopt.Verdict, base: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """The attempt's result is the cell's: COMPLETE, published as the cell's result.json."""
        record = verdict.outcome(**base)
        tid = job.trial._trial_id
        settled = self.ledger.settle(tid, TrialState.COMPLETE, record, record["val_reward"])
        if settled:
            verdict.publish()
        elif self.ledger.storage.get_trial(tid).state != TrialState.COMPLETE:
            adopt.supersede(verdict.run_id, f"attempt {job.attempt} was failed by another process")
        return settled, record

    def _fail(self, job: _Job, verdict: adopt.Verdict, decided: outcome.Outcome,
              base: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """The attempt is no result: its outcome noted, its cell re-queued if retried, the attempt failed."""
        record = {**base, **decided.fields()}
        tid = job.trial._trial_id
        # Outcome, then the next attempt, then settle: a crash in between leaves the cell queued, and a worker
        # popping the next attempt sees (by the outcome) that this one is on its way out, not a rival.
        settled = self.ledger.note(tid, record)
        if settled and decided.retry:
            self.ledger.requeue(job.cell, settling=job.trial, failed=decided.counts_as_failure)
        settled = settled and self.ledger.settle(tid, TrialState.FAIL)
        if settled:
            adopt.close_run(verdict.run_id, self.opts.study_name, job.cell, job.attempt, decided.run_status,
                            record["error"], self.ledger.ledger_id, claimed_at(job.trial))
        return settled, record

    def _forks(self, per_job: int, cfg: dict[str, Any]) -> bool:
        """Whether this job is forked (harness.sweep.forkserver): a plain single-process CPU job only."""
        on_cpu = cfg.get("device") == "cpu" or (cfg.get("device") == "auto" and not self.opts.gpus
                                                and not has_nvidia_devices())
        return (self.opts.job_start == "fork" and per_job == 1 and on_cpu
                and "HARNESS_TRAIN_CMD" not in os.environ and not (cfg.get("trl") or {}).get("use_vllm"))

    def _verdict(self, cell: str, attempt: int, claimed: float | None) -> tuple[adopt.Verdict, str | None]:
        """What the attempt came to; while MLflow cannot be asked, wait for it (unless stopping).
        Also returns the outage seen meanwhile, if any (a job that failed in one is not at fault)."""
        outage = None
        while True:
            verdict = adopt.find(self.opts.sweep_dir, self.opts.study_name, cell, attempt,
                                 self.ledger.ledger_id, claimed)
            if verdict.kind != "unknown" or self.stop.is_set():
                return verdict, outage
            if outage is None:
                outage = redact(verdict.why)  # it may become the attempt's recorded error
                log.warning("cell %s attempt %d: %s; waiting for it to tell whether the job finished", cell,
                            attempt, outage)
            self.stop.wait(max(self.opts.poll_s, 2.0))

    def _find(self, t: FrozenTrial) -> adopt.Verdict:
        return adopt.find(self.opts.sweep_dir, self.opts.study_name, t.user_attrs[CELL],
                          int(t.user_attrs[ATTEMPT]), self.ledger.ledger_id, claimed_at(t))
