"""Secrets out of everything the harness shows or keeps: the password of a URL is replaced by `***`.

A ledger URL (`postgresql://user:secret@host/db`) and a tracking URI (`http://user:secret@host:5000`) carry
their passwords with them, and both end up in messages: ours, and those of the libraries that use them (an
MLflow client error names the URL it asked, with its credentials). So every URL we print, log, tag or store
goes through `redact`, and a CLI process's stdout and stderr go through `redacted_streams`, which catches the
libraries' messages (logging, tracebacks) on their way to a terminal or a log file.

Credentials travel to other processes by environment, never on a command line (any user can read another's
argv in `ps`): a sweep hands its ledger URL to its workers in STORAGE_ENV.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO

STORAGE_ENV = "HARNESS_STORAGE"  # the ledger URL (or journal path) of `worker`, `sweep` and `status`
HIDDEN = "***"

# scheme://user:password@ ; the user may be empty, the password is whatever lies between the first colon
# after the user and the next '@' (a raw '/' in a password is kept inside it, so it is hidden too).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(?P<password>[^\s@]*)@")


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it replaced by `***`."""
    if "://" not in text:  # the common case, and cheap: most text written holds no URL at all
        return text
    return _USERINFO.sub(lambda m: f"{m['head']}{HIDDEN}@" if m["password"] else m[0], text)


class EnvSecret(str):
    """A string (a ledger URL) that pickles as a reference to the environment variable that holds it.

    submitit ships a SLURM worker's options as a pickle file in the results folder, and every later
    resubmission pickles them again; the secret itself must travel in the job's environment (sbatch and
    submitit's local executor pass the submitting process's environment on), so the pickle names only the
    variable."""

    env: str

    def __new__(cls, value: str, env: str) -> EnvSecret:
        secret = super().__new__(cls, value)
        secret.env = env
        return secret

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return from_env, (self.env,)


def from_env(name: str) -> str:
    """The value an EnvSecret stood for, in the process that unpickles it."""
    try:
        return os.environ[name]
    except KeyError:
        raise RuntimeError(f"${name} is not set in this job's environment: the sweep's driver passes its "
                           "ledger to SLURM workers there (sbatch's default --export=ALL); export it in the "
                           "job instead") from None


class _Redacting:
    """A text stream that writes through `redact`; everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text) if isinstance(text, str) else text)
        return len(text)  # what the caller wrote, as a stream reports it

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def redact_output() -> None:
    """sys.stdout and sys.stderr redacted for the rest of this process (a submitit worker job, which no CLI
    command wraps; a second call changes nothing)."""
    if not isinstance(sys.stdout, _Redacting):
        sys.stdout = _Redacting(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, _Redacting):
        sys.stderr = _Redacting(sys.stderr)  # type: ignore[assignment]


@contextlib.contextmanager
def redacted_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr redacted for the duration (a CLI command), and after an exception that leaves
    it: the interpreter prints that exception's traceback once the command has returned."""
    saved = sys.stdout, sys.stderr
    redact_output()
    yield
    sys.stdout, sys.stderr = saved
