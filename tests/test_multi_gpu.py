"""Multi-GPU cells: packing jobs of `gpus_per_job` devices onto a machine's GPUs, and their launch command lines.

What needs CUDA is MOCKED here, because no GPU exists on the machines this suite runs on: `torch.cuda.is_available`
and `torch.cuda.device_count` are monkeypatched in the test process to pretend the machine has 3 or 4 GPUs, and
`accelerate` is replaced (HARNESS_ACCELERATE_CMD) by a stand-in script that records its command line and the
CUDA_VISIBLE_DEVICES it was given, then writes result.json like a finished job. Those stand-ins remain for what
only GPUs can run: packing workers onto disjoint sets of devices and pinning their jobs there, and ZeRO-2
(DeepSpeed needs CUDA). What is real: the spec validation, the driver, the worker processes, the ledger, the
pinning of each worker to its devices, and the command lines, which accelerate's own argument parser and launch
validation accept. The launch itself, a worker running a 2-process cell with real accelerate and real training
(on CPU, over gloo), is tests/test_multiprocess_cpu.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import ConfigError
from harness.launch import DEEPSPEED_CONFIGS, check_gpus, default_workers, gpu_slots, job_command
from harness.sweep.ledger import DEEPSPEED, GPUS_PER_JOB, Ledger
from harness.sweep.spec import load_spec, make_plan
from harness.sweep.storage import open_storage

# Stand-in for the `accelerate` CLI: `accelerate launch [options] -m harness train CONFIG --tag k=v ... --result R`.
FAKE_ACCELERATE = r'''
import json, os, sys, time
argv = sys.argv[1:]
m = argv.index("-m")
assert argv[0] == "launch" and argv[m + 1:m + 3] == ["harness", "train"], argv
train = argv[m + 3:]
tags = {train[i + 1].split("=", 1)[0]: train[i + 1].split("=", 1)[1] for i, a in enumerate(train) if a == "--tag"}
result = train[train.index("--result") + 1]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": argv, "cell": tags["harness.cell"], "tags": tags, "worker_pid": os.getppid(),
                        "devices": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
time.sleep(1.0)  # long enough that every worker gets a cell
json.dump({"status": "complete", "run_id": "none", "final": {"val/reward": 0.5}}, open(result, "w"))
'''
SPEC = {
    "study": "mgpu",
    "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16, "val_prompts": 8,
             "trl": {"num_generations": 4, "per_device_train_batch_size": 4}},
    "axes": {"objective": ["grpo", "cfpo"], "batch_ratio": [1, 2]},
    "seeds": [0],
    "scales": {"paper": {"base": {"rollout_batches": 2}},
               "proxy": {"base": {"rollout_batches": 2}, "gpus_per_job": 2, "deepspeed": "zero2"}},
}


def write_spec(tmp_path: Path, **proxy: object) -> Path:
    spec = json.loads(json.dumps(SPEC))
    spec["scales"]["proxy"].update(proxy)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend this machine has n CUDA GPUs (a mock: there is no GPU here)."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    """Results, MLflow store and the accelerate stand-in in tmp_path; returns the stand-in's log."""
    (tmp_path / "fake_accelerate.py").write_text(FAKE_ACCELERATE)
    log = tmp_path / "jobs.jsonl"
    monkeypatch.setenv("HARNESS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HARNESS_ACCELERATE_CMD", f"{sys.executable} {tmp_path / 'fake_accelerate.py'}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("HARNESS_TRAIN_CMD", raising=False)
    return log


def harness(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def jobs(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def accelerate_accepts(argv: list[str]):
    """Parse and validate a recorded `accelerate launch` command line with accelerate's own code (no launch)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[0] == "launch"
    args = launch_command_parser().parse_args(argv[1:])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        args, _, _ = _validate_launch_command(args)
    return args


# ----------------------------------------------------------------------------------------------- packing
def test_slots_are_disjoint_sets_of_k_devices():
    assert gpu_slots(["0", "1", "2", "3"], 1) == [["0"], ["1"], ["2"], ["3"]]
    assert gpu_slots(["0", "1", "2", "3"], 2) == [["0", "1"], ["2", "3"]]
    assert gpu_slots(["0", "1", "2"], 2) == [["0", "1"]]  # floor(3/2): the third GPU stays idle
    assert gpu_slots(["4", "5", "6", "7"], 4) == [["4", "5", "6", "7"]]  # names as CUDA_VISIBLE_DEVICES gives them
    assert gpu_slots([], 1) == []
    assert [default_workers(["0"] * g, k) for g, k in ((8, 1), (8, 2), (8, 3), (3, 2), (2, 2))] == [8, 4, 2, 1, 1]
    assert default_workers([], 1) == max(1, os.cpu_count() or 1)  # CPU: one single-threaded job per core
    check_gpus([], 1, "x")
    with pytest.raises(ConfigError, match="on CPU machines gpus_per_job must be 1"):
        check_gpus([], 2, "x")
    with pytest.raises(ConfigError, match="gpus_per_job=4 but only 2 GPU"):
        check_gpus(["0", "1"], 4, "x")


def test_visible_gpus_follow_cuda_visible_devices(fake_gpus, monkeypatch):
    from harness.launch import visible_gpus

    fake_gpus(0)
    assert visible_gpus() == []
    fake_gpus(4)
    assert visible_gpus() == ["0", "1", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]


# ---------------------------------------------------------------------------------------- command lines
def test_one_gpu_job_is_python_m_harness_train(monkeypatch):
    monkeypatch.delenv("HARNESS_TRAIN_CMD", raising=False)
    assert job_command(1) == [sys.executable, "-m", "harness", "train"]


def test_multi_gpu_job_is_accelerate_launch(monkeypatch):
    monkeypatch.delenv("HARNESS_ACCELERATE_CMD", raising=False)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    assert job_command(2, "none", port=29611) == [
        accelerate, "launch", "--num_processes", "2", "--multi_gpu", "--num_machines", "1",
        "--main_process_port", "29611", "-m", "harness", "train"]
    zero2 = str(DEEPSPEED_CONFIGS["zero2"])
    assert job_command(4, "zero2", port=29612) == [
        accelerate, "launch", "--num_processes", "4", "--config_file", zero2,
        "--main_process_port", "29612", "-m", "harness", "train"]
    # accelerate itself accepts both, and reads them as k data-parallel processes running `-m harness train`.
    plain = accelerate_accepts(job_command(2, "none", port=29611)[1:] + ["cfg.yaml", "--result", "r.json"])
    assert (plain.multi_gpu, plain.use_deepspeed, plain.num_processes, plain.main_process_port) == (True, False, 2,
                                                                                                   29611)
    assert (plain.module, plain.training_script, plain.training_script_args) == (
        True, "harness", ["train", "cfg.yaml", "--result", "r.json"])
    ds = accelerate_accepts(job_command(4, "zero2", port=29612)[1:] + ["cfg.yaml"])
    assert (ds.use_deepspeed, ds.zero_stage, ds.num_processes, ds.mixed_precision) == (True, 2, 4, "bf16")
    # Each multi-GPU job gets its own rendezvous port, so two of them on one machine do not collide.
    port = int(job_command(2)[job_command(2).index("--main_process_port") + 1])
    assert 0 < port < 65536


def test_zero2_config_is_an_accelerate_deepspeed_stage_2_config():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = DEEPSPEED_CONFIGS["zero2"]
    assert path == Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "zero2.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type == DistributedType.DEEPSPEED and cfg.deepspeed_config["zero_stage"] == 2
    assert cfg.deepspeed_config["offload_optimizer_device"] == "none" and cfg.num_machines == 1


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("proxy, message", [
    ({"gpus_per_job": 0}, "scales.proxy.gpus_per_job: Input should be greater than or equal to 1"),
    ({"gpus_per_job": "two"}, "scales.proxy.gpus_per_job: Input should be a valid integer"),
    ({"deepspeed": "zero3"}, "scales.proxy.deepspeed: Input should be 'none' or 'zero2'"),
    ({"gpus_per_job": 1, "deepspeed": "zero2"}, "scales.proxy: deepspeed: zero2 shards a job across its GPUs"),
])
def test_bad_gpus_per_job_or_deepspeed_is_exit_2(tmp_path, env, capsys, proxy, message):
    rc, _ = harness("sweep", str(write_spec(tmp_path, **proxy)), "--scale", "proxy")
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_cpu_machine_refuses_gpus_per_job_above_1(tmp_path, env, fake_gpus, capsys):
    fake_gpus(0)  # a CPU machine, whatever this one is
    spec = write_spec(tmp_path, gpus_per_job=2)
    rc, _ = harness("sweep", str(spec), "--scale", "proxy", "--workers", "1")
    err = capsys.readouterr().err
    assert rc == 2 and "scales.proxy: gpus_per_job=2 needs CUDA GPUs" in err and "must be 1" in err, err
    assert not (tmp_path / "results").exists()  # nothing written
    # A worker joining such a sweep from a CPU machine is refused the same way (the ledger holds the setting).
    journal = tmp_path / "ledger.journal"
    Ledger(open_storage(str(journal)), "mgpu/proxy", create=True).set_attr(GPUS_PER_JOB, 2)
    rc, _ = harness("worker", str(spec), "--scale", "proxy", "--storage", str(journal))
    assert rc == 2 and "on CPU machines gpus_per_job must be 1" in capsys.readouterr().err
    # Too few GPUs for one job is refused as well.
    fake_gpus(1)
    rc, _ = harness("sweep", str(spec), "--scale", "proxy")
    assert rc == 2 and "gpus_per_job=2 but only 1 GPU(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- driver and workers
def test_driver_packs_two_gpu_zero2_jobs_onto_four_gpus(tmp_path, env, fake_gpus):
    fake_gpus(4)
    spec = write_spec(tmp_path)  # proxy: gpus_per_job 2, deepspeed zero2
    cells = {c.hash for c in make_plan(*load_spec(str(spec)), "proxy").cells}
    rc, out = harness("sweep", str(spec), "--scale", "proxy")  # --workers left out: floor(4/2) = 2
    assert rc == 0, out
    assert len(list((tmp_path / "results" / "mgpu" / "proxy" / "workers").glob("*.log"))) == 2
    ran = jobs(env)
    assert sorted(j["cell"] for j in ran) == sorted(cells)  # every cell once
    for j in ran:
        args = accelerate_accepts(j["argv"])
        assert (args.num_processes, args.use_deepspeed, args.zero_stage) == (2, True, 2)
        assert args.config_file == str(DEEPSPEED_CONFIGS["zero2"]) and args.training_script == "harness"
        assert args.training_script_args[0] == "train"
        assert j["tags"]["harness.gpus_per_job"] == "2" and j["tags"]["harness.deepspeed"] == "zero2"
    # Each worker is pinned to its own pair of devices, and all its jobs ran there.
    by_worker: dict[int, set[str]] = {}
    for j in ran:
        by_worker.setdefault(j["worker_pid"], set()).add(j["devices"])
    assert sorted(d for devices in by_worker.values() for d in devices) == ["0,1", "2,3"]
    ledger = Ledger(open_storage(str(tmp_path / "results" / "mgpu" / "proxy" / "ledger.journal")), "mgpu/proxy",
                    create=False)
    assert (ledger.attr(GPUS_PER_JOB), ledger.attr(DEEPSPEED)) == (2, "zero2")
    assert {c.state for c in ledger.cells()} == {"complete"}


def test_three_gpus_two_per_job_leaves_one_idle_and_runs_plain_ddp(tmp_path, env, fake_gpus):
    fake_gpus(3)
    spec = write_spec(tmp_path, deepspeed="none")
    rc, out = harness("sweep", str(spec), "--scale", "proxy")
    assert rc == 0, out
    assert len(list((tmp_path / "results" / "mgpu" / "proxy" / "workers").glob("*.log"))) == 1
    ran = jobs(env)
    assert len(ran) == 4 and {j["devices"] for j in ran} == {"0,1"}
    for j in ran:
        args = accelerate_accepts(j["argv"])
        assert (args.num_processes, args.multi_gpu, args.use_deepspeed, args.config_file) == (2, True, False, None)


def test_worker_on_another_machine_packs_its_own_gpus(tmp_path, env, fake_gpus):
    """`harness worker` on a 4-GPU machine joining a 2-GPU-per-job sweep starts two pinned worker processes."""
    fake_gpus(4)
    spec = write_spec(tmp_path)
    plan = make_plan(*load_spec(str(spec)), "proxy")
    journal = tmp_path / "shared" / "ledger.journal"  # stands for the sweep's shared storage
    ledger = Ledger(open_storage(str(journal)), plan.experiment, create=True)
    ledger.set_attr(GPUS_PER_JOB, 2)  # as the driver records the scale's setting
    ledger.set_attr(DEEPSPEED, "zero2")
    for c in plan.cells:
        ledger.enqueue(c.hash, c.axes, c.job_fields(), c.cost, attempt=1)
    rc, out = harness("worker", str(spec), "--scale", "proxy", "--storage", str(journal), "--name", "m2")
    assert rc == 0, out
    assert "worker m2-0" in out and "worker m2-1" in out and "on GPUs 0,1" in out and "on GPUs 2,3" in out
    ran = jobs(env)
    assert sorted(j["cell"] for j in ran) == sorted(c.hash for c in plan.cells)
    assert {j["devices"] for j in ran} == {"0,1", "2,3"}
    assert {c.worker for c in ledger.cells()} == {"m2-0", "m2-1"}
    assert {c.state for c in ledger.cells()} == {"complete"}
