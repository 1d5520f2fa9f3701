"""Processes of a sweep: who is alive (a PID plus its start time, so a recycled PID is not mistaken for the
owner of a cell) and how a job process is started and stopped (environment, death with its parent, its group,
every process of it: JobTree).

A job is more than its process group: torchrun (and accelerate launch, which runs it) starts each rank in a
session of its own, and a rank's helpers may do the same, so signalling the group reaches the launcher
only. Were the launcher to die first, its ranks would live on, holding their GPUs' memory. So a worker is a
child subreaper (become_subreaper): a process of its job whose parent dies is re-parented to the worker, not
to init, and JobTree finds every process of a job by walking /proc from the job's process and from the
worker.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("harness.sweep.processes")
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 2.0  # how often a running job's processes are looked up (remembered, should one leave the tree)
KILL_WAIT_S = 10.0  # how long SIGKILLed processes get to vanish (one in uninterruptible sleep may not)


def pid_start(pid: int) -> str | None:
    """Start time of a process (Linux), so a recycled PID is not mistaken for the worker that owned a cell."""
    fields = _stat(pid)
    return None if not fields or fields[0] == "Z" else fields[19]  # a zombie has exited


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


# A scheduler's time-limit warning (SLURM's --signal, which submitit sets to SIGUSR2) reaches every process of the
# allocation; it is for the worker (take no new cell), and would kill a job, whose default action it is.
WORKER_ONLY_SIGNALS = (signal.SIGUSR2,)


def job_preexec() -> Callable[[], None]:
    """preexec_fn of an exec'd job: dies with its worker, and ignores WORKER_ONLY_SIGNALS (ignored signals stay
    ignored across exec; a forked job sets the same in harness.sweep.forkserver)."""
    die = die_with_parent()

    def preexec() -> None:
        for sig in WORKER_ONLY_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if die is not None:
            die()

    return preexec


def become_subreaper() -> bool:
    """Make this process (a worker) the child subreaper of its descendants (Linux): a process of a job whose
    parent exits is re-parented to this process rather than to init, so JobTree still finds it, and this
    process collects its exit status (JobTree.reap)."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


class JobTree:
    """Every process of one job: the process the worker started (the root), its descendants, and those of them
    that were re-parented to this process (a subreaper) when their parent died. Made right after the job
    starts; its methods are the steps of stopping it (harness.sweep.worker._supervise)."""

    def __init__(self, root: int):
        self.root, self.me = root, os.getpid()
        # This process's other children (a forkserver, multiprocessing's resource tracker) are not the job's.
        self.others = {pid: _started(pid) for pid in children(self.me) if pid != root}
        self.seen: dict[int, str] = {}  # processes of the job seen alive (pid -> start time)
        self._looked = 0.0

    def members(self) -> dict[int, str]:
        """The job's live processes (pid -> start time), the root included while it lives. Processes seen
        before and still alive count too: without a subreaper (not Linux, or a worker run in a thread of
        another program) one that left the tree is found only so."""
        mine = {pid for pid in children(self.me) if pid != self.root and not self._other(pid)}
        now = {}
        for pid in descendants({self.root} | mine) - {self.me}:
            start = pid_start(pid)
            if start is not None:
                now[pid] = start
        for pid, start in self.seen.items():
            if pid not in now and pid_start(pid) == start:
                now[pid] = start
        self.seen = dict(now)
        return now

    def poll(self) -> None:
        """While the job runs: look its processes up now and then, collect those that exited here."""
        if time.monotonic() - self._looked >= POLL_S:
            self._looked = time.monotonic()
            self.members()
        self.reap()

    def terminate(self) -> None:
        """SIGTERM to the job's process group: the job itself, or its launcher, which forwards it to its ranks
        and waits for them (torchrun: 30 s) before it kills them."""
        self.members()  # who is there, before anything exits
        signal_group(self.root, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the job's process group and to every process of the job (while the root lives)."""
        signal_group(self.root, signal.SIGKILL)
        for pid, start in self.members().items():
            _signal(pid, start, signal.SIGKILL)
        self.reap()

    def clear(self, stopped_at: float | None, grace_s: float, poll_s: float = 0.2) -> dict[int, str]:
        """Once the root has exited: stop what is left of the job (ranks outside its group, those a crashed
        launcher left behind). SIGTERM to those the group's SIGTERM did not reach, SIGKILL once grace_s has
        passed since the job was stopped (since now, if it was not); returns the processes that were left."""
        left = self.members()
        if left:
            for pid, start in left.items():
                if stopped_at is None or _pgid(pid) != self.root:
                    _signal(pid, start, signal.SIGTERM)
            deadline = (stopped_at if stopped_at is not None else time.time()) + grace_s
            while self.members() and time.time() < deadline:
                self.reap()
                time.sleep(poll_s)
            deadline = time.time() + KILL_WAIT_S
            while (rest := self.members()) and time.time() < deadline:
                for pid, start in rest.items():
                    _signal(pid, start, signal.SIGKILL)
                self.reap()
                time.sleep(poll_s)
            if rest:
                log.warning("job %d: processes %s survive SIGKILL (uninterruptible sleep?)", self.root,
                            sorted(rest))
        self.reap()
        return left

    def reap(self) -> None:
        """Collect the exit status of the job's processes that were re-parented here and have exited (a
        subreaper's duty: else they stay zombies). The root is its starter's to collect (Popen,
        forkserver)."""
        for pid in children(self.me):
            if pid != self.root and not self._other(pid) and _state(pid) == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _other(self, pid: int) -> bool:
        return pid in self.others and self.others[pid] == _started(pid)  # theirs to collect, even as zombies


def children(pid: int) -> set[int]:
    """A process's children, zombies included: /proc/<pid>/task/*/children, else every process's parent."""
    if not _children_files():
        return {p for p, parent in _parents().items() if parent == pid}
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:  # a child belongs to the thread that forked it
        try:
            out.update(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            pass  # the thread ended meanwhile
    return out


def descendants(roots: set[int]) -> set[int]:
    """roots and every process below them, zombies included."""
    parents = None if _children_files() else _parents()
    found, todo = set(roots), list(roots)
    while todo:
        pid = todo.pop()
        kids = children(pid) if parents is None else {p for p, q in parents.items() if q == pid}
        todo.extend(kids - found)
        found |= kids
    return found


def _children_files() -> bool:
    global _HAS_CHILDREN
    if _HAS_CHILDREN is None:  # a kernel without CONFIG_PROC_CHILDREN has no such file
        _HAS_CHILDREN = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()
    return _HAS_CHILDREN


_HAS_CHILDREN: bool | None = None


def _parents() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc") if Path("/proc").is_dir() else ():
        fields = _stat(int(name)) if name.isdigit() else None
        if fields:
            out[int(name)] = int(fields[1])
    return out


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _started(pid: int) -> str | None:
    """Start time of a process, a zombie's too (pid_start answers None for a zombie: it has exited)."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _state(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[0] if fields else None


def _pgid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[2]) if fields else None


def _signal(pid: int, start: str, sig: int) -> None:
    """Signal a process if it is still the one seen (same start time: its PID may have been recycled)."""
    if pid_start(pid) != start:
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
