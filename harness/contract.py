"""The run contract: what a job writes, the sweep settles and the analysis reads, defined once.

Three parts of the project meet in MLflow runs and files under the results root: a job (harness.job) creates
a run and writes its result, the sweep (harness.sweep) tags, adopts or supersedes it, the analysis (analysis/)
reads it. Every name they share lives here: run statuses, `harness.*` tags with a typed identity, the study
layout on disk, the tracking-URI rule, the metric keys, and two grid facts. Standard library only, so that the
analysis (which imports nothing else of the harness) and a sweep worker's start-up stay light.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

# --- run statuses: the harness.status tag and a result file's `status` ---------------------------------------
RUNNING = "running"
COMPLETE = "complete"
DIVERGED = "diverged"  # stopped by the divergence guard: a finding, not a failure
FAILED = "failed"
KILLED = "killed"
SUPERSEDED = "superseded"  # a result of a cell whose ledger counts another attempt
PRUNED = "pruned"  # a tuning trial's job stopped early by its pruner: settled, never retried (harness.pruning)
FINISHED = (COMPLETE, DIVERGED, PRUNED)  # the statuses that are results


def is_result(status: str | None) -> bool:
    return status in FINISHED


# --- harness.* tags on a job's MLflow run ----------------------------------------------------------------------
STATUS = "harness.status"
STUDY = "harness.study"
SCALE = "harness.scale"
CELL = "harness.cell"  # the job's config hash, seed included (set by the sweep)
ATTEMPT = "harness.attempt"  # 1-based attempt number at the cell
# the id of the ledger whose attempt the run is: only that ledger adopts or tidies it (harness.sweep.adopt)
LEDGER = "harness.ledger"
AXES = "harness.axes"  # JSON of the cell's axis values, seed included
GPUS_PER_JOB = "harness.gpus_per_job"
DEEPSPEED = "harness.deepspeed"
CONFIG_HASH = "harness.config_hash"  # set by the job itself (equals CELL for a sweep's job)
REPLICATE_HASH = "harness.replicate_hash"  # the config hash without the seed: the seeds of one line share it
DEVICE = "harness.device"
STEPS_OK = "harness.steps_per_rollout_batch_ok"  # "false": some rollout batch got more or fewer optimizer steps
DIVERGED_AT = "harness.diverged_at"
DIVERGED_REASON = "harness.diverged_reason"
ERROR = "harness.error"
SUPERSEDED_WHY = "harness.superseded"
PRUNED_AT = "harness.pruned_at"  # rollout batches completed when the pruner stopped the job
# --- a tuning trial's job (harness.sweep.tuning): which Optuna study and trial its sampled knobs came from
TUNE_STUDY = "harness.tune_study"
TUNE_TRIAL = "harness.tune_trial"
# set by a sweep worker for a tuning trial's job: JSON {storage, study, trial_id, job, jobs, pruner}
TUNE_ENV = "HARNESS_TUNE"
# --- code identity of the tree a job ran from (harness.tracking.git_state)
GIT_COMMIT = "git.commit"
GIT_DIRTY = "git.dirty"  # "true" when tracked or untracked source files differ from the commit
GIT_DIFF_HASH = "git.diff_hash"  # sha256 of the diff against the commit (untracked source files included)
# --- on a study's MLflow experiment
DESCRIPTION = "harness.description"  # what the study asks, its scale, its declared question
HYPOTHESIS = "harness.hypothesis"  # the declared question (JSON)
# --- on a sweep invocation's parent run
SWEEP = "harness.sweep"  # "true" on the parent run (no metrics)
HOST = "harness.host"
PID = "harness.pid"
PID_START = "harness.pid_start"


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """Which attempt of which cell of which sweep a job's run is: the tags a sweep worker passes to its job."""

    study: str
    scale: str
    cell: str
    attempt: int
    axes: dict[str, Any]
    gpus_per_job: int = 1
    deepspeed: str | None = None  # only for multi-process jobs
    ledger: str | None = None  # the ledger's id (None: a ledger made before ledgers had ids)

    def to_tags(self) -> dict[str, str]:
        tags = {STUDY: self.study, SCALE: self.scale, CELL: self.cell, ATTEMPT: str(self.attempt),
                GPUS_PER_JOB: str(self.gpus_per_job), AXES: json.dumps(self.axes, sort_keys=True)}
        if self.gpus_per_job > 1:
            tags[DEEPSPEED] = str(self.deepspeed)
        if self.ledger:
            tags[LEDGER] = self.ledger
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> RunIdentity | None:
        """The identity of a sweep's run; None for a run no sweep made (no cell tag)."""
        if CELL not in tags:
            return None
        try:
            axes = json.loads(tags.get(AXES) or "{}")
        except ValueError:  # a hand-made tag: the identity stands without it
            axes = {}
        return cls(study=tags.get(STUDY, ""), scale=tags.get(SCALE, ""), cell=tags[CELL],
                   attempt=_int(tags.get(ATTEMPT), -1), axes=axes if isinstance(axes, dict) else {},
                   gpus_per_job=_int(tags.get(GPUS_PER_JOB), 1), deepspeed=tags.get(DEEPSPEED),
                   ledger=tags.get(LEDGER))


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


