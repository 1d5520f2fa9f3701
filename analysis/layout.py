"""Where a study's outputs live: results/<study>/<scale>/{README.md,figures,tables,runs}, all of it published.

`runs/` holds one parquet file per finished run (its RunInfo, params, tags and the metric curves the analysis
reads; analysis.cache): the runs travel with the results, so a fresh clone, with no MLflow store, regenerates
every figure, table and the report from them with the same command."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class StudyPaths:
    root: Path  # results/<study>/<scale>
    cache: Path  # runs/: per-run parquet files of finished runs (published with the study)
    figures: Path
    tables: Path

    @property
    def readme(self) -> Path:
        return self.root / "README.md"


def study_paths(results_dir: str | Path, study: str, scale: str, cache_dir: str | Path | None = None) -> StudyPaths:
    root = Path(results_dir) / study / scale
    return StudyPaths(
        root=root,
        cache=Path(cache_dir) if cache_dir is not None else root / "runs",
        figures=root / "figures",
        tables=root / "tables",
    )


def experiment_name(study: str, scale: str) -> str:
    """The sweep logs a study at one scale to this MLflow experiment."""
    return f"{study}/{scale}"


def default_tracking_uri(results_dir: str | Path) -> str:
    """Same rule as the harness: MLFLOW_TRACKING_URI if set, else the sqlite store inside the results folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(results_dir) / 'mlflow.db'}"


def missing_sqlite_file(tracking_uri: str) -> Path | None:
    """The sqlite file a `sqlite:///` URI names, when that file does not exist (else None).

    Opening such a URI would create an empty store as a side effect; the loader uses the cache instead.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = Path(tracking_uri[len(prefix):].split("?", 1)[0])
    return None if str(path) == ":memory:" or path.exists() else path
