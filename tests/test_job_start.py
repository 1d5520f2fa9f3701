"""Forked jobs (`--job-start fork`, the default on CPU) against exec'd ones (`--job-start exec`, what every job was
before): speed must not change a single number. A tiny sweep is run both ways through the real CLI; every metric
of every cell must be equal bit for bit, and the analysis tables byte-identical apart from the MLflow run ids
(random per run, so they differ between any two sweeps). A forked job must also die with its worker."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.sweep.ledger import JOB, Ledger
from harness.sweep.processes import pid_alive
from harness.sweep.storage import open_storage

pytestmark = pytest.mark.slow

TINY = ["rollout_batches=2", "batch_ratio=[2]", "iterations=[2]", "seed=[0]", "proxy.warmstart_steps=20",
        "proxy.hidden_size=32", "proxy.intermediate_size=64", "proxy.num_hidden_layers=1", "val_prompts=8",
        "eval_every=1", "generation_batch_size=16", "trl.num_generations=4", "trl.per_device_train_batch_size=4",
        "trl.max_completion_length=24"]
STUDY = "grpo-vs-cfpo/proxy-full"
CLOCKS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}  # TRL's timings


def sweep(tmp_path: Path, how: str, extra: list[str], wait: bool = True, args: tuple[str, ...] = ()):
    results = tmp_path / how / "results"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / how / 'mlflow.db'}",
           "HARNESS_CACHE": str(tmp_path / "cache")}
    for key in ("HARNESS_TRAIN_CMD", "HARNESS_RESULTS"):
        env.pop(key, None)
    argv = [sys.executable, "-m", "harness", "sweep", "grpo-vs-cfpo", "--scale", "proxy-full", "--results-dir",
            str(results), "--job-start", how, *args, *[a for s in [*TINY, *extra] for a in ("--set", s)]]
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), results
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return env, results


def histories(uri: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """cell -> metric -> [(step, value)] of every job run of the sweep."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(STUDY)
    out = {}
    for run in client.search_runs([exp.experiment_id], "tags.`harness.cell` != ''"):
        out[run.data.tags["harness.cell"]] = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics if key not in CLOCKS}
    return out


def tables(env: dict[str, str], results: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "analysis", "tables", "grpo-vs-cfpo", "--scale", "proxy-full",
                           "--results-dir", str(results)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = {}
    for path in sorted((results / "grpo-vs-cfpo" / "proxy-full" / "tables").iterdir()):
        text = path.read_text()
        ids = {"cells.csv": "run_ids", "runs.csv": "run_id"}.get(path.name)
        if ids:  # run ids are random per run: blank them, keep everything else
            rows = list(csv.DictReader(io.StringIO(text)))
            for r in rows:
                r[ids] = ""
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            text = buf.getvalue()
        out[path.name] = text
    return out


def test_forked_jobs_log_the_same_numbers_as_execd_jobs(tmp_path):
    env_f, results_f = sweep(tmp_path, "fork", [])
    env_e, results_e = sweep(tmp_path, "exec", [])
    logs = {how: [p.read_text().splitlines()[0]
                  for p in (r / "grpo-vs-cfpo" / "proxy-full" / "jobs").glob("*/attempt-1.log")]
            for how, r in (("fork", results_f), ("exec", results_e))}
    assert len(logs["fork"]) == 2 and all(line.endswith("(forked)") for line in logs["fork"]), logs
    assert len(logs["exec"]) == 2 and not any(line.endswith("(forked)") for line in logs["exec"]), logs

    forked, execd = histories(env_f["MLFLOW_TRACKING_URI"]), histories(env_e["MLFLOW_TRACKING_URI"])
    assert set(forked) == set(execd) and len(forked) == 2
    for cell in forked:
        assert forked[cell].keys() == execd[cell].keys()
        assert {"loss", "reward", "val/reward", "entropy", "grad_norm"} <= forked[cell].keys()
        for key in forked[cell]:
            assert forked[cell][key] == execd[cell][key], (cell, key)  # exact, not approximately
        assert len(forked[cell]["loss"]) == 2 * 2 * 2  # rollout batches x batch ratio x iterations: every step
    a, b = tables(env_f, results_f), tables(env_e, results_e)
    assert a.keys() == b.keys() and "cells.csv" in a
    for name in a:
        assert a[name] == b[name], name


def test_forked_job_dies_with_its_worker(tmp_path):
    """SIGKILL a lone worker mid-job: its forked job (a child of the forkserver, not of the worker) must go too.
    The driver only enqueues (--workers 0) and is killed first, so no reaper is left to stop the job for it."""
    driver, results = sweep(tmp_path, "fork", ["rollout_batches=200", "batch_ratio=[1]", "iterations=[1]",
                                               "objective=[grpo]"], wait=False, args=("--workers", "0"))
    ledger_path = results / "grpo-vs-cfpo" / "proxy-full" / "ledger.journal"
    worker = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _queued(ledger_path):
            time.sleep(0.5)
        driver.kill()
        driver.wait(30)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fork' / 'mlflow.db'}",
               "HARNESS_CACHE": str(tmp_path / "cache")}
        env.pop("HARNESS_TRAIN_CMD", None)
        worker = subprocess.Popen([sys.executable, "-m", "harness", "worker", "grpo-vs-cfpo", "--scale", "proxy-full",
                                   "--results-dir", str(results), "--job-start", "fork"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, job = time.time() + 240, None
        while time.time() < deadline and job is None:
            time.sleep(1)
            job = next((t.user_attrs[JOB] for t in _trials(ledger_path) if JOB in t.user_attrs), None)
        assert job is not None, "no job started"
        assert pid_alive(job["pid"], job["pid_start"])
        worker.kill()
        deadline = time.time() + 15
        while time.time() < deadline and pid_alive(job["pid"], job["pid_start"]):
            time.sleep(0.2)
        assert not pid_alive(job["pid"], job["pid_start"]), "the forked job outlived its worker"
    finally:
        for p in (driver, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(30)


def _trials(ledger_path: Path):
    return Ledger(open_storage(str(ledger_path)), STUDY, create=False).trials() if ledger_path.is_file() else []


def _queued(ledger_path: Path) -> bool:
    try:
        return bool(_trials(ledger_path))
    except Exception:  # the driver is still creating the study
        return False
