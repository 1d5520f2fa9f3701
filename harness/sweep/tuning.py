"""The tuning stage at run time: trials are cells.

One Optuna study per objective lives in the stage's ledger storage (`<study>/<scale>/tune:<objective>`). The
driver asks each study for a trial, turns it into cells of the ledger (one job per tuning cell and seed, with
the trial's sampled knobs; harness.sweep.stages) and tells the study what they came to once the ledger has
settled them, so trials run on the same workers, queue, retries, timeouts and MLflow runs as grid cells. Each
objective gets the same number of trials; at most ceil(workers / objectives) of an objective's trials run at
once (1 with 2 workers and 2 objectives: each objective's sampler sees every earlier result, so a rerun on the
same machine asks the same knobs).

A trial's score is the study's primary measure (analysis/summary.py, the scoring the analysis uses: a diverged
run counts 0 from its divergence on), averaged over its jobs. A job stopped by the pruner (harness.pruning)
makes its trial PRUNED; a job that failed for good (every attempt) makes it FAIL; both still use up a trial.

Exactly once: nothing here is remembered between invocations but what the storage holds. A trial asked but not
yet told is resumed from its sampled knobs: the cells it needs are derived from them again (same config hash)
and queued only if the ledger does not have them.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness import contract
from harness.config import ConfigError, build_config, config_hash, deep_merge
from harness.sweep.fields import nest
from harness.sweep.ledger import FEEDING, Ledger
from harness.sweep.spec import Cell, Plan
from harness.sweep.stages import tune_of
from harness.sweep.tune_spec import build_pruner, build_sampler

TERMINAL = (*contract.FINISHED, contract.FAILED)  # a job state that will not change without --retry-failed
CELLS = "harness.cells"  # on a tuning trial: the config hashes of its jobs
SCORES = "harness.scores"  # on a tuning trial: each job's primary measure


def best_of(complete: list[FrozenTrial]) -> FrozenTrial:
    """The highest score; a tie goes to the earliest trial (whatever order a storage returns them in)."""
    return max(complete, key=lambda t: (t.value, -t.number))


def study_name(experiment: str, objective: str) -> str:
    return f"{experiment}:{objective}"


class Tuner:
    """Feeds a tuning stage's ledger with trials and tells each objective's study their results."""

    def __init__(self, plan: Plan, storage: Any, workers: int):
        self.plan, self.tune = plan, tune_of(plan)
        self.templates: dict[str, list[Cell]] = defaultdict(list)
        for cell in sorted(plan.cells, key=lambda c: (c.axes["seed"], c.hash)):
            self.templates[cell.config.objective].append(cell)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.studies = {o: optuna.create_study(
            study_name=study_name(plan.experiment, o), storage=storage, direction="maximize",
            sampler=build_sampler(self.tune.sampler, self.tune.knobs_of(o)),
            pruner=build_pruner(self.tune.pruner), load_if_exists=True) for o in self.templates}
        self.space = {o: {k: r.distribution() for k, r in self.tune.knobs_of(o).items()} for o in self.templates}
        self.cap = max(1, math.ceil(workers / len(self.templates)))

    def expected_jobs(self) -> int:
        return sum(self.tune.trials_of(o) * len(cells) for o, cells in self.templates.items())

    def jobs(self, objective: str, params: dict[str, Any], number: int) -> list[Cell]:
        """The cells of one trial: its objective's template cells with the sampled knobs."""
        out = []
        for cell in self.templates[objective]:
            raw = deep_merge(cell.config.model_dump(mode="json"), nest(params))
            where = f"{self.plan.spec_path}: scales.{self.plan.base_scale}.tune: trial {number} of {objective}"
            cfg = build_config(raw, where)
            out.append(Cell(hash=config_hash(cfg), axes={**cell.axes, "trial": number, **params}, config=cfg))
        return out

    def sync(self, ledger: Ledger, score: Any) -> int:
        """Tell what finished, queue what is missing, ask for new trials while the budget lasts; the number of
        trials told now. score(run_id) -> the run's primary measure, or None when it cannot be read yet."""
        cells = {c.hash: c for c in ledger.cells()}
        told = 0
        for objective, study in self.studies.items():
            trials = study.get_trials(deepcopy=False)
            open_ = [t for t in trials if t.state == TrialState.RUNNING]
            for t in open_:
                told += self._settle(ledger, study, objective, t, cells, score)
            running = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            for i in range(min(self.tune.trials_of(objective) - len(trials), self.cap - running)):
                study.sampler = self._sampler(objective, len(trials) + i)
                trial = study.ask(self.space[objective])
                self._queue(ledger, study, objective, trial.number, trial._trial_id, trial.params, cells)
        ledger.set_attr(FEEDING, not self.all_asked())
        return told

    def all_asked(self) -> bool:
        return all(len(s.get_trials(deepcopy=False)) >= self.tune.trials_of(o) for o, s in self.studies.items())

    def finished(self) -> bool:
        return self.all_asked() and not any(
            s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) for s in self.studies.values())

    def _sampler(self, objective: str, number: int) -> Any:
        """The sampler for trial `number`: a seeded sampler's stream restarts at (seed + number), so what it
        asks depends on the study's history only, never on how often the driver was restarted (a sampler
        rebuilt with its first seed would ask its first points again). QMC's sequence already follows the
        trial count."""
        spec = self.tune.sampler
        seed = spec.kwargs().get("seed")
        # Not grid: its seed shuffles the order of the grid points, which trials index into.
        if seed is not None and spec.name in ("tpe", "random", "gp"):
            spec = spec.model_copy(update={"seed": int(seed) + number})
        return build_sampler(spec, self.tune.knobs_of(objective))

    def summary(self) -> list[str]:
        """One line per objective: its trials by state and its best setting so far."""
        lines = []
        for objective, study in self.studies.items():
            trials = study.get_trials(deepcopy=False)
            states = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
            counts = ", ".join(f"{n} {s.name.lower()}" for s, n in states.items() if n)
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            best = best_of(complete) if complete else None
            at = (f"; best {self.plan.hypothesis.measure} {best.value:.4f} at "
                  + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
                  + f" (trial {best.number})") if best else ""
            lines.append(f"tuned {objective}: {len(trials)}/{self.tune.trials_of(objective)} trials ({counts}){at}")
        return lines

    def _queue(self, ledger: Ledger, study: optuna.Study, objective: str, number: int, trial_id: int,
               params: dict[str, Any], cells: dict[str, Any], recorded: list[str] | None = None) -> list[Cell]:
        """The trial's jobs, queued where the ledger lacks them; recorded: the cells the trial already names
        (written once: this runs on every sync, and each write is a ledger append)."""
        jobs = self.jobs(objective, params, number)
        if recorded != [c.hash for c in jobs]:
            study._storage.set_trial_user_attr(trial_id, CELLS, [c.hash for c in jobs])
        for j, cell in enumerate(jobs):
            if cell.hash not in cells:
                ledger.enqueue(cell.hash, cell.axes, cell.job_fields(), cell.cost, attempt=1, tune={
                    "study": study.study_name, "trial": number, "trial_id": trial_id, "job": j,
                    "jobs": len(jobs), "pruner": self.tune.pruner.model_dump()})
        return jobs

    def _settle(self, ledger: Ledger, study: optuna.Study, objective: str, t: FrozenTrial,
                cells: dict[str, Any], score: Any) -> int:
        jobs = self._queue(ledger, study, objective, t.number, t._trial_id, t.params, cells,
                           t.user_attrs.get(CELLS))
        states = [cells[c.hash].state if c.hash in cells else "queued" for c in jobs]
        if not all(s in TERMINAL for s in states):
            return 0
        if contract.PRUNED in states:
            study.tell(t.number, state=TrialState.PRUNED)
        elif contract.FAILED in states:
            study.tell(t.number, state=TrialState.FAIL)
        else:
            scores = [score(cells[c.hash].run_id) for c in jobs]
            if any(s is None for s in scores):
                return 0  # the tracking store is away: told on a later sync
            study._storage.set_trial_user_attr(t._trial_id, SCORES, scores)
            if any(math.isnan(s) for s in scores):  # no evaluation to score: nothing to rank it by
                study.tell(t.number, state=TrialState.FAIL)
            else:
                study.tell(t.number, float(sum(scores) / len(scores)))
        return 1


