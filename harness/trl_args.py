"""How a job config maps onto TRL's GRPOConfig: the batch shape, the knobs the harness manages, the arguments.

The config validates with it (`shape_of`, `MANAGED_TRL_KNOBS`), harness.checks builds GRPOConfig from the
same `grpo_config_kwargs` as the job, so a config that passes the checks is the one the job trains with.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import contract

if TYPE_CHECKING:
    from harness.config import JobConfig

# GRPOConfig knobs the harness sets itself: derived from harness fields, so a user may not set them directly.
MANAGED_TRL_KNOBS = {
    "steps_per_generation": "set batch_ratio (and generation_batch_size) instead",
    "gradient_accumulation_steps": "set batch_ratio (and generation_batch_size) instead",
    "num_iterations": "set iterations instead",
    "max_steps": "set rollout_batches instead",
    "num_train_epochs": "set rollout_batches instead",
    "seed": "set seed instead",
    "output_dir": "set output_dir instead",
    "report_to": "the harness logs to MLflow itself",
    "run_name": "the harness names runs itself",
    "logging_steps": "the harness logs every optimizer step",
}

# Settings the harness always imposes on GRPOConfig, and why.
FIXED_TRL_SETTINGS: dict[str, Any] = {
    "logging_steps": 1,  # one MLflow point per optimizer step
    "report_to": "none",  # harness.callbacks.MLflowMetrics logs, synchronously, to the harness's own run
    "save_strategy": "no",
    "logging_nan_inf_filter": False,  # HF would otherwise hide a NaN loss from the divergence check
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """How (generation_batch_size, batch_ratio, iterations) map onto TRL's knobs for one process."""

    per_device_train_batch_size: int
    steps_per_generation: int
    gradient_accumulation_steps: int
    num_iterations: int
    optimizer_steps_per_rollout_batch: int


def shape_of(cfg: JobConfig, num_processes: int = 1) -> BatchShape:
    """Per-process TRL knobs for the global batch sizes the user asked for.

    generation batch = processes x micro-batch x steps_per_generation; optimizer batch = processes x
    micro-batch x grad accumulation; batch_ratio = steps_per_generation / gradient_accumulation_steps, so each
    pass over a rollout batch is batch_ratio optimizer steps and the batch receives batch_ratio x iterations
    steps in all.
    With this mapping TRL computes old log-probs exactly when batch_ratio x iterations > 1: it skips them only
    when gradient_accumulation_steps is a multiple of steps_per_generation x num_iterations.
    `generation_batch_size` is global, so a cell computes the same experiment on 1 or k GPUs.
    """
    gen = cfg.generation_batch_size
    g = cfg.trl.get("num_generations", 8)
    micro = cfg.trl.get("per_device_train_batch_size", 8)
    if not isinstance(g, int) or not isinstance(micro, int) or g < 1 or micro < 1:
        raise ValueError("trl.num_generations and trl.per_device_train_batch_size must be positive integers")
    if gen % g:
        raise ValueError(f"generation_batch_size={gen} must be divisible by trl.num_generations={g}")
    if gen % cfg.batch_ratio:
        raise ValueError(f"generation_batch_size={gen} must be divisible by batch_ratio={cfg.batch_ratio}")
    optimizer_batch = gen // cfg.batch_ratio
    if optimizer_batch % (micro * num_processes):
        raise ValueError(
            f"optimizer batch generation_batch_size/batch_ratio={optimizer_batch} must be divisible by "
            f"trl.per_device_train_batch_size={micro}"
            + (f" x {num_processes} processes" if num_processes > 1 else ""))
    if micro % g and g % micro:
        raise ValueError(f"trl.per_device_train_batch_size={micro} and trl.num_generations={g} "
                         "must divide one another")
    per_process = micro * num_processes
    return BatchShape(
        per_device_train_batch_size=micro,
        steps_per_generation=gen // per_process,
        gradient_accumulation_steps=optimizer_batch // per_process,
        num_iterations=cfg.iterations,
        optimizer_steps_per_rollout_batch=contract.steps_per_rollout_batch(cfg.batch_ratio, cfg.iterations),
    )


def grpo_config_kwargs(cfg: JobConfig, shape: BatchShape, device: str) -> dict[str, Any]:
    """GRPOConfig's arguments; harness.checks builds the same ones (device "cpu") to validate a config."""
    hardware = ({"use_cpu": True, "bf16": False, "fp16": False, "gradient_checkpointing": False}
                if device == "cpu" else {"bf16": True, "gradient_checkpointing": False})
    return {**hardware, **cfg.trl, **FIXED_TRL_SETTINGS,
            "per_device_train_batch_size": shape.per_device_train_batch_size,
            "steps_per_generation": shape.steps_per_generation,
            "gradient_accumulation_steps": shape.gradient_accumulation_steps,
            "num_iterations": shape.num_iterations,
            "max_steps": cfg.rollout_batches * shape.optimizer_steps_per_rollout_batch,
            "seed": cfg.seed, "output_dir": str(Path(cfg.output_dir) / "trainer"), "run_name": cfg.objective}
