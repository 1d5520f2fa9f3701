"""A tuning trial's job reports each validation to its Optuna trial; the trial's pruner may stop it early.

Set up by a sweep worker through the environment (contract.TUNE_ENV: the ledger storage, the tuning study,
the trial, this job's index among the trial's jobs, the pruner's spec). Only the job reports; the sweep's
driver tells the trial its result (harness.sweep.tuning). The step an evaluation is reported at is its rollout
batch (x jobs per trial, + this job's index), so a pruner compares this job only with the jobs of other trials
at the same cell and seed. A pruned job ends as `pruned`: a result, never retried. An evaluation at the
budget's end is reported but never pruned (the job has cost all it will).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import TrainerCallback

from harness import contract

log = logging.getLogger(__name__)


class TrialPruning(TrainerCallback):
    """After each validation (GreedyValidation runs first): report it, and stop training if pruned."""

    def __init__(self, spec: dict[str, Any], validation: Any, steps_per_rollout_batch: int, budget: int):
        import optuna

        from harness.sweep.storage import open_storage
        from harness.sweep.tune_spec import Named, build_pruner

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.validation, self.k, self.budget = validation, steps_per_rollout_batch, budget
        self.job, self.jobs = int(spec["job"]), int(spec["jobs"])
        study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"]),
                                  pruner=build_pruner(Named(**spec["pruner"])))
        self.trial = optuna.trial.Trial(study, int(spec["trial_id"]))
        self.reported = 0  # evaluations reported so far
        self.pruned_at: float | None = None  # rollout batches done when the pruner stopped the job

    @classmethod
    def from_env(cls, validation: Any, steps_per_rollout_batch: int, budget: int) -> TrialPruning | None:
        raw = os.environ.get(contract.TUNE_ENV)
        return cls(json.loads(raw), validation, steps_per_rollout_batch, budget) if raw else None

    def on_log(self, args, state, control, **kwargs):
        history = self.validation.history
        if len(history) <= self.reported:
            return
        self.reported = len(history)
        step, value = history[-1]
        rb = step / self.k
        if step == 0:
            return  # the warm start, the same for every trial
        try:
            self.trial.report(float(value), int(round(rb)) * self.jobs + self.job)
            prune = self.trial.should_prune()
        except Exception as e:  # noqa: BLE001 - the trial was told meanwhile, or the ledger is away: train on
            log.warning("could not report to tuning trial %s: %s", self.trial.number, e)
            return
        if prune and rb < self.budget:  # at the budget's end there is nothing left to save: the job is complete
            log.info("pruned at rollout batch %g (val/reward %.4f)", rb, value)
            self.pruned_at = rb
            control.should_training_stop = True
