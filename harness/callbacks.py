"""Trainer callbacks: metrics to MLflow, the divergence stop, periodic greedy validation."""
from __future__ import annotations

import logging
import math

from rich.console import Console
from transformers import TrainerCallback

from harness.contract import GRAD_CLIPPED, GRAD_NORM, LOSS, VAL_REWARD
from harness.progress import interactive
from harness.tasks import Row, Task
from harness.tracking import RunLogger
from harness.validation import greedy_accuracy

log = logging.getLogger(__name__)


class MLflowMetrics(TrainerCallback):
    """Sends every optimizer step's logs (TRL's and the harness's metrics) to the job's MLflow run, stored once
    per rollout batch (every `flush_every` steps) and at the end, off the per-step path (harness.tracking).

    `grad_norm` is HF's total norm before clipping; `grad_clipped` says whether `max_grad_norm` acted.
    """

    def __init__(self, logger: RunLogger, max_grad_norm: float | None, flush_every: int = 1):
        self.logger = logger
        self.max_grad_norm = max_grad_norm
        self.flush_every = flush_every
        self.last: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if GRAD_NORM in metrics and self.max_grad_norm:
            metrics[GRAD_CLIPPED] = float(metrics[GRAD_NORM] > self.max_grad_norm)
        self.logger.log_metrics(metrics, step=state.global_step, flush=state.global_step % self.flush_every == 0)
        self.last.update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.logger.flush()


class DivergenceGuard(TrainerCallback):
    """Stops training cleanly at the first non-finite loss or gradient norm; the run keeps what it logged."""

    WATCHED = (LOSS, GRAD_NORM)

    def __init__(self):
        self.diverged_at: int | None = None
        self.reason = ""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.WATCHED:
            v = (logs or {}).get(key)
            if isinstance(v, float) and not math.isfinite(v) and self.diverged_at is None:
                self.diverged_at, self.reason = state.global_step, f"{key} = {v}"
                log.warning("diverged at step %d: %s; stopping", state.global_step, self.reason)
                control.should_training_stop = True


class GreedyValidation(TrainerCallback):
    """Greedy accuracy on held-out prompts before training, every `every_steps` steps, and at the end."""

    def __init__(self, logger: RunLogger, task: Task, rows: list[Row], every_steps: int, max_new_tokens: int,
                 guard: DivergenceGuard, chat: bool = False):
        self.logger, self.task, self.rows, self.chat = logger, task, rows, chat
        self.every_steps, self.max_new_tokens, self.guard = every_steps, max_new_tokens, guard
        self.history: list[tuple[int, float]] = []

    def _evaluate(self, step: int, model, tokenizer) -> None:
        acc = greedy_accuracy(model, tokenizer, self.task, self.rows, self.max_new_tokens, chat=self.chat)
        self.history.append((step, acc))
        self.logger.log_metrics({VAL_REWARD: acc}, step=step)
        log.info("step %d: val/reward %.4f", step, acc)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._evaluate(state.global_step, model, processing_class)

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kwargs):
        # on_log, not on_step_end: callbacks see a step's logs in order, so the DivergenceGuard (registered
        # first) has judged this step before we decide to evaluate. A diverged policy is never evaluated,
        # whichever step it diverged on; the analysis scores it 0 from the divergence on.
        if "loss" not in (logs or {}):  # the end-of-training summary, not a step
            return
        if state.global_step % self.every_steps == 0 and self.guard.diverged_at is None:
            self._evaluate(state.global_step, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.history[-1][0] != state.global_step and self.guard.diverged_at is None:
            self._evaluate(state.global_step, model, processing_class)


class ProgressReport(TrainerCallback):
    """Where the job is: a progress bar on a terminal, else one compact log line per rollout batch
    (replaces HF's PrinterCallback, which prints every metric of every step)."""

    def __init__(self, steps_per_rollout_batch: int):
        self.k = steps_per_rollout_batch
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if interactive():
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task_id = self.bar.add_task("training", total=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # the end-of-training summary
            return
        batch, total = -(-state.global_step // self.k), -(-state.max_steps // self.k)
        summary = f"step {state.global_step}/{state.max_steps} rollout batch {batch}/{total}"
        if "reward" in logs:
            summary += f" reward {logs['reward']:.3f}"
        if self.bar is not None:
            self.bar.update(self.task_id, completed=state.global_step, description=summary)
        elif state.global_step % self.k == 0:
            log.info("%s loss %.4g grad_norm %.3g", summary, logs["loss"], logs.get("grad_norm", float("nan")))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.stop()
