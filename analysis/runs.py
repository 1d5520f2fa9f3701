"""Run metadata from MLflow tags and params, and the choice of one attempt per cell.

A sweep may run a cell (one config hash: objective, batch_ratio, iterations, seed, ...) several times: a
crashed or interrupted attempt is retried. Only attempts that ended as a result (`complete` or `diverged`)
count, and of those the latest; cells with none are listed as excluded, under their latest attempt.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import pandas as pd
from mlflow.entities import Run

from harness import contract

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class RunInfo:
    run_id: str
    cell: str  # harness.cell (config hash); falls back to harness.config_hash, then the run id
    objective: str
    batch_ratio: int
    iterations: int
    seed: int
    status: str  # harness.status: running | complete | diverged | failed | killed (unknown when the tag is missing)
    attempt: int  # harness.attempt, 1-based
    steps_per_rollout_batch: int  # optimizer steps per rollout batch: the param, else batch_ratio x iterations
    start_time: int  # ms since epoch; orders attempts that share an attempt number
    mlflow_status: str  # MLflow's own run status: RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    diverged_at: int | None = None  # harness.diverged_at: step at which the harness's divergence guard stopped it
    note: str = ""  # harness.diverged_reason or harness.error: why it diverged or failed, for the report
    base_objective: str = ""  # the objective tag alone (`objective` is the line label: objective + extra axes)
    extra_axes: str = "{}"  # JSON of the sweep axes beyond the grid (e.g. {"trl.max_grad_norm": 0.0})
    replicate: str = ""  # harness.replicate_hash: the config without its seed ("" for runs made before the tag)
    budget: int | None = None  # param rollout_batches: the budget every run of the cell was given
    eval_every: int | None = None  # param eval_every (rollout batches between validation evaluations)
    val_prompts: int | None = None  # param val_prompts: sample size behind each val/reward value
    git_commit: str = ""  # git.commit tag
    git_dirty: str = ""  # git.dirty tag ("true" when the job ran from a modified tree)
    git_diff_hash: str = ""  # git.diff_hash tag: which modification (absent for clean runs and older runs)
    steps_ok: str = ""  # harness.steps_per_rollout_batch_ok ("false": a rollout batch got fewer/more steps)
    params: str = "{}"  # JSON of the run's params minus PER_RUN_PARAMS: what must agree between seeds

    @property
    def usable(self) -> bool:
        return contract.is_result(self.status)

    @property
    def final(self) -> bool:
        """Neither its metrics nor its status can change any more: safe to cache."""
        return self.usable and self.mlflow_status == "FINISHED"


GRID_AXES = ("objective", "batch_ratio", "iterations", "seed")
# Params that may differ between the seeds of one line: the seed, where a job wrote, how many threads it used,
# and the path of the (content-addressed) proxy model cache on the machine that ran it.
PER_RUN_PARAMS = frozenset({"seed", "output_dir", "experiment", "torch_threads", "proxy.path"})


def _per_run(params: dict[str, str]) -> frozenset[str]:
    """PER_RUN_PARAMS, plus the warm start's own score when each seed warm-starts its own model."""
    return PER_RUN_PARAMS | ({"proxy.warmstart_val_reward"} if params.get("proxy.init_seed") == "seed" else set())


def extra_axes(tags: dict[str, str]) -> dict[str, object]:
    """The sweep axes of a run beyond objective x batch_ratio x iterations x seed (tag harness.axes)."""
    return {k: v for k, v in sorted(json.loads(tags.get(contract.AXES) or "{}").items()) if k not in GRID_AXES}


def line_label(tags: dict[str, str]) -> str:
    """The objective, plus the values of any sweep axis beyond the grid (e.g. `cfpo trl.max_grad_norm=0.0`):
    runs that differ in an ablation axis are separate lines, never pooled as if they were seeds."""
    return " ".join([tags["objective"], *(f"{k}={v}" for k, v in extra_axes(tags).items())])


def _int_param(params: dict[str, str], key: str) -> int | None:
    try:
        return int(params[key])
    except (KeyError, ValueError):
        return None


def run_info(run: Run) -> RunInfo | None:
    """RunInfo of a training run; None for the sweep's parent run and runs without the contract's tags."""
    tags, params = run.data.tags, run.data.params
    if tags.get(contract.SWEEP, "").lower() == "true":
        return None
    try:
        batch_ratio, iterations = int(tags["batch_ratio"]), int(tags["iterations"])
        info = RunInfo(
            run_id=run.info.run_id,
            cell=tags.get(contract.CELL) or tags.get(contract.CONFIG_HASH) or run.info.run_id,
            objective=line_label(tags),
            batch_ratio=batch_ratio,
            iterations=iterations,
            seed=int(tags["seed"]),
            status=tags.get(contract.STATUS, "unknown"),
            attempt=int(tags.get(contract.ATTEMPT, 1)),
            steps_per_rollout_batch=int(params.get("optimizer_steps_per_rollout_batch",
                                                   contract.steps_per_rollout_batch(batch_ratio, iterations))),
            start_time=int(run.info.start_time or 0),
            mlflow_status=str(run.info.status),
            diverged_at=int(tags[contract.DIVERGED_AT]) if tags.get(contract.DIVERGED_AT) else None,
            note=tags.get(contract.DIVERGED_REASON) or tags.get(contract.ERROR) or "",
            base_objective=tags["objective"],
            extra_axes=json.dumps(extra_axes(tags), sort_keys=True),
            replicate=tags.get(contract.REPLICATE_HASH, ""),
            budget=_int_param(params, "rollout_batches"),
            eval_every=_int_param(params, "eval_every"),
            val_prompts=_int_param(params, "val_prompts"),
            git_commit=tags.get(contract.GIT_COMMIT, ""),
            git_dirty=tags.get(contract.GIT_DIRTY, ""),
            git_diff_hash=tags.get(contract.GIT_DIFF_HASH, ""),
            steps_ok=tags.get(contract.STEPS_OK, ""),
            params=json.dumps({k: v for k, v in sorted(params.items()) if k not in _per_run(params)}),
        )
    except (KeyError, ValueError) as e:
        # Not a job of the harness (or a broken one): say so rather than guess its place in the grid.
        log.warning("skipping run %s: missing or malformed tag %s", run.info.run_id, e)
        return None
    if info.steps_per_rollout_batch < 1:
        log.warning("skipping run %s: optimizer_steps_per_rollout_batch < 1", info.run_id)
        return None
    return info


def runs_frame(infos: list[RunInfo]) -> pd.DataFrame:
    cols = [f.name for f in dataclasses.fields(RunInfo)]
    return pd.DataFrame([dataclasses.asdict(i) for i in infos], columns=cols)


def choose_attempts(infos: list[RunInfo]) -> tuple[list[RunInfo], list[RunInfo]]:
    """(chosen, excluded): per cell the latest usable attempt; for cells with none, their latest attempt."""
    by_cell: dict[str, list[RunInfo]] = {}
    for info in infos:
        by_cell.setdefault(info.cell, []).append(info)
    chosen, excluded = [], []
    for attempts in by_cell.values():
        attempts.sort(key=lambda i: (i.attempt, i.start_time))
        usable = [i for i in attempts if i.usable]
        (chosen if usable else excluded).append(usable[-1] if usable else attempts[-1])
    key = lambda i: (i.objective, i.batch_ratio, i.iterations, i.seed, i.cell)  # noqa: E731 - stable order
    return sorted(chosen, key=key), sorted(excluded, key=key)
