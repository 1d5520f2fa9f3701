"""A worker whose clock is 5 minutes behind the driver's: staleness must be judged on the reaper's own clock.

The driver runs with no workers of its own (`--workers 0`: it queues, watches and reaps); one external worker
joins as another machine (HARNESS_HOST, so the driver cannot ask the kernel whether it lives and must go by its
heartbeat) with its clock set back 300 s by libfaketime. Its heartbeats are wall-clock values 300 s in the
driver's past: compared with the driver's wall clock (--stale-after 20) every live attempt would be reaped and
its cell run twice. What must hold: every cell complete exactly once, at its first attempt, nothing reaped.

Real: the driver, the worker, the ledger journal, MLflow (sqlite), libfaketime's shifted clock. Stand-in: the
job (tests/test_tracking_outage.py's FAKE_JOB via HARNESS_TRAIN_CMD, 12 s of metrics), so attempts outlast
several heartbeats and the stale limit. Skipped when libfaketime is not installed (Debian: apt-get install
faketime; CI installs it).
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

from harness.sweep.ledger import PARENT_RUN, REAPED, Ledger
from harness.sweep.storage import open_storage
from tests.conftest import REPO
from tests.test_tracking_outage import FAKE_JOB

pytestmark = pytest.mark.slow

LIBFAKETIME = next((p for p in (Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
                                Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
                                Path("/usr/lib/faketime/libfaketime.so.1")) if p.is_file()), None)


@pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime not installed (apt-get install faketime)")
def test_a_worker_with_a_slow_clock_is_not_reaped(tmp_path):
    spec = {"study": "skew", "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16,
                                      "val_prompts": 8, "rollout_batches": 2,
                                      "trl": {"num_generations": 4, "per_device_train_batch_size": 8}},
            "axes": {"objective": ["grpo", "cfpo"]}, "seeds": [0, 1], "scales": {"cpu": {"device": "cpu"}}}
    path = tmp_path / "skew.yaml"
    path.write_text(yaml.safe_dump(spec))
    (tmp_path / "fake_job.py").write_text(FAKE_JOB)
    results = tmp_path / "results"
    env = {**os.environ, "HARNESS_RESULTS": str(results), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
           "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp_path / 'fake_job.py'}", "FAKE_LOG": str(tmp_path / "jobs.log"),
           "FAKE_STEPS": "30"}
    driver = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(path), "--workers", "0",
                               "--stale-after", "20"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    journal = results / "skew" / "cpu" / "ledger.journal"
    worker = None
    try:
        for _ in range(240):  # the worker joins once the driver has its ledger and its parent run
            if journal.is_file() and Ledger(open_storage(str(journal)), "skew/cpu", create=False).attr(PARENT_RUN):
                break
            time.sleep(0.5)
        # Every clock of the worker and its jobs set back 300 s (faking only the wall clock breaks Python's
        # sleeps, which mix the two).
        skewed = {**env, "HARNESS_HOST": "machine2", "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": "-300"}
        worker = subprocess.Popen([sys.executable, "-m", "harness", "worker", str(path), "--scale", "cpu",
                                   "--name", "late"], cwd=REPO, env=skewed, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        out, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, out[-4000:]
        worker.wait(timeout=120)
    finally:
        for p in (driver, worker):
            if p is not None and p.poll() is None:
                p.kill()
    ledger = Ledger(open_storage(str(journal)), "skew/cpu", create=False)
    trials = ledger.trials()
    assert not [t.user_attrs[REAPED] for t in trials if REAPED in t.user_attrs]
    complete = [t.user_attrs["harness.cell"] for t in ledger.trials((TrialState.COMPLETE,))]
    assert len(complete) == len(set(complete)) == 4 and len(trials) == 4, [t.user_attrs for t in trials]
