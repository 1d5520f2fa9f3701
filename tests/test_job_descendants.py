"""Every process of a job dies with it (harness.sweep.processes.JobTree, a worker as child subreaper).

A real process tree, started the way a worker starts a job (its own session, dying with its parent, the job's
environment): the job, a plain child in its group, and two "ranks" as torchrun starts them, each in a session
of its own (os.setsid) and deaf to SIGTERM (as a rank stuck in a collective is); one rank's parent exits at
once, so the rank is re-parented, to the worker when it is a subreaper. Stopping the job must leave none of
them alive (read from /proc), and no zombie under the worker. A control shows that signalling the job's
process group, as workers did before, leaves both ranks running: the test can fail.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.sweep.ledger import Ledger
from harness.sweep.processes import pid_start
from harness.sweep.storage import open_storage

REPO = Path(__file__).resolve().parent.parent
GRACE_S = 2.0  # the stand-in worker's grace (the real worker's is harness.sweep.worker.GRACE_S)
TREE_JOB = r'''
import os, subprocess, sys, time
out = os.environ["TREE_PIDS"]
RANK = ("import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(os.environ['TREE_PIDS'], 'a').write(f'rank {os.getpid()}\\n'); time.sleep(3600)")
with open(out, "a") as f:
    f.write(f"root {os.getpid()}\n")
subprocess.Popen([sys.executable, "-c", RANK])  # a rank whose parent (the job) lives on
# a rank whose parent exits at once
ORPHAN = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {RANK!r}])"
subprocess.Popen([sys.executable, "-c", ORPHAN]).wait()
child = subprocess.Popen(["sleep", "3600"])  # a plain child, in the job's process group
with open(out, "a") as f:
    f.write(f"child {child.pid}\n")
time.sleep(3600)
'''
# A stand-in worker: starts the job as harness.sweep.worker does (processes.py's functions), waits for a line
# on stdin, then stops it with the steps of Worker._supervise; "group" mode is the old way (its group only).
WORKER = r'''
import json, os, signal, subprocess, sys, time
from harness.sweep.processes import (JobTree, become_subreaper, children, die_with_parent, job_env,
                                     signal_group)
mode, job, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
if mode == "tree":
    assert become_subreaper()
proc = subprocess.Popen([sys.executable, job], env=job_env(), stdin=subprocess.DEVNULL,
                        start_new_session=True, preexec_fn=die_with_parent())
tree = JobTree(proc.pid)
print("started", flush=True)
sys.stdin.readline()
stopped = time.time()
tree.terminate() if mode == "tree" else signal_group(proc.pid, signal.SIGTERM)
while True:
    try:
        rc = proc.wait(timeout=0.5)
        break
    except subprocess.TimeoutExpired:
        pass
    if mode == "tree":
        tree.poll()
    if time.time() - stopped > grace:
        tree.kill() if mode == "tree" else signal_group(proc.pid, signal.SIGKILL)
left = tree.clear(stopped, grace) if mode == "tree" else {}
state = lambda p: open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
zombies = sorted(p for p in children(os.getpid()) if state(p) == "Z")
report = {"rc": rc, "left": sorted(left), "zombies": zombies, "s": time.time() - stopped}
print(json.dumps(report), flush=True)
'''

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _pids(path: Path, proc: subprocess.Popen, timeout: float = 60) -> dict[str, list[int]]:
    """The job's processes as they note themselves: root, two ranks, the plain child."""
    deadline = time.time() + timeout
    while True:
        lines = path.read_text().split("\n") if path.exists() else []
        found: dict[str, list[int]] = {}
        for ln in filter(None, lines):
            kind, pid = ln.split()
            found.setdefault(kind, []).append(int(pid))
        if len(found.get("rank", [])) == 2 and "child" in found and "root" in found:
            return found
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"the job's processes did not all start: {found}"
        time.sleep(0.05)


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(starts: dict[int, str | None]) -> list[int]:
    """Those of the processes that still run (same PID, same start time; a zombie has exited)."""
    return sorted(p for p, s in starts.items() if s is not None and pid_start(p) == s)


def _kill(starts: dict[int, str | None]) -> None:
    for pid in _alive(starts):
        os.kill(pid, signal.SIGKILL)


def _stand_in(mode: str, tmp_path: Path) -> tuple[subprocess.Popen, dict[str, list[int]], dict[int, str]]:
    job = tmp_path / "tree_job.py"
    job.write_text(TREE_JOB)
    env = {**os.environ, "TREE_PIDS": str(tmp_path / "pids")}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, mode, str(job), str(GRACE_S)], cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "started"
    pids = _pids(tmp_path / "pids", worker)
    return worker, pids, {p: pid_start(p) for ps in pids.values() for p in ps}


def test_stopping_a_job_leaves_no_process_of_it_alive(tmp_path):
    worker, pids, starts = _stand_in("tree", tmp_path)
    try:
        # One rank's parent exited: it now hangs off the worker (a subreaper), not off init.
        assert worker.pid in {_ppid(p) for p in pids["rank"]}
        worker.stdin.write("stop\n")
        worker.stdin.flush()
        report = json.loads(worker.stdout.readline())
        worker.wait(timeout=30)
        assert _alive(starts) == []
        assert set(pids["rank"]) <= set(report["left"])  # the job's group signal did not reach them
        assert report["zombies"] == []  # the re-parented rank's exit was collected
        assert GRACE_S <= report["s"] < GRACE_S + 10  # SIGKILL only after the grace, and promptly then
    finally:
        _kill(starts)
        worker.kill()


