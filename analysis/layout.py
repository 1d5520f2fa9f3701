"""Where a study's outputs live: results/<study>/<scale>/{README.md,figures,tables,runs}, all of it published.

`runs/` holds one parquet file per finished run (its RunInfo, params, tags and the metric curves the analysis
reads; analysis.cache): the runs travel with the results, so a fresh clone, with no MLflow store, regenerates
every figure, table and the report from them with the same command."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from analysis.errors import AnalysisError
from harness import contract

# Studies written here are published with the repository: their runs must come from committed code.
PUBLISHED_ROOT = Path(__file__).resolve().parents[1] / "results"


def is_published(folder: str | Path) -> bool:
    return Path(folder).resolve().is_relative_to(PUBLISHED_ROOT.resolve())


@dataclasses.dataclass(frozen=True)
class StudyPaths:
    root: Path  # results/<study>/<scale>
    cache: Path  # runs/: per-run parquet files of finished runs (published with the study)
    figures: Path
    tables: Path
    tune_cache: Path  # tune/runs/: the runs of a tuned scale's tuning stage (analysis.tuning)

    @property
    def readme(self) -> Path:
        return self.root / "README.md"


def study_paths(results_dir: str | Path, study: str, scale: str, cache_dir: str | Path | None = None) -> StudyPaths:
    root = contract.sweep_dir(results_dir, study, scale)
    return StudyPaths(
        root=root,
        cache=Path(cache_dir) if cache_dir is not None else root / "runs",
        figures=root / "figures",
        tables=root / "tables",
        tune_cache=Path(cache_dir) / "tune" if cache_dir is not None else root / "tune" / "runs",
    )


experiment_name = contract.experiment_name  # the sweep logs a study at one scale to this MLflow experiment


def resolve_scale(results_dir: str | Path, study: str, scale: str, tracking_uri: str | None = None) -> str:
    """`auto`: the one scale of `study` under the results folder (a ledger or published runs), as the harness's
    `--scale auto` takes the scale whose ledger is there; failing that, the one MLflow experiment `study/<scale>`.
    Any other value is returned as given."""
    if scale != "auto":
        return scale
    root = Path(results_dir) / study
    found = sorted(d.name for d in root.glob("*") if (d / "runs").is_dir() or (d / "ledger.journal").exists())
    uri = tracking_uri or default_tracking_uri(results_dir)
    if not found and missing_sqlite_file(uri) is None:
        from mlflow import MlflowClient

        names = [e.name for e in MlflowClient(uri).search_experiments(filter_string=f"name LIKE '{study}/%'")]
        found = sorted(n.split("/", 1)[1] for n in names if n.startswith(f"{study}/"))
    if len(found) != 1:
        raise AnalysisError(f"--scale auto: {study} has {'no' if not found else len(found)} scales under {root}; "
                            f"allowed: pass --scale with {', '.join(found) or 'the scale the sweep ran at'}")
    return found[0]


def default_tracking_uri(results_dir: str | Path) -> str:
    """The harness's rule (harness.contract.tracking_uri) for this results folder."""
    return contract.tracking_uri(results_dir)


def missing_sqlite_file(tracking_uri: str) -> Path | None:
    """The sqlite file a `sqlite:///` URI names, when that file does not exist (else None).

    Opening such a URI would create an empty store as a side effect; the loader uses the cache instead.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = Path(tracking_uri[len(prefix):].split("?", 1)[0])
    return None if str(path) == ":memory:" or path.exists() else path
