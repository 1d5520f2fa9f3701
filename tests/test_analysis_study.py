"""analysis end to end on a real MLflow sqlite store of synthetic runs whose curves (and verdicts) are known."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle
from mlflow import MlflowClient
from scipy import stats

from analysis.cli import main
from analysis.collapse import detect_collapse
from analysis.errors import AnalysisError
from analysis.figures import HATCH, curve_figure, curve_metrics, stable_regime_figure
from analysis.load import LONG_COLUMNS, load_study
from analysis.metrics import CURVES
from analysis.regen_bench import benchmark
from analysis.summary import run_summaries
from analysis.synthetic import log_run, sweep_parent
from analysis.tables import cell_table

R = 4  # rollout batches per run; val/reward at rollout batches 0..R
STABLE = [0.2, 0.4, 0.5, 0.6, 0.6]
STABLE1 = [0.2, 0.4, 0.5, 0.6, 0.7]
COLLAPSE = [0.2, 0.6, 0.2, 0.1, 0.1]  # < 50% of peak 0.6 at rb 2, ends at 0.1 < 80% of 0.6
DIP = [0.2, 0.6, 0.15, 0.5, 0.55]  # < 50% of peak at rb 2, but ends at 0.55 >= 80% of 0.6: not collapsed
FAILED_VAL = [0.95] * 5  # failed/running attempts: must never show up in a number


def metrics(k: int, val: list[float], *, steps: int | None = None, entropy: dict[int, float] | None = None,
            loss: dict[int, float] | None = None, grad_norm: dict[int, float] | None = None,
            drop: tuple[str, ...] = ()) -> dict[str, dict[int, float]]:
    """Per-step metrics of a run with k optimizer steps per rollout batch; overrides replace single steps."""
    s = range(1, (steps or R * k) + 1)
    m = {
        "reward": {i: 0.5 for i in s},
        "entropy": {i: 0.5 for i in s} | (entropy or {}),
        "loss": {i: 0.1 for i in s} | (loss or {}),
        "clip_ratio/region_mean": {i: 0.01 * k for i in s},
        "rollout_kl": {i: 0.001 * i for i in s},
        "ratio/abs_dev_mean": {i: 0.02 for i in s},
        "completions/mean_length": {i: 10.0 for i in s},
        "grad_norm": {i: 1.0 for i in s} | (grad_norm or {}),
        "grad_clipped": {i: float(i == 1) for i in s},
        "rollout/steps_on_batch": {i: float((i - 1) % k + 1) for i in s},
        "rollout/batch": {i: float(-(-i // k)) for i in s},
        "rollout/ratio_measured": {i: float(k > 1) for i in s},
        "val/reward": {rb * k: v for rb, v in enumerate(val)},
    }
    return {key: v for key, v in m.items() if key not in drop}


# (objective, batch_ratio, iterations, seed, log_run kwargs, metrics kwargs)
RUNS = [
    ("grpo", 1, 1, 0, {"status": "failed", "attempt": 1}, {"val": FAILED_VAL}),
    ("grpo", 1, 1, 0, {"attempt": 2}, {"val": STABLE}),
    ("grpo", 1, 1, 0, {"status": "running", "attempt": 3}, {"val": FAILED_VAL}),
    ("grpo", 1, 1, 1, {"status": "diverged", "tags": {"harness.diverged_at": "3",
                                                      "harness.diverged_reason": "loss = nan"}},
     {"val": STABLE[:4], "steps": 3}),
    ("grpo", 1, 1, 2, {"status": "failed"}, {"val": FAILED_VAL}),
    ("grpo", 1, 2, 0, {}, {"val": STABLE, "entropy": {3: 1.2, 4: 1.3, 5: 1.4, 6: 1.5, 7: 1.5, 8: 1.5}}),
    ("grpo", 1, 2, 1, {}, {"val": STABLE1}),
    ("grpo", 2, 1, 0, {}, {"val": STABLE}),
    ("grpo", 2, 1, 1, {}, {"val": STABLE1}),
    ("grpo", 2, 2, 0, {}, {"val": COLLAPSE}),
    ("grpo", 2, 2, 1, {}, {"val": COLLAPSE, "loss": {2: float("nan")}}),
    ("cfpo", 1, 1, 0, {}, {"val": STABLE}),
    ("cfpo", 1, 1, 1, {}, {"val": STABLE1}),
    ("cfpo", 1, 1, 2, {"status": "running"}, {"val": FAILED_VAL}),
    ("cfpo", 1, 2, 0, {}, {"val": DIP}),
    ("cfpo", 1, 2, 1, {}, {"val": STABLE1}),
    ("cfpo", 2, 1, 0, {}, {"val": STABLE, "entropy": {4: 2.0, 6: 0.01, 7: 0.01}}),  # one-step spike, 2-step dip
    ("cfpo", 2, 1, 1, {}, {"val": STABLE1, "entropy": {i: 0.01 for i in range(3, 9)}}),
    ("cfpo", 2, 2, 0, {}, {"val": STABLE}),
    ("cfpo", 2, 2, 1, {}, {"val": STABLE1, "grad_norm": {5: float("inf")}}),
]
PARAMS = {"rollout_batches": str(R), "eval_every": "1", "val_prompts": "100"}  # start 0.2: 2 SE = 0.08
# (objective, batch_ratio, iterations, seed) -> (step, rollout batch, words in the reason)
COLLAPSED = {
    ("grpo", 1, 1, 1): (3, 3.0, "diverged"),
    ("grpo", 1, 2, 0): (3, 1.5, "entropy >"),
    ("grpo", 2, 2, 0): (8, 2.0, "val reward"),
    ("grpo", 2, 2, 1): (2, 0.5, "non-finite loss; val reward"),
    ("cfpo", 2, 1, 1): (3, 1.5, "entropy <"),
    ("cfpo", 2, 2, 1): (5, 1.25, "non-finite grad_norm"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """s/proxy (the study above), m/proxy (no grad_norm), f/proxy (failed only), c/proxy (one run still open)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    ids: dict = {}
    exp = client.create_experiment("s/proxy", artifact_location=(root / "mlartifacts").as_uri())
    parent = sweep_parent(client, exp, "s", "proxy")
    for objective, b, it, seed, run_kw, m_kw in RUNS:
        run_id = log_run(client, exp, study="s", scale="proxy", objective=objective, batch_ratio=b, iterations=it,
                         seed=seed, metrics=metrics(b * it, **m_kw), parent_run_id=parent, params=PARAMS, **run_kw)
        ids[(objective, b, it, seed, run_kw.get("attempt", 1))] = run_id
    exp_m = client.create_experiment("m/proxy")
    for seed in (0, 1):
        log_run(client, exp_m, study="m", scale="proxy", objective="grpo", batch_ratio=1, iterations=1, seed=seed,
                metrics=metrics(1, STABLE, drop=("grad_norm",)))
    exp_f = client.create_experiment("f/proxy")
    log_run(client, exp_f, study="f", scale="proxy", objective="grpo", batch_ratio=1, iterations=1, seed=0,
            metrics=metrics(1, STABLE), status="failed")
    exp_c = client.create_experiment("c/proxy")
    for seed, mlflow_status in [(0, None), (1, "RUNNING")]:  # seed 1: tagged complete, run not ended yet
        ids[("c", seed)] = log_run(client, exp_c, study="c", scale="proxy", objective="cfpo", batch_ratio=1,
                                   iterations=1, seed=seed, metrics=metrics(1, STABLE), mlflow_status=mlflow_status)
    return {"uri": uri, "db": root / "mlflow.db", "ids": ids, "parent": parent}