def test_control_signalling_the_group_alone_leaves_the_ranks_running(tmp_path):
    worker, pids, starts = _stand_in("group", tmp_path)
    try:
        worker.stdin.write("stop\n")
        worker.stdin.flush()
        json.loads(worker.stdout.readline())
        worker.wait(timeout=30)
        assert _alive(starts) == sorted(pids["rank"])  # root and child gone, both ranks still running
    finally:
        _kill(starts)
        worker.kill()


@pytest.mark.slow
def test_a_worker_stopped_by_a_signal_leaves_no_process_of_its_job(tmp_path):
    """The real worker (`harness worker`'s entry point) runs the tree as its job (HARNESS_TRAIN_CMD) and is
    stopped with SIGTERM, as a scheduler stops it: it stops its job, waits its grace (the ranks ignore
    SIGTERM), kills what is left and leaves; nothing of the job survives it."""
    from harness.sweep.worker import GRACE_S as WORKER_GRACE_S

    journal = tmp_path / "ledger.journal"
    ledger = Ledger(open_storage(str(journal)), "tree/proxy", create=True)
    ledger.enqueue("cell0", {"seed": 0}, {"seed": 0, "device": "cpu"}, 1.0, attempt=1)
    job = tmp_path / "tree_job.py"
    job.write_text(TREE_JOB)
    env = {**os.environ, "HARNESS_TRAIN_CMD": f"{sys.executable} {job}", "TREE_PIDS": str(tmp_path / "pids"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "HARNESS_RESULTS": str(tmp_path / "r")}
    run = ("import sys\nfrom harness.sweep.worker import WorkerOptions, run_worker\n"
           f"sys.exit(run_worker(WorkerOptions(storage={str(journal)!r}, study='tree', scale='proxy', "
           f"results={str(tmp_path / 'r')!r}, name='w0', job_start='exec')))")
    worker = subprocess.Popen([sys.executable, "-c", run], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    starts: dict[int, str | None] = {}
    try:
        pids = _pids(tmp_path / "pids", worker)
        starts = {p: pid_start(p) for ps in pids.values() for p in ps}
        assert worker.pid in {_ppid(p) for p in pids["rank"]}
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=WORKER_GRACE_S + 60)
        assert worker.returncode == 130, out
        assert _alive(starts) == [], out
        assert "its job left" in out, out
        assert ledger.cells()[0].state == "queued"  # stopped by a signal: handed back, no attempt spent
    finally:
        _kill(starts)
        worker.kill()


@pytest.mark.slow
def test_a_two_process_cell_whose_launcher_is_killed_mid_step_leaves_no_rank(tmp_path, proxy_cache):
    """A real 2-process CPU cell (accelerate launch, torchrun, two training ranks over gloo, as
    tests/test_multiprocess_cpu.py runs it) under a real worker process. Mid-training its launcher is
    SIGKILLed (as the OOM killer might): the ranks, each in a session of its own, are orphaned and
    re-parented to the worker, which settles the attempt as failed and stops them; none is left running."""
    from conftest import TINY_JOB

    from harness.config import parse_overrides
    from harness.sweep.ledger import DEEPSPEED, GPUS_PER_JOB, JOB, MAX_ATTEMPTS
    from harness.sweep.processes import descendants
    from harness.sweep.spec import load_spec, make_plan

    results = tmp_path / "results"
    env = {**os.environ, "HARNESS_RESULTS": str(results), "HARNESS_CACHE": str(proxy_cache),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HOME": str(tmp_path / "hf")}
    for var in ("HARNESS_TRAIN_CMD", "HARNESS_ACCELERATE_CMD", "CUDA_VISIBLE_DEVICES", "MASTER_PORT"):
        env.pop(var, None)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "study": "ranks", "base": {**parse_overrides(TINY_JOB), "model": "proxy", "task": "chain-sum-probe",
                                   "batch_ratio": 2, "rollout_batches": 200, "val_prompts": 8},
        "axes": {"objective": ["grpo"]}, "seeds": [0],
        "scales": {"paper": {"base": {}}, "proxy": {"base": {}}}}))
    plan = make_plan(*load_spec(str(spec)), "proxy")
    journal = tmp_path / "ledger.journal"
    ledger = Ledger(open_storage(str(journal)), plan.experiment, create=True)
    for key, value in ((GPUS_PER_JOB, 2), (DEEPSPEED, "none"), (MAX_ATTEMPTS, 1)):
        ledger.set_attr(key, value)
    [cell] = plan.cells
    ledger.enqueue(cell.hash, cell.axes, cell.job_fields(), cell.cost, attempt=1)
    run = ("import sys\nfrom harness.sweep.worker import WorkerOptions, run_worker\n"
           f"sys.exit(run_worker(WorkerOptions(storage={str(journal)!r}, study='ranks', scale='proxy', "
           f"results={str(results)!r}, name='w0', job_start='exec')))")
    worker = subprocess.Popen([sys.executable, "-c", run], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    progress = results / "ranks" / "proxy" / "jobs" / cell.hash / "attempt-1.progress"
    starts: dict[int, str | None] = {}
    try:
        deadline = time.time() + 600
        while not progress.exists():  # rank 0 has stored a metric: training is under way
            assert worker.poll() is None, worker.communicate()[0]
            assert time.time() < deadline, "the 2-process cell did not start training in 10 minutes"
            time.sleep(0.5)
        time.sleep(2)
        starts = {p: pid_start(p) for p in descendants({worker.pid}) - {worker.pid}}
        launcher = ledger.trials()[0].user_attrs[JOB]["pid"]
        assert len(starts) >= 3 and launcher in starts  # the launcher and its two ranks, at least
        os.kill(launcher, signal.SIGKILL)
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, out
        assert _alive(starts) == [], out
        assert "its job left" in out, out
        assert ledger.cells()[0].state == "failed"
    finally:
        _kill(starts)
        worker.kill()
