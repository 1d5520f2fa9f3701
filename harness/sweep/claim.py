"""The one-driver rule, held by the ledger's own storage: at most one `sweep` driver per sweep, on any
machine.

Two drivers on one ledger would both enqueue the same cells (Optuna's enqueue_trial is not safe with
concurrent producers) and both tidy MLflow. A record in the ledger ("driver: pid on host") cannot
exclude a second driver by itself (read, then write, is not atomic), so the claim is a lock of the storage,
taken atomically and released by the operating system or the database when the driver dies, however it dies:

- journal file: a POSIX record lock (fcntl) on `<journal>.driver.lock` beside the journal, so on a shared file
  system (NFS) every machine that shares the journal sees the same lock;
- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection the driver keeps open; TCP
  keepalives let the server drop the lock of a machine that vanished.

The ledger's `harness.driver` record remains, to say who holds the claim.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any

from harness.sweep.ledger import HOST
from harness.sweep.storage import sqlalchemy_url


class ClaimTaken(RuntimeError):
    """Another driver holds the sweep."""


class DriverClaim:
    def __init__(self, storage_url: str, study: str):
        self.url, self.study = storage_url, study
        self._file: Any = None
        self._conn: Any = None

    def take(self) -> DriverClaim:
        if "://" in self.url:
            self._take_pg()
        else:
            self._take_file(Path(self.url + ".driver.lock"))
        return self

    def held(self) -> bool:
        """False when the claim was lost (the database connection holding the lock is gone)."""
        if self._conn is None:
            return self._file is not None
        from sqlalchemy import text

        try:
            self._conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

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

    def _take_pg(self) -> None:
        from sqlalchemy import create_engine, text

        url = sqlalchemy_url(self.url)
        args = ({"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
                if url.startswith("postgresql+psycopg2") else {})
        conn = create_engine(url, connect_args=args, poolclass=_null_pool()).connect()
        conn.execution_options(isolation_level="AUTOCOMMIT")
        if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(self.study)}).scalar():
            conn.close()
            raise ClaimTaken(f"the PostgreSQL advisory lock of {self.study!r} is held")
        self._conn = conn


def lock_key(study: str) -> int:
    """A signed 64-bit advisory-lock key for one sweep (study/scale)."""
    return int.from_bytes(hashlib.sha256(f"harness.driver:{study}".encode()).digest()[:8], "big", signed=True)


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool
