"""What a finished attempt comes to (harness.sweep.outcome): every case of the worker's decision, as a
table."""
from __future__ import annotations

import pytest

from harness.sweep.outcome import AttemptEnd, Outcome, decide

DOWN = "MLflow tracking server http://mlflow:5000 is unreachable (ConnectionError)"
LIMIT = "ran past the cell time limit of 30 min"
STALL = "no new metric for 10 min (stall limit 10 min)"

# (case, facts, state, error, retry, counts as a failure)
ROWS = [
    # The attempt's own result decides, whatever the exit code or why the job ended.
    ("result", dict(verdict="result", exit_code=0, status="complete"), "complete", None, True, False),
    ("diverged", dict(verdict="result", exit_code=0, status="diverged"), "diverged", None, True, False),
    ("result, killed after it", dict(verdict="result", exit_code=-9, status="complete"),
     "complete", None, True, False),
    ("result, stopped by us", dict(verdict="result", exit_code=-15, status="complete", stopped=True),
     "complete", None, True, False),
    ("result, past a limit", dict(verdict="result", exit_code=-15, status="diverged", stopped=True,
                                  timed_out=LIMIT), "diverged", None, True, False),
    ("result, exit 2", dict(verdict="result", exit_code=2, status="complete"), "complete", None, True, False),
    # Another process declared the attempt dead: nothing to record; a result is superseded.
    ("heartbeat lost, result", dict(verdict="result", exit_code=0, status="complete", heartbeat_lost=True),
     "superseded", "attempt 3 was declared dead before its job finished", True, False),
    ("heartbeat lost, stopped", dict(verdict="none", exit_code=-15, stopped=True, heartbeat_lost=True),
     "declared-dead", None, True, False),
    ("heartbeat lost, unknown", dict(verdict="unknown", exit_code=-15, why=DOWN, heartbeat_lost=True),
     "declared-dead", None, True, False),
    # MLflow cannot tell whether the job finished.
    ("unknown", dict(verdict="unknown", exit_code=-15, stopped=True, why=DOWN), "left-for-reaper", DOWN, True,
     False),
    ("unknown, exit 1", dict(verdict="unknown", exit_code=1, why=DOWN), "left-for-reaper", DOWN, True, False),
    # No result: past a limit.
    ("timeout", dict(verdict="none", exit_code=-15, stopped=True, timed_out=LIMIT), "timeout", LIMIT, True,
     True),
    ("stall", dict(verdict="none", exit_code=-9, stopped=True, timed_out=STALL), "timeout", STALL, True,
     True),
    ("timeout in an outage", dict(verdict="none", exit_code=-15, stopped=True, timed_out=LIMIT,
                                  tracking_error=DOWN), "timeout", LIMIT, True, True),
    # No result: stopped by a signal to the worker, so no attempt spent.
    ("stopped", dict(verdict="none", exit_code=-15, stopped=True), "interrupted",
     "stopped by a signal to the worker", True, False),
    ("stopped, exit 0", dict(verdict="none", exit_code=0, stopped=True), "interrupted",
     "stopped by a signal to the worker", True, False),
    ("stopped in an outage", dict(verdict="none", exit_code=-9, stopped=True, tracking_error=DOWN),
     "interrupted", "stopped by a signal to the worker", True, False),
    # No result: the tracking server failed the job.
    ("tracking outage", dict(verdict="none", exit_code=1, tracking_error=DOWN), "interrupted", DOWN, True,
     False),
    ("tracking outage, exit 2", dict(verdict="none", exit_code=2, tracking_error=DOWN), "interrupted", DOWN,
     True, False),
    # No result: the job failed.
    ("bad config", dict(verdict="none", exit_code=2, last_line="ConfigError: objective: unknown 'xpo'"),
     "failed", "exit 2: ConfigError: objective: unknown 'xpo'", False, True),
    ("exit 1", dict(verdict="none", exit_code=1, last_line="boom: a fake failure"), "failed",
     "exit 1: boom: a fake failure", True, True),
    ("exit 1, empty log", dict(verdict="none", exit_code=1), "failed", "exit 1", True, True),
    ("exit 1, long last line", dict(verdict="none", exit_code=1, last_line="x" * 400), "failed",
     "exit 1: " + "x" * 300, True, True),
    ("killed, not by us", dict(verdict="none", exit_code=-9), "failed", "killed by SIGKILL", True, True),
    ("segfault", dict(verdict="none", exit_code=-11, last_line="boom"), "failed", "killed by SIGSEGV", True,
     True),
    ("exit 0, failed result", dict(verdict="none", exit_code=0, status="failed"), "failed",
     "exit 0 but result.json says status 'failed'", True, True),
    ("exit 0, no result", dict(verdict="none", exit_code=0), "failed",
     "exit 0 but result.json says status None", True, True),
]


@pytest.mark.parametrize(("facts", "state", "error", "retry", "counts"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_outcome_table(facts, state, error, retry, counts):
    got = decide(AttemptEnd(attempt=3, **facts))
    assert (got.state, got.error, got.retry, got.counts_as_failure) == (state, error, retry, counts)


def test_ledger_fields_carry_retry_only_for_failed_attempts():
    assert Outcome("failed", "exit 2", retry=False).fields() == {"state": "failed", "error": "exit 2",
                                                                 "retry": False}
    assert Outcome("failed", "exit 1").fields() == {"state": "failed", "error": "exit 1", "retry": True}
    assert Outcome("timeout", LIMIT).fields() == {"state": "timeout", "error": LIMIT}
    assert Outcome("interrupted", DOWN).fields() == {"state": "interrupted", "error": DOWN}


def test_a_failed_attempts_run_is_tagged_timeout_or_killed():
    assert Outcome("timeout", LIMIT).run_status == "timeout"
    assert {Outcome(s, "x").run_status for s in ("failed", "interrupted")} == {"killed"}