# --- where things live --------------------------------------------------------------------------------------------
def results_root() -> Path:
    """Root of everything the harness writes: `$HARNESS_RESULTS`, else `results/` in the working directory."""
    return Path(os.environ.get("HARNESS_RESULTS", "results")).resolve()


def tracking_uri(results: str | Path | None = None) -> str:
    """`$MLFLOW_TRACKING_URI`, else an embedded sqlite store `mlflow.db` in the results root."""
    root = results_root() if results is None else Path(results)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (MLflow's default, ./mlruns of the
    working directory, would scatter them); the server's own default otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


TUNE_STAGE = "tune"


def tune_scale(scale: str) -> str:
    """The tuning stage of a scale as a scale of its own: its ledger, experiment and folder nest in the
    scale's (results/<study>/<scale>/tune/, experiment <study>/<scale>/tune)."""
    return f"{scale}/{TUNE_STAGE}"


def split_stage(scale: str) -> tuple[str, str | None]:
    """'proxy/tune' -> ('proxy', 'tune'); 'proxy' -> ('proxy', None)."""
    base, sep, stage = scale.rpartition("/")
    return (base, stage) if sep and stage == TUNE_STAGE else (scale, None)


def experiment_name(study: str, scale: str) -> str:
    """The MLflow experiment (and ledger study) of a study at one scale."""
    return f"{study}/{scale}"


def sweep_dir(results: str | Path, study: str, scale: str) -> Path:
    """A sweep's files: its ledger, workers' logs, and one folder per cell under jobs/."""
    return Path(results) / study / scale


def ledger_path(results: str | Path, study: str, scale: str) -> Path:
    """The default ledger storage (an Optuna journal file)."""
    return sweep_dir(results, study, scale) / "ledger.journal"


def job_dir(sweep: Path, cell: str) -> Path:
    return sweep / "jobs" / cell


def attempt_log(sweep: Path, cell: str, attempt: int) -> Path:
    return job_dir(sweep, cell) / f"attempt-{attempt}.log"


def attempt_result(sweep: Path, cell: str, attempt: int) -> Path:
    """The job's `--result` file: one per attempt, so a later attempt never reads or deletes an earlier one's."""
    return job_dir(sweep, cell) / f"attempt-{attempt}.result.json"


def attempt_progress(sweep: Path, cell: str, attempt: int) -> Path:
    """Touched whenever the job stores a metric (the worker's stall detector watches its mtime)."""
    return job_dir(sweep, cell) / f"attempt-{attempt}.progress"


def cell_result(sweep: Path, cell: str) -> Path:
    """The cell's adopted result: a copy of the counted attempt's result file."""
    return job_dir(sweep, cell) / "result.json"


# --- metric keys: written by the trainer's callbacks, read by the analysis ------------------------------------
VAL_REWARD = "val/reward"  # greedy validation reward
TRAIN_REWARD = "reward"
ENTROPY = "entropy"
LOSS = "loss"
ROLLOUT_KL = "rollout_kl"  # KL(rollout policy || current policy) over each rollout batch
REF_KL = "kl"  # KL to the reference model (TRL's)
CLIP_RATIO = "clip_ratio/region_mean"
GRAD_NORM = "grad_norm"
GRAD_CLIPPED = "grad_clipped"  # 1.0 where max_grad_norm clipped this step's gradient
STEPS_ON_BATCH = "rollout/steps_on_batch"  # optimizer steps taken on the current rollout batch
ROLLOUT_BATCH = "rollout/batch"
RATIO_MEASURED = "rollout/ratio_measured"  # 1.0 where the importance ratio was measured, not assumed to be 1
RATIO_ABS_DEV = "ratio/abs_dev_mean"
COMPLETION_LENGTH = "completions/mean_length"


# --- grid facts ---------------------------------------------------------------------------------------------------
def steps_per_rollout_batch(batch_ratio: int, iterations: int) -> int:
    """Optimizer steps on each rollout batch: the batch is cut into batch_ratio minibatches, each seen
    `iterations` times."""
    return batch_ratio * iterations


def on_policy(batch_ratio: int, iterations: int) -> bool:
    """One step per rollout batch: the policy that sampled is the one updated, the importance ratio is 1 and the
    objectives' clipping or penalty never acts."""
    return steps_per_rollout_batch(batch_ratio, iterations) == 1
