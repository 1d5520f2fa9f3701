"""Synthetic MLflow studies whose curves are known: the fixture of the tests and the benchmark's store.

`log_run` writes one run exactly as the contract says (tags, the steps-per-batch param, metrics by optimizer
step); `make_study` fills an experiment with a plausible grid in which GRPO collapses under high
reuse (batch_ratio x iterations) and CFPO does not, plus one failed and one running cell (or, with
`cells`, a ladder of cells such as (1,1), (4,4), (8,8): the many-objective figure tests).
"""
from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis.layout import experiment_name
from harness import contract

Curve = Mapping[int, float] | Sequence[tuple[int, float]]  # step -> value
_BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call


def cell_hash(objective: str, batch_ratio: int, iterations: int, seed: int) -> str:
    return hashlib.sha256(f"{objective}/{batch_ratio}/{iterations}/{seed}".encode()).hexdigest()[:12]


def log_run(client: MlflowClient, experiment_id: str, *, study: str, scale: str, objective: str,
            batch_ratio: int, iterations: int, seed: int, metrics: Mapping[str, Curve],
            status: str = "complete", attempt: int = 1, cell: str | None = None,
            parent_run_id: str | None = None, mlflow_status: str | None = None,
            tags: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None) -> str:
    """One child run of a sweep. MLflow status (unless given): FINISHED for complete/diverged, FAILED for
    failed, RUNNING otherwise; "RUNNING" leaves the run open, as a job that has not ended yet. `tags` adds
    to (or overrides) the contract's tags, e.g. harness.diverged_at; `params` adds params (rollout_batches,
    val_prompts, ...) beside optimizer_steps_per_rollout_batch."""
    run_tags = {
        contract.STUDY: study, contract.SCALE: scale,
        contract.CELL: cell or cell_hash(objective, batch_ratio, iterations, seed),
        contract.ATTEMPT: str(attempt), contract.STATUS: status, "objective": objective,
        "batch_ratio": str(batch_ratio), "iterations": str(iterations), "seed": str(seed),
    }
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=run_tags | dict(tags or {}),
                            run_name=f"{objective}-b{batch_ratio}-i{iterations}-s{seed}-a{attempt}")
    run_id = run.info.run_id
    steps = contract.steps_per_rollout_batch(batch_ratio, iterations)
    all_params = {"optimizer_steps_per_rollout_batch": str(steps), **(params or {})}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in all_params.items()])
    now = int(time.time() * 1000)
    entities = [Metric(key, float(value), now, int(step))
                for key, curve in metrics.items()
                for step, value in (curve.items() if isinstance(curve, Mapping) else curve)]
    for start in range(0, len(entities), _BATCH):
        client.log_batch(run_id, metrics=entities[start:start + _BATCH])
    if mlflow_status is None:
        mlflow_status = "FINISHED" if contract.is_result(status) else "FAILED" if status == contract.FAILED \
            else "RUNNING"
    if mlflow_status != "RUNNING":
        client.set_terminated(run_id, mlflow_status)
    return run_id


