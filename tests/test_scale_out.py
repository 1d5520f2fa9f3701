"""Scale-out: a real PostgreSQL server on loopback as the sweep's ledger, shared by a driver and a worker that
stands for another machine (its own host name, results folder and process), with the ledger tests' kind of
stand-in job (HARNESS_TRAIN_CMD) instead of training.

The server: tests/pg_server.py (skipped with the reason where PostgreSQL or psycopg2 is missing).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harness.sweep.ledger import Ledger
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage
from tests.pg_server import database

FAKE_JOB = r'''
import json, os, sys, time
args = sys.argv[1:]
tags = {args[i + 1].split("=", 1)[0]: args[i + 1].split("=", 1)[1] for i, a in enumerate(args) if a == "--tag"}
result = args[args.index("--result") + 1]
def note(what):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(f"{what} {tags['harness.cell']} {tags['harness.attempt']} {os.environ.get('HARNESS_HOST', '-')}\n")
note("start")
time.sleep(float(os.environ.get("FAKE_SLEEP", "1.0")))
json.dump({"status": "complete", "run_id": "none", "final": {"val/reward": 0.5}}, open(result, "w"))
note("done")
'''
SPEC = {
    "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16, "val_prompts": 8,
             "trl": {"num_generations": 4, "per_device_train_batch_size": 8}},
    "axes": {"objective": ["grpo", "cfpo"], "batch_ratio": [1, 2]},
    "seeds": [0, 1],
    "scales": {"paper": {"base": {"rollout_batches": 2}}, "proxy": {"base": {"rollout_batches": 2}}},
}


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 with an empty database; yields its URL."""
    with database("harness-pg-") as pg:
        yield pg.url


def test_driver_and_a_worker_on_another_machine_share_a_postgresql_ledger(tmp_path, postgres):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"study": "pg", **SPEC}))
    (tmp_path / "fake_job.py").write_text(FAKE_JOB)
    log = tmp_path / "jobs.log"
    cells = [c.hash for c in make_plan(*load_spec(str(spec)), "proxy").cells]
    assert len(cells) == 8
    # Shared by both machines: the ledger (PostgreSQL) and the MLflow store (here one sqlite file).
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "FAKE_LOG": str(log),
           "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp_path / 'fake_job.py'}"}
    for key in ("HARNESS_RESULTS", "HARNESS_HOST", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    common = [str(spec), "--scale", "proxy", "--storage", postgres]
    driver = subprocess.Popen([sys.executable, "-m", "harness", "sweep", *common, "--workers", "1",
                               "--results-dir", str(tmp_path / "machine1")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90  # the driver has enqueued the grid once its worker starts a job
        while time.time() < deadline and not (log.exists() and log.read_text().startswith("start")):
            assert driver.poll() is None, driver.communicate()[0]
            time.sleep(0.2)
        assert log.exists(), "the driver's worker never started a job"
        # "Another machine": its own host name (attempts judged by heartbeat, not by PID) and results folder.
        other = subprocess.run([sys.executable, "-m", "harness", "worker", *common, "--name", "machine2",
                                "--results-dir", str(tmp_path / "machine2")],
                               env={**env, "HARNESS_HOST": "machine2"}, capture_output=True, text=True, timeout=120)
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert other.returncode == 0, other.stdout + other.stderr
    assert driver.returncode == 0, out
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert sorted(ln[1] for ln in lines if ln[0] == "start") == sorted(cells)  # each cell ran exactly once...
    assert sorted(ln[1] for ln in lines if ln[0] == "done") == sorted(cells)  # ...and finished
    assert {ln[3] for ln in lines} == {"-", "machine2"}  # both machines ran cells
    ledger = Ledger(open_storage(postgres), "pg/proxy", create=False)
    status = {c.hash: (c.state, c.attempt, c.attempts) for c in ledger.cells()}
    assert status == {h: ("complete", 1, 1) for h in cells}
    assert {c.worker for c in ledger.cells()} == {f"{_host()}-w0", "machine2"}
    on_m2 = [c.hash for c in ledger.cells() if c.worker == "machine2"]
    assert all((tmp_path / "machine2" / "pg" / "proxy" / "jobs" / h / "result.json").is_file() for h in on_m2)
    shown = subprocess.run([sys.executable, "-m", "harness", "status", *common], env=env, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "8 complete" in shown.stdout, shown.stdout + shown.stderr


def _host() -> str:
    import socket

    return socket.gethostname()


def _pop_all(url: str, out: str) -> None:
    from optuna.trial import TrialState

    ledger = Ledger(open_storage(url), "pops/proxy", create=False)
    got = []
    while (t := ledger.pop(f"p{os.getpid()}", lambda t: Path("x.log"))) is not None:
        got.append(t.user_attrs["harness.cell"])
        ledger.settle(t._trial_id, TrialState.COMPLETE, {"state": "complete"}, 0.0)
    Path(out).write_text("\n".join(got))


def test_concurrent_pops_on_postgresql_hand_each_cell_to_one_process(tmp_path, postgres):
    ledger = Ledger(open_storage(postgres), "pops/proxy", create=True)
    for i in range(40):
        ledger.enqueue(f"cell{i:02d}", {"i": i}, {"seed": i}, 1.0, attempt=1)
    procs = [mp.get_context("spawn").Process(target=_pop_all, args=(postgres, str(tmp_path / f"got{i}")))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    got = [c for i in range(4) for c in (tmp_path / f"got{i}").read_text().split()]
    assert sorted(got) == [f"cell{i:02d}" for i in range(40)]
    assert len({c.worker for c in ledger.cells()}) > 1  # really concurrent
