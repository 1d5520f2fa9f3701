"""A worker: pulls queued cells from the ledger and runs each as `python -m harness train` in a subprocess
(`accelerate launch --num_processes k ... -m harness train` when the sweep's scale sets gpus_per_job k > 1).

Each attempt runs in its own session with its own log, a heartbeat thread keeps the attempt's claim fresh, and
the job dies with the worker (Linux parent-death signal), so no job outlives the worker that answers for it.
Exit code and result.json decide the outcome: 0 + status complete/diverged -> COMPLETE; 2 (bad config) ->
failed, not retried; anything else -> failed, re-queued up to the sweep's attempt limit. SIGINT, SIGTERM and
SIGUSR2 (a scheduler's warning) stop the job gracefully and re-queue the cell without spending an attempt.

GPUs: a worker started with `gpus` (the driver's local workers, `harness worker --gpus`) pins its jobs to those
devices with CUDA_VISIBLE_DEVICES; without, its jobs see what the worker sees (a SLURM allocation, say).
`run_worker_group` runs several pinned workers on one machine, as `harness worker` does on a multi-GPU machine.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from harness.launch import job_command
from harness.sweep.ledger import ATTEMPT, AXES, CELL, CONFIG, FINISHED_OK, HOST, PARENT_RUN, Ledger, open_storage

log = logging.getLogger("harness.sweep.worker")
REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 30.0  # how long a job gets to mark its MLflow run KILLED after SIGTERM before it is SIGKILLed


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """Everything a worker needs; picklable, so submitit can ship it to a SLURM (or local) job."""

    storage: str
    study: str
    scale: str
    results: str
    name: str
    poll_s: float = 1.0
    gpus: tuple[str, ...] | None = None  # devices of this worker's jobs (CUDA_VISIBLE_DEVICES); None: inherited

    @property
    def study_name(self) -> str:
        return f"{self.study}/{self.scale}"

    @property
    def sweep_dir(self) -> Path:
        return Path(self.results) / self.study / self.scale


def attempt_log(sweep_dir: Path, cell: str, attempt: int) -> Path:
    return sweep_dir / "jobs" / cell / f"attempt-{attempt}.log"


def run_worker(opts: WorkerOptions) -> int:
    """Entry point of `python -m harness worker`, of local workers and of submitit jobs."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {opts.name} %(message)s", stream=sys.stdout)
    os.environ["HARNESS_RESULTS"] = opts.results  # the job's results root and default MLflow store follow it
    return Worker(opts).run()


def worker_command(spec: Path, opts: WorkerOptions) -> list[str]:
    """`python -m harness worker` for one worker process with these options."""
    cmd = [sys.executable, "-m", "harness", "worker", str(spec), "--scale", opts.scale, "--storage", opts.storage,
           "--results-dir", opts.results, "--name", opts.name]
    if opts.gpus is not None:
        cmd += ["--gpus", ",".join(opts.gpus) or "none"]
    return cmd


def spawn_worker(spec: Path, opts: WorkerOptions) -> subprocess.Popen:
    """Start one worker process, logging to <sweep>/workers/NAME.log, pinned to opts.gpus.

    Own session: a terminal's Ctrl-C reaches the parent only, which stops workers in order. Parent-death SIGTERM:
    a SIGKILLed parent still stops its workers (they stop their jobs and re-queue their cells).
    """
    log_dir = opts.sweep_dir / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HARNESS_RESULTS=opts.results)
    if opts.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(opts.gpus)
    with open(log_dir / f"{opts.name}.log", "ab") as out:
        return subprocess.Popen(worker_command(spec, opts), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM))


