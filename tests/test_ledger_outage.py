"""A PostgreSQL ledger that goes away mid-sweep, for real: the server restarted (its sessions ended), then cut off
by a firewall rule on the loopback (tests/pg_server.py's Firewall: packets dropped, so open connections go
half-open and new ones time out) for longer than the sweep's stale-after and the connections' timeouts.

Real: the server, the restart, the firewall, the driver with a local worker, a worker standing for another
machine (its own HARNESS_HOST, so every reaper judges its attempts by heartbeat alone). Stand-in: the job
(tests/test_scale_out.py's FAKE_JOB, via HARNESS_TRAIN_CMD), which sleeps, so its length is known. Skipped with
the reason where PostgreSQL, psycopg2 or nft is missing or nft may not change the firewall.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from harness.sweep.ledger import OUTCOME, REAPED, Ledger
from harness.sweep.pg_ledger import LedgerUnavailable, RetryingRDBStorage
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage, sqlalchemy_url
from tests.pg_server import Firewall, database
from tests.test_scale_out import FAKE_JOB, SPEC

pytestmark = pytest.mark.slow


@pytest.fixture
def server():
    with database("harness-pg-outage-") as pg:
        yield pg


def test_a_half_open_ledger_connection_fails_in_seconds_not_minutes(server):
    """With the server cut off after a connection was made, a call on that connection must fail (and, with no
    retry window, raise LedgerUnavailable) within the connections' timeouts: without a TCP user timeout it
    would wait out TCP's retransmissions (about 15 minutes)."""
    storage = RetryingRDBStorage(sqlalchemy_url(server.url), retry_s=0)
    storage.get_all_studies()  # a pooled connection, open
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            storage.get_all_studies()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - what it raised is the test's answer
            outcome.append(e)

    with Firewall(server.port):
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(120)  # the timeouts allow ~45 s (keepalives, user timeout, then a 5 s connect timeout)
        assert not caller.is_alive(), "a ledger call on a half-open connection still hangs after 120 s"
    assert outcome and isinstance(outcome[0], LedgerUnavailable), outcome
    assert "127.0.0.1" in str(outcome[0]) and "unreachable" in str(outcome[0])


def test_sweep_rides_out_a_restart_and_an_outage_of_its_ledger(tmp_path, server):
    """A restart of the server and a 45 s outage (3x the sweep's 15 s stale-after) while both workers run a job:
    no live attempt may be reaped (a reaper that could not read the ledger cannot judge heartbeats that could
    not be written), the driver must keep its claim (re-taken on a new connection), and every cell must end
    complete exactly once, at its first attempt."""
    url = server.url
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"study": "outage", **SPEC, "axes": {"objective": ["grpo", "cfpo"]}}))
    cells = [c.hash for c in make_plan(*load_spec(str(spec)), "proxy").cells]
    (tmp_path / "fake_job.py").write_text(FAKE_JOB)
    jobs = tmp_path / "jobs.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "FAKE_LOG": str(jobs),
           "FAKE_SLEEP": "25", "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp_path / 'fake_job.py'}"}
    for key in ("HARNESS_RESULTS", "HARNESS_HOST", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    common = [str(spec), "--scale", "proxy", "--storage", url]
    driver_log, other_log = open(tmp_path / "driver.log", "w"), open(tmp_path / "machine2.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "harness", "sweep", *common, "--workers", "1",
                               "--stale-after", "15", "--results-dir", str(tmp_path / "machine1")],
                              env=env, stdout=driver_log, stderr=subprocess.STDOUT, text=True)
    other = None
    try:
        _wait(lambda: jobs.exists() and "start" in jobs.read_text(), 120, "the driver's worker to start a job",
              tmp_path)
        other = subprocess.Popen([sys.executable, "-m", "harness", "worker", *common, "--name", "machine2",
                                  "--results-dir", str(tmp_path / "machine2")],
                                 env={**env, "HARNESS_HOST": "machine2"}, stdout=other_log,
                                 stderr=subprocess.STDOUT, text=True)
        _wait(lambda: "machine2" in jobs.read_text(), 120, "the other machine's worker to start a job", tmp_path)
        server.pg_ctl("restart")  # every session ends, the driver's claim among them
        time.sleep(3)
        with Firewall(server.port):
            time.sleep(45)  # both jobs end meanwhile; their results wait to be recorded
        assert driver.wait(timeout=400) == 0, _logs(tmp_path)
        assert other.wait(timeout=120) == 0, _logs(tmp_path)
    finally:
        for proc in (driver, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
    lines = [ln.split() for ln in jobs.read_text().splitlines()]
    assert sorted(ln[1] for ln in lines if ln[0] == "start") == sorted(cells), lines  # each cell ran once
    assert sorted(ln[1] for ln in lines if ln[0] == "done") == sorted(cells), lines
    ledger = Ledger(open_storage(url), "outage/proxy", create=False)
    trials = ledger.trials()
    assert all(t.state == TrialState.COMPLETE and REAPED not in t.user_attrs for t in trials), \
        [(t.number, t.state, t.user_attrs.get(REAPED), t.user_attrs.get(OUTCOME)) for t in trials]
    assert sorted(t.user_attrs["harness.cell"] for t in trials) == sorted(cells)
    said = _logs(tmp_path)
    assert "unreachable" in said and "reachable again" in said, said  # the outage was met, and ridden out
    assert "driver claim of outage/proxy taken again" in said, said


def _wait(predicate, timeout: float, what: str, folder: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"waited in vain for {what}:\n{_logs(folder)}")


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in (folder / "driver.log", folder / "machine2.log")
                     if p.exists())
