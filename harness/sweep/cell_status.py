"""The ledger's view of one cell (CellStatus, cell_status) and of one attempt (attempt_state): what `status`,
the live progress and the driver show, read from the cell's trials in the ledger (harness.sweep.ledger).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from harness import contract
from harness.sweep.ledger_attrs import ATTEMPT, AXES, COST, OUTCOME, OWNER, REAPED


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
