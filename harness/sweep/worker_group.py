"""Worker processes on this machine: one per slot, each pinned to its GPUs, started by the driver or by
`harness worker` on a multi-GPU machine, and stopped together; and which launcher may start a sweep's
workers.

Launchers: `local` (processes here), `slurm` (submitit's SLURM executor: one array task per worker) and
`submitit-local` (submitit's local executor, for tests and laptops). submitit on its own would fall back to
its local executor where there is no SLURM; `slurm` never does: it is refused where no controller answers.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import ConfigError
from harness.redact import STORAGE_ENV, redact
from harness.sweep.processes import die_with_parent

if TYPE_CHECKING:  # the CLI asks check_launcher before paying for the worker's imports
    from harness.sweep.worker import WorkerOptions

LAUNCHERS = ("local", "slurm", "submitit-local")
SUBMITIT = {"slurm": "slurm", "submitit-local": "local"}  # launcher -> submitit's executor
SLURM_PING_S = 5.0


def check_launcher(launcher: str, tracking_uri: str) -> None:
    """One line refusing a launcher whose workers could not work (before anything is written)."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher}: allowed: {', '.join(LAUNCHERS)}")
    if launcher != "slurm":
        return
    if tracking_uri.startswith("sqlite"):
        # Jobs on several nodes writing one SQLite file over NFS/Lustre fail with "database is locked".
        raise ConfigError(f"--launcher slurm: the MLflow store is SQLite ({redact(tracking_uri)}), which "
                          "fails with lock errors on a shared file system; set MLFLOW_TRACKING_URI to a "
                          "tracking server every node reaches (http://host:5000; docs/SCALE_OUT.md)")
    down = slurm_down()
    if down:
        raise ConfigError(f"--launcher slurm: {down}; run on a SLURM login node, or use --launcher local "
                          "(or submitit-local)")


def slurm_down(timeout_s: float = SLURM_PING_S) -> str | None:
    """None when a SLURM controller reports UP to `scontrol ping` within timeout_s; else why not."""
    missing = [b for b in ("sinfo", "scontrol") if shutil.which(b) is None]
    if missing:
        return f"no SLURM client here ({' and '.join(missing)} not on PATH)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no SLURM controller answered `scontrol ping` within {timeout_s:g} s"
    except OSError as e:
        return f"`scontrol ping` failed ({e})"
    if ping.returncode == 0 and re.search(r"\bis UP\b", ping.stdout):
        return None
    said = " ".join((ping.stdout + " " + ping.stderr).split())[:200] or f"exit code {ping.returncode}"
    return f"no SLURM controller is UP (`scontrol ping`: {said})"


def worker_command(spec: Path, opts: WorkerOptions) -> list[str]:
    """`python -m harness worker` for one worker process with these options. The ledger is not on it: any user
    can read a command line (`ps`), and a PostgreSQL URL holds a password; spawn_worker passes it in
    $HARNESS_STORAGE, the default of `worker --storage`."""
    cmd = [sys.executable, "-m", "harness", "worker", str(spec), "--scale", opts.scale,
           "--results-dir", opts.results, "--name", opts.name]
    if opts.gpus is not None:
        cmd += ["--gpus", ",".join(opts.gpus) or "none"]
    return [*cmd, "--job-start", opts.job_start]


def spawn_worker(spec: Path, opts: WorkerOptions) -> subprocess.Popen:
    """Start one worker process, logging to <sweep>/workers/NAME.log, pinned to opts.gpus.

    Own session: a terminal's Ctrl-C reaches the parent only, which stops workers in order. Parent-death
    SIGTERM: a SIGKILLed parent still stops its workers (they stop their jobs and re-queue their cells).
    """
    log_dir = opts.sweep_dir / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HARNESS_RESULTS=opts.results)
    env[STORAGE_ENV] = str(opts.storage)
    if opts.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(opts.gpus)
    with open(log_dir / f"{opts.name}.log", "ab") as out:
        return subprocess.Popen(worker_command(spec, opts), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM))


def run_worker_group(spec: Path, group: list[WorkerOptions]) -> int:
    """Several pinned workers on this machine (`harness worker` with more than one GPU slot); returns when
    all have left. SIGINT / SIGTERM / SIGHUP are passed on as SIGTERM: each worker stops its job and re-queues
    it."""
    procs = [spawn_worker(spec, o) for o in group]
    for o, p in zip(group, procs, strict=True):
        print(f"worker {o.name} (pid {p.pid}) on GPUs {','.join(o.gpus or ()) or 'none'}: log "
              f"{o.sweep_dir / 'workers' / (o.name + '.log')}", flush=True)
    stopped = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopped.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.returncode for p in procs]
    return 130 if stopped.is_set() else next((c for c in codes if c), 0)
