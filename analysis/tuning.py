"""The tuning stage of a tuned scale, from its runs: each objective's trials, the setting it was compared at,
its score against each tuned knob (sensitivity), the range of each knob within the declared tolerance of its
best (robustness), and what the pruner saved.

The runs are the tuning stage's (MLflow experiment `<study>/<scale>/tune`; published with the study in
`results/<study>/<scale>/tune/runs/`, so a fresh clone regenerates this section too). A trial's score is the
study's primary measure, scored as every run is (analysis.summary), averaged over the trial's jobs (its tuning
cells x tuning seeds); a pruned trial has no score (it stopped early) and is shown at the rollout batch it was
stopped at. The setting each objective was compared at is read from the comparison's own runs, and checked
against the best trial recomputed here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import save
from analysis.formatting import markdown
from analysis.load import StudyData, load_study
from analysis.style import objective_order, objective_styles
from analysis.summary import run_summaries
from harness import contract

TRIAL = "trial"  # the tuning stage's axis naming a run's trial (harness.sweep.tuning)


@dataclasses.dataclass
class Tuning:
    trials: pd.DataFrame  # one row per trial: objective, trial, each knob, state, score, jobs, stopped_rb, budget
    knobs: list[str]
    log_knobs: set[str]  # knobs tuned on a log scale (plotted and measured in decades)
    compared: dict[str, dict[str, object]]  # objective -> the knob values its comparison runs used
    spec: dict  # the sweep file's tune: section
    measure: str
    data: StudyData

    @property
    def tolerance(self) -> float:
        return float(self.spec.get("tolerance", 0.02))

    def apart(self) -> list[str]:
        """The knobs the objectives were compared at different values of."""
        return [k for k in self.knobs if len({_key(v.get(k)) for v in self.compared.values()}) > 1]

    def best(self, objective: str) -> pd.Series | None:
        done = self.trials[(self.trials["objective"] == objective) & self.trials["score"].notna()]
        return done.sort_values(["score", "trial"], ascending=[False, True]).iloc[0] if len(done) else None


def load_tuning(study: str, scale: str, spec: dict, measure: str, compare_runs: pd.DataFrame, *, tracking_uri: str,
                cache_dir: Path, offline: bool | None, validate=None) -> Tuning:
    """The tuning stage of `study` at `scale`; compare_runs: the comparison's runs (their `params` JSON);
    validate: as load_study's (publishing checks the tuning runs' code too)."""
    data = load_study(study, contract.tune_scale(scale), tracking_uri=tracking_uri, cache_dir=cache_dir,
                      offline=offline, validate=validate)
    scores = run_summaries(data.long, data.runs)
    runs = data.runs.set_index("run_id")
    rows = []
    knobs: list[str] = []
    val = data.metric(contract.VAL_REWARD).groupby("run_id")["rollout_batch"].max()
    for run_id, row in scores.set_index("run_id").iterrows():
        axes = json.loads(runs.at[run_id, "extra_axes"])
        knobs = [k for k in axes if k != TRIAL] or knobs
        rows.append({"objective": row["base_objective"], "trial": int(axes[TRIAL]), **{n: axes[n] for n in knobs},
                     "status": row["status"], "value": row[measure], "budget": row["budget"],
                     "start": row["start_val"], "final": row["final_val"],
                     "stopped_rb": float(val.get(run_id, np.nan))})
    per_run = pd.DataFrame(rows)
    trials = per_run.groupby(["objective", "trial", *knobs], sort=False).agg(
        jobs=("status", "size"), pruned=("status", lambda s: bool((s == contract.PRUNED).any())),
        diverged=("status", lambda s: int((s == contract.DIVERGED).sum())), score=("value", "mean"),
        stopped_rb=("stopped_rb", "min"), budget=("budget", "max"), start=("start", "mean"),
        final=("final", "mean")).reset_index()
    trials["state"] = np.where(trials["pruned"], "pruned", "complete")
    trials.loc[trials["pruned"], ["score", "final"]] = np.nan
    trials["gain"] = trials["final"] - trials["start"]  # did the trial train at all, or stay at its warm start?
    order = {o: i for i, o in enumerate(objective_order(trials["objective"]))}
    trials = (trials.assign(rank=trials["objective"].map(order)).sort_values(["rank", "trial"])
              .drop(columns="rank").reset_index(drop=True))
    ranges = spec.get("knobs") or {}
    log_knobs = {k for section in ranges.values() if isinstance(section, dict)
                 for k, r in section.items() if isinstance(r, dict) and r.get("log")}
    compared = {}
    for objective, group in compare_runs.groupby("base_objective"):
        params = json.loads(group["params"].iloc[0])
        compared[str(objective)] = {k: _value(params.get(k)) for k in knobs}
    return Tuning(trials, knobs, log_knobs, compared, spec, measure, data)


def _value(text: object) -> object:
    try:
        return float(text)  # params are logged as text
    except (TypeError, ValueError):
        return text


def near_best(tuning: Tuning, objective: str, knob: str) -> tuple[int, int, float, float, float | None]:
    """(trials within the tolerance of the best, scored trials, lowest and highest knob value among them, their
    span: decades for a log-scale knob, else units; None for a categorical knob)."""
    t = tuning.trials[(tuning.trials["objective"] == objective) & tuning.trials["score"].notna()]
    best = t["score"].max()
    near = t[t["score"] >= best - tuning.tolerance][knob]
    try:
        lo, hi = float(near.min()), float(near.max())
    except (TypeError, ValueError):
        return len(near), len(t), math.nan, math.nan, None
    span = math.log10(hi / lo) if knob in tuning.log_knobs and lo > 0 else hi - lo
    return len(near), len(t), lo, hi, span


def at_edge(tuning: Tuning, objective: str, knob: str, value: object) -> str | None:
    """'lower' or 'upper' when `value` lies in the outer tenth of the knob's declared range (log scale for a log
    knob); None inside, or for a knob without a numeric range."""
    ranges = tuning.spec.get("knobs") or {}
    r = {**(ranges.get("all") or {}), **(ranges.get(objective) or {})}.get(knob)
    if not isinstance(r, dict) or "low" not in r or "high" not in r:
        return None
    lo, hi, v = float(r["low"]), float(r["high"]), float(value)  # type: ignore[arg-type]
    if r.get("log"):
        lo, hi, v = math.log(lo), math.log(hi), math.log(v)
    where = (v - lo) / (hi - lo)
    return "lower" if where < 0.1 else "upper" if where > 0.9 else None


def pruning_saved(tuning: Tuning) -> tuple[float, float]:
    """(rollout batches the pruner saved, rollout batches a full run of every trial would have cost)."""
    t = tuning.trials
    full = float((t["budget"] * t["jobs"]).sum())
    saved = float(((t["budget"] - t["stopped_rb"]) * t["jobs"])[t["pruned"]].sum())
    return saved, full


def sensitivity_figure(tuning: Tuning, knob: str, study: str, scale: str) -> Figure:
    """Score against the knob, one panel per objective: complete trials, pruned trials along the bottom, the
    compared setting starred, the tolerance band below the best."""
    objectives = objective_order(tuning.trials["objective"])
    styles = objective_styles(objectives)
    fig = Figure(figsize=(3.6 * len(objectives), 3.2), layout="constrained")
    axes = fig.subplots(1, len(objectives), sharey=True, squeeze=False)[0]
    scored = tuning.trials["score"].dropna()
    floor = float(scored.min()) - 0.05 if len(scored) else 0.0
    for ax, objective in zip(axes, objectives):
        t = tuning.trials[tuning.trials["objective"] == objective]
        st = styles[objective]
        done, pruned = t[t["score"].notna()], t[t["pruned"]]
        ax.scatter(done[knob].astype(float), done["score"], color=st["color"], marker=st["marker"], zorder=3,
                   label="trial")
        ax.scatter(pruned[knob].astype(float), [floor] * len(pruned), color=st["color"], marker="x", zorder=3,
                   label="pruned (no score)")
        best = tuning.best(objective)
        if best is not None:
            ax.axhspan(best["score"] - tuning.tolerance, best["score"], color=st["color"], alpha=0.12, lw=0,
                       label=f"within {tuning.tolerance:g} of best")
        used = tuning.compared.get(objective, {}).get(knob)
        if used is not None and best is not None:
            ax.scatter([float(used)], [best["score"] if float(used) == float(best[knob]) else floor],
                       s=160, facecolors="none", edgecolors="black", marker="*", zorder=4, label="compared at")
        if knob in tuning.log_knobs:
            ax.set_xscale("log")
        ax.set_title(objective)
        ax.set_xlabel(knob)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"trial score ({tuning.measure})")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{study} / {scale}: tuning sensitivity ({knob})", fontsize=10)
    return fig


def trial_table(tuning: Tuning) -> pd.DataFrame:
    """The trials as published (tables/tuning.csv)."""
    t = tuning.trials
    out = t[["objective", "trial", *tuning.knobs, "state", "score", "start", "final", "gain", "jobs", "diverged",
             "stopped_rb"]].copy()
    out["compared_at"] = [all(_same(tuning.compared.get(o, {}).get(k), r[k]) for k in tuning.knobs)
                          for o, (_, r) in zip(t["objective"], t.iterrows())]
    return out


def _key(value: object) -> object:
    return round(float(value), 12) if isinstance(value, float) else value  # type: ignore[arg-type]


def _same(a: object, b: object) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return a == b


def write_tuning_tables(tuning: Tuning, folder: Path, stamp: str | None) -> dict[str, Path]:
    """tables/tuning.csv (every trial) and tuning.md."""
    t = trial_table(tuning)
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / "tuning.csv", folder / "tuning.md"
    (t.assign(stamp=stamp) if stamp else t).to_csv(csv, index=False, float_format="%.6g")
    shown = t.assign(**{c: t[c].map(lambda v, f=f: "" if pd.isna(v) else format(v, f))
                        for c, f in (("score", ".4f"), ("start", ".4f"), ("final", ".4f"), ("gain", "+.4f"))},
                     stopped_rb=t["stopped_rb"].map(lambda v: f"{v:g}"),
                     compared_at=t["compared_at"].map(lambda v: "**yes**" if v else ""),
                     **{k: t[k].map(lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)) for k in tuning.knobs})
    md.write_text((f"<!-- {stamp} -->\n" if stamp else "") + markdown(shown))
    return {"tuning.csv": csv, "tuning.md": md}


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tuning_lines(tuning: Tuning, source: str, figures: dict[str, list[Path]], rel) -> list[str]:
    """The report's tuning section: what was tuned and how, where each objective ended, how robust it is."""
    spec, t = tuning.spec, tuning.trials
    objectives = objective_order(t["objective"])
    counts = {o: int((t["objective"] == o).sum()) for o in objectives}
    sampler, pruner = spec.get("sampler") or {"name": "tpe"}, spec.get("pruner") or {"name": "median"}
    knobs = "; ".join(f"{owner}: " + ", ".join(f"{k} {_range(r)}" for k, r in section.items())
                      for owner, section in (spec.get("knobs") or {}).items())
    cells = spec.get("cells") or sorted({(int(b), int(i)) for b, i in
                                         zip(tuning.data.runs["batch_ratio"], tuning.data.runs["iterations"])})
    seeds = sorted({int(s) for s in tuning.data.runs["seed"]})
    equal = len(set(counts.values())) == 1
    md = ["## Tuning: every objective tuned with the same budget before the comparison", "",
          f"Declared in `{source}` (`tune:`): {knobs}. Each objective ran "
          + (f"{next(iter(counts.values()))} trials (an equal budget)" if equal else
             "an **unequal** number of trials (" + ", ".join(f"{o} {n}" for o, n in counts.items())
             + "; run with --unequal-budget): the better-funded objective had more chances")
          + f" with Optuna's {sampler['name']} sampler ({_kwargs(sampler)}) and {pruner['name']} pruner "
          f"({_kwargs(pruner)}), at cell(s) {', '.join(f'({b}, {i})' for b, i in cells)} on tuning seed(s) "
          f"{', '.join(map(str, seeds))}, none of them a seed of the comparison. A trial's score: "
          f"{tuning.measure} of its runs, scored as every run here (a diverged run counts 0 from its divergence "
          "on); a pruned trial has none. The comparison above ran each objective at its best trial's setting.", "",
          f"| objective | compared at | best trial (score) | trials: complete / pruned / with a diverged run "
          f"| within {tuning.tolerance:g} of its best | range within {tuning.tolerance:g} |",
          "|---|---|---|---|---|---|"]
    mismatch = []
    for o in objectives:
        best, rows = tuning.best(o), t[t["objective"] == o]
        used = tuning.compared.get(o, {})
        at = ", ".join(f"{k}={_fmt(v)}" for k, v in used.items()) or "(not compared)"
        spans = []
        for knob in tuning.knobs:
            n_near, n, lo, hi, span = near_best(tuning, o, knob)
            unit = " decades" if knob in tuning.log_knobs else ""
            spans.append(f"{knob} {_fmt(lo)} to {_fmt(hi)}" + (f" ({span:.2f}{unit})" if span is not None else ""))
        if best is not None and used and not all(_same(used.get(k), best[k]) for k in tuning.knobs):
            mismatch.append(o)
        md.append(f"| {o} | {at} | " + (f"{int(best['trial'])} ({best['score']:.4f})" if best is not None else "none")
                  + f" | {int((rows['state'] == 'complete').sum())} / {int(rows['pruned'].sum())} / "
                  f"{int((rows['diverged'] > 0).sum())} | {n_near} of {n} | {'; '.join(spans)} |")
    for o in objectives:
        best = tuning.best(o)
        for knob in tuning.knobs if best is not None else []:
            edge = at_edge(tuning, o, knob, best[knob])
            if edge:
                md.append(f"- **{o}'s best {knob} ({_fmt(best[knob])}) is at the {edge} edge of the range searched**: "
                          "its optimum may lie outside it; widen the range before reading the comparison as tuned.")
        if best is not None and abs(best["gain"]) < tuning.tolerance:
            md.append(f"- {o}'s best trial barely moved from its warm start (final - start {best['gain']:+.4f}): "
                      "at this setting it hardly trains, so the comparison may say more about not moving than about "
                      "the objective.")
    saved, full = pruning_saved(tuning)
    md += ["", f"- Pruning stopped {int(t['pruned'].sum())} of {len(t)} trials early and saved {saved:g} of "
           f"{full:g} rollout batches ({saved / full:.0%} of the tuning budget)." if full else "",
           "- The settings compared are the best trials recomputed from these runs." if not mismatch else
           f"- **The settings compared differ from the best trials recomputed here for {', '.join(mismatch)}**: the "
           "tuning ledger and these runs disagree; do not trust the comparison until that is explained.",
           f"- What tuning can show here: {len(seeds)} tuning seed(s), so a trial's score carries one seed's noise, "
           "and the best of several noisy trials is optimistic (selection): its score is not an estimate of the "
           "objective's performance; the comparison on fresh seeds is. The range within the tolerance is a "
           "coarse, trial-limited view of robustness to the knob, not a fitted curve.", ""]
    for knob in tuning.knobs:
        stem = f"sensitivity_{_slug(knob)}"
        if stem in figures:
            png, pdf = figures[stem]
            md += [f"![sensitivity to {knob}]({rel(png)})", "", f"Score against {knob}, one panel per objective "
                   f"(x: pruned, at the bottom; star: the setting compared; band: within {tuning.tolerance:g} of the "
                   f"best). [PDF]({rel(pdf)})", ""]
    return md + ["Every trial: [tuning.md](tables/tuning.md), [tuning.csv](tables/tuning.csv).", ""]


def _slug(knob: str) -> str:
    return knob.replace(".", "_").replace("/", "_")


def _range(r: object) -> str:
    if not isinstance(r, dict):
        return str(r)
    if "choices" in r:
        return "in {" + ", ".join(map(str, r["choices"])) + "}"
    return f"in [{r.get('low')}, {r.get('high')}]" + (" (log)" if r.get("log") else "")


def _kwargs(spec: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in spec.items() if k != "name") or "defaults"


def tuning_figures(tuning: Tuning, folder: Path, study: str, scale: str) -> dict[str, list[Path]]:
    return {f"sensitivity_{_slug(k)}": save(sensitivity_figure(tuning, k, study, scale), folder,
                                           f"sensitivity_{_slug(k)}") for k in tuning.knobs}
