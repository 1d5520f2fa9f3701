"""Sweep ledger and workers, with a stand-in job (a tiny real subprocess) instead of training.

The stand-in takes the train command's arguments, notes start/done in a shared log and writes result.json; it
can hang, fail, or create an MLflow run like the real job. The driver, the workers and the ledger are real.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.sweep.ledger import Ledger, open_storage, pid_alive
from harness.sweep.spec import load_spec, make_plan

FAKE_JOB = r'''
import json, os, sys, time
args = sys.argv[1:]
tags, result, parent = {}, None, None
i = 1
while i < len(args):
    if args[i] == "--tag":
        k, v = args[i + 1].split("=", 1); tags[k] = v; i += 2
    elif args[i] == "--result":
        result = args[i + 1]; i += 2
    elif args[i] == "--parent-run-id":
        parent = args[i + 1]; i += 2
    else:
        i += 1
cell, attempt = tags["harness.cell"], int(tags["harness.attempt"])
def note(*what):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(" ".join(map(str, [*what, cell, attempt, os.getpid(), os.getppid()])) + "\n")
note("start")
run_id = "none"
if os.environ.get("FAKE_MLFLOW"):
    from mlflow.tracking import MlflowClient
    c = MlflowClient()
    exp = c.get_experiment_by_name(f"{tags['harness.study']}/{tags['harness.scale']}").experiment_id
    run_id = c.create_run(exp, tags={**tags, "mlflow.parentRunId": parent, "harness.status": "running"}).info.run_id
    note("run", run_id)
if os.environ.get("FAKE_HANG") == cell and attempt == 1:
    time.sleep(300)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.2")))
if cell in os.environ.get("FAKE_FAIL", "").split(","):
    print("boom: a fake failure")
    sys.exit(1)
if os.environ.get("FAKE_MLFLOW"):
    c.set_terminated(run_id, "FINISHED")
json.dump({"status": "complete", "run_id": run_id, "final": {"val/reward": 0.5}}, open(result, "w"))
note("done")
'''
SPEC = {
    "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16, "val_prompts": 8,
             "trl": {"num_generations": 4, "per_device_train_batch_size": 8}},
    "axes": {"objective": ["grpo", "cfpo"], "batch_ratio": [1, 2]},
    "seeds": [0],
    "scales": {"paper": {"base": {"rollout_batches": 2}}, "proxy": {"base": {"rollout_batches": 2}}},
}


class Sweep:
    """A tiny sweep in a tmp dir: spec, results root, MLflow store, stand-in job, shared job log."""

    def __init__(self, tmp: Path, study: str, seeds: list[int] = (0,)):
        self.tmp, self.study = tmp, study
        self.spec = tmp / "spec.yaml"
        self.spec.write_text(yaml.safe_dump({"study": study, **SPEC, "seeds": list(seeds)}))
        self.results = tmp / "results"
        self.log = tmp / "jobs.log"
        (tmp / "fake_job.py").write_text(FAKE_JOB)
        self.uri = f"sqlite:///{tmp / 'mlflow.db'}"
        self.env = {**os.environ, "HARNESS_RESULTS": str(self.results), "MLFLOW_TRACKING_URI": self.uri,
                    "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp / 'fake_job.py'}", "FAKE_LOG": str(self.log)}
        self.cells = [c.hash for c in make_plan(*load_spec(str(self.spec)), "proxy").cells]

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(self.spec), "--scale", "proxy", *args],
                                env={**self.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, *args: str, timeout: float = 90, **env: str) -> tuple[int, str]:
        p = self.start(*args, **env)
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out

    def events(self, kind: str) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [ln.split()[1:] for ln in self.log.read_text().splitlines() if ln.split()[0] == kind]

    def wait_for(self, kind: str, cell: str, timeout: float = 60) -> list[str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hits = [e for e in self.events(kind) if cell in e]
            if hits:
                return hits[0]
            time.sleep(0.1)
        raise AssertionError(f"no {kind} event for {cell} within {timeout}s")

    def ledger(self) -> Ledger:
        return Ledger(open_storage(str(self.results / self.study / "proxy" / "ledger.journal")),
                      f"{self.study}/proxy", create=False)

    def states(self) -> dict[str, tuple[str, int]]:
        return {c.hash: (c.state, c.attempt) for c in self.ledger().cells()}

    def done_counts(self) -> dict[str, int]:
        return {h: sum(1 for e in self.events("done") if e[0] == h) for h in self.cells}


def test_two_workers_run_each_cell_exactly_once(tmp_path):
    """The driver's local worker and a worker joining with `python -m harness worker` share one queue."""
    s = Sweep(tmp_path, "two", seeds=[0, 1])
    driver = s.start("--workers", "1", FAKE_SLEEP="0.7")
    for line in driver.stdout:  # the joining worker needs the ledger the driver creates
        if line.startswith("sweep two/proxy:"):
            break
    joiner = subprocess.run([sys.executable, "-m", "harness", "worker", str(s.spec), "--scale", "proxy",
                             "--name", "joiner"], env={**s.env, "FAKE_SLEEP": "0.7"}, capture_output=True,
                            text=True, timeout=90)
    out = driver.stdout.read()
    assert driver.wait(timeout=90) == 0, out
    assert joiner.returncode == 0, joiner.stdout + joiner.stderr
    assert s.done_counts() == {h: 1 for h in s.cells}
    assert len(s.events("start")) == len(s.cells) == 8
    assert s.states() == {h: ("complete", 1) for h in s.cells}
    workers = {c.worker for c in s.ledger().cells()}
    assert "joiner" in workers and len(workers) == 2, workers


