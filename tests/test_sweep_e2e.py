"""End to end: the repo's sweep at a tiny proxy size, through the real CLI and the real train job, into a real
MLflow sqlite store in a tmp dir; then a resume that must run nothing and create no new job runs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from harness.sweep.ledger import Ledger
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage

pytestmark = pytest.mark.slow

# Both objectives x batch_ratio [1, 2], one seed, two rollout batches of a 1-layer proxy: seconds per job.
TINY = ["rollout_batches=2", "batch_ratio=[1,2]", "iterations=1", "seed=[0]", "proxy.warmstart_steps=20",
        "proxy.hidden_size=32", "proxy.intermediate_size=64", "proxy.num_hidden_layers=1", "val_prompts=8",
        "generation_batch_size=16", "trl.num_generations=4", "trl.per_device_train_batch_size=8",
        "trl.max_completion_length=24"]


def harness(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], env=env, capture_output=True, text=True,
                          timeout=240)


def test_tiny_sweep_end_to_end_then_resume(tmp_path):
    results = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("HARNESS_TRAIN_CMD", None)
    env.pop("HARNESS_RESULTS", None)
    sets = [a for s in TINY for a in ("--set", s)]
    argv = ["sweep", "grpo-vs-cfpo", "--scale", "proxy-full", "--workers", "2", "--results-dir", str(results), *sets]
    plan = make_plan(*load_spec("grpo-vs-cfpo"), "proxy-full", TINY)
    cells = {c.hash: c for c in plan.cells}
    assert len(cells) == 4 and {c.axes["objective"] for c in plan.cells} == {"grpo", "cfpo"}

    first = harness(env, *argv)
    assert first.returncode == 0, first.stdout + first.stderr
    used = re.search(r"worker utilisation (\d+)% of 2 x ", first.stdout)  # busy worker-seconds / (workers x wall)
    assert used and 0 < int(used.group(1)) <= 100, first.stdout
    sweep_dir = results / "grpo-vs-cfpo" / "proxy-full"
    ledger = Ledger(open_storage(str(sweep_dir / "ledger.journal")), "grpo-vs-cfpo/proxy-full", create=False)
    assert {c.hash: (c.state, c.attempt) for c in ledger.cells()} == {h: ("complete", 1) for h in cells}
    for h in cells:
        assert (sweep_dir / "jobs" / h / "result.json").is_file()
        assert (sweep_dir / "jobs" / h / "attempt-1.log").is_file()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("grpo-vs-cfpo/proxy-full")
    assert exp is not None and exp.artifact_location.startswith("file://")
    # the study is described where the UI shows it: what it asks, the scale, the declared question
    assert "Scale proxy-full: exploration" in exp.tags["mlflow.note.content"] == exp.tags["harness.description"]
    assert json.loads(exp.tags["harness.hypothesis"])["cells"] == "off-policy"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("harness.sweep") == "true"]
    children = [r for r in runs if "harness.cell" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and len(runs) == 5
    for r in children:
        t = r.data.tags
        assert r.info.status == "FINISHED" and t["harness.status"] in ("complete", "diverged")
        assert t["mlflow.parentRunId"] == parents[0].info.run_id
        assert t["harness.study"] == "grpo-vs-cfpo" and t["harness.scale"] == "proxy-full"
        assert t["harness.attempt"] == "1"
        # The job's own config hash is the sweep's cell identity: the ledger and MLflow name the same thing.
        assert t["harness.config_hash"] == t["harness.cell"] and t["harness.cell"] in cells
        assert r.data.params["rollout_batches"] == "2"
        assert t["objective"] == cells[t["harness.cell"]].axes["objective"]
        assert json.loads(t["harness.axes"]) == cells[t["harness.cell"]].axes  # what analysis draws lines by

    # Resume: every cell is complete, so nothing runs and no job run is created; only a new parent run.
    again = harness(env, *argv)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 new, 0 retried, 4 done" in again.stdout
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if "harness.cell" in r.data.tags]) == 4
    assert len([r for r in runs if r.data.tags.get("harness.sweep") == "true"]) == 2
    assert not list(sweep_dir.glob("jobs/*/attempt-2.log"))

    status = harness(env, "status", "grpo-vs-cfpo", "--results-dir", str(results))
    assert status.returncode == 0, status.stderr
    assert all(h in status.stdout for h in cells) and "4 complete" in status.stdout


def test_a_study_without_gradient_clipping_still_gets_its_verdict(tmp_path):
    """`--set trl.max_grad_norm=0` (the README's ablation knob, used alone): no run logs `grad_clipped`, and the
    analysis must still write its verdict, tables and figures, with the clipping diagnostics as n/a."""
    results = tmp_path / "results"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("HARNESS_TRAIN_CMD", None)
    env.pop("HARNESS_RESULTS", None)
    sets = [a for s in [*TINY, "trl.max_grad_norm=0"] for a in ("--set", s)]
    done = harness(env, "sweep", "grpo-vs-cfpo", "--scale", "proxy-full", "--workers", "2", "--results-dir",
                   str(results), *sets)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = subprocess.run([sys.executable, "-m", "analysis", "figures", "grpo-vs-cfpo", "--scale", "proxy-full",
                              "--results-dir", str(results)], env=env, capture_output=True, text=True, timeout=300)
    assert figures.returncode == 0, figures.stdout + figures.stderr
    assert "primary (auc_val, mean over 2x1): cfpo - grpo" in figures.stdout
    study = results / "grpo-vs-cfpo" / "proxy-full"
    readme = (study / "README.md").read_text()
    assert "## Verdict" in readme and "max_grad_norm 0.0; how often it acted was not logged (n/a)" in readme
    assert "grad_clipped" in readme.split("Not logged by any run")[1]
    assert "| n/a |" in (study / "tables" / "stability.md").read_text()
    assert (study / "figures" / "verdict.png").exists() and not (study / "figures" / "grad_clipped.png").exists()
