"""The PostgreSQL ledger's retry rules (harness/sweep/pg_ledger.py), against a real server (tests/pg_server.py).

A commit whose answer is lost cannot be produced on demand with a real network, so those tests wrap Optuna's own
call: it runs (and commits) for real, then raises the OperationalError a broken connection raises.
"""
from __future__ import annotations

import time

import optuna
import pytest
import sqlalchemy.exc
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from harness.sweep.ledger import OWNER, STALE_AFTER, Ledger, attempt_state
from harness.sweep.pg_ledger import LedgerUnavailable, RetryingRDBStorage, transient
from harness.sweep.storage import sqlalchemy_url
from tests.pg_server import database


def _broken() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_only_connection_errors_are_transient():
    assert transient(_broken())
    wrapped = StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = _broken()
    assert transient(wrapped)  # Optuna's wrapper around SQLAlchemy's error
    assert not transient(sqlalchemy.exc.ProgrammingError("SELECT x", {}, Exception("no such column")))
    assert not transient(ValueError("bad value"))
    assert not transient(KeyError("no such study"))


@pytest.fixture(scope="module")
def url():
    with database("harness-pg-retry-") as pg:
        yield pg.url


def _ledger(url: str, name: str, cells: int = 1) -> Ledger:
    ledger = Ledger(RetryingRDBStorage(sqlalchemy_url(url), retry_s=5), name, create=True)
    for i in range(cells):
        ledger.enqueue(f"cell{i}", {"seed": i}, {}, 1.0, attempt=1)
    return ledger


def _lose_answer_once(monkeypatch, name: str) -> None:
    """The next `name` call commits, then fails as if its connection broke before the answer came."""
    real, calls = getattr(RDBStorage, name), []

    def once(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise _broken()
        return out
    monkeypatch.setattr(RDBStorage, name, once)


def test_a_settle_whose_answer_was_lost_is_recognised_as_done(url, monkeypatch):
    ledger = _ledger(url, "lost/settle")
    trial = ledger.pop("w", lambda t: "log")
    _lose_answer_once(monkeypatch, "set_trial_state_values")
    assert ledger.settle(trial._trial_id, TrialState.COMPLETE, {"state": "complete"}, 0.5)
    assert ledger.storage.get_trial(trial._trial_id).state == TrialState.COMPLETE


def test_a_claim_whose_answer_was_lost_is_requeued_uncounted(url, monkeypatch):
    """The claimant reads "not queued" and takes nothing; the ownerless attempt is re-queued, not failed."""
    ledger = _ledger(url, "lost/claim")
    ledger.set_attr(STALE_AFTER, 0.0)
    _lose_answer_once(monkeypatch, "set_trial_state_values")
    assert ledger.pop("w", lambda t: "log") is None
    [orphan] = ledger.trials((TrialState.RUNNING,))
    assert OWNER not in orphan.user_attrs
    monkeypatch.undo()
    ledger.reap()  # first sight: fresh
    time.sleep(0.01)
    assert [t.number for t in ledger.reap()] == [orphan.number]
    states = sorted(attempt_state(t) for t in ledger.trials())
    assert states == ["interrupted", "queued"], states  # the queued one is the cell's next attempt...
    requeued = ledger.trials((TrialState.WAITING,))[0]
    assert requeued.user_attrs["harness.attempt"] == 2
    assert ledger.requeue("cell0") is False  # ...and the orphan did not spend one of the two attempts:
    ledger.settle(ledger.pop("w", lambda t: "log")._trial_id, TrialState.FAIL, {"state": "failed"})
    assert ledger.requeue("cell0")  # one counted failure, so a third attempt is still allowed


def test_no_heartbeat_is_judged_across_an_outage(url):
    """A reaper that could not reach the ledger restarts its stale-after clock: a heartbeat unchanged across the
    outage is no sign of a dead worker (its writes failed too)."""
    ledger = _ledger(url, "outage/fresh")
    ledger.set_attr(STALE_AFTER, 0.05)
    assert ledger.fresh("w", 1.0)
    time.sleep(0.1)
    assert not ledger.fresh("w", 1.0)  # unchanged for longer than stale-after: dead
    ledger.storage.last_failure = time.monotonic()  # what a failed call records (see the next test)
    assert ledger.fresh("w", 1.0)  # the clock starts again
    time.sleep(0.1)
    assert not ledger.fresh("w", 1.0)


def test_an_unreachable_database_raises_one_line_after_the_window():
    """Nothing listens on the port: connection refused, retried for the window, then LedgerUnavailable."""
    from harness.launch import free_port

    t0 = time.monotonic()
    with pytest.raises(LedgerUnavailable) as e:
        RetryingRDBStorage(f"postgresql+psycopg2://u:secret@127.0.0.1:{free_port()}/db", retry_s=2)
    assert time.monotonic() - t0 < 30
    line = str(e.value)
    assert "\n" not in line and "secret" not in line and "unreachable" in line, line


def test_a_failing_call_is_retried_with_backoff_until_the_window_ends(url, monkeypatch):
    """Here the failing call is nested inside another (Optuna's get_best_trial asks for the directions): the
    pair is retried as one call, for one window."""
    storage = RetryingRDBStorage(sqlalchemy_url(url), retry_s=1)
    study = optuna.create_study(storage=storage, study_name="nested", load_if_exists=True)
    calls = []

    def failing(self, study_id):
        calls.append(1)
        raise _broken()
    monkeypatch.setattr(RDBStorage, "get_study_directions", failing)
    with pytest.raises(LedgerUnavailable):
        storage.get_best_trial(study._study_id)  # get_best_trial calls get_study_directions inside
    assert 1 < len(calls) < 10, calls  # retried with backoff (0.5 s, 1 s), as one call
    assert storage.last_failure > 0


def test_the_storage_pickles_for_another_process(url):
    import pickle

    storage = pickle.loads(pickle.dumps(RetryingRDBStorage(sqlalchemy_url(url), retry_s=3)))
    assert storage.retry_s == 3 and isinstance(storage.get_all_studies(), list)


@pytest.mark.parametrize("value", ["abc", "-5", "nan"])
def test_a_bad_retry_window_is_one_line_naming_the_variable(monkeypatch, value):
    from harness.config import ConfigError
    from harness.sweep.pg_ledger import retry_window

    monkeypatch.setenv("HARNESS_LEDGER_RETRY_S", value)
    with pytest.raises(ConfigError, match="HARNESS_LEDGER_RETRY_S.*allowed: seconds"):
        retry_window()
    monkeypatch.setenv("HARNESS_LEDGER_RETRY_S", "60")
    assert retry_window() == 60.0
