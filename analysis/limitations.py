"""What a study's results are conditional on, read from its runs: the report's "Limitations" section.

Every line is computed from the runs' params and scores (or the sweep file's `learning_rate_from`), so it stays
true when the setting changes: model and warm start, budget and validation set, learning rate and where it
came from, optimizer batch per cell, gradient clipping per arm and cell, the negative control, what the number
of seeds can show, and the diagnostics no run logged.
"""
from __future__ import annotations

import json
import math

import pandas as pd

from analysis.load import StudyData
from analysis.metrics import CURVES, TABLE_KEYS
from analysis.paired import NEGATIVE_CONTROLS
from analysis.question import Declared
from analysis.verdicts import contrast_cells


def _param(params: list[dict[str, str]], key: str) -> list[str]:
    """The distinct values of a param over the runs (sorted; missing params left out)."""
    return sorted({p[key] for p in params if key in p})


def _one(values: list[str], missing: str = "not logged") -> str:
    return values[0] if len(values) == 1 else (", ".join(values) if values else missing)


def limitation_lines(data: StudyData, summaries: pd.DataFrame, declared: Declared) -> list[str]:
    params = [json.loads(p) for p in data.runs["params"]]
    model = _one(_param(params, "model"))
    lines = []
    if model == "proxy":
        size = _one(_param(params, "proxy.params"))
        starts = sorted(float(s) for s in _param(params, "proxy.warmstart_val_reward") if _is_number(s))
        if not size.isdigit() or not starts:
            lines.append(f"- Model: the CPU proxy ({size} parameters).")
        else:
            built = (f"warm-started by the harness (greedy val reward {starts[0]:.3f} after its warm start)"
                     if len(starts) == 1 else f"warm-started per seed by the harness (greedy val reward "
                                              f"{starts[0]:.3f} to {starts[-1]:.3f} after the warm starts)")
            lines.append(f"- Model: the CPU proxy, a {int(size):,}-parameter Llama built and {built}, on task "
                         f"{_one(_param(params, 'task'))}. What it shows about paper-scale models is a hypothesis "
                         "for them, not a result.")
    else:
        lines.append(f"- Model: {model} on task {_one(_param(params, 'task'))}.")
    init = _param(params, "proxy.init_seed")
    if init == ["seed"]:
        lines.append("- Warm start: each seed warm-starts its own model (proxy.init_seed follows the seed), so "
                     "the seed-to-seed spread includes the checkpoint's and the results generalise over "
                     "warm-started checkpoints.")
    elif model != "proxy" or len(init) == 1:
        lines.append("- Warm start: every seed starts from the same checkpoint"
                     + (f" (proxy.init_seed {init[0]} in every run)" if init else "")
                     + "; seeds vary the prompt order and the sampling, not the initial model, so the results are "
                       "conditional on that one starting point.")
    prompts = _param(params, "val_prompts")
    lines.append(f"- Budget: {_one(_param(params, 'rollout_batches'))} rollout batches of "
                 f"{_one(_param(params, 'generation_batch_size'))} completions per run; validation every "
                 f"{_one(_param(params, 'eval_every'))} rollout batches on one fixed set of {_one(prompts)} prompts "
                 "(the same prompts for every run and seed)" + _binomial_se(summaries, prompts) + ".")
    if declared.tune:
        by_objective = data.runs.groupby("base_objective")["params"].first().map(json.loads)
        rates = ", ".join(f"{o} {float(p['trl.learning_rate']):.3g}" if "trl.learning_rate" in p else f"{o} not logged"
                          for o, p in by_objective.items())
        tuned = sorted({k for section in (declared.tune.get("knobs") or {}).values() for k in section})
        lines.append(f"- Learning rate: {rates}; tuned per objective ({', '.join(tuned)}) in the tuning stage "
                     "(section Tuning), each objective with the trial budget it states; every knob not tuned is "
                     "shared.")
    else:
        lr = _one(_param(params, "trl.learning_rate"))
        origin = declared.learning_rate_from or "the sweep file does not say where it came from (learning_rate_from)"
        lines.append(f"- Learning rate: {lr} for every objective, not tuned per objective; {origin}.")
    lines.append(f"- Optimizer batch (completions per optimizer step = generation batch / batch ratio): "
                 f"{_optimizer_batches(summaries, params)}: a higher batch ratio also means noisier gradients.")
    lines.append(_clipping_line(summaries, params))
    objectives = set(summaries["base_objective"])
    ran = [n for n in NEGATIVE_CONTROLS if n in objectives]
    lines.append(f"- Negative control: {', '.join(ran)} (no trust region) ran, so the report can say whether the "
                 "setting exercises trust regions at all." if ran else
                 f"- Negative control: none ran ({', '.join(NEGATIVE_CONTROLS)}, no trust region, was not in the "
                 "study), so nothing here shows that the setting exercises trust regions at all.")
    seeds = summaries.groupby(["objective", "batch_ratio", "iterations"])["seed"].nunique()
    # What the verdict can show depends on the seeds of the cells it contrasts (a control cell may have fewer).
    present = {(int(b), int(i)) for b, i in zip(summaries["batch_ratio"], summaries["iterations"])}
    contrast = set(contrast_cells(present, declared.hypothesis)) or present
    at = seeds[[(b, i) in contrast for _, b, i in seeds.index]]
    n = int(at.min()) if len(at) else 0
    floor = 2 / 2 ** n if n else 1.0
    alpha = declared.hypothesis.alpha
    needed = next(k for k in range(1, 64) if 2 / 2 ** k < alpha)
    rest = seeds[[(b, i) not in contrast for _, b, i in seeds.index]]
    where = "per cell and objective" if seeds.nunique() <= 1 or rest.empty else (
        f"per objective at the contrast cells ({', '.join(f'{b}x{i}' for b, i in sorted(contrast))}; "
        f"{'-'.join(dict.fromkeys(str(int(x)) for x in (rest.min(), rest.max())))} at the others)")
    lines.append(f"- Seeds: {n} {where}{'' if at.nunique() <= 1 else ' (at least)'}; the smallest "
                 f"sign-flip p that {n} seeds can reach is {floor:.3g}" + (
                     f", so no difference can be claimed at alpha {alpha:g} ({needed} seeds are the least that can)"
                     if floor >= alpha else "") + ".")
    missing = [k for k in dict.fromkeys([*TABLE_KEYS, *(c.key for c in CURVES)]) if not data.runs_with(k)]
    if missing:
        lines.append(f"- Not logged by any run (n/a in tables, no figure): {', '.join(missing)}.")
    return lines


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _binomial_se(summaries: pd.DataFrame, prompts: list[str]) -> str:
    start = summaries["start_val"].dropna()
    if len(prompts) != 1 or start.empty:
        return ""
    p, v = float(start.mean()), int(prompts[0])
    return f"; one evaluation's binomial standard error at the start value {p:.3f} is {math.sqrt(p * (1 - p) / v):.3f}"


