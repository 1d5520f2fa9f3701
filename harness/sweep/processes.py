"""Processes of a sweep: who is alive (a PID plus its start time, so a recycled PID is not mistaken for the
owner of a cell) and how a job process is started and stopped (environment, death with its parent, its group).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def pid_start(pid: int) -> str | None:
    """Start time of a process (Linux), so a recycled PID is not mistaken for the worker that owned a cell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited


def pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if Path("/proc").is_dir():
        now = pid_start(pid)
        return now is not None and (start is None or now == start)
    return True


def job_env(gpus: tuple[str, ...] | None = None) -> dict[str, str]:
    # MLflow store: the job's own default ($MLFLOW_TRACKING_URI, else under $HARNESS_RESULTS), as the driver's.
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if not env.get("CUDA_VISIBLE_DEVICES"):
        # CPU jobs run side by side, one per core: extra BLAS/OpenMP threads would only contend.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    return env


def has_nvidia_devices() -> bool:
    """Whether this machine has NVIDIA GPUs (their device files), without importing torch or touching CUDA."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """preexec_fn asking Linux to send `sig` to the child when this process dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec does the minimum
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
