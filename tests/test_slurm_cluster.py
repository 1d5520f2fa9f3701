"""Sweeps through a real SLURM cluster: `.ci/slurm-cluster` starts Debian's slurmctld, slurmd and munged on this
machine (one node, KillWait 10 s); `sweep --launcher slurm` submits real sbatch arrays through submitit, and
SLURM's own time limits, `scancel`, and its SIGTERM-then-SIGKILL act on the workers.

Real: the scheduler, its signals and limits, the driver, the workers, the ledger, and an `mlflow server` on
127.0.0.1 (a SLURM sweep refuses a SQLite store). Stand-in: the training job (tests/test_tracking_outage.py's
FAKE_JOB, via HARNESS_TRAIN_CMD), which logs a metric every 0.4 s to the server for FAKE_STEPS steps, so its
length is known and a test can catch it mid-run; `sacct` (tests/slurm_bin/sacct, answering from squeue, as the
cluster keeps no accounting). Skipped with the reason when the cluster cannot start on this machine;
HARNESS_REQUIRE_SLURM=1 (set by CI) turns that skip into a failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from harness.config import ConfigError
from harness.sweep.ledger import OUTCOME, OWNER, Ledger
from harness.sweep.storage import open_storage
from tests.conftest import REPO
from tests.test_tracking_outage import FAKE_JOB, Server

pytestmark = pytest.mark.slow

# A SIGTERM the stand-in ignores (FAKE_IGNORE_TERM): only SLURM's SIGKILL after KillWait ends it, as a job stuck
# in a collective would be ended at a preemption.
IGNORING_JOB = "import signal, os\nif os.environ.get('FAKE_IGNORE_TERM'):\n" \
               "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + FAKE_JOB


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    r = subprocess.run([str(REPO / ".ci" / "slurm-cluster"), "start"], capture_output=True, text=True,
                       timeout=600)
    line = (r.stdout.strip() or r.stderr.strip() or "no output").splitlines()[-1]
    if r.returncode != 0:
        if os.environ.get("HARNESS_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM cluster required but did not start: {line}")
        pytest.skip(f"no SLURM cluster on this machine: {line}")
    return {"PATH": f"{REPO / 'tests' / 'slurm_bin'}{os.pathsep}{os.environ['PATH']}"}


def spec_file(folder: Path, cells: int, reference_s: list[float]) -> Path:
    spec = {"study": "slurm", "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16,
                                       "val_prompts": 8, "rollout_batches": 2,
                                       "trl": {"num_generations": 4, "per_device_train_batch_size": 8}},
            "axes": {"objective": ["grpo", "cfpo"]}, "seeds": list(range(cells // 2)),
            "scales": {"cpu": {"device": "cpu", "reference_s": reference_s}}}
    path = folder / "slurm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start(tmp_path: Path, slurm: dict[str, str], server: Server, spec: Path, steps: int, *args: str,
          extra: dict[str, str] | None = None):
    (tmp_path / "fake_job.py").write_text(IGNORING_JOB)
    env = {**os.environ, **slurm, **(extra or {}), "MLFLOW_TRACKING_URI": server.uri,
           "HARNESS_RESULTS": str(tmp_path / "results"),
           "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp_path / 'fake_job.py'}", "FAKE_LOG": str(tmp_path / "jobs.log"),
           "FAKE_STEPS": str(steps)}
    out = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(spec), "--scale", "cpu",
                             "--launcher", "slurm", *args], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT, text=True)
    return proc, env


def ledger_of(tmp_path: Path) -> Ledger:
    return Ledger(open_storage(str(tmp_path / "results" / "slurm" / "cpu" / "ledger.journal")), "slurm/cpu",
                  create=False)


def running_slurm_attempt(tmp_path: Path):
    """A running attempt whose job has started, of a worker that is a SLURM job (None before there is one)."""
    if not (tmp_path / "results" / "slurm" / "cpu" / "ledger.journal").is_file():
        return None
    try:
        trials = ledger_of(tmp_path).trials((TrialState.RUNNING,))
    except ConfigError:  # the driver has not created the sweep yet
        return None
    return next((t for t in trials if "harness.job" in t.user_attrs
                 and (t.user_attrs.get(OWNER) or {}).get("slurm_job")), None)


def wait_for(what: str, predicate, timeout: float, log: Path) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"waited in vain for {what}; driver log:\n{log.read_text()[-4000:]}")


def every_cell_complete_once(ledger: Ledger, n: int) -> None:
    complete = [t.user_attrs["harness.cell"] for t in ledger.trials((TrialState.COMPLETE,))]
    assert len(complete) == len(set(complete)) == n, complete


def test_scancel_of_a_worker_mid_job_is_an_interruption_and_the_worker_is_resubmitted(tmp_path, slurm):
    """scancel = SIGTERM to the worker and its job, then SIGKILL after KillWait (10 s): the job here ignores
    SIGTERM, so the kill ends both before the worker's 30 s grace; the attempt must already be recorded as
    interrupted (no attempt spent), and the driver must submit a new worker, not end with work left. A job is
    100 steps (40 s or more), so the victim cannot end within the KillWait it outlives by ignoring SIGTERM."""
    server = Server(tmp_path)
    server.start()
    try:
        spec = spec_file(tmp_path, cells=4, reference_s=[5.0, 0.0])
        proc, env = start(tmp_path, slurm, server, spec, 100, "--workers", "2", "--timeout-min", "10",
                          extra={"FAKE_IGNORE_TERM": "1"})  # every job ignores SIGTERM; one gets scancel
        log = tmp_path / "driver.log"
        try:
            victim = wait_for("a running attempt of a SLURM worker", lambda: running_slurm_attempt(tmp_path),
                              240, log)
            job = victim.user_attrs[OWNER]["slurm_job"]
            time.sleep(2)
            cancel = subprocess.run(["scancel", job], check=True, env=env, capture_output=True, text=True)
            assert not cancel.stderr, cancel.stderr  # scancel exits 0 on an id it calls invalid
            assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        ledger = ledger_of(tmp_path)
        every_cell_complete_once(ledger, 4)
        settled = ledger.storage.get_trial(victim._trial_id)
        assert settled.state == TrialState.FAIL
        assert (settled.user_attrs.get(OUTCOME) or {}).get("state") == "interrupted", settled.user_attrs
        cell = victim.user_attrs["harness.cell"]
        attempts = [t for t in ledger.trials() if t.user_attrs["harness.cell"] == cell]
        assert all((t.user_attrs.get(OUTCOME) or {}).get("state") in ("interrupted", "complete") for t in attempts)
        assert "submitted SLURM job" in log.read_text(), log.read_text()[-3000:]
    finally:
        server.stop()


def test_workers_outlive_their_time_limit_and_take_only_cells_that_fit(tmp_path, slurm):
    """One worker at a time, each with a 2-minute SLURM time limit, and 10 cells of about 12 s: the first worker
    takes cells while they are expected to end before its limit, then leaves; the driver submits fresh workers
    until every cell is done. No attempt may be cut by the limit (each cell complete at its first attempt)."""
    server = Server(tmp_path)
    server.start()
    try:
        spec = spec_file(tmp_path, cells=10, reference_s=[12.0, 0.0])
        proc, _ = start(tmp_path, slurm, server, spec, 30, "--workers", "1", "--timeout-min", "2")
        log = tmp_path / "driver.log"
        try:
            assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        ledger = ledger_of(tmp_path)
        every_cell_complete_once(ledger, 10)
        assert all(int(t.user_attrs["harness.attempt"]) == 1 for t in ledger.trials()), "an attempt was cut"
        jobs = {(t.user_attrs.get(OWNER) or {}).get("slurm_job") for t in ledger.trials()}
        assert len(jobs) >= 2 and None not in jobs, jobs  # more than one worker job, all of them SLURM's
        assert "submitted SLURM job" in log.read_text()
    finally:
        server.stop()
