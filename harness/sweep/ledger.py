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

import os
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
from harness.sweep import cost, reaper, slurm
from harness.sweep.adopt import Verdict
from harness.sweep.cell_status import CellStatus, attempt_state, cell_status
from harness.sweep.ledger_attrs import (
    ATTEMPT,
    AXES,
    CELL,
    CELL_TIMEOUT,
    CONFIG,
    COST,
    COUNTED_FAILURES,
    DEEPSPEED,
    DRIVER,
    FEEDING,
    GPUS_PER_JOB,
    HEARTBEAT,
    HOST,
    LEDGER_ID,
    MAX_ATTEMPTS,
    OUTCOME,
    OWNER,
    REAPED,
    RETRY_FROM,
    SCALE,
    STALE_AFTER,
    STALL_TIMEOUT,
    TUNE,
)
from harness.sweep.ledger_attrs import JOB as JOB
from harness.sweep.ledger_attrs import PARENT_RUN as PARENT_RUN
from harness.sweep.processes import pid_alive, pid_start

# The view of a cell and of an attempt (cell_status), the ledger's attribute names (ledger_attrs) and
# reaping (reaper) have modules of their own; their names are still imported from here (JOB and PARENT_RUN,
# unused here, re-exported as such).

# A ledger without SCALE is read by the scale its study name ends in, with these reference costs (None: none).
UNRECORDED_REFERENCE_S = {"proxy": cost.PROXY_REFERENCE_S, "proxy-full": cost.PROXY_REFERENCE_S}


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
        """Settle the attempts whose worker is gone (harness.sweep.reaper.reap); the settled ones."""
        return reaper.reap(self, find)

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
