"""A tiny real sweep logged over HTTP to a real `mlflow server`, read back through MLflow's REST API; then its
ledger served by `python -m harness.ui dashboard` and read back through optuna-dashboard's API."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness.ui import stop_process_group, wait_until_ready

REPO = Path(__file__).resolve().parent.parent
STUDY = "grpo-vs-cfpo/proxy-full"
# Both objectives at batch_ratio 2 (off-policy: the ratio is measured), one seed, two rollout batches of a
# 1-layer proxy: seconds per job. max_steps = rollout_batches x batch_ratio x iterations = 4.
TINY = ["objective=[grpo,cfpo]", "batch_ratio=2", "iterations=1", "seed=0", "rollout_batches=2", "eval_every=1",
        "proxy.warmstart_steps=20", "proxy.hidden_size=32", "proxy.intermediate_size=64",
        "proxy.num_hidden_layers=1", "val_prompts=8", "generation_batch_size=16", "trl.num_generations=4",
        "trl.per_device_train_batch_size=8", "trl.max_completion_length=24"]
MAX_STEPS = 4
CHILD_TAGS = ("objective", "batch_ratio", "iterations", "seed", "harness.cell", "harness.status")
METRICS = ("reward", "val/reward", "loss", "entropy", "clip_ratio/region_mean", "ratio/mean", "rollout/steps_on_batch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, **params: str) -> dict:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log.read_text() if log.is_file() else ""
        if text in out:
            return out
        assert proc.poll() is None, f"exited with code {proc.returncode} before printing {text!r}:\n{out}"
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not printed after {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory, proxy_cache):
    """(server base URL, results root, sweep stdout): the tiny sweep, logged over HTTP; the server stays up."""
    tmp = tmp_path_factory.mktemp("ui-server")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp / "mlflow-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
             "--artifacts-destination", (tmp / "mlartifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_until_ready(f"{base}/health", server, timeout=120)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{e}\n{log.read_text()}")
        results = tmp / "results"
        env = {**os.environ, "MLFLOW_TRACKING_URI": base, "HARNESS_RESULTS": str(results),
               "HARNESS_CACHE": str(proxy_cache)}
        env.pop("HARNESS_TRAIN_CMD", None)
        sets = [a for s in TINY for a in ("--set", s)]
        sweep = subprocess.run([sys.executable, "-m", "harness", "sweep", "grpo-vs-cfpo", "--scale", "proxy-full",
                                "--workers", "1", "--results-dir", str(results), *sets],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert sweep.returncode == 0, sweep.stdout + sweep.stderr
        yield base, results, sweep.stdout
    finally:
        stop_process_group(server)  # SIGTERM to the group (uvicorn, its workers, the job runner), then SIGKILL


@pytest.mark.slow
def test_sweep_over_http_is_served_by_the_rest_api(served_sweep):
    base, results, _ = served_sweep
    api = f"{base}/api/2.0/mlflow"
    exp = get(f"{api}/experiments/get-by-name", experiment_name=STUDY)["experiment"]
    runs = post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]

    def tags(run: dict) -> dict[str, str]:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parents = [r for r in runs if tags(r).get("harness.sweep") == "true"]
    children = [r for r in runs if "harness.cell" in tags(r)]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED"

    sweep_dir = results / "grpo-vs-cfpo" / "proxy-full"
    assert {tags(r)["objective"] for r in children} == {"grpo", "cfpo"}
    for run in children:
        t, info = tags(run), run["info"]
        assert all(k in t for k in CHILD_TAGS), sorted(t)
        assert (t["batch_ratio"], t["iterations"], t["seed"]) == ("2", "1", "0")
        assert t["harness.status"] in ("complete", "diverged") and info["status"] == "FINISHED"
        assert t["mlflow.parentRunId"] == parent["info"]["run_id"]
        assert info["run_name"] == f"{t['objective']}-br2-it1-s0"
        # The ledger's job folder and MLflow name the same run.
        result = json.loads((sweep_dir / "jobs" / t["harness.cell"] / "result.json").read_text())
        assert result["run_id"] == info["run_id"]

        latest = {m["key"]: m for m in run["data"]["metrics"]}
        for key in METRICS:
            history = get(f"{api}/metrics/get-history", run_id=info["run_id"], metric_key=key).get("metrics", [])
            steps = sorted(m["step"] for m in history)
            assert steps and 0 <= steps[0] and steps[-1] <= MAX_STEPS, (key, steps)
            last = max(history, key=lambda m: (m["step"], m["timestamp"]))
            assert latest[key]["step"] == last["step"] and latest[key]["value"] == pytest.approx(last["value"])
            if key == "val/reward":  # at step 0 and after every rollout batch (eval_every=1)
                assert steps == [0, 2, 4], steps
            if key == "clip_ratio/region_mean":  # one value per optimizer step
                assert steps == list(range(1, MAX_STEPS + 1)), steps
            if key == "rollout/steps_on_batch":  # batch_ratio x iterations = 2 steps on each rollout batch
                assert max(m["value"] for m in history) == 2

        # The job's artifact went through the server's artifact proxy.
        files = get(f"{base}/ajax-api/2.0/mlflow/artifacts/list", run_uuid=info["run_id"]).get("files", [])
        assert "config.yaml" in {f["path"] for f in files}


@pytest.mark.slow
def test_dashboard_serves_the_sweeps_ledger(served_sweep, tmp_path):
    _, results, _ = served_sweep
    port = free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "harness.ui", "dashboard", "grpo-vs-cfpo", "--scale",
                                 "proxy-full", "--results-dir", str(results), "--port", str(port)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_line(log, f"{base}/dashboard/", proc, timeout=60)
        studies = get(f"{base}/api/studies")["study_summaries"]
        [study] = [s for s in studies if s["study_name"] == STUDY]
        detail = get(f"{base}/api/studies/{study['study_id']}", after="0")
        trials = detail["trials"]
        assert len(trials) == 2 and {t["state"] for t in trials} == {"Complete"}
        cells = {json.loads(a["value"]) if a["value"].startswith('"') else a["value"]
                 for t in trials for a in t["user_attrs"] if a["key"] == "harness.cell"}
        jobs = {p.name for p in (results / "grpo-vs-cfpo" / "proxy-full" / "jobs").iterdir()}
        assert cells == jobs
        with urllib.request.urlopen(f"{base}/dashboard/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("argv", [["mlflow"], ["dashboard", "grpo-vs-cfpo", "--scale", "proxy"]])
def test_ui_without_a_store_is_one_line_and_exit_2(argv, tmp_path):
    env = {**os.environ, "HARNESS_RESULTS": str(tmp_path / "results")}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "harness.ui", *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "no " in r.stderr
    assert not (tmp_path / "results").exists()