def sweep_parent(client: MlflowClient, experiment_id: str, study: str, scale: str) -> str:
    """The sweep-level parent run (tag harness.sweep=true), which the analysis must ignore."""
    run = client.create_run(experiment_id, tags={contract.SWEEP: "true", contract.STUDY: study,
                                                 contract.SCALE: scale}, run_name="sweep")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def synthetic_curves(objective: str, batch_ratio: int, iterations: int, seed: int, rollout_batches: int,
                     eval_every: int) -> tuple[dict[str, dict[int, float]], str]:
    """(metrics, status) of one plausible run: GRPO collapses when batch_ratio x iterations >= 8."""
    rng = np.random.default_rng([seed, batch_ratio, iterations, zlib.crc32(objective.encode())])
    k = contract.steps_per_rollout_batch(batch_ratio, iterations)
    steps = np.arange(1, rollout_batches * k + 1)
    t = steps / k  # rollout batches
    collapse_at = rollout_batches * 0.5 if (objective == "grpo" and k >= 8) else None
    healthy = 0.3 + 0.4 * (1 - np.exp(-t / 20))
    reward = healthy if collapse_at is None else np.where(t < collapse_at, healthy,
                                                          healthy * np.exp(-(t - collapse_at) / 3))
    noise = lambda scale: rng.normal(0, scale, len(steps))  # noqa: E731
    entropy = np.full(len(steps), 0.8) - 0.3 * t / rollout_batches
    if collapse_at is not None:
        entropy = np.where(t < collapse_at, entropy, 0.01)
    dev = 0.02 * (k - 1) / (2.0 if objective == "cfpo" else 1.0)
    metrics = {
        "reward": reward + noise(0.02),
        "entropy": entropy + np.abs(noise(0.005)),
        "loss": noise(0.1),
        "clip_ratio/region_mean": np.clip(dev * 2 + noise(0.005), 0, 1),
        "rollout_kl": np.abs(dev * dev + noise(1e-4)),
        "ratio/abs_dev_mean": np.abs(dev + noise(0.002)),
        "completions/mean_length": 20 + 5 * reward + noise(0.5),
        "grad_norm": np.abs(1 + noise(0.1)) * (1 if collapse_at is None else np.where(t < collapse_at, 1, 50)),
        "rollout/steps_on_batch": (steps - 1) % k + 1.0,
        "rollout/batch": np.ceil(t),
        "rollout/ratio_measured": np.full(len(steps), float(k > 1)),
    }
    metrics["grad_clipped"] = (metrics["grad_norm"] > 1.0).astype(float)
    out = {key: dict(zip(steps.tolist(), np.asarray(v, dtype=float).tolist())) for key, v in metrics.items()}
    evals = np.arange(0, rollout_batches + 1, eval_every)
    val = np.interp(evals, np.concatenate([[0], t]), np.concatenate([[0.3], reward]))
    val = np.clip(val + rng.normal(0, 0.01, len(val)), 0, 1)  # seed-to-seed spread, so intervals are not empty
    out["val/reward"] = {int(e * k): float(v) for e, v in zip(evals, val)}
    return out, "complete"


def make_study(tracking_uri: str, study: str = "synthetic", scale: str = "proxy", *,
               objectives: Sequence[str] = ("grpo", "cfpo"), batch_ratios: Sequence[int] = (1, 2, 4),
               iterations: Sequence[int] = (1, 2, 4), seeds: Sequence[int] = (0, 1, 2),
               rollout_batches: int = 50, eval_every: int = 5,
               cells: Sequence[tuple[int, int]] | None = None) -> str:
    """Fill experiment study/scale with a full grid plus one failed and one running cell; returns its id.

    cells: the (batch_ratio, iterations) pairs to run instead of the full batch_ratios x iterations grid."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(experiment_name(study, scale),
                                             artifact_location=contract.artifact_location(tracking_uri))
    parent = sweep_parent(client, experiment_id, study, scale)
    common = dict(study=study, scale=scale, parent_run_id=parent)
    cells = list(cells) if cells is not None else [(b, i) for b in batch_ratios for i in iterations]
    params = {"rollout_batches": str(rollout_batches), "eval_every": str(eval_every), "val_prompts": "256"}
    for objective in objectives:
        for b, i in cells:
            for s in seeds:
                metrics, status = synthetic_curves(objective, b, i, s, rollout_batches, eval_every)
                log_run(client, experiment_id, objective=objective, batch_ratio=b, iterations=i, seed=s,
                        metrics=metrics, status=status, params=params, **common)
    extra_seed = max(seeds) + 1
    b0, i0 = cells[0]
    log_run(client, experiment_id, objective=objectives[0], batch_ratio=b0, iterations=i0,
            seed=extra_seed, metrics={"reward": {1: 0.3}}, status="failed", **common)
    log_run(client, experiment_id, objective=objectives[-1], batch_ratio=b0,
            iterations=i0, seed=extra_seed, metrics={"reward": {1: 0.3}}, status="running", **common)
    return experiment_id
