"""What a finished attempt comes to, decided from what its worker knows once the job has exited.

A pure function: no process, ledger or MLflow is touched here, so every case is a row of a table
(tests/test_outcome.py). The worker gathers the facts (`AttemptEnd`) and carries out the decision
(`Outcome`).

The attempt's own result decides first, whatever the exit code: a kill can land after the result was written
(a SIGTERM during interpreter shutdown, a SIGKILL before exit), and that result must not be re-run. Without
one: past a limit -> timeout; stopped by a signal to the worker or failed by the tracking server ->
interrupted (not the cell's fault: no attempt spent); exit 2 (bad config) -> failed, not retried; else
failed, retried. An attempt another process declared dead, or whose end MLflow cannot tell, is not recorded
by its worker.
"""
from __future__ import annotations

import dataclasses
import signal
from typing import Any

from harness import contract
from harness.sweep.ledger import COUNTED_FAILURES

# Ledger states of a settled attempt, beside the contract's result statuses and FAILED.
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"
# Nothing for this worker to record:
SUPERSEDED = contract.SUPERSEDED  # another process settled the attempt, whose job reached a result anyway
DECLARED_DEAD = "declared-dead"  # another process settled the attempt, and its job left no result
LEFT_FOR_REAPER = "left-for-reaper"  # MLflow cannot be asked whether the job finished: a reaper decides later

BAD_CONFIG_EXIT = 2  # `harness train` rejected the config: a retry fails the same way


@dataclasses.dataclass(frozen=True)
class AttemptEnd:
    """What the worker knows when an attempt's job has exited."""

    attempt: int
    verdict: str  # adopt.Verdict.kind: "result", "none" or "unknown"
    exit_code: int
    status: str | None = None  # the `status` of the attempt's result (its result file, else its MLflow run)
    stopped: bool = False  # the worker stopped the job (a signal to it, the attempt declared dead, a limit)
    timed_out: str | None = None  # why the watchdog stopped the job, if it did
    heartbeat_lost: bool = False  # another process declared the attempt dead and settled it
    why: str = ""  # for an unknown verdict: what could not be asked
    tracking_error: str | None = None  # the tracking server failed the job (down, or named in its last words)
    last_line: str = ""  # the job log's last non-empty line


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: str  # complete | diverged | failed | timeout | interrupted, or one of the three above
    error: str | None = None
    retry: bool = True  # whether the cell may get another attempt

    @property
    def counts_as_failure(self) -> bool:
        """Whether this attempt spends one of the cell's attempts."""
        return self.state in COUNTED_FAILURES

    @property
    def run_status(self) -> str:
        """The harness.status tag of the attempt's MLflow run, when the attempt is failed."""
        return TIMEOUT if self.state == TIMEOUT else contract.KILLED

    def fields(self) -> dict[str, Any]:
        """The ledger outcome of a failed attempt, beside exit code, duration and log."""
        fields: dict[str, Any] = {"state": self.state, "error": self.error}
        if self.state == contract.FAILED:  # the ledger reads a missing `retry` as True
            fields["retry"] = self.retry
        return fields


def decide(end: AttemptEnd) -> Outcome:
    if end.heartbeat_lost:
        if end.verdict == "result":  # finished anyway: the cell's next attempt is the one that counts
            return Outcome(SUPERSEDED, f"attempt {end.attempt} was declared dead before its job finished")
        return Outcome(DECLARED_DEAD)
    if end.verdict == "unknown":
        return Outcome(LEFT_FOR_REAPER, end.why)
    if end.verdict == "result":
        return Outcome(str(end.status))
    if end.timed_out:
        return Outcome(TIMEOUT, end.timed_out)
    if end.stopped:  # stopped by us: not the job's fault, so it costs no attempt
        return Outcome(INTERRUPTED, "stopped by a signal to the worker")
    if end.tracking_error:  # not the cell's fault either: retried once the server answers
        return Outcome(INTERRUPTED, end.tracking_error)
    return Outcome(contract.FAILED, failure(end.exit_code, end.status, end.last_line),
                   retry=end.exit_code != BAD_CONFIG_EXIT)


def failure(exit_code: int, status: str | None, last_line: str) -> str:
    """One line on why a job that left no result failed."""
    if exit_code < 0:
        return f"killed by {signal.Signals(-exit_code).name}"
    if exit_code == 0:
        return f"exit 0 but result.json says status {status!r}"
    return f"exit {exit_code}" + (f": {last_line[:300]}" if last_line else "")
