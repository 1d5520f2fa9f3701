"""The worker processes of one `sweep` invocation: local processes on this machine, or submitit jobs (SLURM, or
submitit's local executor when asked for by name), started, replaced while work is left, and stopped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.launch import gpu_slots
from harness.redact import STORAGE_ENV, EnvSecret
from harness.sweep.display import console
from harness.sweep.ledger import HOST
from harness.sweep.slurm import NEVER_FITS, NOTHING_FITS
from harness.sweep.spec import Plan
from harness.sweep.worker import GRACE_S, WorkerOptions, run_worker
from harness.sweep.worker_group import SUBMITIT, spawn_worker

MAX_REPLACEMENTS = 20  # local worker restarts per sweep invocation before a crash loop is left to a person


class Launcher:
    """Local worker processes, or submitit jobs (SLURM, or submitit's local executor where there is none)."""

    def __init__(self, plan: Plan, opts: Any, storage: str, results: Path, sweep_dir: Path,
                 gpus: list[str]):
        self.plan, self.opts, self.storage, self.results = plan, opts, storage, results
        self.sweep_dir, self.gpus = sweep_dir, gpus
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []
        self.slots: list[tuple[str, ...]] = []
        self.jobs: list[Any] = []
        self.replaced = 0  # local workers replaced so far (a crash loop stops at MAX_REPLACEMENTS)
        self.retired: set[int] = set()  # SLURM workers not to resubmit (no cell fits in a whole time limit)

    def worker_options(self, name: str, gpus: tuple[str, ...] | None = None) -> WorkerOptions:
        # The ledger URL pickles as a reference to $HARNESS_STORAGE, never into submitit's files (harness.redact)
        return WorkerOptions(storage=EnvSecret(self.storage, STORAGE_ENV), study=self.plan.study,
                             scale=self.plan.scale,
                             results=str(self.results), name=name, gpus=gpus, job_start=self.opts.job_start)

    def start(self) -> None:
        if self.opts.workers == 0:
            return
        if self.opts.launcher in SUBMITIT:
            self._start_submitit()
            return
        # Each worker gets its own slot of gpus_per_job devices; workers beyond the slots share them
        # round-robin. Without GPUs: `--gpus none` (CPU jobs, and the worker need not look for CUDA itself).
        slots = gpu_slots(self.gpus, self.plan.gpus_per_job)
        if slots and self.opts.workers > len(slots):
            console().print(f"warning: {self.opts.workers} workers share {len(slots)} slot(s) of "
                            f"{self.plan.gpus_per_job} GPU(s) round-robin", soft_wrap=True)
        for i in range(self.opts.workers):
            self.names.append(f"{HOST}-w{i}")
            self.slots.append(tuple(slots[i % len(slots)]) if slots else ())
            self.procs.append(self._spawn(i))

    def _spawn(self, i: int) -> subprocess.Popen:
        return spawn_worker(self.plan.spec_path.resolve(), self.worker_options(self.names[i], self.slots[i]))

    def _start_submitit(self) -> None:
        import submitit

        # Named, never guessed: submitit alone would fall back to its local executor where SLURM is missing.
        executor = submitit.AutoExecutor(folder=self.sweep_dir / "submitit",
                                         cluster=SUBMITIT[self.opts.launcher])
        os.environ[STORAGE_ENV] = self.storage  # in every worker job's environment, resubmitted ones' too
        params: dict[str, Any] = {"timeout_min": self.opts.timeout_min, "name": f"sweep-{self.plan.study}",
                                  "slurm_array_parallelism": self.opts.workers}
        if self.plan.device == "cuda" or self.plan.gpus_per_job > 1:
            params["gpus_per_node"] = self.plan.gpus_per_job  # one worker per array task, one job at a time
        if self.opts.partition:
            params["slurm_partition"] = self.opts.partition
        executor.update_parameters(**params)
        names = [f"{executor.cluster}-w{i}" for i in range(self.opts.workers)]
        self.jobs = executor.map_array(run_worker, [self.worker_options(n) for n in names])
        self.executor, self.job_names = executor, names

    def replace_killed(self) -> None:
        """While work is left (the caller asks), a worker that ended badly is replaced; its attempt is settled by
        the reaper (adopted if its job had finished). Local: any non-zero exit (a signal, the OOM killer, a
        crash). SLURM: a worker job that ended for any reason but an empty queue (time limit, scancel,
        preemption, node failure, or nothing queued fitting in its time left) is resubmitted with a whole time
        limit, so a sweep outlives any one job; one that found no cell fitting in a whole time limit is not."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None and p.returncode != 0 and self.replaced < MAX_REPLACEMENTS:
                why = (f"was killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else
                       f"exited with code {p.returncode}")
                console().print(f"worker {self.names[i]} (pid {p.pid}) {why}; starting another", soft_wrap=True)
                self.procs[i], self.replaced = self._spawn(i), self.replaced + 1
        for i, j in enumerate(self.jobs):
            if not j.done() or i in self.retired:
                continue
            rc = _job_result(j)  # the worker's exit code once it returned, even while SLURM still says RUNNING
            if rc == 0:
                continue  # left because the queue was empty
            if rc == NEVER_FITS:
                self.retired.add(i)
                console().print(f"worker {self.job_names[i]} (SLURM job {j.job_id}) found no queued cell expected "
                                f"to end within a whole --timeout-min {self.opts.timeout_min}; not resubmitting",
                                soft_wrap=True)
                continue
            why = ("left: nothing queued fits in its time left" if rc == NOTHING_FITS else
                   f"ended ({j.state}{f', exit code {rc}' if rc is not None else ''})")
            self.jobs[i] = self.executor.submit(run_worker, self.worker_options(self.job_names[i]))
            console().print(f"worker {self.job_names[i]} (SLURM job {j.job_id}) {why}; submitted SLURM job "
                            f"{self.jobs[i].job_id}", soft_wrap=True)

    def finished(self) -> bool:
        return all(p.poll() is not None for p in self.procs) and all(j.done() for j in self.jobs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for j in self.jobs:
            j.cancel(check=False)
        deadline = time.time() + GRACE_S + 15
        try:
            while not self.finished() and time.time() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # its job gets SIGKILL too (parent-death signal); the next start reaps the cell
                p.wait()


def _job_result(job: Any) -> int | None:
    try:
        return int(job.result())
    except Exception:  # noqa: BLE001 - the worker raised: treat as ended badly
        return None
