"""Sweep ledger and workers, with a stand-in job (a tiny real subprocess) instead of training.

The stand-in takes the train command's arguments, notes start/done in a shared log and writes result.json; it
can hang, fail, linger after its result (as a job in interpreter shutdown), or create an MLflow run like the
real job (status tag, then FINISHED, then the result file). The driver, the workers and the ledger are real.
"""
from __future__ import annotations

import contextlib
import io
import json
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
from optuna.trial import TrialState

from harness.cli import main
from harness.sweep.ledger import Ledger
from harness.sweep.processes import pid_alive
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage

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
note("env", os.environ.get("CUDA_VISIBLE_DEVICES", "-"), os.environ.get("OMP_NUM_THREADS", "-"))
run_id = "none"
if os.environ.get("FAKE_MLFLOW"):
    from mlflow.tracking import MlflowClient
    c = MlflowClient()
    exp = c.get_experiment_by_name(f"{tags['harness.study']}/{tags['harness.scale']}").experiment_id
    run_id = c.create_run(exp, tags={**tags, "mlflow.parentRunId": parent,
                                     "harness.status": "running"}).info.run_id
    note("run", run_id)
if os.environ.get("FAKE_HANG") == cell and attempt == 1:
    # hung, though alive; with FAKE_TOUCH it still "logs metrics" (touches its progress file)
    for _ in range(1000):
        if os.environ.get("FAKE_TOUCH"):
            open(os.environ["HARNESS_PROGRESS_FILE"], "a").close()
        time.sleep(0.3)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.2")))
if cell in os.environ.get("FAKE_FAIL", "").split(","):
    print("boom: a fake failure")
    sys.exit(1)
if os.environ.get("FAKE_MLFLOW"):
    c.set_tag(run_id, "harness.status", "complete")
    c.set_terminated(run_id, "FINISHED")
