"""`python -m analysis replicate`: a rerun is judged by its conclusions (verdict, seed-level effect, collapse
counts), on hand-made studies whose answer is known, and through the CLI on a published study against itself."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.cli import main
from analysis.replicate import compare, welch
from analysis.synthetic import make_study
from analysis.verdicts import verdict_table
from harness.hypothesis import Hypothesis

CELLS = [(1, 1), (4, 4)]


def study(effect: float, seeds: int, collapsed_cfpo: int = 0, rng_seed: int = 0) -> pd.DataFrame:
    """Per-run scores: cfpo = grpo + effect + noise at (4, 4); the first `collapsed_cfpo` cfpo seeds collapse there."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for s in range(seeds):
        for b, it in CELLS:
            base = 0.4 + rng.normal(0, 0.1)
            for objective, value in (("grpo", base), ("cfpo", base + (effect + rng.normal(0, 0.01) if b > 1 else 0))):
                rows.append({"run_id": f"{objective}-{b}-{s}", "base_objective": objective, "objective": objective,
                             "extra_axes": "{}", "batch_ratio": b, "iterations": it, "seed": s, "auc_val": value,
                             "final_val": value, "lastk_val": value,
                             "collapsed": objective == "cfpo" and b > 1 and s < collapsed_cfpo})
    return pd.DataFrame(rows)


def checks_of(rerun: pd.DataFrame, published: pd.DataFrame) -> dict[str, bool]:
    h = Hypothesis()
    out = compare(verdict_table(rerun, "grpo", h, []), verdict_table(published, "grpo", h, []), rerun, published, h)
    return {c.what.split(" (difference")[0].split(" (Fisher")[0]: c.reproduces for c in out}


def test_welch_interval_is_scipys():
    a, b = np.array([0.1, 0.12, 0.08, 0.11]), np.array([0.02, 0.0, 0.03])
    d, lo, hi = welch(a, b, 0.05)
    assert d == np.mean(a) - np.mean(b) and lo > 0 and np.isnan(welch(a, b[:1], 0.05)[1])


def test_a_new_draw_of_the_same_effect_reproduces_a_different_effect_does_not():
    published = study(effect=0.05, seeds=10, rng_seed=1)
    same = checks_of(study(effect=0.05, seeds=10, rng_seed=2), published)
    assert all(same.values()), same
    other = checks_of(study(effect=-0.05, seeds=10, rng_seed=2), published)
    assert not other["cfpo - grpo, auc_val (primary): verdict"]  # higher there, lower here
    assert not other["cfpo - grpo, auc_val (primary): effect"]
    collapses = checks_of(study(effect=0.05, seeds=10, collapsed_cfpo=9, rng_seed=2), published)
    assert not collapses["cfpo: collapsed in the contrast cells"] and collapses["grpo: collapsed in the contrast cells"]


def test_cli_replicates_a_published_study_against_itself_and_refuses_a_folder_without_runs(tmp_path, capsys):
    """A synthetic study published (figures write runs/), then replicated from its MLflow store against the
    published copy: every conclusion reproduces, exit 0. A folder without runs/ is one line, exit 2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_study(uri, "rep", batch_ratios=(1, 4), iterations=(1, 4), seeds=(0, 1, 2), rollout_batches=10)
    assert main(["tables", "rep", "--results-dir", str(tmp_path / "published"), "--tracking-uri", uri]) == 0
    capsys.readouterr()
    argv = ["replicate", "rep", "--against", str(tmp_path / "published" / "rep" / "proxy"), "--results-dir",
            str(tmp_path / "rerun"), "--tracking-uri", uri]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cfpo - grpo, auc_val (primary): verdict" in out and "reproduces: every conclusion" in out
    assert main([*argv[:2], "--against", str(tmp_path)] + argv[4:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --against") and "no runs/ folder" in err and err.count("\n") == 1
