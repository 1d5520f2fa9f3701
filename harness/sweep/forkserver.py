"""Jobs forked from a process that imported the training stack once (`--job-start fork`, the default on CPU).

A fresh `python -m harness train` spends about 10 s importing torch, transformers, TRL and MLflow before its
first step: most of a short proxy cell. A worker instead starts one multiprocessing forkserver that imports
them (PRELOAD) and forks a fresh child per attempt. Each attempt is still its own process with its own
session, log and exit code; it runs exactly what `python -m harness train` runs (harness.train_cli), in the
same working directory with the same environment, so its numbers are the ones an exec'd job gets
(tests/test_job_start.py compares the two bit for bit).

Dying with the worker: the child's parent is the forkserver, not the worker, so the parent-death signal of an
exec'd job (processes.die_with_parent) cannot name the worker. A thread of the child watches the worker's PID
(and its start time) instead and SIGKILLs the child's process group within a second of the worker's death.

Used for single-process CPU jobs only: a multi-GPU job is `accelerate launch` (its own processes), a vLLM job
starts engine processes of its own, and CUDA must never be initialised in a process that forks; those, and a
custom $HARNESS_TRAIN_CMD, are exec'd: a fresh process per attempt.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from harness.sweep.processes import WORKER_ONLY_SIGNALS, pid_alive, pid_start
from harness.tracking import code_state

JOB_STARTS = ("fork", "exec")
# Imported once by the forkserver; multiprocessing ignores an ImportError there (the child then imports
# itself).
PRELOAD = ["harness.sweep.preload"]
WATCH_S = 1.0


class ForkedJob:
    """A job started by the forkserver, with the subset of subprocess.Popen the worker uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self._process = process
        self.pid: int = process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode
            self._process.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._process.join(timeout)
            if self.poll() is None:
                raise subprocess.TimeoutExpired(f"job {self.pid}", timeout)
        return self.returncode


class Forkserver:
    """One per worker: started on first use with the jobs' environment, so what the stack reads at import time
    (thread counts, offline flags, cache paths) is what an exec'd job would read.

    It also records the source tree it loaded (harness.tracking.code_state): a forked job runs that code and its
    run names it, so once the tree changes (an edit, a commit made mid-sweep) the worker execs its jobs instead
    (`serves`), and each run again records the code it ran."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self._ctx: multiprocessing.context.BaseContext | None = None
        self.code: dict[str, str] | None = None  # the tree when the forkserver started

    def serves(self, code: dict[str, str]) -> bool:
        """Whether a job forked now runs the code `code` describes (true before the forkserver starts)."""
        return self._ctx is None or self.code == code

    def start(self, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> ForkedJob:
        if self._ctx is None:
            self.code = code_state()
            os.environ.update(self.env)  # the forkserver inherits this process's environment when it starts
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(PRELOAD)
        worker = (os.getpid(), pid_start(os.getpid()))
        process = self._ctx.Process(target=_child, args=(argv, str(log_path), env, str(cwd), worker),
                                    name="harness-job", daemon=False)
        process.start()
        return ForkedJob(process)


def _child(argv: list[str], log_path: str, env: dict[str, str], cwd: str,
           worker: tuple[int, str | None]) -> None:
    """The forked job: its own session and log, the exec'd job's environment and directory, then the CLI."""
    os.setsid()  # its own process group, which the worker signals as a whole
    for sig in WORKER_ONLY_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _watch(*worker)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (lives as long as the process)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [sys.executable, "-m", "harness", *argv]
    from harness.train_cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _watch(pid: int, start: str | None) -> None:
    """SIGKILL this job's process group once the worker that started it is gone."""

    def watch() -> None:
        while pid_alive(pid, start):
            threading.Event().wait(WATCH_S)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()
