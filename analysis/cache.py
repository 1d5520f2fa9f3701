"""Per-run parquet cache of finished runs, so regenerating never asks MLflow again for what cannot change.

Layout of the cache folder (by default results/<study>/<scale>/runs/, committed with the study):
- `<run_id>.parquet`: the run's metric rows (step, metric, value); the parquet schema metadata holds
  the RunInfo and the metric keys that were fetched (a key the run never logged is fetched-and-absent).
- `excluded.json`: per experiment, the failed/running cells seen by the last load that reached MLflow, so
  a report made from the cache alone still lists them.

Only `RunInfo.final` runs are stored. An entry is reused when its format version matches and it was fetched
with every key now asked for; otherwise the run is fetched again and the entry replaced.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.runs import RunInfo

FORMAT_VERSION = 2  # bump when the stored rows or metadata change meaning
_META_KEY = b"analysis.run"
METRIC_COLUMNS = ["step", "metric", "value"]


@dataclasses.dataclass(frozen=True)
class CachedRun:
    experiment: str  # MLflow experiment name ("study/scale"): a cache folder may be shared between studies
    info: RunInfo
    keys: frozenset[str]  # metric keys that were fetched


class RunCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.runs_dir = self.folder

    def _path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.parquet"

    def entry(self, run_id: str) -> CachedRun | None:
        """The cached run's metadata (reads the parquet footer only), or None if absent or of another format."""
        path = self._path(run_id)
        if not path.exists():
            return None
        meta = json.loads((pq.read_schema(path).metadata or {}).get(_META_KEY, b"{}"))
        if meta.get("version") != FORMAT_VERSION:
            return None
        return CachedRun(meta["experiment"], RunInfo(**meta["info"]), frozenset(meta["keys"]))

    def covers(self, run_id: str, keys: set[str]) -> bool:
        entry = self.entry(run_id)
        return entry is not None and keys <= entry.keys

    def read(self, run_id: str, keys: set[str] | None = None) -> pd.DataFrame:
        """Metric rows (step, metric, value) of a cached run, restricted to `keys` when given."""
        filters = [("metric", "in", sorted(keys))] if keys is not None else None
        return pd.read_parquet(self._path(run_id), columns=METRIC_COLUMNS, filters=filters)

    def write(self, experiment: str, info: RunInfo, keys: set[str], rows: pd.DataFrame) -> None:
        """Store a final run; written to a temporary file and renamed, so a crash never leaves half an entry."""
        if not info.final:
            raise ValueError(f"run {info.run_id} is not finished ({info.status}, {info.mlflow_status}); not cached")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(rows[METRIC_COLUMNS], preserve_index=False)
        meta = {"version": FORMAT_VERSION, "experiment": experiment, "info": dataclasses.asdict(info),
                "keys": sorted(keys)}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(meta)})
        path = self._path(info.run_id)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def entries(self, experiment: str) -> list[CachedRun]:
        """Every usable entry of one experiment: what a load without MLflow sees."""
        if not self.runs_dir.exists():
            return []
        found = (self.entry(p.stem) for p in sorted(self.runs_dir.glob("*.parquet")))
        return [e for e in found if e is not None and e.experiment == experiment]

    def _excluded_path(self) -> Path:
        return self.folder / "excluded.json"

    def write_excluded(self, experiment: str, infos: list[RunInfo]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._excluded_path()
        listing = json.loads(path.read_text()) if path.exists() else {}
        listing[experiment] = [dataclasses.asdict(i) for i in infos]
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(listing, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def read_excluded(self, experiment: str) -> list[RunInfo]:
        path = self._excluded_path()
        listing = json.loads(path.read_text()) if path.exists() else {}
        return [RunInfo(**d) for d in listing.get(experiment, [])]