@pytest.fixture(scope="module")
def data(store, tmp_path_factory):
    return load_study("s", "proxy", tracking_uri=store["uri"], cache_dir=tmp_path_factory.mktemp("cache"))


def run_id(store, objective, b, it, seed, attempt=1) -> str:
    return store["ids"][(objective, b, it, seed, attempt)]


# ------------------------------------------------------------------------------------------------ load
def test_long_table_holds_latest_usable_attempts(store, data):
    assert list(data.long.columns) == LONG_COLUMNS
    assert len(data.runs) == 16  # 2 objectives x 4 cells x 2 seeds
    chosen = set(data.runs["run_id"])
    assert run_id(store, "grpo", 1, 1, 0, attempt=2) in chosen  # not failed attempt 1, not running attempt 3
    assert store["parent"] not in chosen
    excluded = {(r.objective, r.status, r.run_id) for r in data.excluded.itertuples()}
    assert excluded == {("grpo", "failed", run_id(store, "grpo", 1, 1, 2)),
                        ("cfpo", "running", run_id(store, "cfpo", 1, 1, 2))}
    assert not (data.metric("val/reward")["value"] >= 0.9).any()  # no value of a failed/running attempt got in
    rows = data.long[data.long["run_id"] == run_id(store, "grpo", 2, 2, 0)]
    np.testing.assert_allclose(rows["rollout_batch"], rows["step"] / 4)
    val = rows[rows["metric"] == "val/reward"]
    assert val["step"].tolist() == [0, 4, 8, 12, 16] and val["value"].tolist() == COLLAPSE