def _optimizer_batches(summaries: pd.DataFrame, params: list[dict[str, str]]) -> str:
    gen = _param(params, "generation_batch_size")
    if len(gen) != 1:
        return "not one generation batch size"
    ratios = sorted(set(summaries["batch_ratio"].astype(int)))
    return ", ".join(f"{int(gen[0]) // r} at batch ratio {r}" for r in ratios)


def _clipping_line(summaries: pd.DataFrame, params: list[dict[str, str]]) -> str:
    norm = _one(_param(params, "trl.max_grad_norm"))
    frac = summaries.groupby(["objective", "batch_ratio", "iterations"])["grad_clipped_frac"].mean().dropna()
    if frac.empty:
        return f"- Gradient clipping: max_grad_norm {norm}; how often it acted was not logged (n/a)."
    parts = []
    for objective, g in frac.groupby(level="objective", sort=False):
        top = g.idxmax()
        span = f"{g.max():.0%}" if f"{g.min():.0%}" == f"{g.max():.0%}" else f"{g.min():.0%}-{g.max():.0%}"
        parts.append(f"{objective} {span} (most at {top[1]}x{top[2]})")
    return (f"- Gradient clipping: max_grad_norm {norm}; share of optimizer steps it clipped, range over cells: "
            f"{'; '.join(parts)}. Where the arms differ here, part of a difference between objectives may be "
            "the clipping's (the stability table has every cell).")