def best_knobs(storage: Any, experiment: str, objectives: list[str], trials: dict[str, int]) -> dict[str, Any]:
    """objective -> its best trial's knobs; a ConfigError (exit 2) while any objective's tuning is unfinished."""
    out, short = {}, []
    for o in objectives:
        try:
            study = optuna.load_study(study_name=study_name(experiment, o), storage=storage)
        except KeyError:
            short.append(f"{o} 0/{trials[o]}")
            continue
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        complete = [t for t in done if t.state == TrialState.COMPLETE]
        if len(done) < trials[o] or not complete:
            short.append(f"{o} {len(done)}/{trials[o]}" + ("" if complete else ", none complete"))
            continue
        out[o] = dict(best_of(complete).params)
    if short:
        raise ConfigError(f"--stage compare: the tuning stage of {experiment.rsplit('/', 1)[0]} has not finished "
                          f"({'; '.join(short)} trials); run `sweep --stage tune` first")
    return out


def run_score(measure: str) -> Any:
    """score(run_id) for Tuner.sync: the run's `measure` scored as the analysis scores it, or None when the
    tracking store cannot be read now."""
    from analysis.summary import val_scores  # the analysis's own scoring, so tuning and verdict agree
    from harness import tracking

    def score(run_id: str | None) -> float | None:
        if run_id is None:
            return None
        try:
            client = tracking.client()
            run = client.get_run(run_id)
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, contract.VAL_REWARD))
        except Exception:  # noqa: BLE001 - any tracking error: try again on the next sync
            return None
        p, tags = run.data.params, run.data.tags
        k = int(p.get("optimizer_steps_per_rollout_batch") or contract.steps_per_rollout_batch(
            int(p["batch_ratio"]), int(p["iterations"])))
        import numpy as np

        rb = np.array([s / k for s, _ in history], dtype=float)
        val = np.array([v for _, v in history], dtype=float)
        diverged = tags.get(contract.DIVERGED_AT)
        scores = val_scores(rb, val, budget=float(p["rollout_batches"]),
                            diverged_rb=int(diverged) / k if diverged else None,
                            eval_every=float(p["eval_every"]), val_prompts=int(p["val_prompts"]))
        return float(scores[measure])

    return score

