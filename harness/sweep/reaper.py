"""Reaping: settling the attempts of a ledger (harness.sweep.ledger) whose worker is gone, as the driver
and idle workers do through Ledger.reap. Who is gone is the ledger's to judge (Ledger.alive); what the
attempt came to is the finder's (harness.sweep.adopt).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from harness.sweep.adopt import Verdict
from harness.sweep.ledger_attrs import ATTEMPT, CELL, HOST, JOB, OUTCOME, OWNER, REAPED
from harness.sweep.processes import pid_alive

if TYPE_CHECKING:  # the ledger imports this module; a Ledger is only passed in
    from harness.sweep.ledger import Ledger

# The ledger's logger, as before reaping had a module of its own: what it says is the ledger's record.
log = logging.getLogger("harness.sweep.ledger")


def reap(ledger: Ledger, find: Callable[[FrozenTrial], Verdict] | None = None) -> list[FrozenTrial]:
    """Settle the attempts whose worker is gone: adopt the ones whose job reached its result, fail the
    others and re-queue their cells (within the attempt limit).

    find(trial): what the attempt came to (harness.sweep.adopt.find for its cell and attempt); without it
    every dead attempt is failed. An attempt whose answer is `unknown` (MLflow unreachable) is left for a
    later reap: failing it could run a finished cell twice.
    """
    reaped = []
    now = time.time()
    for t in ledger.trials((TrialState.RUNNING,)):
        if ledger.alive(t, now):
            continue
        owner = t.user_attrs.get(OWNER) or {}
        if _job_lingers(t):
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
            if ledger.settle(t._trial_id, TrialState.COMPLETE, outcome, outcome["val_reward"]):
                verdict.publish()
                log.warning("cell %s attempt %s: %s; its job had finished (%s): adopted",
                            t.user_attrs[CELL], t.user_attrs.get(ATTEMPT), gone, outcome["state"])
                reaped.append(t)
            continue
        try:
            ledger.storage.set_trial_user_attr(t._trial_id, REAPED, gone)
        except UpdateFinishedTrialError:
            continue  # its worker, or another reaper, settled it first
        # As a worker does: re-queue first, so the cell is never without a queued or running attempt. A worker
        # stopped by a signal recorded `interrupted` before stopping its job (a scheduler's SIGKILL may have
        # come first): not the cell's failure.
        # One without an owner never started (its claimant died, or lost the database's answer to its claim,
        # before recording itself): not a failure either, now or when later attempts are counted.
        never = None if OWNER in t.user_attrs else {"state": "interrupted", "error": "claimed, never started"}
        stopped = never is not None or (t.user_attrs.get(OUTCOME) or {}).get("state") == "interrupted"
        ledger.requeue(t.user_attrs[CELL], settling=t, failed=not stopped)
        if not ledger.settle(t._trial_id, TrialState.FAIL, never):
            continue  # settled meanwhile; a surplus queued attempt is dropped when popped
        log.warning("cell %s attempt %s: %s", t.user_attrs[CELL], t.user_attrs.get(ATTEMPT), gone)
        reaped.append(t)
    return reaped


def _job_lingers(t: FrozenTrial) -> bool:
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