def test_inf_and_nan_survive_the_store(store, data):
    loss = data.metric("loss").set_index(["run_id", "step"])["value"]
    assert np.isnan(loss[(run_id(store, "grpo", 2, 2, 1), 2)])
    grad_norm = data.metric("grad_norm").set_index(["run_id", "step"])["value"]
    assert grad_norm[(run_id(store, "cfpo", 2, 2, 1), 5)] == np.inf  # sqlite stores Inf as the largest float


def test_second_load_reads_cache_not_mlflow(store, tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    shutil.copy(store["db"], db)
    uri, cache = f"sqlite:///{db}", tmp_path / "cache"
    first = load_study("s", "proxy", tracking_uri=uri, cache_dir=cache)
    assert (first.fetched_runs, first.cached_runs) == (16, 0)

    def no_history(*args, **kwargs):
        raise AssertionError("metric history read from MLflow for a cached run")

    monkeypatch.setattr(MlflowClient, "get_metric_history", no_history)
    second = load_study("s", "proxy", tracking_uri=uri, cache_dir=cache)
    assert (second.fetched_runs, second.cached_runs) == (0, 16)
    pd.testing.assert_frame_equal(first.long.reset_index(drop=True), second.long.reset_index(drop=True))

    db.unlink()  # finished runs cannot change: the cache alone regenerates everything
    third = load_study("s", "proxy", tracking_uri=uri, cache_dir=cache)
    assert not db.exists() and third.source.startswith("cache")
    pd.testing.assert_frame_equal(first.long.reset_index(drop=True), third.long.reset_index(drop=True))
    pd.testing.assert_frame_equal(first.excluded, third.excluded)


def test_open_run_is_loaded_but_not_cached(store, tmp_path):
    first = load_study("c", "proxy", tracking_uri=store["uri"], cache_dir=tmp_path)
    assert len(first.runs) == 2 and first.fetched_runs == 2
    second = load_study("c", "proxy", tracking_uri=store["uri"], cache_dir=tmp_path)
    assert (second.fetched_runs, second.cached_runs) == (1, 1)
    assert not (tmp_path / f"{store['ids'][('c', 1)]}.parquet").exists()


def test_empty_study_and_missing_metric_errors(store, tmp_path):
    with pytest.raises(AnalysisError, match="no MLflow experiment 'nosuch/proxy'"):
        load_study("nosuch", "proxy", tracking_uri=store["uri"], cache_dir=tmp_path)
    with pytest.raises(AnalysisError, match="no complete or diverged runs"):
        load_study("f", "proxy", tracking_uri=store["uri"], cache_dir=tmp_path)
    with pytest.raises(AnalysisError, match="no MLflow store at .*absent.db, and no cached runs of 's/proxy'"):
        load_study("s", "proxy", tracking_uri=f"sqlite:///{tmp_path / 'absent.db'}", cache_dir=tmp_path / "c")
    m = load_study("m", "proxy", tracking_uri=store["uri"], cache_dir=tmp_path)
    with pytest.raises(AnalysisError, match="'grad_norm' was not logged by any of the 2 runs"):
        m.require(["val/reward", "grad_norm"])


# -------------------------------------------------------------------------------------------- collapse
def test_collapse_flags_exactly_the_collapsed_runs(store, data):
    verdicts = detect_collapse(data.long, data.runs).set_index("run_id")
    expected = {run_id(store, *key, attempt=2 if key == ("grpo", 1, 1, 0) else 1): v for key, v in COLLAPSED.items()}
    assert set(verdicts.index[verdicts["collapsed"]]) == set(expected)
    for rid, (step, rb, reason) in expected.items():
        assert verdicts.loc[rid, "step"] == step and verdicts.loc[rid, "rollout_batch"] == rb
        assert verdicts.loc[rid, "reason"].startswith(reason.split(";")[0])
        assert all(part.strip() in verdicts.loc[rid, "reason"] for part in reason.split(";"))
    assert (verdicts.loc[~verdicts["collapsed"], "reason"] == "").all()


# ---------------------------------------------------------------------------------------------- tables
@pytest.fixture(scope="module")
def table(data):
    return cell_table(run_summaries(data.long, data.runs), detect_collapse(data.long, data.runs),
                      data.excluded).set_index(["batch_ratio", "iterations", "objective"])


def test_table_values_equal_known_numbers(table):
    row = table.loc[(2, 2, "grpo")]  # both seeds COLLAPSE: identical, so the interval is a point
    assert row["seeds"] == 2 and row["collapsed_n"] == 2 and row["collapse_rbs"] == [0.5, 2.0]
    assert (row["collapse_lo"], row["collapse_hi"]) == pytest.approx(stats.binomtest(2, 2).proportion_ci(
        method="exact"))
    assert row["final_val_mean"] == pytest.approx(0.1) and row["peak_val_mean"] == pytest.approx(0.6)
    assert row["drop_from_peak_mean"] == pytest.approx(0.5) and row["gain_val_mean"] == pytest.approx(-0.1)
    assert row["lastk_val_mean"] == pytest.approx((0.2 + 0.1 + 0.1) / 3)
    assert row["auc_val_mean"] == pytest.approx((0.4 + 0.4 + 0.15 + 0.1) / 4)  # trapezoids / 4 rollout batches
    assert row["final_val_lo"] == pytest.approx(0.1) and row["final_val_hi"] == pytest.approx(0.1)
    assert row["fell_n"] == 2 and row["fell_rbs"] == [3.0, 3.0]  # 0.2 -> 0.1 twice: beyond 2 SE (0.08)

    row = table.loc[(1, 1, "cfpo")]  # STABLE and STABLE1
    lo, hi = stats.t.interval(0.95, 1, loc=0.65, scale=stats.sem([0.6, 0.7]))
    assert (row["final_val_mean"], row["final_val_lo"], row["final_val_hi"]) == pytest.approx((0.65, lo, hi))
    assert row["auc_val_mean"] == pytest.approx((1.9 / 4 + 1.95 / 4) / 2)
    assert row["drop_from_peak_mean"] == pytest.approx(0.0) and row["fell_n"] == 0
    assert row["above_start_rmean"] == 4  # never fell: censored at the budget
    # on-policy: the ratio is never measured, so ratio statistics are n/a, not 0
    assert np.isnan(row["mean_rollout_kl"]) and np.isnan(row["mean_clip_ratio"])
    assert row["grad_clipped_frac"] == pytest.approx(0.25) and row["steps_min"] == row["steps_max"] == 1

    row = table.loc[(1, 1, "grpo")]  # attempt 2 (STABLE) and seed 1, diverged at rollout batch 3 near its best
    assert row["final_val_mean"] == pytest.approx((0.6 + 0.0) / 2)  # diverged: 0 from the divergence on
    assert row["auc_val_mean"] == pytest.approx((1.9 / 4 + (0.3 + 0.45 + 0.25) / 4) / 2)  # over the full budget
    assert row["run_ids"] == sorted(row["run_ids"]) and len(row["run_ids"]) == 2
    assert row["excluded_n"] == 1  # seed 2 failed

    row = table.loc[(1, 2, "cfpo")]  # DIP's one evaluation at 0.15 is within 2 SE of its start 0.2: no fall
    assert row["fell_n"] == 0 and row["collapsed_n"] == 0
    row = table.loc[(2, 2, "cfpo")]  # rollout_kl = 0.001 x step: per-batch means 0.0025, 0.0065, 0.0105, 0.0145
    assert row["mean_rollout_kl"] == pytest.approx(0.0085) and row["peak_rollout_kl"] == pytest.approx(0.0145)
    assert row["mean_clip_ratio"] == pytest.approx(0.04)
    assert row["steps_min"] == row["steps_max"] == row["steps_configured"] == 4 and not row["steps_flag"]


# --------------------------------------------------------------------------------------------- figures
def test_curve_figures_have_grid_and_one_line_per_objective(data):
    specs = curve_metrics(data)
    assert [s.key for s in specs] == [c.key for c in CURVES if c.key != "kl"]  # no run logged kl
    for spec in specs:
        fig = curve_figure(data, spec)
        assert len(fig.axes) == 4 and fig.axes[0].get_gridspec().get_geometry() == (2, 2)
        assert "s (proxy scale)" in fig.get_suptitle() and fig.legends
        for ax in fig.axes:
            assert sorted(line.get_label() for line in ax.get_lines()) == ["cfpo", "grpo"]
        assert fig.axes[2].get_xlabel() == "rollout batches" and fig.axes[0].get_ylabel() == spec.label
    fig = curve_figure(data, "val/reward")
    ax = fig.axes[0]  # batch ratio 1, iterations 1
    assert ax.get_title() == "batch ratio 1, iterations 1"
    grpo = next(line for line in ax.get_lines() if line.get_label() == "grpo")
    np.testing.assert_allclose(grpo.get_xdata(), [0, 1, 2, 3, 4])
    np.testing.assert_allclose(grpo.get_ydata(), [0.2, 0.4, 0.5, 0.6, 0.6])  # failed/running attempts left out
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert colors == {line.get_label(): line.get_color() for line in curve_figure(data, "entropy").axes[3].get_lines()}


def test_stable_regime_marks_collapsed_cells(table):
    fig = stable_regime_figure(table.reset_index(), "s", "proxy")
    panels = [ax for ax in fig.axes if ax.get_title()]  # colorbars have no title
    assert len(panels) == 4
    hatched = {ax.get_title(): sum(isinstance(p, Rectangle) and p.get_hatch() == HATCH for p in ax.patches)
               for ax in panels}
    assert hatched == {"grpo: final val reward": 3, "grpo: val reward AUC / length": 3,
                       "cfpo: final val reward": 2, "cfpo: val reward AUC / length": 2}
    image = panels[0].get_images()[0].get_array()
    assert image.shape == (2, 2) and image[1, 1] == pytest.approx(0.1)  # grpo, batch ratio 2, iterations 2


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_figures_writes_everything(store, tmp_path, capsys):
    assert main(["figures", "s", "--scale", "proxy", "--results-dir", str(tmp_path), "--tracking-uri",
                 store["uri"]]) == 0
    root = tmp_path / "s" / "proxy"
    for stem in ["stable_regime"] + [c.slug for c in CURVES if c.key != "kl"]:
        assert (root / "figures" / f"{stem}.png").stat().st_size > 0 and (root / "figures" / f"{stem}.pdf").exists()
    assert not (root / "figures" / "ref_kl.png").exists()
    tex = (root / "tables" / "val_reward.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex
    readme = (root / "README.md").read_text()
    assert "figures/stable_regime.png" in readme and "grpo** collapsed in 3 of 4 cells" in readme
    for key, rid in store["ids"].items():
        failed_attempt = key[:4] == ("grpo", 1, 1, 0) and key[4] != 2
        if key[0] != "c" and not failed_attempt:
            assert rid in readme, key  # chosen runs and excluded cells, by run id
    assert run_id(store, "grpo", 1, 1, 0, attempt=1) not in readme
    out = capsys.readouterr().out
    assert "16 runs (16 read from MLflow, 0 from cache)" in out and "on-policy control: FAILED" in out
    # this synthetic study's on-policy arms differ (STABLE vs STABLE1): the report must say so loudly
    assert "**CONTROL FAILED**" in readme and readme.index("## Verdict") < readme.index("## Limitations")
    paired = pd.read_csv(root / "tables" / "paired.csv")
    assert {"batch_ratio", "iterations", "objective", "baseline", "measure", "n", "mean_diff", "lo", "hi", "mde",
            "verdict"} <= set(paired.columns)
    assert {"final_val", "auc_val", "lastk_val"} == set(paired["measure"])  # gain would count final twice
    assert set(paired["objective"]) == {"cfpo"} and set(paired["baseline"]) == {"grpo"}
    row = paired[(paired["batch_ratio"] == 1) & (paired["iterations"] == 1) & (paired["measure"] == "final_val")]
    assert row["n"].item() == 2 and row["mean_diff"].item() == pytest.approx(((0.6 - 0.6) + (0.7 - 0.0)) / 2)
    agg = pd.read_csv(root / "tables" / "aggregate.csv")
    assert list(agg.columns[:4]) == ["objective", "baseline", "measure", "verdict"]  # the tooling contract
    assert list(agg["measure"]) == ["auc_val", "final_val", "lastk_val"]  # the declared primary first
    assert list(agg["role"]) == ["primary", "secondary", "secondary"] and (agg["cells"].str.count("x") == 3).all()
    runs = pd.read_csv(root / "tables" / "runs.csv")
    assert len(runs) == 16 and {"run_id", "seed", "auc_val", "collapsed", "censored", "collapse_rule"} <= set(runs)
    assert (root / "figures" / "verdict.png").exists() and "figures/verdict.png" in readme


def test_cli_tables_only_and_errors(store, tmp_path, capsys):
    common = ["--results-dir", str(tmp_path), "--tracking-uri", store["uri"]]
    assert main(["tables", "m", *common]) == 0  # grad_norm is not needed for tables
    assert (tmp_path / "m" / "proxy" / "tables" / "stability.md").exists()
    assert not (tmp_path / "m" / "proxy" / "figures").exists()
    capsys.readouterr()
    # a diagnostic no run logged is n/a, not a refusal: m has no grad_norm, and gets every other figure
    assert main(["figures", "m", *common]) == 0
    assert not (tmp_path / "m" / "proxy" / "figures" / "grad_norm.png").exists()
    assert "grad_norm" in (tmp_path / "m" / "proxy" / "README.md").read_text().split("Not logged by any run")[1]
    capsys.readouterr()
    for argv, message in [(["figures", "nosuch", "--scale", "proxy"], "no MLflow experiment"),
                          (["figures", "nosuch"], "--scale auto: nosuch has no scales"),
                          (["tables", "f"], "no complete or diverged runs"),
                          (["tables", "s", "--rule", "val_drop=2"], "--rule val_drop")]:
        assert main([*argv, *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["tables", "s", "--baseline", "ppo"], "--baseline 'ppo' is not an objective of this study; allowed: grpo, cfpo"),
    (["tables", "m", "--baseline", "grpo"], "the study has one objective (grpo)"),
    (["figures", "s", "--spec", "/nonexistent/s.yaml"], "--spec /nonexistent/s.yaml: no such file"),
    (["tables", "s", "--only", "nosuch=1"], "--only nosuch: no run has this param"),
    (["tables", "s", "--only", "novalue"], "--only expects KEY=VALUE"),
    (["tables", "s", "--cache-dir", "/etc/hostname/cache"], "/etc/hostname is a file; allowed: a folder"),
])
def test_bad_comparison_input_is_one_line_exit_2_and_nothing_written(store, tmp_path, capsys, argv, message):
    results = tmp_path / "results"
    assert main([*argv, "--results-dir", str(results), "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not results.exists()


def test_runs_that_differ_beyond_the_seed_are_refused_not_pooled(tmp_path, capsys):
    """A non-axis `--set rollout_batches=10` lands in the same experiment: the analysis names the field instead of
    averaging 10- and 30-batch runs as seeds; --only picks one setting."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("p/proxy")
    for objective in ("grpo", "cfpo"):
        for seed, budget in [(0, 4), (1, 4), (2, 10)]:
            params = {**PARAMS, "rollout_batches": str(budget)}
            log_run(client, exp, study="p", scale="proxy", objective=objective, batch_ratio=1, iterations=1,
                    seed=seed, metrics=metrics(1, STABLE), params=params,
                    tags={"harness.replicate_hash": f"{objective}-{budget}"})
    common = ["--results-dir", str(tmp_path / "out"), "--tracking-uri", uri]
    capsys.readouterr()  # MLflow's store set-up chatter
    assert main(["tables", "p", *common]) == 2
    err = capsys.readouterr().err
    assert "runs of cfpo at batch ratio 1 x iterations 1 differ in rollout_batches = 10, 4" in err
    assert "--only rollout_batches=VALUE" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert main(["tables", "p", *common, "--only", "rollout_batches=4"]) == 0
    cells = pd.read_csv(tmp_path / "out" / "p" / "proxy" / "tables" / "cells.csv")
    assert cells["seeds"].tolist() == [2, 2]


def test_default_tracking_uri(monkeypatch, tmp_path):
    from analysis.layout import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_tracking_uri(tmp_path) == "http://mlflow:5000"


def test_bench_times_cold_and_warm(store):
    result = benchmark("c", "proxy", tracking_uri=store["uri"])
    assert result.cold.fetched_runs == 2 and result.warm.cached_runs == 1  # the open run is never cached
    assert result.ratio > 0 and "ratio cold/warm" in result.describe()


def test_the_declared_hypothesis_is_what_is_tested(store, tmp_path, capsys):
    """A sweep file's hypothesis: picks the primary measure and cells; a declared cell the study did not run,
    a spec of another study, or a bad field is one line, exit 2, nothing written."""
    spec = tmp_path / "s.yaml"
    common = ["--results-dir", str(tmp_path / "results"), "--tracking-uri", store["uri"], "--spec", str(spec)]
    spec.write_text("study: s\nhypothesis: {measure: final_val, cells: [[2, 2]], margin: 0.05}\n")
    assert main(["tables", "s", *common]) == 0
    agg = pd.read_csv(tmp_path / "results" / "s" / "proxy" / "tables" / "aggregate.csv")
    assert (agg.loc[0, "measure"], agg.loc[0, "role"], agg.loc[0, "cells"], agg.loc[0, "margin"]) == (
        "final_val", "primary", "2x2", 0.05)
    assert "primary (final_val, mean over 2x2): cfpo - grpo" in capsys.readouterr().out
    for text, message in [("study: s\nhypothesis: {cells: [[8, 8]]}\n", "hypothesis.cells: (8, 8) not in this study"),
                          ("study: t\n", "declares study 't', not 's'"),
                          ("study: s\nhypothesis: {measure: gain_val}\n", "hypothesis.measure")]:
        spec.write_text(text)
        out = tmp_path / "bad"
        argv = ["tables", "s", "--results-dir", str(out), "--tracking-uri", store["uri"], "--spec", str(spec)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_published_runs_regenerate_the_study_without_mlflow(store, tmp_path, capsys):
    """The runs travel with the results (results/<study>/<scale>/runs/): with the MLflow store gone, as on a
    fresh clone, the same command writes the same report, tables and figures, byte for byte."""
    db = tmp_path / "mlflow.db"
    shutil.copy(store["db"], db)
    argv = ["figures", "s", "--scale", "proxy", "--results-dir", str(tmp_path / "results"), "--tracking-uri",
            f"sqlite:///{db}"]
    assert main(argv) == 0
    study = tmp_path / "results" / "s" / "proxy"
    first = {p.relative_to(study): p.read_bytes() for p in sorted(study.rglob("*")) if p.is_file()}
    assert any(p.parts[0] == "runs" and p.suffix == ".parquet" for p in first)
    assert "[runs/](runs/)" in (study / "README.md").read_text()
    db.unlink()
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 read from MLflow" in capsys.readouterr().out
    again = {p.relative_to(study): p.read_bytes() for p in sorted(study.rglob("*")) if p.is_file()}
    assert again.keys() == first.keys()
    assert [p for p in first if again[p] != first[p]] == []