def run_worker_group(spec: Path, group: list[WorkerOptions]) -> int:
    """Several pinned workers on this machine (`harness worker` with more than one GPU slot); returns when all
    have left. SIGINT / SIGTERM / SIGHUP are passed on as SIGTERM: each worker stops its job and re-queues it."""
    procs = [spawn_worker(spec, o) for o in group]
    for o, p in zip(group, procs, strict=True):
        print(f"worker {o.name} (pid {p.pid}) on GPUs {','.join(o.gpus or ()) or 'none'}: log "
              f"{o.sweep_dir / 'workers' / (o.name + '.log')}", flush=True)
    stopped = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopped.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.returncode for p in procs]
    return 130 if stopped.is_set() else next((c for c in codes if c), 0)


class Worker:
    def __init__(self, opts: WorkerOptions):
        self.opts = opts
        self.ledger = Ledger(open_storage(opts.storage), opts.study_name, create=False)
        self.stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("got %s: stopping after the current job is stopped", signal.Signals(signum).name)
        self.stop.set()

    def run(self) -> int:
        log.info("worker %s on %s (pid %d) joined %s", self.opts.name, HOST, os.getpid(), self.opts.study_name)
        while not self.stop.is_set():
            trial = self.ledger.pop(self.opts.name, lambda t: attempt_log(
                self.opts.sweep_dir, t.user_attrs[CELL], t.user_attrs[ATTEMPT]))
            if trial is not None:
                self.run_attempt(trial)
                continue
            # Idle: take over attempts of dead workers, leave once nothing can come back to the queue.
            self.ledger.reap()
            if self.ledger.settled():
                break
            self.stop.wait(self.opts.poll_s)
        log.info("worker %s leaves (%s)", self.opts.name, "stopped" if self.stop.is_set() else "queue empty")
        return 130 if self.stop.is_set() else 0

    def run_attempt(self, trial: FrozenTrial) -> None:
        cell, attempt = trial.user_attrs[CELL], int(trial.user_attrs[ATTEMPT])
        job_dir = self.opts.sweep_dir / "jobs" / cell
        job_dir.mkdir(parents=True, exist_ok=True)
        cfg = {**trial.user_attrs[CONFIG], "output_dir": str(job_dir), "experiment": self.opts.study_name}
        cfg_path, result_path = job_dir / "config.yaml", job_dir / "result.json"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        result_path.unlink(missing_ok=True)  # a previous attempt's result must not be read as this one's
        # How to launch is the sweep's (study attrs), read per attempt: a resumed sweep may have changed it.
        per_job, deepspeed = self.ledger.gpus_per_job, self.ledger.deepspeed
        if per_job > 1 and self.opts.gpus is not None and len(self.opts.gpus) < per_job:
            # Not the job's fault: hand the cell back without spending an attempt, and leave.
            why = f"worker {self.opts.name} has GPUs {','.join(self.opts.gpus) or 'none'}, jobs need {per_job}"
            log.error("cell %s: %s; leaving", cell, why)
            if self.ledger.note(trial._trial_id, {"state": "interrupted", "error": why}):
                self.ledger.requeue(cell, settling=trial, failed=False)
                self.ledger.settle(trial._trial_id, TrialState.FAIL)
            self.stop.set()
            return
        tags = {"harness.study": self.opts.study, "harness.scale": self.opts.scale, "harness.cell": cell,
                "harness.attempt": attempt, "harness.gpus_per_job": per_job,
                "harness.axes": json.dumps(trial.user_attrs[AXES], sort_keys=True)}
        if per_job > 1:
            tags["harness.deepspeed"] = deepspeed
        cmd = [*job_command(per_job, deepspeed), str(cfg_path),
               *[a for k, v in tags.items() for a in ("--tag", f"{k}={v}")], "--result", str(result_path)]
        parent = self.ledger.attr(PARENT_RUN)
        if parent:
            cmd += ["--parent-run-id", parent]
        log_path = attempt_log(self.opts.sweep_dir, cell, attempt)
        label = " ".join(f"{k}={v}" for k, v in trial.user_attrs[AXES].items())
        log.info("cell %s attempt %d (%s): starting, log %s", cell, attempt, label, log_path)

        t0 = time.time()
        with open(log_path, "ab") as out:
            out.write(f"# {time.strftime('%F %T')} worker {self.opts.name} on {HOST}: {shlex.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=REPO_ROOT, env=job_env(self.opts.gpus), start_new_session=True,
                                    preexec_fn=die_with_parent())
        beat = Heartbeat(self.ledger, trial._trial_id, interval=min(30.0, self.ledger.stale_after / 4))
        beat.start()
        stopped_at: float | None = None
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if (self.stop.is_set() or beat.lost.is_set()) and stopped_at is None:
                stopped_at = time.time()
                _signal_group(proc, signal.SIGTERM)
            elif stopped_at is not None and time.time() - stopped_at > GRACE_S:
                _signal_group(proc, signal.SIGKILL)
        beat.stop()
        duration = round(time.time() - t0, 1)
        if beat.lost.is_set():
            log.warning("cell %s attempt %d was declared dead by another process; its job was stopped", cell, attempt)
            return

        result = _read_result(result_path)
        base = {"exit_code": rc, "duration_s": duration, "log": str(log_path)}
        if rc == 0 and result.get("status") in FINISHED_OK:
            final = result.get("final") or {}
            val = final.get("val/reward")
            val = float(val) if isinstance(val, (int, float)) and math.isfinite(val) else None
            outcome = {**base, "state": result["status"], "run_id": result.get("run_id"), "val_reward": val,
                       "final": final, "wall_s": result.get("wall_s")}
            settled = self.ledger.settle(trial._trial_id, TrialState.COMPLETE, outcome, val)
        else:
            if stopped_at is not None:  # stopped by us: not the job's fault, so it costs no attempt
                outcome = {**base, "state": "interrupted", "error": "stopped by a signal to the worker"}
            else:
                outcome = {**base, "state": "failed", "error": _failure(rc, result, log_path), "retry": rc != 2}
            # Outcome, then the next attempt, then settle: a crash in between leaves the cell queued, and a worker
            # popping the next attempt sees (by the outcome) that this one is on its way out, not a rival.
            settled = self.ledger.note(trial._trial_id, outcome)
            if settled and outcome.get("retry", True):
                self.ledger.requeue(cell, settling=trial, failed=outcome["state"] == "failed")
            settled = settled and self.ledger.settle(trial._trial_id, TrialState.FAIL)
        if not settled:
            log.warning("cell %s attempt %d was settled by another process first", cell, attempt)
        log.info("cell %s attempt %d (%s): %s in %.0fs%s", cell, attempt, label, outcome["state"], duration,
                 f" ({outcome['error']})" if outcome.get("error") else "")


