"""A tracking outage mid-sweep: a real `mlflow server` on 127.0.0.1, stopped while jobs log to it, restarted.

The jobs are a stand-in (HARNESS_TRAIN_CMD) that logs a metric per step to the server as the real job does,
without the retries MLflow's client would otherwise spend minutes on (so an outage fails it at once). What must
hold: the affected jobs' attempts are settled with one line naming the server and cost no attempt, their cells
run again once the server is back, no cell finished before the outage loses a metric, each cell has exactly one
complete run and none is left RUNNING.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from harness.launch import free_port
from harness.sweep.ledger import Ledger
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage

pytestmark = pytest.mark.slow

STEPS = 30  # 12 s of metrics: wide enough that the server goes away mid-job even on a loaded machine
FAKE_JOB = r'''
import json, os, sys, time
from mlflow.tracking import MlflowClient
args = sys.argv[1:]
tags = {args[i + 1].split("=", 1)[0]: args[i + 1].split("=", 1)[1] for i, a in enumerate(args) if a == "--tag"}
result, parent = args[args.index("--result") + 1], args[args.index("--parent-run-id") + 1]
def note(what):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(f"{what} {tags['harness.cell']} {tags['harness.attempt']} {os.getpid()}\n")
note("start")
try:
    c = MlflowClient()
    exp = c.get_experiment_by_name(f"{tags['harness.study']}/{tags['harness.scale']}").experiment_id
    run_id = c.create_run(exp, tags={**tags, "mlflow.parentRunId": parent, "harness.status": "running"}).info.run_id
    for step in range(int(os.environ["FAKE_STEPS"])):
        c.log_metric(run_id, "m", float(step), step=step)
        time.sleep(0.4)
    c.set_tag(run_id, "harness.status", "complete")
    c.set_terminated(run_id, "FINISHED")
except Exception:
    note("crash")
    raise
json.dump({"status": "complete", "run_id": run_id, "final": {"m": float(step)}}, open(result, "w"))
note("done")
'''
SPEC = {
    "study": "outage",
    "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16, "val_prompts": 8,
             "trl": {"num_generations": 4, "per_device_train_batch_size": 8}},
    "axes": {"objective": ["grpo", "cfpo"], "batch_ratio": [1, 2]},
    "seeds": [0, 1],
    "scales": {"paper": {"base": {"rollout_batches": 2}}, "proxy": {"base": {"rollout_batches": 2}}},
}


class Server:
    """`mlflow server` on 127.0.0.1 over one sqlite store; stop() and start() keep the store and the port."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                    "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                    "--artifacts-destination", str(root / "artifacts")]
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120  # readiness, not an assertion on speed (the server took 9-16 s on 2 cores)
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(self.uri + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer on {self.uri}: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
            self.proc.wait(timeout=60)


def _events(log: Path, kind: str) -> list[list[str]]:
    if not log.exists():
        return []
    return [ln.split()[1:] for ln in log.read_text().splitlines() if ln.split()[0] == kind]


def _wait(what: str, predicate, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"waited in vain for {what}")


def test_sweep_rides_out_a_tracking_server_outage(tmp_path):
    server = Server(tmp_path)
    server.start()
    try:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(SPEC))
        (tmp_path / "fake_job.py").write_text(FAKE_JOB)
        log = tmp_path / "jobs.log"
        cells = [c.hash for c in make_plan(*load_spec(str(spec)), "proxy").cells]
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "HARNESS_RESULTS": str(tmp_path / "results"),
               "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp_path / 'fake_job.py'}", "FAKE_LOG": str(log),
               "FAKE_STEPS": str(STEPS), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        driver = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(spec), "--scale", "proxy",
                                   "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            # Pull the plug while some cell is finished and another is mid-run (it logs a metric every 0.4 s).
            # The first two jobs start together and end together: the victim is a job started after the first
            # end, stopped a second into its 12 s, so it is surely mid-run.
            _wait("a finished cell", lambda: _events(log, "done"))
            seen = len(log.read_text().splitlines())
            _wait("a job started after that", lambda: any(
                ln.startswith("start ") for ln in log.read_text().splitlines()[seen:]))
            time.sleep(1.0)
            done_before = {e[0] for e in _events(log, "done")}
            server.stop()
            _wait("a job hit by the outage", lambda: _events(log, "crash"))
            time.sleep(3)  # the server stays away a while: idle workers must wait, not burn through the queue
            server.start()
            out, _ = driver.communicate(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode == 0, out

        ledger = Ledger(open_storage(str(tmp_path / "results" / "outage" / "proxy" / "ledger.journal")),
                        "outage/proxy", create=False)
        assert {c.hash: c.state for c in ledger.cells()} == {h: "complete" for h in cells}
        trials = {(t.user_attrs["harness.cell"], str(t.user_attrs["harness.attempt"])): t for t in ledger.trials()}
        crashed = {(e[0], e[1]) for e in _events(log, "crash")}
        for key in crashed:
            outcome = trials[key].user_attrs["harness.outcome"]
            if trials[key].state.name == "COMPLETE":
                # Cut off between tagging its run complete and ending it: every metric was stored, so it is adopted
                # from MLflow (harness.sweep.adopt), not run again.
                assert outcome["adopted_from"] == "mlflow", outcome
                continue
            assert trials[key].state.name == "FAIL", key
            assert outcome["state"] == "interrupted", outcome  # one line naming the server; no attempt spent
            assert outcome["error"].startswith(f"MLflow tracking server {server.uri}") and "\n" not in outcome["error"]
        assert all(t.state.name != "FAIL" or key in crashed for key, t in trials.items())  # only the outage's

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("outage/proxy").experiment_id
        runs = client.search_runs([exp])
        assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
        usable = {}
        for r in runs:
            if r.data.tags.get("harness.status") == "complete":
                assert r.data.tags["harness.cell"] not in usable, "two complete runs of one cell"
                usable[r.data.tags["harness.cell"]] = r
        assert sorted(usable) == sorted(cells)
        for h in done_before:  # finished before the outage: every metric still there after the restart
            history = sorted(client.get_metric_history(usable[h].info.run_id, "m"), key=lambda m: m.step)
            assert [m.value for m in history] == [float(s) for s in range(STEPS)]
        for r in usable.values():
            assert r.info.status == "FINISHED" and len(client.get_metric_history(r.info.run_id, "m")) == STEPS
    finally:
        server.stop()
