"""A PostgreSQL ledger that rides out a database restart or a network outage.

Every ledger call is retried, with backoff, while the database cannot be reached (HARNESS_LEDGER_RETRY_S,
15 min by default); then it raises LedgerUnavailable, one line. A connection that went half-open (the server
or the network vanished without a word) fails within seconds instead of hanging for TCP's 15-minute
retransmission limit: client and server TCP keepalives, a TCP user timeout, and statement and idle-transaction
timeouts bound every call.

A retried call may have taken effect before its connection broke (the commit's answer was lost). What that can
do to the ledger, and why it is safe:
- enqueue (create_new_trial): a second queued attempt of a cell; of a cell's queued attempts only the lowest
  runs, the others are settled as `duplicate` when popped (Ledger.pop);
- claim (RUNNING): the retry reads "not queued" and the claimant moves on; the attempt is left running
  without an owner, and a reaper re-queues its cell without counting a failure (Ledger.reap);
- settle (COMPLETE/FAIL): the retry finds the attempt finished; when it is in the state we asked for, we did it.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from harness.config import ConfigError
from harness.redact import redact

log = logging.getLogger("harness.sweep.ledger")

RETRY_S = 900.0  # how long a ledger call waits for the database, unless HARNESS_LEDGER_RETRY_S says otherwise
CONNECT_TIMEOUT_S = 5  # a connection attempt that has not been answered by then has failed

# libpq connection parameters (psycopg2). keepalives_*: the client notices a dead idle connection in ~25 s;
# tcp_user_timeout: and a connection with unacknowledged data in 20 s. options: the server's own keepalives for
# this session (so it drops a vanished client's session, and any lock it holds, as fast), and timeouts for a
# statement waiting on a lock and for a transaction left open.
CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
    "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 "
               "-c statement_timeout=60000 -c idle_in_transaction_session_timeout=120000",
}


class LedgerUnavailable(RuntimeError):
    """The ledger's database could not be reached for the whole retry window."""


def retry_window() -> float:
    """Seconds a ledger call waits for the database: $HARNESS_LEDGER_RETRY_S, else RETRY_S."""
    text = os.environ.get("HARNESS_LEDGER_RETRY_S")
    if text is None:
        return RETRY_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"HARNESS_LEDGER_RETRY_S={text!r}: allowed: seconds, a number >= 0")
    return seconds


def connect_args(url: str) -> dict[str, Any]:
    """The connection parameters above, for a psycopg2 URL (other drivers take theirs from the URL)."""
    return dict(CONNECT_ARGS) if url.startswith("postgresql+psycopg2") else {}


def transient(e: BaseException) -> bool:
    """Whether an error says the database could not be reached (connection refused, dropped, timed out, the
    server shutting down), rather than that the call was wrong: only those are retried."""
    import sqlalchemy.exc

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        # SQLAlchemy's wrappers, and psycopg2's own classes (AdminShutdown and QueryCanceled derive from them)
        if any(c.__name__ in ("OperationalError", "InterfaceError") for c in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class RetryingRDBStorage(RDBStorage):
    """Optuna's RDBStorage whose calls ride out an unreachable database (module docstring)."""

    def __init__(self, url: str, retry_s: float | None = None):
        self.url, self.retry_s = url, retry_window() if retry_s is None else retry_s
        # Monotonic time this process last failed to reach the database: a heartbeat that did not change
        # across an outage is no sign of a dead worker (Ledger.fresh).
        self.last_failure = 0.0
        self._depth = threading.local()  # only the outermost call retries (calls nest inside Optuna)
        self._retry("open", lambda: RDBStorage.__init__(
            self, url, engine_kwargs={"pool_pre_ping": True, "connect_args": connect_args(url)}))

    def __getstate__(self) -> dict[Any, Any]:  # a thread-local does not pickle (a storage sent to a process)
        state = super().__getstate__()
        del state["_depth"]
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._depth = threading.local()

    def _retry(self, name: str, call: Callable[[], Any], args: tuple[Any, ...] = ()) -> Any:
        depth = getattr(self._depth, "n", 0)
        if depth:
            return call()
        self._depth.n = 1
        try:
            return self._retry_outermost(name, call, args)
        finally:
            self._depth.n = 0

    def _retry_outermost(self, name: str, call: Callable[[], Any], args: tuple[Any, ...]) -> Any:
        first: float | None = None
        delay = 0.5
        while True:
            try:
                out = call()
            except UpdateFinishedTrialError:
                if first is not None and name == "set_trial_state_values" and self._finished_as(*args[:2]):
                    out = True  # our own settle, committed before its connection broke
                else:
                    raise
            except Exception as e:
                if not transient(e):
                    raise
                now = self.last_failure = time.monotonic()
                why = _why(e)
                if first is None:
                    first = now
                    log.warning("ledger %s unreachable (%s); retrying for up to %.0f s",
                                redact(self.url), why, self.retry_s)
                if now + delay - first > self.retry_s:
                    raise LedgerUnavailable(f"ledger {redact(self.url)} unreachable for {now - first:.0f} s "
                                            f"({why})") from None
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
                continue
            if first is not None:
                self.last_failure = time.monotonic()
                log.warning("ledger %s reachable again after %.0f s (%s)", redact(self.url),
                            self.last_failure - first, name)
            return out

    def _finished_as(self, trial_id: int, state: TrialState) -> bool:
        return state.is_finished() and self.get_trial(trial_id).state == state


def first_line(e: BaseException) -> str:
    """An error's first non-empty line (a driver's messages run to several), or its type's name."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _why(e: BaseException) -> str:
    return redact(first_line(getattr(e, "orig", None) or e.__cause__ or e))


def _retrying(name: str) -> Callable[..., Any]:
    @functools.wraps(getattr(RDBStorage, name))
    def call(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        method = getattr(super(RetryingRDBStorage, self), name)  # looked up per call: tests wrap Optuna's
        return self._retry(name, lambda: method(*args, **kwargs), args)
    return call


for _name in dir(BaseStorage):  # every call of Optuna's storage API
    if not _name.startswith("_"):
        setattr(RetryingRDBStorage, _name, _retrying(_name))
