"""Where a sweep's ledger lives: a JournalStorage file (one machine, or a shared file system) or PostgreSQL
(several machines). Plain SQLite is refused: it hands one trial to several workers."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from optuna.storages import BaseStorage

from harness.config import ConfigError
from harness.redact import redact
from harness.sweep.pg_ledger import CONNECT_TIMEOUT_S, RetryingRDBStorage, first_line, retry_window


def check_storage(url: str | None, default_path: Path) -> str:
    """The storage a sweep uses, checked before anything is written: a PostgreSQL URL or a journal file
    path."""
    if url is None:
        return str(default_path)
    if url.startswith("sqlite"):
        raise ConfigError(f"--storage {redact(url)}: SQLite storage hands one cell to several workers; use a "
                          "journal file path (shared file system) or postgresql://...")
    if "://" in url and not url.split("://", 1)[0].startswith("postgresql"):
        # The one-driver claim is a PostgreSQL advisory lock (harness.sweep.claim); other databases have none.
        raise ConfigError(f"--storage {redact(url)}: allowed: a journal file path or postgresql://...")
    if "://" in url:
        check_reachable(url)
    return url


def check_reachable(url: str, timeout_s: int = CONNECT_TIMEOUT_S) -> None:
    """A PostgreSQL ledger that accepts a connection within seconds; else one line naming it (password hidden)
    and why: down, refusing the password, no such database. Asked once, before anything is written, so a
    server that is down is not a traceback from deep inside the sweep minutes later."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    retry_window()  # the workers' setting: a bad one is refused now, not by each worker
    where = f"--storage {redact(url)}"
    try:
        engine = sqlalchemy.create_engine(sqlalchemy_url(url), poolclass=NullPool,
                                          connect_args={"connect_timeout": timeout_s})
    except (ImportError, sqlalchemy.exc.ArgumentError) as e:
        raise ConfigError(f"{where}: {redact(first_line(e))}; needs a "
                          "postgresql://user:password@host:port/db URL and psycopg2 (pip install -e "
                          "'.[postgres]')") from None
    try:
        with engine.connect():
            pass
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as e:
        why = first_line(getattr(e, "orig", None) or e)
        raise ConfigError(f"{where}: cannot connect ({redact(why)}); start the server, or check the URL and "
                          "the password") from None
    finally:
        engine.dispose()


def open_storage(url: str, retry_s: float | None = None) -> BaseStorage:
    """retry_s: how long a PostgreSQL ledger's calls wait for an unreachable database (None: the
    environment's, pg_ledger.retry_window)."""
    if "://" in url:
        return RetryingRDBStorage(sqlalchemy_url(url), retry_s)
    from optuna.storages.journal import JournalStorage

    from harness.sweep.journal import open_backend  # torn last line repaired, a lock without a grace period

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(open_backend(url))


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a plain postgresql:// URL as psycopg 3; the `postgres` extra installs
    psycopg2-binary, so a plain URL gets the psycopg2 driver where psycopg2 is installed (an explicit +driver
    is kept)."""
    scheme, sep, rest = url.partition("://")
    if scheme == "postgresql" and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2{sep}{rest}"
    return url
