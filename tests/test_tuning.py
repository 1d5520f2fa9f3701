"""The tuning stage: a sweep file's `tune:` section, its refusals, trials run as cells through the real CLI,
pruning, the best setting carried to the compare stage, and resume after kill -9 mid-trial.

Real: the CLI, the driver, the workers, the training jobs, the Optuna studies in the ledger's journal file, the
MLflow sqlite store. The pruning test makes the pruner's decision certain rather than lucky: the tiny proxy's
exact-match validation reward is 0 at this budget, so a threshold pruner (prune below 0.5) prunes any trial it
gets to judge before the budget's end; the tuned knob is `eval_every` on a grid of {1, 4} over a 4-batch
budget, so the trial evaluating every batch is judged at batch 1 (pruned) and the one evaluating only at the
end never is (complete, hence the best).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.config import ConfigError
from harness.sweep.ledger import Ledger
from harness.sweep.spec import load_spec
from harness.sweep.storage import open_storage
from tests.conftest import REPO, TINY_JOB, run_harness

pytestmark = pytest.mark.slow


def _base() -> dict:
    base: dict = {"rollout_batches": 4}
    for item in TINY_JOB:
        key, _, value = item.partition("=")
        if key not in ("rollout_batches", "trl.learning_rate"):
            base[key] = yaml.safe_load(value)
    return base


def write_spec(folder: Path, tune: dict, **scale: object) -> Path:
    spec = {"study": "tune-test", "extends": str(REPO / "configs" / "proxy.yaml"), "base": _base(),
            "axes": {"objective": ["grpo", "cfpo"], "batch_ratio+iterations": [[2, 1]]},
            "seeds": [0], "hypothesis": {"cells": [[2, 1]]},
            "scales": {"cpu": {"device": "cpu", "tune": tune, **scale}}}
    path = folder / "tune-test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


GRID = {"knobs": {"all": {"eval_every": {"choices": [1, 4]}}}, "seeds": [50], "trials": 2,
        "sampler": {"name": "grid", "seed": 0}, "pruner": {"name": "threshold", "lower": 0.5}}


def studies(storage: str, experiment: str) -> dict[str, optuna.Study]:
    st = open_storage(storage)
    return {o: optuna.load_study(study_name=f"{experiment}:{o}", storage=st) for o in ("grpo", "cfpo")}


@pytest.mark.parametrize("change, field", [
    ({"knobs": {"all": {"trl.learning_rate": {"low": 1e-3, "high": 1e-4, "log": True}}}}, "low"),
    ({"knobs": {"cfpo": {"trl.delta": {"low": 1.0, "high": 2.0}}}}, "tune.knobs.cfpo.trl.delta"),
    ({"knobs": {"all": {"seed": {"choices": [1, 2]}}}}, "tune.knobs.all.seed"),
    ({"knobs": {"sapo": {"trl.learning_rate": {"low": 1e-5, "high": 1e-4}}}}, "tune.knobs.sapo"),
    ({"sampler": {"name": "annealing"}}, "sampler"),
    ({"pruner": {"name": "hyperband-ish"}}, "pruner"),
    ({"seeds": [0, 50]}, "tune.seeds"),
    ({"trials": 3}, "tune.trials"),  # a grid of 2 points
])
def test_bad_tune_sections_are_refused_naming_the_field(tmp_path, change, field):
    path = write_spec(tmp_path, {**GRID, **change})
    with pytest.raises(ConfigError) as e:
        load_spec(str(path))
    assert field in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unequal_budget_and_early_compare_are_refused_before_anything_is_written(tmp_path, harness_env):
    results = Path(harness_env["HARNESS_RESULTS"])
    unequal = write_spec(tmp_path, {**GRID, "trials": {"grpo": 2, "cfpo": 1}})
    r = run_harness(["sweep", str(unequal), "--workers", "1"], harness_env)
    assert r.returncode == 2 and "tune.trials: unequal budgets (cfpo 1, grpo 2)" in r.stderr, r.stderr
    assert "--unequal-budget" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    early = write_spec(tmp_path, GRID)
    r = run_harness(["sweep", str(early), "--stage", "compare", "--workers", "1"], harness_env)
    assert r.returncode == 2 and "run `sweep" in r.stderr and "--stage tune` first" in r.stderr, r.stderr
    r = run_harness(["sweep", str(early), "--stage", "grid"], harness_env)
    assert r.returncode == 2 and "--stage grid: scale 'cpu' has a tune: section; allowed: auto, tune, compare" \
        in r.stderr, r.stderr
    assert not results.exists()


def test_tuning_end_to_end_prunes_a_trial_and_compares_at_the_best_setting(tmp_path, harness_env):
    path = write_spec(tmp_path, GRID)
    r = run_harness(["sweep", str(path), "--workers", "2"], harness_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = Path(harness_env["HARNESS_RESULTS"])
    tune_dir = results / "tune-test" / "cpu" / "tune"
    found = studies(str(tune_dir / "ledger.journal"), "tune-test/cpu/tune")
    for objective, study in found.items():
        by_knob = {t.params["eval_every"]: t for t in study.trials}
        assert sorted(by_knob) == [1, 4], objective  # the grid, each point once: an equal budget of 2
        assert by_knob[1].state == TrialState.PRUNED and by_knob[4].state == TrialState.COMPLETE, objective
        assert study.best_trial.params == {"eval_every": 4}
    ledger = Ledger(open_storage(str(tune_dir / "ledger.journal")), "tune-test/cpu/tune", create=False)
    assert sorted(c.state for c in ledger.cells()) == ["complete", "complete", "pruned", "pruned"]
    assert all(c.attempts == 1 for c in ledger.cells())  # a pruned job is a result, not retried

    client = MlflowClient(harness_env["MLFLOW_TRACKING_URI"])
    tune_exp = client.get_experiment_by_name("tune-test/cpu/tune")
    runs = client.search_runs([tune_exp.experiment_id])
    runs = [r for r in runs if "harness.cell" in r.data.tags]
    assert len(runs) == 4
    for run in runs:
        tags, params = run.data.tags, run.data.params
        study = found[tags["objective"]]
        assert tags["harness.tune_study"] == study.study_name
        trial = study.trials[int(tags["harness.tune_trial"])]
        assert int(params["eval_every"]) == trial.params["eval_every"]
        pruned = trial.state == TrialState.PRUNED
        assert tags["harness.status"] == ("pruned" if pruned else "complete")
        assert (tags.get("harness.pruned_at") == "1") == pruned
        assert run.info.status == "FINISHED"
    # the compare stage: the scale's grid and seeds, each objective at its best tuned setting
    exp = client.get_experiment_by_name("tune-test/cpu")
    compared = [r for r in client.search_runs([exp.experiment_id]) if "harness.cell" in r.data.tags]
    assert sorted((r.data.tags["objective"], r.data.params["eval_every"], r.data.params["seed"])
                  for r in compared) == [("cfpo", "4", "0"), ("grpo", "4", "0")]
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("harness.sweep") == "true"]
    assert parent[0].data.params["tuned.grpo.eval_every"] == "4" and parent[0].data.params["stage"] == "compare"
    assert "tuned grpo: 2/2 trials (1 complete, 1 pruned)" in r.stdout

    # the analysis of the comparison reports the tuning from its runs: trials, the setting compared, pruning
    a = subprocess.run([sys.executable, "-m", "analysis", "figures", "tune-test", "--scale", "cpu", "--spec",
                        str(path), "--results-dir", str(results)], cwd=REPO, env=harness_env, capture_output=True,
                       text=True, timeout=300)
    assert a.returncode == 0, a.stderr[-3000:]
    out = results / "tune-test" / "cpu"
    table = pd.read_csv(out / "tables" / "tuning.csv")
    assert sorted(zip(table["objective"], table["eval_every"], table["state"], table["compared_at"])) == [
        ("cfpo", 1, "pruned", False), ("cfpo", 4, "complete", True),
        ("grpo", 1, "pruned", False), ("grpo", 4, "complete", True)]
    readme = (out / "README.md").read_text()
    assert "## Tuning" in readme and "Each objective ran 2 trials (an equal budget)" in readme
    assert "Pruning stopped 2 of 4 trials early and saved 6 of 16 rollout batches (38%" in readme
    assert "The settings compared are the best trials recomputed from these runs." in readme
    assert (out / "figures" / "sensitivity_eval_every.png").is_file()
    assert len(list((out / "tune" / "runs").glob("*.parquet"))) == 4  # the tuning runs travel with the study


def test_kill_9_mid_trial_then_resume_loses_and_repeats_no_finished_trial(tmp_path, harness_env):
    tune = {"knobs": {"all": {"trl.learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}}}, "seeds": [50],
            "trials": 3, "sampler": {"name": "random", "seed": 3}, "pruner": {"name": "none"}}
    path = write_spec(tmp_path, tune)
    argv = [sys.executable, "-m", "harness", "sweep", str(path), "--stage", "tune", "--workers", "1"]
    results = Path(harness_env["HARNESS_RESULTS"])
    journal = results / "tune-test" / "cpu" / "tune" / "ledger.journal"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(argv, cwd=REPO, env=harness_env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    before: dict[str, int] = {}
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once one cell is complete and another is running
            if journal.is_file():
                ledger = Ledger(open_storage(str(journal)), "tune-test/cpu/tune", create=False)
                done = {c.hash: c.attempt for c in ledger.cells() if c.state == "complete"}
                running = [t for t in ledger.trials((TrialState.RUNNING,)) if "harness.job" in t.user_attrs]
                if done and running:
                    before = done
                    for key in ("harness.job", "harness.owner"):  # the job mid-trial, then its worker
                        os.kill(running[0].user_attrs[key]["pid"], signal.SIGKILL)
                    break
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert before, (tmp_path / "first.log").read_text()[-3000:]

    r = run_harness(["sweep", str(path), "--stage", "tune", "--workers", "1"], harness_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    found = studies(str(journal), "tune-test/cpu/tune")
    ledger = Ledger(open_storage(str(journal)), "tune-test/cpu/tune", create=False)
    cells = {c.hash: c for c in ledger.cells()}
    complete_attempts = [t for t in ledger.trials((TrialState.COMPLETE,))]
    assert len(complete_attempts) == len(cells) == 6  # each cell counted once: nothing ran twice to the end
    for h, attempt in before.items():  # finished before the kill: kept, not re-run
        assert cells[h].state == "complete" and cells[h].attempt == attempt
    for objective, study in found.items():
        assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials), objective
        jobs = [json.dumps(t.user_attrs["harness.cells"]) for t in study.trials]
        assert len(set(jobs)) == 3  # three different trials, each with its own cell
        for t in study.trials:
            (cell,) = t.user_attrs["harness.cells"]
            assert cells[cell].state == "complete"
            assert t.value == pytest.approx(t.user_attrs["harness.scores"][0])
