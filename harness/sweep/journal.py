"""The ledger's journal file (an Optuna JournalStorage log): a lock without a grace period, and the repair of
a torn last line.

Optuna's journal is one JSON record per line, appended under a lock. Two of its failure modes matter to a
sweep:

- A torn last line. A writer killed mid-append, a full disk or a power loss leaves a partial record at the
  end. Optuna's reader skips an unterminated last line, but the next append lands after it, on the same
  line, and from then on every read of the journal fails ("Invalid log format"): the sweep is stuck. Here the
  torn bytes are cut off before anything is appended: when a journal is opened (an unterminated last line, or
  a last line that is not a JSON record), and before every append (an unterminated last line). They are moved
  to `<journal>.torn-<unix time>` beside it, never dropped, and one warning names that file.
- A lock that a second writer may break. Optuna's file locks (a symlink or an O_EXCL file) are broken by any
  waiter after a 30 s grace period, so on a slow file system a holder that is merely slow is joined by a
  second writer and two appends interleave. `JournalLock` is a POSIX record lock (fcntl) instead: no grace
  period, and the operating system (or the NFS lock manager) releases it when its holder dies, however it
  dies.

Both run under that one lock: a repair is a writer like any other, so no process appends to, or repairs, a
half-repaired file. Readers do not lock (Optuna's reader never did); a reader that meets the torn bytes skips
them as the unterminated last line they are.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file

log = logging.getLogger("harness.sweep.journal")
LOCK_SUFFIX = ".flock"  # not Optuna's `.lock`: a stale Optuna symlink lock there points at the journal itself
TORN_SUFFIX = ".torn-"
WARN_AFTER_S = 60.0  # a writer waiting this long for the lock says so (once per wait)
_CHUNK = 1 << 16

# POSIX record locks belong to a process, not to a file descriptor: two threads (or two backends) of one
# process on one journal would both "hold" it, and closing either descriptor would drop it for both. Within a
# process they queue on a mutex per lock file first.
_mutexes: dict[str, threading.Lock] = {}
_mutexes_guard = threading.Lock()


def _reset_after_fork() -> None:
    # A child forked while another thread held a mutex would wait for it for ever; it holds no record lock.
    global _mutexes, _mutexes_guard
    _mutexes, _mutexes_guard = {}, threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _mutex(path: str) -> threading.Lock:
    with _mutexes_guard:
        return _mutexes.setdefault(os.path.realpath(path), threading.Lock())


class JournalLock(BaseJournalFileLock):
    """An exclusive fcntl record lock on `<journal>.flock`, in Optuna's BaseJournalFileLock interface.

    Held until released or until its holder dies; a waiter waits as long as that takes (no grace period)."""

    def __init__(self, journal: str):
        self.path = journal + LOCK_SUFFIX
        self._fd: int | None = None

    def acquire(self) -> bool:
        mutex = _mutex(self.path)
        mutex.acquire()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _wait_for_lock(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            mutex.release()
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            raise RuntimeError("Error: did not possess lock")  # Optuna's locks say so too
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            _mutex(self.path).release()


def _wait_for_lock(fd: int, path: str) -> None:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
    # Held elsewhere: wait in the kernel's queue (F_SETLKW), saying so if it takes long.
    t0 = time.monotonic()
    timer = threading.Timer(WARN_AFTER_S, lambda: log.warning(
        "waiting %.0fs for the journal lock %s (its holder is alive: a dead holder's lock is released)",
        time.monotonic() - t0, path))
    timer.daemon = True
    timer.start()
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    finally:
        timer.cancel()


class RepairingJournalBackend(JournalFileBackend):
    """Optuna's journal file backend, writing under JournalLock and cutting off a torn last line before it
    appends."""

    def __init__(self, file_path: str):
        super().__init__(file_path, lock_obj=JournalLock(file_path))

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(entry, separators=(",", ":")) for entry in logs) + "\n").encode()
        with get_lock_file(self._lock):
            fd = os.open(self._file_path, os.O_RDWR | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                # A writer that died mid-append left an unterminated line: appending after it would corrupt
                # both records.
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    _repair_locked(self._file_path)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)


def open_backend(path: str) -> RepairingJournalBackend:
    """The journal backend of a ledger file, its torn last line (if any) repaired first, under the lock."""
    if not os.path.exists(path):
        open(path, "ab").close()  # as Optuna's backend does; an existing journal may be read-only
    repair(path)
    return RepairingJournalBackend(path)


def repair(path: str) -> Path | None:
    """Cut off the journal's torn last line, under the journal's lock; returns the file that now holds the
    torn bytes, or None when the journal was whole."""
    with open(path, "rb") as f:  # a look without the lock first: a whole journal (the rule) may be read-only
        size = f.seek(0, os.SEEK_END)
        if _whole_prefix(f, size) == size:
            return None
    with get_lock_file(JournalLock(path)):  # looked at again under it: a writer may have been mid-append
        return _repair_locked(path)


def _repair_locked(path: str) -> Path | None:
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        keep = _whole_prefix(f, size)
        if keep == size:
            return None
        f.seek(keep)
        torn = f.read()
        side = _side_file(path)
        with open(side, "xb") as out:  # written and synced before the journal loses the bytes
            out.write(torn)
            out.flush()
            os.fsync(out.fileno())
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("journal %s: its last line was torn (%d bytes, a write cut short); moved to %s, the journal "
                "now ends at its last complete record", path, size - keep, side)
    return side


def _whole_prefix(f: Any, size: int) -> int:
    """The length of the journal without its torn last line: an unterminated tail, else a last line that is
    not a JSON record."""
    if size == 0:
        return 0
    start = _line_start(f, size)
    f.seek(size - 1)
    if f.read(1) != b"\n":
        return start  # no newline: the write was cut short (even if the bytes so far parse)
    f.seek(start)
    return size if _record(f.read(size - start)) else start


def _line_start(f: Any, end: int) -> int:
    """Where the line holding byte end - 1 starts (just after the newline before it)."""
    pos = end - 1
    while pos > 0:
        lo = max(0, pos - _CHUNK)
        f.seek(lo)
        found = f.read(pos - lo).rfind(b"\n")
        if found >= 0:
            return lo + found + 1
        pos = lo
    return 0


def _record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # also UnicodeDecodeError
        return False


def _side_file(path: str) -> Path:
    base = f"{path}{TORN_SUFFIX}{int(time.time())}"
    side, n = Path(base), 1
    while side.exists():  # two repairs within a second keep both
        side, n = Path(f"{base}-{n}"), n + 1
    return side