def test_sigkill_worker_mid_cell_reruns_it_once(tmp_path):
    s = Sweep(tmp_path, "kill")
    hang = s.cells[0]
    driver = s.start("--workers", "2", FAKE_HANG=hang, FAKE_MLFLOW="1")
    _, _, job_pid, worker_pid = s.wait_for("start", hang)
    s.wait_for("run", hang)
    os.kill(int(worker_pid), signal.SIGKILL)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 0, out
    # The job died with its worker; the other worker re-ran the cell; every cell finished exactly once.
    assert not pid_alive(int(job_pid), None)
    assert s.done_counts() == {h: 1 for h in s.cells}
    assert s.states() == {h: ("complete", 2 if h == hang else 1) for h in s.cells}
    trials = [t for t in s.ledger().trials() if t.user_attrs["harness.cell"] == hang]
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and "is gone" in trials[0].user_attrs["harness.reaped"]
    # MLflow: the killed attempt's run (left RUNNING by SIGKILL) is KILLED, every attempt nests under the sweep.
    client = MlflowClient(s.uri)
    exp = client.get_experiment_by_name("kill/proxy").experiment_id
    runs = client.search_runs([exp])
    parent = [r for r in runs if r.data.tags.get("harness.sweep") == "true"]
    children = {(r.data.tags["harness.cell"], r.data.tags["harness.attempt"]): r for r in runs
                if "harness.cell" in r.data.tags}
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert children[(hang, "1")].info.status == "KILLED"
    assert children[(hang, "1")].data.tags["harness.status"] == "killed"
    assert children[(hang, "2")].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in children.values())


def test_failed_cells_retry_up_to_the_limit_then_on_request(tmp_path):
    s = Sweep(tmp_path, "retry")
    bad = s.cells[-1]
    rc, out = s.run("--workers", "1", "--max-attempts", "2", FAKE_FAIL=bad)
    assert rc == 1, out
    assert re.search(rf"failed {bad} .* after 2 attempt\(s\): exit 1: boom: a fake failure", out), out
    assert s.states()[bad] == ("failed", 2)
    # Resume: complete cells are skipped, the failed cell has used its attempts.
    rc, out = s.run("--workers", "1", "--max-attempts", "2", FAKE_FAIL=bad)
    assert rc == 1 and "3 done" in out and "1 failed for good" in out, out
    assert len(s.events("start")) == len(s.cells) + 1
    # --retry-failed: a fresh allowance; the cell now succeeds on its third attempt.
    rc, out = s.run("--workers", "1", "--retry-failed")
    assert rc == 0, out
    assert s.states()[bad] == ("complete", 3)
    assert s.done_counts() == {h: 1 for h in s.cells}


def test_driver_sigint_requeues_running_cells_and_resume_finishes(tmp_path):
    s = Sweep(tmp_path, "intr")
    driver = s.start("--workers", "2", FAKE_SLEEP="300", FAKE_MLFLOW="1")
    for h in s.cells[:2]:
        s.wait_for("run", h)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=90)
    assert driver.returncode == 130, out
    states = s.states()
    assert "running" not in {st for st, _ in states.values()}  # nothing left running for ever
    assert {states[h] for h in s.cells[:2]} == {("queued", 2)}  # interrupted attempts cost nothing...
    for e in s.events("start"):
        assert not pid_alive(int(e[2]), None)  # ...and their jobs are gone
    client = MlflowClient(s.uri)
    exp = client.get_experiment_by_name("intr/proxy").experiment_id
    assert {r.info.status for r in client.search_runs([exp])} == {"KILLED"}
    rc, out = s.run("--workers", "2")
    assert rc == 0, out
    assert s.done_counts() == {h: 1 for h in s.cells}


def test_driver_sigkill_stops_its_workers_and_resume_finishes(tmp_path):
    s = Sweep(tmp_path, "dkill")
    driver = s.start("--workers", "2", FAKE_SLEEP="300")
    for h in s.cells[:2]:
        s.wait_for("start", h)
    driver.kill()
    driver.communicate(timeout=30)
    deadline = time.time() + 60  # workers get SIGTERM from the kernel, stop their jobs, re-queue the cells
    while time.time() < deadline and any(st == "running" for st, _ in s.states().values()):
        time.sleep(0.5)
    assert "running" not in {st for st, _ in s.states().values()}
    rc, out = s.run("--workers", "2")
    assert rc == 0, out
    assert s.done_counts() == {h: 1 for h in s.cells}
    client = MlflowClient(s.uri)
    exp = client.get_experiment_by_name("dkill/proxy").experiment_id
    parents = sorted((r.info.start_time, r.info.status) for r in client.search_runs([exp]))
    assert [st for _, st in parents] == ["KILLED", "FINISHED"]  # the dead driver's parent run is closed


def test_slurm_launcher_with_submitit_local_executor(tmp_path):
    s = Sweep(tmp_path, "slurm")
    rc, out = s.run("--workers", "2", "--launcher", "slurm", "--timeout-min", "5")
    assert rc == 0, out
    assert s.done_counts() == {h: 1 for h in s.cells}
    assert list((s.results / "slurm" / "proxy" / "submitit").glob("*_0_log.out"))


def test_status_prints_the_ledger(tmp_path):
    s = Sweep(tmp_path, "stat")
    assert s.run("--workers", "1")[0] == 0
    out = subprocess.run([sys.executable, "-m", "harness", "status", str(s.spec)], env=s.env, capture_output=True,
                         text=True, timeout=60).stdout
    for h in s.cells:
        assert re.search(rf"{h} .*complete .* 1 .* 0\.500", out), out
    assert "4 complete" in out
