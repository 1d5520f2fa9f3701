"""Time regenerating all figures and tables (and the README) from a cold store vs a warm cache.

cold: an empty analysis cache, so every run's metric histories are read from MLflow (and then cached);
warm: the same cache again, so MLflow is asked for the run listing only. The OS file cache is not dropped:
"cold" is about the analysis cache, not the disk. Everything is written to a temporary folder, so timing a
real study leaves results/ untouched. Without a study name, a synthetic study is built first (not timed).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from analysis.errors import AnalysisError
from analysis.layout import default_tracking_uri, missing_sqlite_file
from analysis.pipeline import Outputs, regenerate
from analysis.synthetic import make_study


@dataclasses.dataclass(frozen=True)
class Timing:
    total_s: float
    phases: dict[str, float]  # load, analyse, tables, figures, report
    fetched_runs: int  # runs read from MLflow
    cached_runs: int  # runs read from the cache

    @classmethod
    def of(cls, out: Outputs) -> Timing:
        return cls(sum(out.seconds.values()), dict(out.seconds), out.data.fetched_runs, out.data.cached_runs)


@dataclasses.dataclass(frozen=True)
class BenchResult:
    study: str
    scale: str
    runs: int
    cold: Timing
    warm: Timing

    @property
    def ratio(self) -> float:
        """cold / warm wall time of a full regeneration: how much the cache saves."""
        return self.cold.total_s / self.warm.total_s

    @property
    def load_ratio(self) -> float:
        return self.cold.phases["load"] / self.warm.phases["load"]

    def describe(self) -> str:
        phases = lambda t: ", ".join(f"{k} {v:.2f}s" for k, v in t.phases.items())  # noqa: E731
        return "\n".join([
            f"{self.study}/{self.scale}: {self.runs} runs, all figures + tables + README",
            f"cold store: {self.cold.total_s:.2f}s ({phases(self.cold)}; {self.cold.fetched_runs} runs from MLflow)",
            f"warm cache: {self.warm.total_s:.2f}s ({phases(self.warm)}; {self.warm.cached_runs} runs from cache)",
            f"ratio cold/warm: {self.ratio:.2f}x overall, {self.load_ratio:.1f}x for loading",
        ])


def benchmark(study: str | None = None, scale: str = "proxy", *, tracking_uri: str | None = None,
              results_dir: str | Path = "results", repeats: int = 1) -> BenchResult:
    """Cold then warm regeneration, `repeats` times each (fastest kept); a synthetic study when study is None."""
    with tempfile.TemporaryDirectory(prefix="analysis-bench-") as tmp:
        tmp = Path(tmp)
        if study is None:
            study, uri = "bench", f"sqlite:///{tmp / 'mlflow.db'}"
            make_study(uri, study, scale)
        else:
            uri = tracking_uri or default_tracking_uri(results_dir)
            if missing_sqlite_file(uri):  # opening it would create an empty store
                raise AnalysisError(f"no MLflow store at {uri}")
        cold, warm = [], []
        for i in range(max(1, repeats)):
            cache = tmp / f"cache{i}"  # fresh per repeat: the cold run must find it empty
            kwargs = dict(results_dir=tmp / "out", tracking_uri=uri, cache_dir=cache, offline=False)
            cold.append(Timing.of(out := regenerate(study, scale, **kwargs)))
            warm.append(Timing.of(regenerate(study, scale, **kwargs)))
        fastest = lambda ts: min(ts, key=lambda t: t.total_s)  # noqa: E731
        return BenchResult(study, scale, len(out.data.runs), fastest(cold), fastest(warm))