class Heartbeat(threading.Thread):
    """Refreshes the attempt's heartbeat; sets `lost` when the ledger says someone else settled the attempt."""

    def __init__(self, ledger: Ledger, trial_id: int, interval: float):
        super().__init__(daemon=True, name="heartbeat")
        self.ledger, self.trial_id, self.interval = ledger, trial_id, interval
        self.lost, self._done = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.ledger.heartbeat(self.trial_id)
            except UpdateFinishedTrialError:
                self.lost.set()
                return
            except Exception as e:  # a storage hiccup: the next beat may get through
                log.warning("heartbeat failed: %s", e)

    def stop(self) -> None:
        self._done.set()
        self.join()


def job_env(gpus: tuple[str, ...] | None = None) -> dict[str, str]:
    # MLflow store: the job's own default ($MLFLOW_TRACKING_URI, else under $HARNESS_RESULTS), as the driver's.
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if not env.get("CUDA_VISIBLE_DEVICES"):
        # CPU jobs run side by side, one per core: extra BLAS/OpenMP threads would only contend.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    return env


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """preexec_fn asking Linux to send `sig` to the child when this process dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec does the minimum
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _failure(rc: int, result: dict[str, Any], log_path: Path) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    if rc == 0:
        return f"exit 0 but result.json says status {result.get('status')!r}"
    last = ""
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else ""
    except OSError:
        pass
    return f"exit {rc}" + (f": {last[:300]}" if last else "")
