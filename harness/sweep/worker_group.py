"""Worker processes on this machine: one per slot, each pinned to its GPUs, started by the driver or by
`harness worker` on a multi-GPU machine, and stopped together."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.sweep.processes import die_with_parent
from harness.sweep.worker import WorkerOptions


def worker_command(spec: Path, opts: WorkerOptions) -> list[str]:
    """`python -m harness worker` for one worker process with these options."""
    cmd = [sys.executable, "-m", "harness", "worker", str(spec), "--scale", opts.scale,
           "--storage", opts.storage, "--results-dir", opts.results, "--name", opts.name]
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
