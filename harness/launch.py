"""Where a job runs and how it starts: packing jobs onto a machine's GPUs, and the job's command line.

A sweep scale sets `gpus_per_job` (k) and `deepspeed` (none | zero2). With G visible GPUs a machine runs
floor(G/k) jobs at a time, each pinned (CUDA_VISIBLE_DEVICES) to its own disjoint set of k devices. A job on one
device is `python -m harness train ...`; a job on k > 1 devices is
`accelerate launch --num_processes k [--config_file configs/accelerate/zero2.yaml] -m harness train ...`
(one training process per device, data parallel; ZeRO-2 shards optimizer state and gradients across them).

Two environment hooks, for wrappers (nice, numactl) and for tests of the machinery without training or GPUs:
`HARNESS_TRAIN_CMD` replaces `python -m harness train` of a one-device job; `HARNESS_ACCELERATE_CMD` replaces the
`accelerate` executable of a k-device job (the rest of its command line is kept).
"""
from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path

from harness.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_CONFIGS = {"zero2": REPO_ROOT / "configs" / "accelerate" / "zero2.yaml"}
DEEPSPEED_CHOICES = ("none", *DEEPSPEED_CONFIGS)


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    names = [d.strip() for d in env.split(",") if d.strip()] if env else []
    return names or [str(i) for i in range(torch.cuda.device_count())]


def check_gpus(gpus: list[str], per_job: int, where: str) -> None:
    """A ConfigError (exit 2) when jobs of `per_job` devices cannot run on these GPUs."""
    if per_job < 1:
        raise ConfigError(f"{where}: gpus_per_job={per_job}: must be at least 1")
    if per_job == 1:
        return
    if not gpus:
        raise ConfigError(f"{where}: gpus_per_job={per_job} needs CUDA GPUs and this machine has none; on CPU "
                          "machines gpus_per_job must be 1")
    if per_job > len(gpus):
        raise ConfigError(f"{where}: gpus_per_job={per_job} but only {len(gpus)} GPU(s) are visible here "
                          f"({','.join(gpus)})")


def gpu_slots(gpus: list[str], per_job: int) -> list[list[str]]:
    """Disjoint sets of `per_job` devices, in order: floor(G / per_job) of them (leftover devices stay idle)."""
    if per_job < 1:
        raise ValueError(f"gpus_per_job must be at least 1, got {per_job}")
    return [gpus[i * per_job:(i + 1) * per_job] for i in range(len(gpus) // per_job)]


def default_workers(gpus: list[str], per_job: int) -> int:
    """Jobs at a time on this machine: one per slot of `per_job` GPUs; without GPUs one per CPU core."""
    if gpus:
        return max(1, len(gpus) // per_job)
    return max(1, os.cpu_count() or 1)


def free_port() -> int:
    """A TCP port free right now on this machine (for torch.distributed's rendezvous of one job)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command() -> list[str]:
    """`python -m harness train`, or $HARNESS_TRAIN_CMD (a wrapper such as `nice -n 10 python -m harness train`,
    or a stand-in job in tests of the sweep machinery)."""
    custom = os.environ.get("HARNESS_TRAIN_CMD")
    return shlex.split(custom) if custom else [sys.executable, "-m", "harness", "train"]


def accelerate_command() -> list[str]:
    """The `accelerate` CLI of this Python environment, or $HARNESS_ACCELERATE_CMD."""
    custom = os.environ.get("HARNESS_ACCELERATE_CMD")
    if custom:
        return shlex.split(custom)
    exe = Path(sys.executable).parent / "accelerate"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def job_command(gpus_per_job: int = 1, deepspeed: str = "none", port: int | None = None) -> list[str]:
    """The command that starts one job, up to (not including) its config path and options.

    port: torch.distributed's rendezvous port of a k-device job; each job gets its own (default: a free one), so
    two multi-GPU jobs on one machine do not both try accelerate's default 29500.
    """
    if deepspeed not in DEEPSPEED_CHOICES:
        raise ConfigError(f"deepspeed: {deepspeed!r}; allowed: {', '.join(DEEPSPEED_CHOICES)}")
    if gpus_per_job == 1:
        return train_command()
    if gpus_per_job < 1:
        raise ConfigError(f"gpus_per_job={gpus_per_job}: must be at least 1")
    cmd = [*accelerate_command(), "launch", "--num_processes", str(gpus_per_job)]
    if deepspeed == "none":
        cmd += ["--multi_gpu", "--num_machines", "1"]
    else:
        cmd += ["--config_file", str(DEEPSPEED_CONFIGS[deepspeed])]
    cmd += ["--main_process_port", str(port if port is not None else free_port()), "-m", "harness", "train"]
    return cmd
