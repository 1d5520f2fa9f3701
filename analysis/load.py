"""A study at one scale, from MLflow (or the cache), as one long table: one row per (run, metric, step).

Only the chosen attempt of each cell is loaded (see analysis.runs); failed and running cells come back in
`StudyData.excluded`, to be listed, never plotted. Finished runs are read from the parquet cache when it
has them, so a warm regeneration costs one `search_runs` call; without a store (a `sqlite:///` file that
does not exist, or `offline=True`) the cache alone is read.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from analysis.cache import METRIC_COLUMNS, RunCache
from analysis.errors import AnalysisError
from analysis.layout import experiment_name, missing_sqlite_file
from analysis.metrics import ALL_KEYS
from analysis.pooling import check_replicates, select
from analysis.runs import RunInfo, choose_attempts, run_info, runs_frame

log = logging.getLogger(__name__)

LONG_COLUMNS = ["run_id", "cell", "objective", "batch_ratio", "iterations", "seed", "status", "step",
                "rollout_batch", "metric", "value"]
# The sqlite store cannot hold ±Inf and stores ±(largest float64) instead; map them back so Inf stays Inf.
_FLOAT_MAX = np.finfo(np.float64).max


@dataclasses.dataclass
class StudyData:
    study: str
    scale: str
    long: pd.DataFrame  # LONG_COLUMNS, sorted by run, metric, step
    runs: pd.DataFrame  # one row per chosen run (RunInfo fields)
    excluded: pd.DataFrame  # latest attempt of each cell with no complete/diverged attempt (RunInfo fields)
    source: str  # the tracking URI, or "cache <folder>" when MLflow was not read
    fetched_runs: int = 0  # runs whose metric histories were read from MLflow
    cached_runs: int = 0  # runs read from the cache

    @property
    def experiment(self) -> str:
        return experiment_name(self.study, self.scale)

    def metric(self, key: str) -> pd.DataFrame:
        return self.long[self.long["metric"] == key]

    def runs_with(self, key: str) -> set[str]:
        return set(self.long.loc[self.long["metric"] == key, "run_id"].unique())

    def require(self, keys: Iterable[str]) -> None:
        """AnalysisError for a key no run logged; a warning for one only some runs logged."""
        for key in keys:
            have = self.runs_with(key)
            if not have:
                raise AnalysisError(f"metric {key!r} was not logged by any of the {len(self.runs)} runs of "
                                    f"{self.experiment!r} ({self.source})")
            if len(have) < len(self.runs):
                missing = sorted(set(self.runs["run_id"]) - have)
                log.warning("metric %r missing from %d of %d runs: %s", key, len(missing), len(self.runs),
                            ", ".join(missing))


def load_study(study: str, scale: str, *, tracking_uri: str, cache_dir: str | Path,
               keys: Iterable[str] = ALL_KEYS, offline: bool | None = None, only: Mapping[str, str] | None = None,
               validate: Callable[[list[RunInfo]], None] | None = None) -> StudyData:
    """Load the chosen attempt of every cell of `study` at `scale` (see the module docstring).

    offline: None reads MLflow unless the tracking URI is a sqlite file that does not exist; True reads the
    cache only; False always reads MLflow. only: keep runs whose params match (analysis.pooling.select).
    The chosen runs must be replicates line by line (analysis.pooling.check_replicates); `validate` may
    refuse them too. Both run before anything is read into or written to the cache.
    """
    keys = set(keys)
    cache = RunCache(cache_dir)
    name = experiment_name(study, scale)
    missing = missing_sqlite_file(tracking_uri)
    if offline or (offline is None and missing is not None):
        why = "offline (MLflow not read)" if offline else f"no MLflow store at {missing}"
        return _from_cache(study, scale, cache, keys, why, only or {}, validate)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise AnalysisError(f"no MLflow experiment {name!r} at {tracking_uri}: is the study name or scale wrong?")
    all_runs = _search_all(client, experiment.experiment_id)
    logged = {r.info.run_id: set(r.data.metrics) for r in all_runs}  # latest values: which keys each run has
    chosen, excluded = choose_attempts(select([i for i in map(run_info, all_runs) if i is not None], only or {}))
    if not chosen:
        raise AnalysisError(f"study {name!r} has no complete or diverged runs at {tracking_uri} "
                            f"({len(excluded)} failed or running cells)")
    _validate(chosen, validate)

    frames, fetched, cached = [], 0, 0
    for info in chosen:
        if info.final and cache.covers(info.run_id, keys):
            rows = cache.read(info.run_id, keys)
            cached += 1
        else:
            rows = _fetch_history(client, info.run_id, keys & logged[info.run_id])
            fetched += 1
            if info.final:
                cache.write(name, info, keys, rows)
        frames.append(_with_run_columns(rows, info))
    cache.write_excluded(name, excluded)
    return _study(study, scale, frames, chosen, excluded, tracking_uri, fetched, cached)


def _validate(chosen: list[RunInfo], validate: Callable[[list[RunInfo]], None] | None) -> None:
    check_replicates(chosen)
    if validate is not None:
        validate(chosen)


def _from_cache(study: str, scale: str, cache: RunCache, keys: set[str], why: str, only: Mapping[str, str],
                validate: Callable[[list[RunInfo]], None] | None) -> StudyData:
    name = experiment_name(study, scale)
    entries = cache.entries(name)
    if not entries:
        raise AnalysisError(f"{why}, and no cached runs of {name!r} in {cache.folder}")
    # The cache holds finished runs only, so each cell's latest cached attempt is its latest usable one
    # as of the last load that reached MLflow.
    chosen, _ = choose_attempts(select([e.info for e in entries], only))
    if not chosen:
        raise AnalysisError(f"{why}, and no cached run of {name!r} matches --only")
    _validate(chosen, validate)
    by_id = {e.info.run_id: e for e in entries}
    stale = sorted(i.run_id for i in chosen if not keys <= by_id[i.run_id].keys)
    if stale:
        log.warning("%d cached runs lack some metric keys (load once with MLflow to refresh): %s",
                    len(stale), ", ".join(stale))
    frames = [_with_run_columns(cache.read(i.run_id, keys), i) for i in chosen]
    return _study(study, scale, frames, chosen, cache.read_excluded(name), f"cache {cache.folder}", 0, len(chosen))


def _study(study: str, scale: str, frames: list[pd.DataFrame], chosen: list[RunInfo], excluded: list[RunInfo],
           source: str, fetched: int, cached: int) -> StudyData:
    grid = runs_frame(chosen)
    long = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LONG_COLUMNS)
    return StudyData(study, scale, long[LONG_COLUMNS], grid, runs_frame(excluded), source, fetched, cached)


def _search_all(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _fetch_history(client: MlflowClient, run_id: str, keys: set[str]) -> pd.DataFrame:
    """Rows (step, metric, value); a step logged twice keeps its last value (by timestamp)."""
    records = [(m.step, key, m.value, m.timestamp)
               for key in sorted(keys) for m in client.get_metric_history(run_id, key)]
    df = pd.DataFrame.from_records(records, columns=["step", "metric", "value", "timestamp"])
    df = (df.sort_values(["metric", "step", "timestamp"], kind="stable")
            .drop_duplicates(["metric", "step"], keep="last"))
    value = df["value"].to_numpy(dtype=float)
    df["value"] = np.where(np.abs(value) >= _FLOAT_MAX, np.copysign(np.inf, value), value)
    df["step"] = df["step"].astype("int64")
    return df[METRIC_COLUMNS].reset_index(drop=True)


def _with_run_columns(rows: pd.DataFrame, info: RunInfo) -> pd.DataFrame:
    out = rows.copy()
    for col in ("run_id", "cell", "objective", "batch_ratio", "iterations", "seed", "status"):
        out[col] = getattr(info, col)
    # Rollout batches completed at step s = s / (optimizer steps per rollout batch): the common time axis.
    out["rollout_batch"] = out["step"] / info.steps_per_rollout_batch
    return out.sort_values(["metric", "step"], kind="stable")
