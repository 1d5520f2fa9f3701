"""The sweep's ledger and queue: one Optuna study, one trial per attempt at a cell.

Why Optuna storage: a JournalStorage file (one machine or a shared file system) or PostgreSQL (several
machines) gives race-free hand-out of queued trials and a record optuna-dashboard can read. What is safe was
measured: plain SQLite hands one trial to several workers (refused here); `enqueue_trial` is unsafe from
concurrent producers when it relies on `skip_if_exists` (not used: a cell is enqueued only by the process that
just settled its previous attempt, or by the driver before any worker starts); `ask()` invents a new trial
when the queue is empty (not used: `pop` claims WAITING trials itself, as Optuna's own
`_pop_waiting_trial_id` does).

Trial state is the truth about an attempt: WAITING = queued, RUNNING = running, COMPLETE = finished as
`complete` or `diverged` (user attr `harness.outcome`), FAIL = failed, died, timeout, interrupted or
duplicate. Finishing a trial is a compare-and-set in both backends (a second finisher gets
`UpdateFinishedTrialError`), so when a worker and a reaper race over a trial exactly one of them settles it
and decides whether to re-queue.
Before an attempt is failed, its own result is looked for (harness.sweep.adopt): a job that reached its result
is adopted as COMPLETE however its worker died, so a finished cell is never run twice.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from harness import contract
from harness.config import ConfigError
from harness.sweep import cost, slurm
from harness.sweep.adopt import Verdict
from harness.sweep.processes import pid_alive, pid_start

CELL = "harness.cell"            # config hash; present on every trial the sweep enqueued
AXES = "harness.axes"            # axis values of the cell (seed included)
CONFIG = "harness.config"        # the job config, minus output_dir and experiment
ATTEMPT = "harness.attempt"      # 1-based attempt number of this trial at its cell
COST = "harness.cost"            # relative run time (spec.Cell.cost), for the queue's order and the ETA
OWNER = "harness.owner"          # {worker, host, pid, pid_start, log, started}, by the claiming worker
JOB = "harness.job"              # {pid, pid_start} of the job process (its own process group), once started
HEARTBEAT = "harness.heartbeat"  # epoch seconds, refreshed by the running worker
# {state, exit_code, duration_s, run_id, val_reward, error, retry}, from the worker
OUTCOME = "harness.outcome"
REAPED = "harness.reaped"        # why a reaper declared the attempt dead
TUNE = "harness.tune"            # a tuning trial's job: {study, trial, job, jobs, pruner} (harness.sweep.tuning)

# Study attrs, set by the driver, read by every worker.
MAX_ATTEMPTS = "harness.max_attempts"
RETRY_FROM = "harness.retry_from"      # failures of trials numbered below this do not count (--retry-failed)
STALE_AFTER = "harness.stale_after"
PARENT_RUN = "harness.parent_run_id"
DRIVER = "harness.driver"              # {host, pid, pid_start, run_id, heartbeat} of the live driver
GPUS_PER_JOB = "harness.gpus_per_job"  # the scale's gpus_per_job: how every worker launches a job
DEEPSPEED = "harness.deepspeed"        # the scale's deepspeed setting (none, zero2)
CELL_TIMEOUT = "harness.cell_timeout_s"    # wall-clock limit of one attempt (harness.sweep.watchdog)
STALL_TIMEOUT = "harness.stall_timeout_s"  # longest time a job may go without storing a metric
FEEDING = "harness.feeding"  # true while the driver will queue more (tuning): idle workers wait, not leave
# {name, device, reference_s} of the sweep's scale (spec.Plan.ledger_scale), written by the driver
SCALE = "harness.scale"
# A new ledger's id (uuid4): its jobs' runs carry it (contract.LEDGER), so no other ledger adopts them
LEDGER_ID = "harness.ledger_id"
# A ledger without SCALE is read by the scale its study name ends in, with these reference costs (None: none).
UNRECORDED_REFERENCE_S = {"proxy": cost.PROXY_REFERENCE_S, "proxy-full": cost.PROXY_REFERENCE_S}

# Attempts owned by this host are judged by their PID, others by heartbeat: machines must have distinct names.
# HARNESS_HOST overrides the host name where they do not (containers started from one image, say).
HOST = os.environ.get("HARNESS_HOST") or socket.gethostname()
# interrupted (Ctrl-C, scheduler preemption, tracking outage) and duplicate do not count
COUNTED_FAILURES = ("failed", "died", "timeout")


@dataclasses.dataclass
class CellStatus:
    """One cell as the ledger sees it: its latest attempt and what it came to."""

    hash: str
    axes: dict[str, Any]
    state: str                 # queued, running, complete, diverged, failed, interrupted
    attempt: int
    attempts: int              # attempts that ran (or are running)
    cost: float
    duration_s: float | None = None
    started: float | None = None
    val_reward: float | None = None
    run_id: str | None = None
    error: str | None = None
    log: str | None = None
    worker: str | None = None
    stale: bool = False


def claimed_at(t: FrozenTrial) -> float | None:
    """When an attempt was claimed (epoch s): its owner's record, else the trial's start."""
    started = (t.user_attrs.get(OWNER) or {}).get("started")
    return float(started) if started else t.datetime_start.timestamp() if t.datetime_start else None


class Ledger:
    """One sweep's Optuna study, with the operations the driver and the workers need."""

    def __init__(self, storage: BaseStorage, study_name: str, create: bool,
                 scale: dict[str, Any] | None = None):
        """create: make the study if it is new (the driver); scale: record it as SCALE (the driver's plan)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = storage
        self.name = study_name
        if create:
            optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                load_if_exists=True)
        try:
            self.study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            raise ConfigError(f"no sweep {study_name!r} in this ledger; start it with `python -m harness "
                              "sweep`") from None
        if create and scale is not None:
            self.set_attr(SCALE, scale)
        # Only a ledger with no attempts yet gets an id: an older one's attempts may have untagged runs to adopt.
        if create and self.ledger_id is None and not storage.get_n_trials(self.study_id):
            self.set_attr(LEDGER_ID, uuid.uuid4().hex)

    # ------------------------------------------------------------------------------------ study attrs
    def attr(self, key: str, default: Any = None) -> Any:
        return self.storage.get_study_user_attrs(self.study_id).get(key, default)

    @property
    def ledger_id(self) -> str | None:
        """This ledger's id (None: made before ledgers had ids), the harness.ledger tag of its jobs' runs."""
        return self.attr(LEDGER_ID)

    def set_attr(self, key: str, value: Any) -> None:
        self.storage.set_study_user_attr(self.study_id, key, value)

    @property
    def max_attempts(self) -> int:
        return int(self.attr(MAX_ATTEMPTS, 2))

    @property
    def stale_after(self) -> float:
        return float(self.attr(STALE_AFTER, 120.0))

    @property
    def cell_timeout_s(self) -> float:
        return float(self.attr(CELL_TIMEOUT, float("inf")))

    @property
    def stall_timeout_s(self) -> float:
        return float(self.attr(STALL_TIMEOUT, float("inf")))

    @property
    def gpus_per_job(self) -> int:
        return int(self.attr(GPUS_PER_JOB, 1))

    @property
    def deepspeed(self) -> str:
        return str(self.attr(DEEPSPEED, "none"))

    def _scale(self) -> dict[str, Any]:
        recorded = self.attr(SCALE)
        if recorded:
            return recorded
        name = self.name.rsplit("/", 1)[-1]
        reference = UNRECORDED_REFERENCE_S.get(name)
        return {"name": name, "device": None, "reference_s": list(reference) if reference else None}

    @property
    def scale(self) -> str:
        """The sweep's scale name, as recorded (SCALE), else the last part of the study name."""
        return str(self._scale()["name"])

    @property
    def reference_s(self) -> tuple[float, float] | None:
        """The scale's (start-up s, s per cost unit) on the reference machine (harness.sweep.cost)."""
        reference = self._scale().get("reference_s")
        return (float(reference[0]), float(reference[1])) if reference else None

    # ---------------------------------------------------------------------------------------- trials
    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return [t for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)
                if CELL in t.user_attrs]

    def by_cell(self) -> dict[str, list[FrozenTrial]]:
        out: dict[str, list[FrozenTrial]] = defaultdict(list)
        for t in self.trials():
            out[t.user_attrs[CELL]].append(t)
        return out

    def enqueue(self, cell: str, axes: dict[str, Any], config: dict[str, Any], cost: float,
                attempt: int, tune: dict[str, Any] | None = None) -> None:
        # params are informational (optuna-dashboard shows them); the cell's identity is its hash.
        attrs = {CELL: cell, AXES: axes, CONFIG: config, COST: cost, ATTEMPT: attempt}
        optuna.load_study(study_name=self.name, storage=self.storage).enqueue_trial(
            {k: v for k, v in axes.items()}, user_attrs={**attrs, **({TUNE: tune} if tune else {})})

    def pop(self, worker: str, log_for: Callable[[FrozenTrial], Path],
            max_seconds: float | None = None) -> FrozenTrial | None:
        """Claim the queued attempt expected to run longest (race-free), record its owner; None when the queue
        is empty. Heaviest first (harness.sweep.cost), so the sweep's last minutes are short jobs on every
        worker, not one long job and idle workers; ties go in queue order (seeds and objectives as planned).

        log_for(trial): the attempt's log path, recorded in the owner so `status` can point at it.
        max_seconds: only cells expected to end within this (a SLURM worker's time left, harness.sweep.slurm).
        """
        while True:
            claimed = None
            for t in self._heaviest_first(max_seconds):
                try:
                    if self.storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                        claimed = t
                        break
                except UpdateFinishedTrialError:
                    continue
            if claimed is None:
                return None
            tid = claimed._trial_id
            owner = {"worker": worker, "host": HOST, "pid": os.getpid(), "pid_start": pid_start(os.getpid()),
                     "log": str(log_for(claimed)), "started": time.time(),
                     **({"slurm_job": slurm.job_id()} if slurm.job_id() else {})}
            self.storage.set_trial_user_attr(tid, OWNER, owner)
            self.storage.set_trial_user_attr(tid, HEARTBEAT, time.time())
            # Two reapers settling one dead attempt at once can queue two successors. Of the claimed or
            # queued attempts of a cell only the lowest-numbered one runs (each claimant checks after its own
            # claim, so of two racing claimants the higher sees the lower); none runs once the cell is done.
            cell = claimed.user_attrs[CELL]
            if any(t.state == TrialState.COMPLETE or (t.number < claimed.number and _contender(t))
                   for t in self.by_cell()[cell] if t.number != claimed.number):
                self.settle(tid, TrialState.FAIL, {"state": "duplicate"})
                continue
            return self.storage.get_trial(tid)

    def _heaviest_first(self, max_seconds: float | None = None) -> list[FrozenTrial]:
        trials = self.trials()
        history = [cost.Attempt(t.user_attrs[CELL], float(t.user_attrs.get(COST, 1.0)),
                                (t.user_attrs.get(OUTCOME) or {}).get("duration_s"),
                                t.state == TrialState.COMPLETE)
                   for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
        model = cost.model_for(history, self.reference_s)  # fitted once per pop
        if model is None:  # no seconds to weigh against the time left (a scale without reference costs)
            max_seconds = None
        expected = {t.number: cost.expected_seconds(t.user_attrs[CELL], float(t.user_attrs.get(COST, 1.0)),
                                                    history, model)
                    for t in trials if t.state == TrialState.WAITING}
        return sorted((t for t in trials if t.number in expected
                       and (max_seconds is None or expected[t.number] <= max_seconds)),
                      key=lambda t: (-expected[t.number], t.number))

    def heartbeat(self, trial_id: int) -> None:
        """Raises UpdateFinishedTrialError when the attempt was settled by someone else (declared dead)."""
        self.storage.set_trial_user_attr(trial_id, HEARTBEAT, time.time())

    def note(self, trial_id: int, outcome: dict[str, Any]) -> bool:
        """Record an attempt's outcome before settling it; False when another process settled it first."""
        try:
            self.storage.set_trial_user_attr(trial_id, OUTCOME, outcome)
            return True
        except UpdateFinishedTrialError:
            return False

    def settle(self, trial_id: int, state: TrialState, outcome: dict[str, Any] | None = None,
               value: float | None = None) -> bool:
        """Finish an attempt; False when another process settled it first."""
        if outcome is not None and not self.note(trial_id, outcome):
            return False
        try:
            self.storage.set_trial_state_values(trial_id, state, [value] if value is not None else None)
            return True
        except UpdateFinishedTrialError:
            return False

    def alive(self, t: FrozenTrial, now: float) -> bool:
        owner = t.user_attrs.get(OWNER) or {}
        if owner.get("host") == HOST:  # same machine: the owning process is the authority
            return pid_alive(owner["pid"], owner.get("pid_start"))
        return self.fresh(("trial", t._trial_id), t.user_attrs.get(HEARTBEAT))

    def fresh(self, key: object, beat: object) -> bool:
        """Whether a heartbeat value written on another machine has changed within stale_after seconds of this
        process's own monotonic clock. Comparing the value with our wall clock would make a machine whose clock
        runs ahead declare every remote worker dead (and run their cells twice); a value first seen now counts
        as fresh, so a restarted reaper waits stale_after before it judges. So does one that could not reach
        the ledger meanwhile (pg_ledger: nor could the workers write their heartbeats)."""
        seen = self.__dict__.setdefault("_seen", {})  # key -> (heartbeat value, monotonic time it was first seen)
        now = time.monotonic()
        outage = getattr(self.storage, "last_failure", 0.0)
        if key not in seen or seen[key][0] != beat or seen[key][1] < outage:
            seen[key] = (beat, now)
            return True
        return now - seen[key][1] < self.stale_after

    def reap(self, find: Callable[[FrozenTrial], Verdict] | None = None) -> list[FrozenTrial]:
        """Settle the attempts whose worker is gone: adopt the ones whose job reached its result, fail the
        others and re-queue their cells (within the attempt limit).

        find(trial): what the attempt came to (harness.sweep.adopt.find for its cell and attempt); without it
        every dead attempt is failed. An attempt whose answer is `unknown` (MLflow unreachable) is left for a
        later reap: failing it could run a finished cell twice.
        """
        log = logging.getLogger(__name__)
        reaped = []
        now = time.time()
        for t in self.trials((TrialState.RUNNING,)):
            if self.alive(t, now):
                continue
            owner = t.user_attrs.get(OWNER) or {}
            if self._job_lingers(t):
                continue  # its job outlived the worker, just killed: judged at the next reap, once gone
            verdict = find(t) if find is not None else Verdict("none")
            if verdict.kind == "unknown":
                log.warning("cell %s attempt %s: worker gone, outcome unknown for now (%s)",
                            t.user_attrs[CELL], t.user_attrs.get(ATTEMPT), verdict.why)
                continue
            gone = (f"worker {owner.get('worker', '?')} on {owner.get('host', '?')} "
                    f"(pid {owner.get('pid', '?')}) is gone")
            if verdict.kind == "result":
                outcome = verdict.outcome(duration_s=round(now - owner.get("started", now), 1),
                                          note=f"adopted: {gone} after its job finished")
                if self.settle(t._trial_id, TrialState.COMPLETE, outcome, outcome["val_reward"]):
                    verdict.publish()
                    log.warning("cell %s attempt %s: %s; its job had finished (%s): adopted",
                                t.user_attrs[CELL], t.user_attrs.get(ATTEMPT), gone, outcome["state"])
                    reaped.append(t)
                continue
            try:
                self.storage.set_trial_user_attr(t._trial_id, REAPED, gone)
            except UpdateFinishedTrialError:
                continue  # its worker, or another reaper, settled it first
            # As a worker does: re-queue first, so the cell is never without a queued or running attempt. A worker
            # stopped by a signal recorded `interrupted` before stopping its job (a scheduler's SIGKILL may have
            # come first): not the cell's failure.
            # One without an owner never started (its claimant died, or lost the database's answer to its claim,
            # before recording itself): not a failure either, now or when later attempts are counted.
            never = None if OWNER in t.user_attrs else {"state": "interrupted", "error": "claimed, never started"}
            stopped = never is not None or (t.user_attrs.get(OUTCOME) or {}).get("state") == "interrupted"
            self.requeue(t.user_attrs[CELL], settling=t, failed=not stopped)
            if not self.settle(t._trial_id, TrialState.FAIL, never):
                continue  # settled meanwhile; a surplus queued attempt is dropped when popped
            log.warning("cell %s attempt %s: %s", t.user_attrs[CELL], t.user_attrs.get(ATTEMPT), gone)
            reaped.append(t)
        return reaped

    def _job_lingers(self, t: FrozenTrial) -> bool:
        """Whether the job of a dead worker's attempt still runs here; if so it is killed now (its result, if
        it writes one before it dies, must be seen by the reaper, so the reaper waits for it to be gone)."""
        owner, job = t.user_attrs.get(OWNER) or {}, t.user_attrs.get(JOB) or {}
        if owner.get("host") != HOST or "pid" not in job or not pid_alive(job["pid"], job.get("pid_start")):
            return False
        try:
            os.killpg(job["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return True

    def requeue(self, cell: str, settling: FrozenTrial | None = None, failed: bool = False) -> bool:
        """Queue the next attempt of a cell unless it is done, queued, running, or out of attempts.

        settling: the RUNNING attempt the caller is about to settle (re-queue comes first, so a crash in
        between leaves a queued cell, never a lost one); failed: whether that attempt counts as a failure.
        """
        trials = self.by_cell().get(cell, [])
        others = [t for t in trials if settling is None or t.number != settling.number]
        if not trials or any(t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
                             for t in others):
            return False
        retry_from = int(self.attr(RETRY_FROM, 0))
        counted = [t for t in others if t.number >= retry_from and attempt_state(t) in COUNTED_FAILURES]
        if len(counted) + int(failed) >= self.max_attempts:
            return False
        if counted and not (counted[-1].user_attrs.get(OUTCOME) or {}).get("retry", True):
            return False  # a bad-config exit (2) fails the same way again; --retry-failed overrides
        last = trials[-1].user_attrs
        attempt = max(t.user_attrs[ATTEMPT] for t in trials) + 1
        self.enqueue(cell, last[AXES], last[CONFIG], last[COST], attempt, last.get(TUNE))
        return True

    def settled(self) -> bool:
        """Nothing queued, nothing alive running, and no live driver about to queue more: workers may
        leave."""
        now = time.time()
        driver = self.attr(DRIVER) or {}
        if self.attr(FEEDING) and driver and self.fresh("driver", driver.get("heartbeat")):
            return False
        return not any(t.state == TrialState.WAITING or (t.state == TrialState.RUNNING and self.alive(t, now))
                       for t in self.trials((TrialState.WAITING, TrialState.RUNNING)))

    def completed_attempts(self) -> dict[str, int]:
        """cell -> the attempt the ledger counts as its result (COMPLETE: complete or diverged)."""
        return {t.user_attrs[CELL]: int(t.user_attrs[ATTEMPT]) for t in self.trials((TrialState.COMPLETE,))}

    def cells(self) -> list[CellStatus]:
        return [cell_status(h, ts, self.alive) for h, ts in self.by_cell().items() if ts]

    def live_attempts(self) -> set[tuple[str, int]]:
        now = time.time()
        return {(t.user_attrs[CELL], int(t.user_attrs[ATTEMPT])) for t in self.trials((TrialState.RUNNING,))
                if self.alive(t, now)}


def _contender(t: FrozenTrial) -> bool:
    """Whether an attempt may still run or become the cell's result: queued, or running and not on its way out
    (a settler has recorded a non-result outcome for it, or a reaper has failed it)."""
    if t.state == TrialState.WAITING:
        return True
    if t.state != TrialState.RUNNING or REAPED in t.user_attrs:
        return False
    outcome = t.user_attrs.get(OUTCOME)
    return outcome is None or outcome.get("state") in contract.FINISHED


def attempt_state(t: FrozenTrial) -> str:
    """What one attempt came to: queued, running, complete, diverged, failed, died, timeout, interrupted,
    duplicate."""
    outcome = t.user_attrs.get(OUTCOME) or {}
    if t.state == TrialState.WAITING:
        return "queued"
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.COMPLETE:
        return outcome.get("state", "complete")
    state = outcome.get("state")
    # A FAIL trial with a success outcome lost a race with a reaper: the record counts it as died.
    return "died" if state is None or state in contract.FINISHED else state


def cell_status(cell: str, trials: list[FrozenTrial],
                alive: Callable[[FrozenTrial, float], bool]) -> CellStatus:
    real = [t for t in trials if attempt_state(t) != "duplicate"] or trials
    done = [t for t in real if t.state == TrialState.COMPLETE]
    running = [t for t in real if t.state == TrialState.RUNNING]
    queued = [t for t in real if t.state == TrialState.WAITING]
    t = done[0] if done else running[-1] if running else queued[-1] if queued else real[-1]
    state = attempt_state(t)
    state = "failed" if state in ("died", "timeout") else state  # why is in `error`
    outcome, owner = t.user_attrs.get(OUTCOME) or {}, t.user_attrs.get(OWNER) or {}
    failures = [x for x in real if x.state == TrialState.FAIL]
    last = failures[-1].user_attrs if failures else {}
    # A retried cell shows why its previous attempt failed until this attempt settles.
    error = outcome.get("error") or t.user_attrs.get(REAPED)
    if not error and not done:
        error = (last.get(OUTCOME) or {}).get("error") or last.get(REAPED)
    return CellStatus(
        hash=cell, axes=t.user_attrs[AXES], state=state, attempt=int(t.user_attrs[ATTEMPT]),
        attempts=sum(1 for x in real if x.state != TrialState.WAITING),
        cost=float(t.user_attrs.get(COST, 1.0)), duration_s=outcome.get("duration_s"),
        started=owner.get("started"), val_reward=outcome.get("val_reward"),
        run_id=outcome.get("run_id"), error=error,
        log=owner.get("log"), worker=owner.get("worker"),
        stale=t.state == TrialState.RUNNING and not alive(t, time.time()))
