"""Where a sweep's ledger lives: a JournalStorage file (one machine, or a shared file system) or PostgreSQL
(several machines). Plain SQLite is refused: it hands one trial to several workers."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna
from optuna.storages import BaseStorage

from harness.config import ConfigError


def check_storage(url: str | None, default_path: Path) -> str:
    """The storage a sweep uses, checked before anything is written: a PostgreSQL URL or a journal file
    path."""
    if url is None:
        return str(default_path)
    if url.startswith("sqlite"):
        raise ConfigError(f"--storage {url}: SQLite storage hands one cell to several workers; use a journal "
                          "file path (shared file system) or postgresql://...")
    if "://" in url and not url.split("://", 1)[0].startswith("postgresql"):
        # The one-driver claim is a PostgreSQL advisory lock (harness.sweep.claim); other databases have none.
        raise ConfigError(f"--storage {url}: allowed: a journal file path or postgresql://...")
    return url


def open_storage(url: str) -> BaseStorage:
    if "://" in url:
        return optuna.storages.RDBStorage(sqlalchemy_url(url), engine_kwargs={"pool_pre_ping": True})
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a plain postgresql:// URL as psycopg 3; the `postgres` extra installs
    psycopg2-binary, so a plain URL gets the psycopg2 driver where psycopg2 is installed (an explicit +driver
    is kept)."""
    scheme, sep, rest = url.partition("://")
    if scheme == "postgresql" and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2{sep}{rest}"
    return url
