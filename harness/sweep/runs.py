"""MLflow side of a sweep: the parent run of each invocation, and runs left RUNNING by killed jobs.

A job SIGKILLed with its worker cannot end its own MLflow run, and MLflow keeps it RUNNING for ever (NOTES §5),
so the ledger, not MLflow, says what is running: a sweep run whose cell attempt is not live in the ledger is
marked KILLED when the next sweep starts and when this one ends.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from mlflow.tracking import MlflowClient

from harness import tracking
from harness.sweep.ledger import HOST, Ledger, pid_start
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
              "scale_description": getattr(plan.spec.scales, plan.scale).description,
              **{k: str(v) for k, v in options.items()}}
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    client.log_artifact(run.info.run_id, str(plan.spec_path))
    return run.info.run_id


def end_parent(client: MlflowClient, run_id: str, status: str, counts: dict[str, int]) -> None:
    for k, v in counts.items():
        client.log_metric(run_id, f"cells/{k}", v)
    client.set_terminated(run_id, status)


def kill_orphans(client: MlflowClient, experiment_id: str, ledger: Ledger, keep: str | None) -> list[str]:
    """Mark KILLED every RUNNING sweep run of the experiment that nothing is running any more.

    Called only while this process is the sweep's one driver, so any other parent run left RUNNING is stale.
    """
    live = ledger.live_attempts()
    killed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=10000):
        tags = run.data.tags
        if run.info.run_id == keep:
            continue
        if tags.get("harness.sweep") == "true":
            orphan = True
        elif "harness.cell" in tags:
            try:
                orphan = (tags["harness.cell"], int(tags.get("harness.attempt", "-1"))) not in live
            except ValueError:
                orphan = True
        else:
            continue  # not a sweep's run: none of our business
        if orphan:
            if tags.get("harness.status") == "running":
                client.set_tag(run.info.run_id, "harness.status", "killed")
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed
