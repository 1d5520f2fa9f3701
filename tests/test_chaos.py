"""Chaos: a fixed-seed random sequence of SIGKILLs (the driver, its workers, their jobs) over a tiny sweep,
re-running the same `sweep` command whenever the driver is gone. Afterwards every cell is complete exactly once
(ledger, result files, MLflow), no run is left RUNNING, and the analysis tables have every cell with its full
seed count.

The job is a stand-in (HARNESS_TRAIN_CMD) that keeps the real job's contract through the real
harness.tracking.RunLogger: the run's tags and params, the metrics the analysis tables read, one optimizer step
at a time; then harness.status, FINISHED, result.json, and a linger standing for the seconds a real job spends
in interpreter shutdown (torch, TRL) after its result, the window in which a kill could make a cell run twice.
Real training would take minutes per kill on two cores; the sweep machinery under test is the same.

Kills come at random wall-clock moments, so on a fast machine the sweep could finish before the chaos is
done. The stand-in job therefore paces completions by the kills made so far: the k-th cell to complete waits
until k/cells of the kills have happened (the test writes the count to a file), so every machine sees all the
kills spread over the whole sweep, including the window after a result is written.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.sweep.ledger import Ledger
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage

pytestmark = pytest.mark.slow

SEED = 20260601
KILLS = 16
SEEDS = [0, 1]
JOB = r'''
import json, os, sys, time
import yaml
from harness import tracking

args = sys.argv[1:]
tags = {args[i + 1].split("=", 1)[0]: args[i + 1].split("=", 1)[1] for i, a in enumerate(args) if a == "--tag"}
result, parent = args[args.index("--result") + 1], args[args.index("--parent-run-id") + 1]
cfg = yaml.safe_load(open(args[0]))
cell, attempt = tags["harness.cell"], tags["harness.attempt"]
def note(what):
    with open(os.environ["CHAOS_LOG"], "a") as f:
        f.write(f"{what} {cell} {attempt} {os.getpid()}\n")
note("start")
br, it, seed, objective = cfg["batch_ratio"], cfg["iterations"], cfg["seed"], cfg["objective"]
logger = tracking.RunLogger(cfg["experiment"], f"{objective}-br{br}-it{it}-s{seed}", {
    "objective": objective, "batch_ratio": str(br), "iterations": str(it), "seed": str(seed),
    "harness.config_hash": cell, "harness.replicate_hash": f"{objective}-{br}-{it}", "harness.status": "running",
    **tags}, parent)
logger.log_params({**tracking.flatten(cfg), "optimizer_steps_per_rollout_batch": str(br * it)})
per_batch = br * it
for step in range(cfg["rollout_batches"] * per_batch + 1):
    logger.log_metrics({"val/reward": 0.3 + 0.01 * step + 0.02 * seed, "reward": 0.3, "entropy": 1.0, "loss": 0.1,
                        "rollout_kl": 0.001 * step, "clip_ratio/region_mean": 0.0, "grad_clipped": 0.0,
                        "grad_norm": 1.0, "rollout/steps_on_batch": per_batch, "ratio/abs_dev_mean": 0.0,
                        "rollout/batch": step // per_batch + 1}, step)
    time.sleep(0.2)
done = {ln.split()[1] for ln in open(os.environ["CHAOS_LOG"]) if ln.startswith("done ")}
need = -(-(len(done) + 1) * int(os.environ["CHAOS_KILLS"]) // int(os.environ["CHAOS_CELLS"]))
while int(open(os.environ["CHAOS_KILLED"]).read() or 0) < need:  # pace completions by the chaos (docstring)
    time.sleep(0.1)
logger.set_tags({"harness.status": "complete", "harness.steps_per_rollout_batch_ok": "true"})
logger.finish("FINISHED")
with open(result, "w") as f:
    json.dump({"status": "complete", "run_id": logger.run_id, "final": {"val/reward": 0.5}}, f)
note("done")
time.sleep(1.5)  # interpreter shutdown
'''
SPEC = {
    "study": "chaos",
    "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16, "val_prompts": 8, "eval_every": 1,
             "trl": {"num_generations": 4, "per_device_train_batch_size": 8}},
    "axes": {"objective": ["grpo", "cfpo"], "batch_ratio": [1, 2]},
    "seeds": SEEDS,
    "scales": {"paper": {"base": {"rollout_batches": 2}}, "proxy": {"base": {"rollout_batches": 2}}},
}


def _ours(marker: str, needle: str) -> list[int]:
    """PIDs of this test's processes whose command line holds both strings (the machine is shared)."""
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and needle in cmd:
            pids.append(p.info["pid"])
    return sorted(pids)


def test_random_sigkills_never_lose_nor_repeat_a_cell(tmp_path, monkeypatch):
    rng = random.Random(SEED)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    (tmp_path / "chaos_job.py").write_text(JOB)
    log, results, uri = tmp_path / "chaos.log", tmp_path / "results", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cells = [c.hash for c in make_plan(*load_spec(str(spec)), "proxy").cells]
    env = {**os.environ, "HARNESS_RESULTS": str(results), "MLFLOW_TRACKING_URI": uri, "CHAOS_LOG": str(log),
           "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp_path / 'chaos_job.py'}",
           "CHAOS_KILLED": str(tmp_path / "killed"), "CHAOS_KILLS": str(KILLS), "CHAOS_CELLS": str(len(cells))}
    (tmp_path / "killed").write_text("0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "harness", "sweep", str(spec), "--scale", "proxy", "--workers", "2",
           "--max-attempts", "100"]

    def sweep() -> subprocess.Popen:
        with open(tmp_path / f"sweep-{runs}.log", "w") as out:  # one log per run of the command, for a post-mortem
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    t0 = time.time()
    from harness import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the store exists before the chaos, as after any earlier job
    tracking.client()
    runs, kills = 1, []
    driver = sweep()
    while not log.exists():  # the first kill once the sweep is under way
        assert driver.poll() is None, "the sweep ended before starting a job"
        time.sleep(0.2)
    candidates = {"driver": lambda: [driver.pid] if driver.poll() is None else [],
                  "worker": lambda: _ours(str(spec), " worker "),
                  "job": lambda: _ours(str(tmp_path / "chaos_job.py"), "--result")}
    while len(kills) < KILLS:
        time.sleep(rng.uniform(1.5, 5.0))
        if driver.poll() is not None:
            assert driver.returncode == 0 or runs < 40, "the sweep keeps failing"
            if driver.returncode == 0:
                break  # finished before all kills: asserted below
            runs += 1
            driver = sweep()
            continue
        kind = rng.choice(["driver", "worker", "worker", "job", "job", "job"])
        pids = candidates[kind]()
        if not pids:  # none of that kind right now (jobs between cells, workers not started yet): next draw
            continue
        pid = rng.choice(pids)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills.append("driver" if pid == driver.pid else kind)
        (tmp_path / "killed.tmp").write_text(str(len(kills)))
        os.replace(tmp_path / "killed.tmp", tmp_path / "killed")  # the jobs never read a half-written count
        if pid == driver.pid:
            driver.wait()
            runs += 1
            driver = sweep()  # the same command again
    while driver.wait(timeout=600) != 0:  # let the last one finish (one killed last is started again)
        runs += 1
        driver = sweep()
        assert runs < 40
    elapsed = time.time() - t0

    # The ledger: one COMPLETE attempt per cell, and nothing else running or queued.
    ledger = Ledger(open_storage(str(results / "chaos" / "proxy" / "ledger.journal")), "chaos/proxy", create=False)
    by_cell = ledger.by_cell()
    assert sorted(by_cell) == sorted(cells)
    for h, trials in by_cell.items():
        assert [t.state.name for t in trials].count("COMPLETE") == 1, h
        assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")], h
    # MLflow: exactly one complete run per cell (none needed tagging as superseded), none RUNNING.
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("chaos/proxy").experiment_id
    all_runs = client.search_runs([exp], max_results=5000)
    running = [r.info.run_id for r in all_runs if r.info.status == "RUNNING"]
    complete: dict[str, list] = {}
    for r in all_runs:
        if r.data.tags.get("harness.status") in ("complete", "superseded"):
            complete.setdefault(r.data.tags["harness.cell"], []).append(r)
    # Re-runs after completing: any attempt started after the first attempt that reached its result, by its
    # result file or, for a job killed between ending its run and writing the file, by its MLflow run.
    events = [ln.split() for ln in log.read_text().splitlines()]
    reruns, finished = 0, {}
    for h in cells:
        wrote = {int(p.name.split("-")[1].split(".")[0]) for p in (results / "chaos" / "proxy" / "jobs" / h)
                 .glob("attempt-*.result.json") if json.loads(p.read_text() or "{}").get("status") == "complete"}
        reached = sorted(wrote | {int(r.data.tags["harness.attempt"]) for r in complete.get(h, [])})
        assert reached, h
        finished[h] = reached[0]
        reruns += sum(1 for e in events if e[0] == "start" and e[1] == h and int(e[2]) > reached[0])
        counted = [t for t in by_cell[h] if t.state.name == "COMPLETE"][0]
        assert counted.user_attrs["harness.attempt"] == reached[0], h
    print(f"\nchaos: {len(kills)} kills ({', '.join(f'{k} {kills.count(k)}' for k in sorted(set(kills)))}), "
          f"{runs} sweep runs, {reruns} cells re-run after completing, {len(running)} runs RUNNING, "
          f"{sum(len(t) for t in by_cell.values())} attempts for {len(cells)} cells, {elapsed:.0f}s")
    assert len(kills) == KILLS, f"the sweep finished after {len(kills)} kills"
    assert reruns == 0
    assert running == []
    assert {h: [(r.info.status, r.data.tags["harness.status"], r.data.tags["harness.attempt"]) for r in rs]
            for h, rs in complete.items()} == {h: [("FINISHED", "complete", str(finished[h]))] for h in cells}

    # The analysis finds every cell once, with all its seeds.
    from analysis.pipeline import regenerate

    table = regenerate("chaos", "proxy", results_dir=results, tracking_uri=uri, figures=False).table
    rows = {(r["objective"], int(r["batch_ratio"]), int(r["iterations"])): int(r["seeds"])
            for r in table.to_dict("records")}
    assert rows == {(o, b, 1): len(SEEDS) for o in ("grpo", "cfpo") for b in (1, 2)}, table
