"""The one-driver rule, held by the ledger's own storage: at most one `sweep` driver per sweep, on any
machine.

Two drivers on one ledger would both enqueue the same cells (Optuna's enqueue_trial is not safe with
concurrent producers) and both tidy MLflow. A record in the ledger ("driver: pid on host") cannot
exclude a second driver by itself (read, then write, is not atomic), so the claim is a lock of the storage,
taken atomically and released by the operating system or the database when the driver dies, however it dies:

- journal file: a POSIX record lock (fcntl) on `<journal>.driver.lock` beside the journal, so on a shared file
  system (NFS) every machine that shares the journal sees the same lock;
- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection the driver keeps open; TCP
  keepalives let the server drop the lock of a machine that vanished, and a driver whose connection broke (a
  database restart, a network outage) takes the lock again on a new one unless another driver has it.

The ledger's `harness.driver` record remains, to say who holds the claim.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from harness.sweep.ledger import HOST
from harness.sweep.pg_ledger import LedgerUnavailable, connect_args, transient
from harness.sweep.storage import sqlalchemy_url


class ClaimTaken(RuntimeError):
    """Another driver holds the sweep."""


class DriverClaim:
    def __init__(self, storage_url: str, study: str):
        self.url, self.study = storage_url, study
        self._file: Any = None
        self._conn: Any = None
        self.session_name = f"harness-driver {uuid.uuid4().hex[:16]}"  # this driver's PostgreSQL sessions

    def take(self) -> DriverClaim:
        if "://" in self.url:
            self._take_pg()
        else:
            self._take_file(Path(self.url + ".driver.lock"))
        return self

    def held(self) -> bool:
        """False when another driver holds the claim now. A PostgreSQL claim whose connection broke (a database
        restart, a network outage) is taken again on a new connection; pg_ledger.LedgerUnavailable while the
        database cannot be reached (the caller asks again later)."""
        if "://" not in self.url:
            return self._file is not None
        from sqlalchemy import text

        try:
            if self._conn is not None:
                self._conn.execute(text("SELECT 1"))
                return True
        except Exception:
            pass
        self.release()
        try:
            self._take_pg(regain=True)
            logging.getLogger(__name__).warning("driver claim of %s taken again on a new connection (the old one "
                                                "broke)", self.study)
            return True
        except ClaimTaken:
            return False
        except Exception as e:
            if transient(e):
                raise LedgerUnavailable("driver claim: the ledger's database cannot be reached "
                                        f"({type(e).__name__})") from None
            raise

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock
            self._file = None
        if self._conn is not None:
            try:
                self._conn.close()  # ends the session, and with it the advisory lock
            except Exception:
                pass
            self._conn = None

    def _take_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise ClaimTaken(f"{path} is locked" + (f" ({holder})" if holder else "")) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {HOST}\n")
        f.flush()
        self._file = f

    def _take_pg(self, regain: bool = False) -> None:
        """regain: after this driver's connection broke. Its old session may live on at the server, holding the
        lock, until the server's keepalives notice (pg_ledger.CONNECT_ARGS); it is ended here, found by the
        application name this driver gives its sessions, so only our own stale session is ever ended."""
        from sqlalchemy import create_engine, text

        url = sqlalchemy_url(self.url)
        args = connect_args(url)
        if args:  # psycopg2: and a name for this driver's sessions
            args["application_name"] = self.session_name
        conn = create_engine(url, connect_args=args, poolclass=_null_pool()).connect()
        conn.execution_options(isolation_level="AUTOCOMMIT")
        key = {"k": lock_key(self.study)}
        tries = 20 if regain else 1
        for i in range(tries):
            if regain:
                conn.execute(text(_END_OUR_STALE_SESSIONS), {"me": self.session_name})
            if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), key).scalar():
                self._conn = conn
                return
            if i + 1 < tries:
                time.sleep(0.5)  # an ended session lets go of its lock as its process exits
        conn.close()
        raise ClaimTaken(f"the PostgreSQL advisory lock of {self.study!r} is held")


_END_OUR_STALE_SESSIONS = """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE application_name = :me AND pid <> pg_backend_pid()"""


def lock_key(study: str) -> int:
    """A signed 64-bit advisory-lock key for one sweep (study/scale)."""
    return int.from_bytes(hashlib.sha256(f"harness.driver:{study}".encode()).digest()[:8], "big", signed=True)


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool
