"""MLflow side of a sweep: the parent run of each invocation, and runs left RUNNING by killed jobs.

A job SIGKILLed with its worker cannot end its own MLflow run, and MLflow keeps it RUNNING for ever (NOTES §5),
so the ledger, not MLflow, says what is running and which attempt is a cell's result: `tidy` brings MLflow in
line when a sweep starts and when it ends.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from mlflow.tracking import MlflowClient

from harness import tracking
from harness.sweep.adopt import USABLE
from harness.sweep.ledger import HOST, Ledger
from harness.sweep.processes import pid_start
from harness.sweep.spec import Plan


def open_experiment(plan: Plan) -> tuple[MlflowClient, str]:
    client = tracking.client()
    return client, tracking.ensure_experiment(client, plan.experiment)


def start_parent(client: MlflowClient, experiment_id: str, plan: Plan, options: dict[str, Any]) -> str:
    """One parent run per `sweep` invocation; jobs nest their runs under it with --parent-run-id."""
    tags = {"harness.sweep": "true", "harness.study": plan.study, "harness.scale": plan.scale,
            "harness.host": HOST, "harness.pid": str(os.getpid()), "harness.pid_start": str(pid_start(os.getpid())),
            "mlflow.note.content": plan.spec.description, **tracking.git_state()}
    run = client.create_run(experiment_id, run_name=f"sweep {plan.experiment} {time.strftime('%Y-%m-%d %H:%M')}",
                            tags=tags)
    params = {"spec": str(plan.spec_path), "scale": plan.scale, "cells": str(len(plan.cells)),
              "rollout_batches": str(plan.base["rollout_batches"]), "seeds": json.dumps(plan.seeds),
              "axes": json.dumps(plan.axes)[:6000],
              "scale_description": plan.spec.scales.get(plan.scale).description,
              **{k: str(v) for k, v in options.items()}}
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    client.log_artifact(run.info.run_id, str(plan.spec_path))
    return run.info.run_id


def end_parent(client: MlflowClient, run_id: str, status: str, counts: dict[str, int]) -> None:
    for k, v in counts.items():
        client.log_metric(run_id, f"cells/{k}", v)
    client.set_terminated(run_id, status)


def tidy(client: MlflowClient, experiment_id: str, ledger: Ledger) -> dict[str, list[str]]:
    """Make MLflow say what the ledger says; called only by the sweep's one driver, at its start and its end.

    - A sweep run left RUNNING whose attempt is not live in the ledger: KILLED, or FINISHED when the ledger
      adopted that attempt as the cell's result (its job was killed between its last metric and its run's end).
    - Any other parent run left RUNNING: a dead driver's, KILLED.
    - A complete/diverged run of a cell whose counted attempt is another one: tagged harness.status=superseded,
      so that the analysis finds exactly one result per cell (only a worker cut off from the ledger, whose
      attempt was failed meanwhile, can leave one).
    """
    live, counted = ledger.live_attempts(), ledger.completed_attempts()
    done: dict[str, list[str]] = {"killed": [], "finished": [], "superseded": []}
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=10000):
        tags = run.data.tags
        if tags.get("harness.sweep") == "true":
            _close(client, run.info.run_id, "KILLED", None)
            done["killed"].append(run.info.run_id)
            continue
        key = _attempt(tags)
        if key is None or key in live:
            continue  # not a sweep's run (none of our business), or still running
        if counted.get(key[0]) == key[1]:
            _close(client, run.info.run_id, "FINISHED", None)
            done["finished"].append(run.info.run_id)
        else:
            _close(client, run.info.run_id, "KILLED", "killed" if tags.get("harness.status") == "running" else None)
            done["killed"].append(run.info.run_id)
    for status in USABLE:
        for run in client.search_runs([experiment_id], filter_string=f"tags.`harness.status` = '{status}'",
                                      max_results=10000):
            key = _attempt(run.data.tags)
            if key is not None and key[0] in counted and counted[key[0]] != key[1]:
                client.set_tag(run.info.run_id, "harness.status", "superseded")
                client.set_tag(run.info.run_id, "harness.superseded", f"the ledger counts attempt {counted[key[0]]}")
                done["superseded"].append(run.info.run_id)
    return done


def _attempt(tags: dict[str, str]) -> tuple[str, int] | None:
    if "harness.cell" not in tags:
        return None
    try:
        return tags["harness.cell"], int(tags.get("harness.attempt", "-1"))
    except ValueError:
        return tags["harness.cell"], -1


def _close(client: MlflowClient, run_id: str, status: str, status_tag: str | None) -> None:
    if status_tag:
        client.set_tag(run_id, "harness.status", status_tag)
    client.set_terminated(run_id, status)
