"""MLflow side of a sweep: the parent run of each invocation, and runs left RUNNING by killed jobs.

A job SIGKILLed with its worker cannot end its own MLflow run, and MLflow keeps such a run RUNNING for ever
(it never learns that the process died), so the ledger, not MLflow, says what is running and which attempt is
a cell's result: `tidy` brings MLflow in line when a sweep starts and when it ends.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from mlflow.tracking import MlflowClient

from harness import contract, tracking
from harness.redact import redact
from harness.sweep.ledger import HOST, Ledger
from harness.sweep.processes import pid_alive, pid_start
from harness.sweep.spec import Plan


def open_experiment(plan: Plan) -> tuple[MlflowClient, str]:
    """The study's experiment, described where the MLflow UI shows it: what it asks, at which scale, and the
    question its analysis tests."""
    client = tracking.client()
    experiment_id = tracking.ensure_experiment(client, plan.experiment)
    scale = plan.spec.scales[plan.base_scale]
    h = plan.hypothesis
    stage = {"tune": "\n\nTuning stage: each objective's knobs tuned with the same number of Optuna trials on "
                     "tuning seeds; runs tagged harness.tune_study and harness.tune_trial.",
             "compare": "\n\nCompare stage: each objective at its best tuned setting (sweep's parent run "
                        "params tuned.*)."}.get(plan.stage, "")
    about = (f"{plan.spec.description}\n\nScale {plan.scale}: {scale.description}{stage}\n\nDeclared question: "
             f"{h.measure}, each objective against {h.baseline or 'the first objective'}, {h.contrast} over "
             f"{h.cells}, alpha {h.alpha:g}, equivalence margin {h.margin:g}."
             + (f" Confirms the exploration {scale.confirms} on fresh seeds." if scale.confirms else ""))
    for key, value in {contract.DESCRIPTION: about, "mlflow.note.content": about,
                       contract.HYPOTHESIS: h.model_dump_json()}.items():
        client.set_experiment_tag(experiment_id, key, value)
    return client, experiment_id


def start_parent(client: MlflowClient, experiment_id: str, plan: Plan, options: dict[str, Any],
                 ledger_id: str | None = None) -> str:
    """One parent run per `sweep` invocation; jobs nest their runs under it with --parent-run-id."""
    tags = {contract.SWEEP: "true", contract.STUDY: plan.study, contract.SCALE: plan.scale,
            contract.HOST: HOST, contract.PID: str(os.getpid()),
            contract.PID_START: str(pid_start(os.getpid())),
            "mlflow.note.content": plan.spec.description, **tracking.git_state(),
            **({contract.LEDGER: ledger_id} if ledger_id else {})}
    run = client.create_run(experiment_id,
                            run_name=f"sweep {plan.experiment} {time.strftime('%Y-%m-%d %H:%M')}", tags=tags)
    params = {"spec": str(plan.spec_path), "scale": plan.scale, "cells": str(len(plan.cells)),
              "rollout_batches": str(plan.base["rollout_batches"]), "seeds": json.dumps(plan.seeds),
              "axes": json.dumps(plan.axes)[:6000],
              "scale_description": plan.spec.scales[plan.base_scale].description, "stage": plan.stage,
              **{f"tuned.{o}.{k}": str(v) for o, knobs in plan.tuned.items() for k, v in knobs.items()},
              **{k: redact(str(v)) for k, v in options.items()}}  # the ledger URL among them: no password
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    client.log_artifact(run.info.run_id, str(plan.spec_path))
    for extended in sorted({e for e in (plan.spec.extends, plan.spec.scales[plan.base_scale].extends) if e}):
        client.log_artifact(run.info.run_id, str(plan.spec_path.parent / extended), "extends")
    return run.info.run_id


def end_parent(client: MlflowClient, run_id: str, status: str, counts: dict[str, int]) -> None:
    for k, v in counts.items():
        client.log_metric(run_id, f"cells/{k}", v)
    client.set_terminated(run_id, status)


def tidy(client: MlflowClient, experiment_id: str, ledger: Ledger) -> dict[str, list[str]]:
    """Make MLflow say what the ledger says; called only by the sweep's one driver, at its start and its end.

    - A sweep run left RUNNING whose attempt is not live in the ledger: KILLED, or FINISHED when the ledger
      adopted that attempt as the cell's result (its job was killed between its last metric and its run's
      end).
    - Any other parent run left RUNNING: a dead driver's, KILLED.
    - A complete/diverged run of a cell whose counted attempt is another one: tagged
      harness.status=superseded, so that the analysis finds exactly one result per cell (only a worker cut off
      from the ledger, whose attempt was failed meanwhile, can leave one).
    Only this ledger's runs (tag harness.ledger): the experiment may hold an earlier ledger's (its folder
    wiped) or a second ledger's, whose cells and attempts this ledger knows nothing of; a parent run of
    another ledger is closed only when its driver, on this machine, is gone.
    """
    live, counted = ledger.live_attempts(), ledger.completed_attempts()
    ours = ledger.ledger_id
    done: dict[str, list[str]] = {"killed": [], "finished": [], "superseded": []}
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=10000):
        tags = run.data.tags
        if tags.get(contract.SWEEP) == "true":
            if tags.get(contract.LEDGER) == ours or _driver_gone(tags):
                _close(client, run.info.run_id, "KILLED", None)
                done["killed"].append(run.info.run_id)
            continue
        key = _attempt(tags, ours)
        if key is None or key in live:
            continue  # not this ledger's run (none of our business), or still running
        if counted.get(key[0]) == key[1]:
            _close(client, run.info.run_id, "FINISHED", None)
            done["finished"].append(run.info.run_id)
        else:
            still_running = tags.get(contract.STATUS) == contract.RUNNING
            _close(client, run.info.run_id, "KILLED", contract.KILLED if still_running else None)
            done["killed"].append(run.info.run_id)
    for status in contract.FINISHED:
        for run in client.search_runs([experiment_id], filter_string=f"tags.`{contract.STATUS}` = '{status}'",
                                      max_results=10000):
            key = _attempt(run.data.tags, ours)
            if key is not None and key[0] in counted and counted[key[0]] != key[1]:
                client.set_tag(run.info.run_id, contract.STATUS, contract.SUPERSEDED)
                client.set_tag(run.info.run_id, contract.SUPERSEDED_WHY,
                               f"the ledger counts attempt {counted[key[0]]}")
                done["superseded"].append(run.info.run_id)
    return done


def _attempt(tags: dict[str, str], ledger_id: str | None) -> tuple[str, int] | None:
    """(cell, attempt) of a job run of this ledger's; None for a run no sweep made, or another ledger's."""
    identity = contract.RunIdentity.from_tags(tags)
    if identity is None or identity.ledger != ledger_id:
        return None
    return identity.cell, identity.attempt


def _driver_gone(tags: dict[str, str]) -> bool:
    """Whether the driver of a parent run ran on this machine and is gone."""
    start = tags.get(contract.PID_START)
    return (tags.get(contract.HOST) == HOST and (tags.get(contract.PID) or "").isdigit()
            and not pid_alive(int(tags[contract.PID]), None if start in (None, "None") else start))


def _close(client: MlflowClient, run_id: str, status: str, status_tag: str | None) -> None:
    if status_tag:
        client.set_tag(run_id, contract.STATUS, status_tag)
    client.set_terminated(run_id, status)