json.dump({"status": "complete", "run_id": run_id, "final": {"val/reward": 0.5}}, open(result, "w"))
note("done")
if os.environ.get("FAKE_LINGER") == cell:  # a slow interpreter shutdown: the window a kill must not waste
    note("linger")
    time.sleep(300)
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

    def __init__(self, tmp: Path, uri: str, study: str, seeds: list[int] = (0,)):
        self.tmp, self.study = tmp, study
        self.spec = tmp / "spec.yaml"
        self.spec.write_text(yaml.safe_dump({"study": study, **SPEC, "seeds": list(seeds)}))
        self.results = tmp / "results"
        self.log = tmp / "jobs.log"
        (tmp / "fake_job.py").write_text(FAKE_JOB)
        self.uri = uri  # one store for the module (each test has its own study, so its own experiment)
        self.env = {**os.environ, "HARNESS_RESULTS": str(self.results), "MLFLOW_TRACKING_URI": self.uri,
                    "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp / 'fake_job.py'}", "FAKE_LOG": str(self.log)}
        self.cells = [c.hash for c in make_plan(*load_spec(str(self.spec)), "proxy").cells]

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(self.spec), "--scale", "proxy",
                                 *args], env={**self.env, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def run(self, *args: str, **env: str) -> tuple[int, str]:
        """The driver in this process (its imports are paid once per module); workers are still processes."""
        keys = {k: v for k, v in {**self.env, **env}.items() if os.environ.get(k) != v}
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            for k, v in keys.items():
                mp.setenv(k, v)
            rc = main(["sweep", str(self.spec), "--scale", "proxy", *args])
        return rc, out.getvalue()

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


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_two_workers_run_each_cell_exactly_once(tmp_path, uri):
    """The driver's local worker and a worker joining with `python -m harness worker` share one queue."""
    s = Sweep(tmp_path, uri, "two", seeds=[0, 1])
    driver = s.start("--workers", "1", FAKE_SLEEP="2.0")
    s.wait_for("start", s.cells[0])  # the driver's worker is at work: the queue exists and is shared from now
    joiner = subprocess.run([sys.executable, "-m", "harness", "worker", str(s.spec), "--scale", "proxy",
                             "--name", "joiner"], env={**s.env, "FAKE_SLEEP": "2.0"}, capture_output=True,
                            text=True, timeout=90)
    out, _ = driver.communicate(timeout=90)
    assert driver.returncode == 0, out
    assert joiner.returncode == 0, joiner.stdout + joiner.stderr
    assert s.done_counts() == {h: 1 for h in s.cells}
    assert len(s.events("start")) == len(s.cells) == 8
    assert s.states() == {h: ("complete", 1) for h in s.cells}
    workers = {c.worker for c in s.ledger().cells()}
    assert "joiner" in workers and len(workers) == 2, workers
    out = subprocess.run([sys.executable, "-m", "harness", "status", str(s.spec)], env=s.env,
                         capture_output=True, text=True, timeout=60).stdout
    for h in s.cells:
        assert re.search(rf"{h} .*complete .* 1 .* 0\.500", out), out
    assert "8 complete" in out


def test_sigkill_worker_mid_cell_reruns_it_once(tmp_path, uri):
    s = Sweep(tmp_path, uri, "kill")
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
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert "is gone" in trials[0].user_attrs["harness.reaped"]
    # MLflow: the killed attempt's run (left RUNNING by SIGKILL) is KILLED, every attempt nests under the
    # sweep.
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


def test_worker_whose_attempt_was_reaped_stops_its_job(tmp_path, uri):
    """A worker cut off from the ledger for longer than --stale-after loses its claim and must stop its
    job."""
    s = Sweep(tmp_path, uri, "lost")
    hang = s.cells[0]
    driver = s.start("--workers", "1", "--stale-after", "2", FAKE_HANG=hang)
    _, _, job_pid, _ = s.wait_for("start", hang)
    ledger = s.ledger()
    t = next(t for t in ledger.trials(tuple(TrialState)) if t.user_attrs["harness.cell"] == hang)
    worker_pid = t.user_attrs["harness.owner"]["pid"]
    # Cut the worker off (SIGSTOP: no heartbeat reaches the ledger) and act as a reaper on another machine,
    # which can only go by whether the heartbeat changes; then let the worker run on: it must find its attempt
    # settled and stop its job.
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        ledger.storage.set_trial_user_attr(t._trial_id, "harness.owner", {**t.user_attrs["harness.owner"],
                                                                          "host": "elsewhere"})
        for _ in range(100):
            if ledger.storage.get_trial(t._trial_id).state != TrialState.RUNNING:
                break
            ledger.reap()
            time.sleep(0.1)
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    assert ledger.storage.get_trial(t._trial_id).state != TrialState.RUNNING
    out, _ = driver.communicate(timeout=90)
    assert driver.returncode == 0, out
    assert not pid_alive(int(job_pid), None)
    assert s.done_counts() == {h: 1 for h in s.cells}
    assert s.states()[hang] == ("complete", 2)


def test_failed_cells_retry_up_to_the_limit_then_on_request(tmp_path, uri):
    s = Sweep(tmp_path, uri, "retry")
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


def test_driver_sigint_requeues_running_cells_and_resume_finishes(tmp_path, uri):
    s = Sweep(tmp_path, uri, "intr")
    driver = s.start("--workers", "2", FAKE_SLEEP="300")
    for h in s.cells[:2]:
        s.wait_for("start", h)
    driver.send_signal(signal.SIGINT)
    # Not a speed check: a stop may take the worker's grace (45 s) and the driver's wait for workers (60 s).
    out, _ = driver.communicate(timeout=240)
    assert driver.returncode == 130, out
    states = s.states()
    assert "running" not in {st for st, _ in states.values()}  # nothing left running for ever
    assert {states[h] for h in s.cells[:2]} == {("queued", 2)}  # interrupted attempts cost nothing...
    for e in s.events("start"):
        assert not pid_alive(int(e[2]), None)  # ...and their jobs are gone
    client = MlflowClient(s.uri)
    exp = client.get_experiment_by_name("intr/proxy").experiment_id
    assert [r.info.status for r in client.search_runs([exp])] == ["KILLED"]  # the sweep's parent run
    rc, out = s.run("--workers", "2")
    assert rc == 0, out
    assert s.done_counts() == {h: 1 for h in s.cells}


def test_driver_sigkill_stops_its_workers_and_resume_finishes(tmp_path, uri):
    s = Sweep(tmp_path, uri, "dkill")
    driver = s.start("--workers", "2", FAKE_SLEEP="300")
    for h in s.cells[:2]:
        s.wait_for("start", h)
    driver.kill()
    driver.communicate(timeout=30)
    deadline = time.time() + 180  # workers get SIGTERM from the kernel, stop their jobs, re-queue the cells
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


def test_one_gpu_per_worker_and_one_thread_per_cpu_job(tmp_path, uri, monkeypatch):
    import torch

    s = Sweep(tmp_path, uri, "gpus")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert s.run("--workers", "2")[0] == 0
    assert {(e[0], e[1]) for e in s.events("env")} == {("-", "1")}  # CPU: one OpenMP thread per job
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert s.run("--workers", "2", "--set", "seed=[1]")[0] == 0
    gpu_jobs = [e for e in s.events("env") if e[0] != "-"]
    assert len(gpu_jobs) == 4 and {e[0] for e in gpu_jobs} == {"0", "1"} and {e[1] for e in gpu_jobs} == {"-"}
    # Each worker kept its own GPU: the jobs of one worker (same parent pid) all saw the same device.
    by_worker: dict[str, set[str]] = {}
    for e in gpu_jobs:
        by_worker.setdefault(e[-1], set()).add(e[0])
    assert all(len(devices) == 1 for devices in by_worker.values())


def test_slurm_launcher_with_submitit_local_executor(tmp_path, uri, monkeypatch):
    s = Sweep(tmp_path, uri, "slurm")
    monkeypatch.setenv("HARNESS_STORAGE", "")  # the driver sets it for its submitit jobs: undone after the test
    rc, out = s.run("--workers", "2", "--launcher", "submitit-local", "--timeout-min", "5")
    assert rc == 0, out
    assert s.done_counts() == {h: 1 for h in s.cells}
    assert list((s.results / "slurm" / "proxy" / "submitit").glob("*_0_log.out"))


def _runs_by_cell(uri: str, experiment: str) -> dict[str, list]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    out: dict[str, list] = {}
    for r in client.search_runs([exp]):
        if "harness.cell" in r.data.tags:
            out.setdefault(r.data.tags["harness.cell"], []).append(r)
    return out


@pytest.mark.parametrize("victim", ["worker", "job", "driver"])
def test_job_killed_after_its_result_is_adopted_not_rerun(tmp_path, uri, victim):
    """The kill lands after the job ended its MLflow run and wrote its result, while it lingers (interpreter
    shutdown): the attempt is the cell's result, whoever settles it (the reaper, the worker, a new driver)."""
    s = Sweep(tmp_path, uri, f"adopt-{victim}")
    slow = s.cells[0]
    driver = s.start("--workers", "2", FAKE_LINGER=slow, FAKE_MLFLOW="1")
    try:
        _, _, job_pid, worker_pid = s.wait_for("linger", slow, timeout=120)
    except AssertionError:
        driver.kill()
        raise AssertionError(driver.communicate()[0]) from None
    os.kill({"worker": int(worker_pid), "job": int(job_pid), "driver": driver.pid}[victim], signal.SIGKILL)
    out, _ = driver.communicate(timeout=120)
    rc = driver.returncode
    if victim == "driver":
        rc, out = s.run("--workers", "2", FAKE_MLFLOW="1")  # the same command again
    assert rc == 0, out
    assert s.done_counts() == {h: 1 for h in s.cells}
    assert [e[0] for e in s.events("start")].count(slow) == 1  # never started again
    assert s.states()[slow] == ("complete", 1)
    trials = [t for t in s.ledger().trials() if t.user_attrs["harness.cell"] == slow]
    assert [t.state.name for t in trials] == ["COMPLETE"]
    runs = _runs_by_cell(s.uri, f"adopt-{victim}/proxy")
    assert sorted(runs) == sorted(s.cells)
    for h, rs in runs.items():
        kept = [(r.info.status, r.data.tags["harness.status"]) for r in rs
                if r.data.tags["harness.status"] != "killed"]
        assert kept == [("FINISHED", "complete")], h
        # Another cell's job running when its driver was killed died with it: a KILLED run, then a rerun.
        assert all(r.info.status == "KILLED" for r in rs if r.data.tags["harness.status"] == "killed"), h
    assert len(runs[slow]) == 1
    cell_dir = s.results / f"adopt-{victim}" / "proxy" / "jobs" / slow
    assert json.loads((cell_dir / "result.json").read_text())["attempt"] == 1
    assert (cell_dir / "attempt-1.result.json").is_file()


@pytest.mark.parametrize("limit", ["stall", "cell"])
def test_hung_job_is_stopped_recorded_as_timeout_and_retried(tmp_path, uri, limit):
    """A job alive but hung: silent (no metric) past the stall limit, or busy past the cell time limit."""
    s = Sweep(tmp_path, uri, f"hang-{limit}")
    hang = s.cells[0]
    flags = ["--stall-timeout-min", "0.1"] if limit == "stall" else ["--cell-timeout-min", "0.15"]
    touch = {"FAKE_TOUCH": "1"} if limit == "cell" else {}
    rc, out = s.run("--workers", "2", *flags, FAKE_HANG=hang, **touch)
    assert rc == 0, out
    assert s.done_counts() == {h: 1 for h in s.cells}
    trials = [t for t in s.ledger().trials() if t.user_attrs["harness.cell"] == hang]
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    outcome = trials[0].user_attrs["harness.outcome"]
    why = "no new metric for" if limit == "stall" else "ran past the cell time limit of 9 s"
    assert outcome["state"] == "timeout" and why in outcome["error"], outcome
    assert re.search(rf"timeout {hang} attempt 1 .*{why}", out), out
    _, _, job_pid, _ = s.events("start")[[e[0] for e in s.events("start")].index(hang)]
    assert not pid_alive(int(job_pid), None)


def test_limits_and_storage_are_checked_before_anything_is_written(tmp_path, uri, capsys):
    s = Sweep(tmp_path, uri, "limits")
    assert make_plan(*load_spec(str(s.spec)), "proxy").cell_timeout_s == 6 * 3600  # a cpu scale's default
    gpu = yaml.safe_load(s.spec.read_text())
    gpu["scales"]["paper"]["device"] = "cuda"  # a cuda scale's default
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(gpu))
    assert make_plan(*load_spec(str(tmp_path / "gpu.yaml")), "paper").stall_timeout_s == 2 * 3600
    for args, line in ((["--stall-timeout-min", "-1"], "--stall-timeout-min -1.0: must be a positive number"),
                       (["--cell-timeout-min", "0"], "--cell-timeout-min 0.0: must be a positive number"),
                       (["--storage", "mysql://x/y"],
                        "--storage mysql://x/y: allowed: a journal file path or postgresql://")):
        rc, _ = s.run("--workers", "1", *args)
        err = capsys.readouterr().err
        assert rc == 2 and line in err and len(err.strip().splitlines()) == 1, err
    spec = yaml.safe_load(s.spec.read_text())
    spec["scales"]["proxy"]["cell_timeout_min"] = -5
    s.spec.write_text(yaml.safe_dump(spec))
    rc, _ = s.run("--workers", "1")
    err = capsys.readouterr().err
    assert rc == 2 and "scales.proxy.cell_timeout_min: Input should be greater than 0" in err, err
    assert not s.results.exists()


def test_a_second_driver_on_the_ledger_is_refused_on_any_machine(tmp_path, uri):
    """Two drivers on one ledger (here: as two machines, own host names and results folders, one journal):
    the second is refused before it enqueues or reaps anything; the claim dies with its holder."""
    s = Sweep(tmp_path, uri, "drivers")
    shared = str(tmp_path / "shared" / "ledger.journal")
    hang = s.cells[0]

    def driver(machine: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(s.spec), "--scale", "proxy",
                                 "--workers", "1", "--storage", shared,
                                 "--results-dir", str(tmp_path / machine)],
                                env={**s.env, "HARNESS_HOST": machine, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    first = driver("m1", FAKE_HANG=hang)
    s.wait_for("start", hang)
    ledger = Ledger(open_storage(shared), "drivers/proxy", create=False)
    before = [(t.number, t.state) for t in ledger.storage.get_all_trials(ledger.study_id)]
    second = driver("m2")
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 1, out
    assert "another `sweep` driver (pid " in out and " on m1)" in out, out
    assert [(t.number, t.state) for t in ledger.storage.get_all_trials(ledger.study_id)] == before
    assert not (tmp_path / "m2").exists()  # nothing written: no folder, no workers, no jobs
    first.kill()  # a SIGKILLed driver's claim goes with it; its worker stops its job and re-queues the cell
    first.communicate(timeout=60)
    third = driver("m2")
    out, _ = third.communicate(timeout=180)
    assert third.returncode == 0, out
    assert s.done_counts() == {h: 1 for h in s.cells}


# ------------------------------------------------------------------------------ ledger logic, in process
def _ledger(tmp_path: Path, cells: int) -> Ledger:
    ledger = Ledger(open_storage(str(tmp_path / "ledger.journal")), "unit/proxy", create=True)
    for i in range(cells):
        ledger.enqueue(f"cell{i:02d}", {"i": i}, {"seed": i}, 1.0, attempt=1)
    return ledger


def test_remote_worker_without_heartbeat_is_reaped_and_its_cell_requeued(tmp_path):
    ledger = _ledger(tmp_path, 1)
    trial = ledger.pop("remote", lambda t: tmp_path / "x.log")
    tid = trial._trial_id
    # Pretend the owner is another machine: only its heartbeat can show it is alive.
    ledger.storage.set_trial_user_attr(tid, "harness.owner",
                                       {"worker": "remote", "host": "elsewhere", "pid": 1})
    ledger.set_attr("harness.stale_after", 0.5)
    assert ledger.reap() == [] and ledger.cells()[0].state == "running"  # fresh heartbeat
    # A heartbeat that stops changing goes stale after stale_after of the reaper's own clock, whatever its value
    # says (a remote clock may be behind or ahead): first seen now, so still fresh...
    ledger.storage.set_trial_user_attr(tid, "harness.heartbeat", time.time() - 10 * ledger.stale_after)
    assert ledger.reap() == []
    time.sleep(0.6)  # ...then unchanged for longer than stale_after
    assert [t.number for t in ledger.reap()] == [trial.number]
    cell = ledger.cells()[0]
    assert (cell.state, cell.attempt) == ("queued", 2) and "elsewhere" in (cell.error or "")
    # The remote worker, back from the dead, finds its attempt settled and must not record it.
    from optuna.exceptions import UpdateFinishedTrialError

    with pytest.raises(UpdateFinishedTrialError):
        ledger.heartbeat(tid)
    assert not ledger.settle(tid, TrialState.COMPLETE, {"state": "complete"}, 1.0)


def test_attempt_limit_counts_failures_not_interruptions(tmp_path):
    ledger = _ledger(tmp_path, 1)
    ledger.set_attr("harness.max_attempts", 2)
    for outcome, requeued in ((("interrupted", False), True), (("failed", True), True),
                              (("failed", True), False)):
        t = ledger.pop("w", lambda t: tmp_path / "x.log")
        assert ledger.requeue("cell00", settling=t, failed=outcome[1]) is requeued
        ledger.settle(t._trial_id, TrialState.FAIL, {"state": outcome[0]})
    cell = ledger.cells()[0]
    assert (cell.state, cell.attempt, cell.attempts) == ("failed", 3, 3)
    assert not ledger.requeue("cell00")  # the driver's resume does not retry it either...
    ledger.set_attr("harness.retry_from", 99)  # ...until --retry-failed moves the watermark
    assert ledger.requeue("cell00") and ledger.cells()[0].state == "queued"


def _pop_all(path: str, out: str) -> None:
    ledger = Ledger(open_storage(path), "unit/proxy", create=False)
    got = []
    while (t := ledger.pop(f"p{os.getpid()}", lambda t: Path("x.log"))) is not None:
        got.append(t.user_attrs["harness.cell"])
        ledger.settle(t._trial_id, TrialState.COMPLETE, {"state": "complete"}, 0.0)
    Path(out).write_text("\n".join(got))


def test_concurrent_pops_hand_each_cell_to_one_process(tmp_path):
    import multiprocessing as mp

    _ledger(tmp_path, 40)
    procs = [mp.get_context("spawn").Process(target=_pop_all, args=(str(tmp_path / "ledger.journal"),
                                                                      str(tmp_path / f"got{i}")))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    got = [c for i in range(4) for c in (tmp_path / f"got{i}").read_text().split()]
    assert sorted(got) == [f"cell{i:02d}" for i in range(40)]


def _dead_remote_attempt(ledger: Ledger, tmp_path: Path):
    t = ledger.pop("remote", lambda t: tmp_path / "x.log")
    ledger.storage.set_trial_user_attr(t._trial_id, "harness.owner", {"worker": "remote", "host": "elsewhere",
                                                                      "pid": 1, "started": time.time()})
    ledger.storage.set_trial_user_attr(t._trial_id, "harness.heartbeat",
                                       time.time() - 10 * ledger.stale_after)
    return t


def test_reaper_adopts_a_dead_workers_finished_attempt_and_waits_when_it_cannot_tell(tmp_path):
    from harness.sweep.adopt import Verdict

    ledger = _ledger(tmp_path, 2)
    ledger.set_attr("harness.stale_after", 0.5)
    first, second = _dead_remote_attempt(ledger, tmp_path), _dead_remote_attempt(ledger, tmp_path)
    diverged = {"status": "diverged", "run_id": "r1", "final": {"val/reward": 0.25}}
    verdicts = {first.number: Verdict("result", diverged, "file", "r1"),
                second.number: Verdict("unknown", why="MLflow tracking server http://x is unreachable")}
    assert ledger.reap(lambda t: verdicts[t.number]) == []  # heartbeats first seen: stale only once unchanged
    time.sleep(0.6)
    assert [t.number for t in ledger.reap(lambda t: verdicts[t.number])] == [first.number]
    cells = {c.hash: c for c in ledger.cells()}
    assert (cells["cell00"].state, cells["cell00"].attempt, cells["cell00"].val_reward) == (
        "diverged", 1, 0.25)
    assert cells["cell01"].state == "running"  # unknown: left for a later reap, not failed, not re-queued
    assert len(ledger.trials()) == 2
    verdicts[second.number] = Verdict("none")
    assert [t.number for t in ledger.reap(lambda t: verdicts[t.number])] == [second.number]
    assert (ledger.cells()[1].state, ledger.cells()[1].attempt) == ("queued", 2)


def test_of_two_queued_successors_only_the_lowest_runs(tmp_path):
    ledger = _ledger(tmp_path, 1)
    ledger.enqueue("cell00", {"i": 0}, {"seed": 0}, 1.0, attempt=2)  # two reapers re-queued at once
    a = ledger.pop("a", lambda t: tmp_path / "x.log")
    assert a.user_attrs["harness.attempt"] == 1
    assert ledger.pop("b", lambda t: tmp_path / "x.log") is None  # attempt 2 sees attempt 1 running: dropped
    assert [t.user_attrs.get("harness.outcome") for t in ledger.trials()] == [None, {"state": "duplicate"}]


def test_adoption_reads_the_attempts_result_file_then_its_mlflow_run(tmp_path, monkeypatch):
    from harness import tracking
    from harness.launch import free_port
    from harness.sweep import adopt

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sweep_dir = tmp_path / "sweep"
    assert adopt.find(sweep_dir, "u/proxy", "c1", 1).kind == "none"  # no file, no experiment
    client = tracking.client()
    exp = tracking.ensure_experiment(client, "u/proxy")
    run = client.create_run(exp, tags={"harness.cell": "c1", "harness.attempt": "1",
                                       "harness.status": "running"})
    client.log_metric(run.info.run_id, "val/reward", 0.75, step=3)
    assert adopt.find(sweep_dir, "u/proxy", "c1", 1).kind == "none"  # still training when it died
    client.set_tag(run.info.run_id, "harness.status", "complete")  # killed between its status tag and its end
    v = adopt.find(sweep_dir, "u/proxy", "c1", 1)
    assert (v.kind, v.source, v.run_id, v.outcome()["val_reward"]) == (
        "result", "mlflow", run.info.run_id, 0.75)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert adopt.find(sweep_dir, "u/proxy", "c1", 2).kind == "none"  # another attempt's run is not this one's
    path = adopt.result_path(sweep_dir, "c2", 1)
    path.parent.mkdir(parents=True)
    path.write_text('{"status": "complete", "run_id": "r2", "fin')  # cut short by a kill: not a result
    assert adopt.find(sweep_dir, "u/proxy", "c2", 1).kind == "none"
    path.write_text(json.dumps({"status": "complete", "run_id": "r2", "final": {"val/reward": 0.5}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    assert adopt.find(sweep_dir, "u/proxy", "c2", 1).kind == "result"  # the file alone suffices
    v = adopt.find(sweep_dir, "u/proxy", "c1", 1)
    assert v.kind == "unknown" and v.why.startswith("MLflow tracking server http://127.0.0.1:"), v


def _claim_in_process(url: str, out: str, barrier) -> None:
    from harness.sweep.claim import ClaimTaken, DriverClaim

    barrier.wait()
    try:
        claim = DriverClaim(url, "race/proxy").take()
        Path(out).write_text("held")
        barrier.wait()  # hold it until every contender has tried
        claim.release()
    except ClaimTaken:
        Path(out).write_text("refused")
        barrier.wait()


def test_driver_claim_on_a_journal_is_held_by_exactly_one_of_racing_processes(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_claim_in_process,
                         args=(str(tmp_path / "ledger.journal"), str(tmp_path / f"c{i}"), barrier))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert sorted((tmp_path / f"c{i}").read_text() for i in range(4)) == ["held"] + ["refused"] * 3
