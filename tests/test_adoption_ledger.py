"""Adoption bound to its ledger: an attempt adopts only an MLflow run of its own ledger (tag harness.ledger,
the ledger's id) that started since the attempt was claimed, and the driver's tidy-up touches only its own
ledger's runs. A wiped ledger with its MLflow store kept, or a second ledger on the same experiment, must not
settle a cell with an old run.

Real ledgers, a real MLflow sqlite store; the end-to-end test runs a tiny sweep through the CLI with real
training (tests/test_sweep_e2e.py's TINY settings), wipes its folder, and starts it again.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness import contract, tracking
from harness.sweep import adopt, mlflow_runs
from harness.sweep.driver import _finder
from harness.sweep.ledger import HOST, OWNER, Ledger, claimed_at
from harness.sweep.processes import pid_start
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage

STUDY = "bound/proxy"
# tests/test_sweep_e2e.py's: both objectives x batch_ratio [1, 2], one seed, a 1-layer proxy: seconds per job.
TINY = ["rollout_batches=2", "batch_ratio=[1,2]", "iterations=1", "seed=[0]", "proxy.warmstart_steps=20",
        "proxy.hidden_size=32", "proxy.intermediate_size=64", "proxy.num_hidden_layers=1", "val_prompts=8",
        "generation_batch_size=16", "trl.num_generations=4", "trl.per_device_train_batch_size=8",
        "trl.max_completion_length=24"]


@pytest.fixture
def store(tmp_path, monkeypatch) -> tuple[MlflowClient, str]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = tracking.client()
    return client, tracking.ensure_experiment(client, STUDY)


def _run(client: MlflowClient, exp: str, cell: str, start_s: float, status: str = contract.COMPLETE,
         ledger: str | None = None, end: str = "FINISHED", attempt: int = 1) -> str:
    """An MLflow run of a cell's attempt as a job leaves it, started at start_s (epoch seconds)."""
    tags = {contract.CELL: cell, contract.ATTEMPT: str(attempt), contract.STATUS: status,
            **({contract.LEDGER: ledger} if ledger else {})}
    run = client.create_run(exp, start_time=int(start_s * 1000), tags=tags)
    client.log_metric(run.info.run_id, contract.VAL_REWARD, 0.5, step=1)
    if end != "RUNNING":
        client.set_terminated(run.info.run_id, end)
    return run.info.run_id


def _dead_here(ledger: Ledger, t) -> None:
    """Make a claimed attempt's worker a process of this machine that has exited."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = {**t.user_attrs[OWNER], "host": HOST, "pid": gone.pid, "pid_start": "0"}
    ledger.storage.set_trial_user_attr(t._trial_id, OWNER, owner)


def test_a_new_ledger_gets_an_id_once_and_an_older_ledger_keeps_none(tmp_path):
    path = str(tmp_path / "ledger.journal")
    ledger = Ledger(open_storage(path), STUDY, create=True)
    assert ledger.ledger_id and len(ledger.ledger_id) == 32
    ledger.enqueue("c1", {"seed": 0}, {"seed": 0}, 1.0, attempt=1)
    assert Ledger(open_storage(path), STUDY, create=True).ledger_id == ledger.ledger_id  # a resumed driver
    assert Ledger(open_storage(path), "other/proxy", create=True).ledger_id != ledger.ledger_id
    # A ledger made before ids, with attempts: it stays without one (its runs carry no tag to match).
    legacy = Ledger(open_storage(str(tmp_path / "legacy.journal")), STUDY, create=True)
    legacy.set_attr("harness.ledger_id", None)
    legacy.enqueue("c1", {"seed": 0}, {"seed": 0}, 1.0, attempt=1)
    assert Ledger(open_storage(str(tmp_path / "legacy.journal")), STUDY, create=True).ledger_id is None
    identity = contract.RunIdentity(study="s", scale="p", cell="c", attempt=1, axes={}, ledger="abc")
    assert identity.to_tags()[contract.LEDGER] == "abc"
    assert contract.RunIdentity.from_tags(identity.to_tags()) == identity


def test_find_adopts_only_its_own_ledgers_run_started_since_the_claim(tmp_path, store):
    client, exp = store
    ledger = Ledger(open_storage(str(tmp_path / "ledger.journal")), STUDY, create=True)
    ledger.enqueue("c1", {"seed": 0}, {"seed": 0}, 1.0, attempt=1)
    t = ledger.pop("w0", lambda t: tmp_path / "x.log")
    claimed = claimed_at(t)
    assert claimed == t.user_attrs[OWNER]["started"] and abs(claimed - time.time()) < 60
    sweep_dir = tmp_path / "sweep"
    # An earlier ledger's run of this cell and attempt (made before ids: no tag), a second ledger's, and one
    # of this ledger's id that started before the attempt was claimed: none is this attempt's.
    old = _run(client, exp, "c1", claimed - 3600)
    _run(client, exp, "c1", claimed + 1, ledger="another-ledger")
    _run(client, exp, "c1", claimed - 5, ledger=ledger.ledger_id)
    v = adopt.find(sweep_dir, STUDY, "c1", 1, ledger.ledger_id, claimed)
    assert (v.kind, v.run_id) == ("none", None)
    # A ledger without an id (older) adopts as before: the latest run of the cell and attempt.
    assert adopt.find(sweep_dir, STUDY, "c1", 1).kind == "result"
    # This attempt's own run is adopted, and only for this attempt.
    own = _run(client, exp, "c1", claimed + 2, ledger=ledger.ledger_id)
    v = adopt.find(sweep_dir, STUDY, "c1", 1, ledger.ledger_id, claimed)
    assert (v.kind, v.source, v.run_id, v.outcome()["val_reward"]) == ("result", "mlflow", own, 0.5)
    assert adopt.find(sweep_dir, STUDY, "c1", 2, ledger.ledger_id, claimed).kind == "none"
    # Closing a failed attempt's run (no run id known) never closes another ledger's.
    running = _run(client, exp, "c1", claimed - 60, status=contract.RUNNING, end="RUNNING", attempt=3)
    adopt.close_run(None, STUDY, "c1", 3, contract.KILLED, "stopped", ledger.ledger_id, claimed)
    assert client.get_run(running).info.status == "RUNNING"
    assert client.get_run(old).data.tags[contract.STATUS] == contract.COMPLETE


def test_the_reaper_adopts_a_dead_workers_attempt_from_its_own_ledgers_run_only(tmp_path, store):
    """Through the driver's finder (Ledger.reap): the dead worker's attempt of c1 has only foreign runs and is
    failed and re-queued; that of c2 has its own run and is adopted."""
    client, exp = store
    ledger = Ledger(open_storage(str(tmp_path / "ledger.journal")), STUDY, create=True)
    for cell in ("c1", "c2"):
        ledger.enqueue(cell, {"cell": cell}, {"seed": 0}, 1.0, attempt=1)
    trials = {t.user_attrs["harness.cell"]: t for t in (ledger.pop("w", lambda t: tmp_path / "x.log"),
                                                         ledger.pop("w", lambda t: tmp_path / "y.log"))}
    for t in trials.values():
        _dead_here(ledger, t)
    for cell in ("c1", "c2"):
        _run(client, exp, cell, time.time() - 3600)  # the wiped ledger's
        _run(client, exp, cell, time.time() + 1, ledger="another-ledger")
    own = _run(client, exp, "c2", claimed_at(trials["c2"]) + 1, ledger=ledger.ledger_id)
    reaped = ledger.reap(_finder(tmp_path / "sweep", STUDY, lambda: ledger))
    assert len(reaped) == 2
    cells = {c.hash: c for c in ledger.cells()}
    assert (cells["c1"].state, cells["c1"].attempt) == ("queued", 2)
    assert (cells["c2"].state, cells["c2"].run_id) == ("complete", own)


def test_tidy_leaves_other_ledgers_runs_alone(tmp_path, store):
    client, exp = store
    ledger = Ledger(open_storage(str(tmp_path / "ledger.journal")), STUDY, create=True)
    ours = ledger.ledger_id
    ledger.enqueue("c1", {"seed": 0}, {"seed": 0}, 1.0, attempt=2)  # the ledger counts attempt 2 of c1
    t = ledger.pop("w", lambda t: tmp_path / "x.log")
    ledger.settle(t._trial_id, TrialState.COMPLETE, {"state": "complete"}, 0.5)
    now = time.time()
    mine_running = _run(client, exp, "c1", now, status=contract.RUNNING, ledger=ours, end="RUNNING")
    mine_complete = _run(client, exp, "c1", now, ledger=ours)  # attempt 1 of c1: not the counted one
    other_running = _run(client, exp, "c1", now, status=contract.RUNNING, ledger="other", end="RUNNING")
    other_complete = _run(client, exp, "c1", now, ledger="other")
    legacy_running = _run(client, exp, "c1", now, status=contract.RUNNING, end="RUNNING")

    def parent(ledger_id: str | None, pid: int) -> str:
        tags = {contract.SWEEP: "true", contract.HOST: HOST, contract.PID: str(pid),
                contract.PID_START: str(pid_start(pid)),
                **({contract.LEDGER: ledger_id} if ledger_id else {})}
        return client.create_run(exp, tags=tags).info.run_id

    gone = subprocess.Popen(["true"])
    gone.wait()
    our_parent, dead_parent = parent(ours, gone.pid), parent(None, gone.pid)
    live_parent = parent("other", os.getpid())  # another ledger's driver, alive on this machine

    done = mlflow_runs.tidy(client, exp, ledger)

    status = {r: (client.get_run(r).info.status, client.get_run(r).data.tags.get(contract.STATUS))
              for r in (mine_running, mine_complete, other_running, other_complete, legacy_running)}
    assert status == {mine_running: ("KILLED", contract.KILLED),
                      mine_complete: ("FINISHED", contract.SUPERSEDED),
                      other_running: ("RUNNING", contract.RUNNING),
                      other_complete: ("FINISHED", contract.COMPLETE),
                      legacy_running: ("RUNNING", contract.RUNNING)}
    assert {r: client.get_run(r).info.status for r in (our_parent, dead_parent, live_parent)} == {
        our_parent: "KILLED", dead_parent: "KILLED", live_parent: "RUNNING"}
    assert sorted(done["killed"]) == sorted([mine_running, our_parent, dead_parent])


def _harness(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_a_wiped_ledger_runs_every_cell_again_and_adopts_no_old_run(tmp_path, harness_env):
    """A tiny sweep end to end; its folder (ledger included) wiped, the MLflow store kept. Started again with
    jobs that die before they write anything, no cell is settled by an old run; started again for real, every
    cell runs again as a new run of the new ledger, and the old runs are left as they were."""
    results = tmp_path / "results"
    env = {**harness_env}
    env.pop("HARNESS_TRAIN_CMD", None)
    argv = ["sweep", "grpo-vs-cfpo", "--scale", "proxy-full", "--workers", "2", "--results-dir", str(results),
            *[a for s in TINY for a in ("--set", s)]]
    cells = {c.hash for c in make_plan(*load_spec("grpo-vs-cfpo"), "proxy-full", TINY).cells}
    sweep_dir = results / "grpo-vs-cfpo" / "proxy-full"
    experiment = "grpo-vs-cfpo/proxy-full"
    client = MlflowClient(harness_env["MLFLOW_TRACKING_URI"])

    def ledger() -> Ledger:
        return Ledger(open_storage(str(sweep_dir / "ledger.journal")), experiment, create=False)

    def job_runs() -> dict[str, object]:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id])
        return {r.info.run_id: r for r in runs if contract.CELL in r.data.tags}

    first = _harness(env, *argv)
    assert first.returncode == 0, first.stdout + first.stderr
    first_id = ledger().ledger_id
    old = job_runs()
    assert len(old) == 4 and {r.data.tags[contract.LEDGER] for r in old.values()} == {first_id}
    assert {c.run_id for c in ledger().cells()} == set(old)

    shutil.rmtree(sweep_dir)  # the user wipes the sweep; results/mlflow.db stays
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nsys.exit(3)\n")  # dies before any run or result: only an old run could help
    second = _harness({**env, "HARNESS_TRAIN_CMD": f"{sys.executable} {crash}"}, *argv, "--max-attempts", "1")
    assert second.returncode == 1 and "4 new, 0 retried, 0 done" in second.stdout, second.stdout + second.stderr
    assert ledger().ledger_id not in (None, first_id)
    assert {c.hash: c.state for c in ledger().cells()} == {h: "failed" for h in cells}, second.stdout

    shutil.rmtree(sweep_dir)
    third = _harness(env, *argv)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "4 new, 0 retried, 0 done" in third.stdout
    third_id = ledger().ledger_id
    final = {c.hash: c for c in ledger().cells()}
    assert {h: (c.state, c.attempt) for h, c in final.items()} == {h: ("complete", 1) for h in cells}
    runs = job_runs()
    new = {r: run for r, run in runs.items() if r not in old}
    assert {c.run_id for c in final.values()} == set(new) and len(new) == 4  # every cell ran again
    for run in new.values():
        assert run.data.tags[contract.LEDGER] == third_id
        assert run.data.tags[contract.STATUS] in contract.FINISHED
    for r, run in old.items():  # the old ledger's runs: neither counted nor touched by the new ledger's tidy
        assert (runs[r].info.status, runs[r].data.tags[contract.STATUS]) == (
            run.info.status, run.data.tags[contract.STATUS])
