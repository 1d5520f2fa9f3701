"""The study where users browse it, the MLflow UI: a regenerated report attached to the sweep's runs, and
published runs loaded into a store.

- `attach`: after `figures` read the runs from MLflow, the report, tables and figures are logged as artifacts
  (under `study/`) of the study's newest sweep parent run, and the experiment's description says where the
  verdict is; someone browsing the runs finds the verdict next to them.
- `import_published`: `python -m analysis import STUDY --scale S` loads the runs published under
  results/STUDY/S/runs/ into an MLflow store, as experiment `STUDY/S (published)`: a name of its own, so a
  later analysis of the study's own experiment never mixes the copies with the runs. Each copy carries
  `harness.source_run` (the published run id) and is made once.
"""
from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis.cache import RunCache
from analysis.errors import AnalysisError
from analysis.layout import experiment_name
from analysis.runs import RunInfo
from harness import contract

SOURCE_RUN = "harness.source_run"


def attach(tracking_uri: str, study: str, scale: str, root: Path, verdict: str) -> str | None:
    """Log README.md, tables/ and figures/ under `study/` of the newest sweep parent run; returns its id (None
    when the experiment has no parent run: jobs run without a sweep)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(study, scale))
    if experiment is None:
        return None
    parents = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{contract.SWEEP}` = 'true'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return None
    run_id = parents[0].info.run_id
    client.log_artifact(run_id, str(root / "README.md"), "study")
    for folder in ("tables", "figures"):
        if (root / folder).is_dir():
            client.log_artifacts(run_id, str(root / folder), f"study/{folder}")
    about = experiment.tags.get(contract.DESCRIPTION, "")
    client.set_experiment_tag(experiment.experiment_id, "mlflow.note.content",
                              f"{about}\n\nVerdict:\n{verdict}\n\nReport, tables and figures: artifacts `study/` "
                              f"of the sweep run {run_id}; published under results/{study}/{scale}/.".strip())
    return run_id


def import_published(study: str, scale: str, runs_dir: Path, tracking_uri: str) -> tuple[str, int, int]:
    """(experiment name, runs imported now, runs already there) for the published runs in runs_dir."""
    entries = RunCache(runs_dir).entries(experiment_name(study, scale))
    if not entries:
        raise AnalysisError(f"{runs_dir}: no published runs of {experiment_name(study, scale)!r}; allowed: the "
                            "runs/ folder of a published study (results/STUDY/SCALE/runs)")
    name = f"{experiment_name(study, scale)} (published)"
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(
        name, artifact_location=contract.artifact_location(tracking_uri))
    done = {r.data.tags.get(SOURCE_RUN) for r in client.search_runs([exp_id], max_results=50000)}
    cache, made = RunCache(runs_dir), 0
    for entry in entries:
        info = entry.info
        if info.run_id in done:
            continue
        run = client.create_run(exp_id, start_time=info.start_time or None, tags=_tags(info),
                                run_name=f"{info.objective}-br{info.batch_ratio}-it{info.iterations}-s{info.seed}")
        params = {**json.loads(info.params), "seed": str(info.seed)}
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's caps per call: 100 params, 1000 metrics
            client.log_batch(run.info.run_id, params=items[i:i + 100])
        rows = cache.read(info.run_id)
        metrics = [Metric(m, float(v), info.start_time, int(s)) for s, m, v in rows.itertuples(index=False)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
        client.set_terminated(run.info.run_id, info.mlflow_status)
        made += 1
    return name, made, len(entries) - made


def _tags(info: RunInfo) -> dict[str, str]:
    tags = {"objective": info.base_objective, "batch_ratio": str(info.batch_ratio),
            "iterations": str(info.iterations), "seed": str(info.seed), contract.CELL: info.cell,
            contract.ATTEMPT: str(info.attempt), contract.STATUS: info.status,
            contract.REPLICATE_HASH: info.replicate, contract.STEPS_OK: info.steps_ok,
            contract.GIT_COMMIT: info.git_commit, contract.GIT_DIRTY: info.git_dirty, SOURCE_RUN: info.run_id,
            contract.AXES: json.dumps({**json.loads(info.extra_axes), "objective": info.base_objective,
                                       "batch_ratio": info.batch_ratio, "iterations": info.iterations,
                                       "seed": info.seed}, sort_keys=True)}
    if info.diverged_at is not None:
        tags[contract.DIVERGED_AT] = str(info.diverged_at)
    if info.git_diff_hash:
        tags[contract.GIT_DIFF_HASH] = info.git_diff_hash
    return {k: v for k, v in tags.items() if v != ""}

