"""Figures with the objective zoo: 8 objectives on the reuse ladder (1,1), (4,4), (8,8), through the real CLI.

One synthetic MLflow store and one `python -m analysis figures` run for the module (the figures the CLI builds
are captured on the way, so the tests inspect exactly what was saved); style and layout checks need no store.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle

from analysis import figures
from analysis.cli import main
from analysis.metrics import CURVES
from analysis.style import PALETTE, objective_styles
from analysis.synthetic import make_study

ZOO = ("grpo", "clip-higher", "gspo", "cispo", "sapo", "cfpo", "gppo", "pg-is")
LADDER = [(1, 1), (4, 4), (8, 8)]
PUBLISHED = {"grpo": "#0072B2", "cfpo": "#D55E00"}  # colours of the published grpo-vs-cfpo figures


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """Runs the CLI once; returns the results folder and the figures it built, by stem."""
    root = tmp_path_factory.mktemp("zoo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    make_study(uri, "zoo", objectives=ZOO, cells=LADDER, seeds=(0, 1, 2), rollout_batches=1, eval_every=1)
    built: dict = {}

    def spy(name, key=None):
        real = getattr(figures, name)

        def wrapper(*args, **kwargs):
            fig = real(*args, **kwargs)
            built[key(*args) if key else name] = fig
            return fig
        return wrapper

    with pytest.MonkeyPatch.context() as mp:  # make_figures looks these up in analysis.figures at call time
        mp.setattr(figures, "stable_regime_figure", spy("stable_regime_figure"))
        mp.setattr(figures, "verdict_figure", spy("verdict_figure"))
        mp.setattr(figures, "curve_figure", spy("curve_figure", key=lambda data, spec: spec.slug))
        assert main(["figures", "zoo", "--scale", "proxy", "--tracking-uri", uri,
                     "--results-dir", str(root / "results")]) == 0
    return {"root": root / "results" / "zoo" / "proxy", "figs": built}


def titled(fig) -> list:
    return [ax for ax in fig.axes if ax.get_title()]  # colourbars have no title


def test_cli_writes_every_figure(zoo):
    folder = zoo["root"] / "figures"
    stems = ["stable_regime", "verdict"] + [c.slug for c in CURVES if c.key != "kl"]
    for stem in stems:
        assert (folder / f"{stem}.png").stat().st_size > 0 and (folder / f"{stem}.pdf").exists(), stem
    assert "figures/stable_regime.png" in (zoo["root"] / "README.md").read_text()


def test_stable_regime_is_one_panel_per_objective(zoo):
    fig = zoo["figs"]["stable_regime_figure"]
    panels = titled(fig)
    quantities = [label for _, label in figures.MAP_QUANTITIES]
    assert sorted(ax.get_title() for ax in panels) == sorted(f"{o}: {q}" for o in ZOO for q in quantities)
    assert panels[0].get_gridspec().get_geometry() == (2, 4)  # 8 panels a quantity: 2 rows of 4
    assert len(fig.axes) == len(panels) + len(quantities)  # one shared colourbar per quantity
    for ax in panels:
        image = ax.get_images()[0]
        grid = image.get_array().filled(np.nan)
        assert grid.shape == (3, 3)  # the study's full batch ratio x iterations grid
        assert np.isfinite(np.diag(grid)).all() and np.isnan(grid[~np.eye(3, dtype=bool)]).all()
        texts = [t.get_text() for t in ax.texts]
        assert len(texts) == 3 and all(t.endswith("/3 collapsed") for t in texts)  # off-ladder cells: blank
    for q in range(len(quantities)):  # one colour scale per quantity
        assert len({ax.get_images()[0].get_clim() for ax in panels[8 * q:8 * q + 8]}) == 1


def test_curves_have_one_distinct_colour_per_objective_and_an_outside_legend(zoo):
    curves = {k: f for k, f in zoo["figs"].items() if k not in ("stable_regime_figure", "verdict_figure")}
    assert len(curves) >= 5
    seen: dict[str, str] = {}
    for slug, fig in curves.items():
        assert len(titled(fig)) == 3  # the ladder's three cells, not a 3 x 3 grid of mostly empty panels
        for ax in fig.axes:
            colours = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()}
            assert set(colours) == set(ZOO) and len(set(colours.values())) == len(ZOO), slug
            styles = {(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()}
            assert len(styles) == len(ZOO), slug  # lines separate in greyscale too
            for name, colour in colours.items():
                assert seen.setdefault(name, colour) == colour, (slug, name)
        legend = fig.legends[0]
        assert len(legend.get_texts()) == len(ZOO) and legend._ncols in (3, 4)
        top = legend.get_window_extent().y1  # figures were drawn when saved
        assert all(top <= ax.get_window_extent().y0 for ax in fig.axes), slug  # below every panel
    assert {o: seen[o] for o in PUBLISHED} == {o: c.lower() for o, c in PUBLISHED.items()}


def test_verdict_has_one_row_per_objective_in_its_colour(zoo):
    fig = zoo["figs"]["verdict_figure"]
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(labels) == sorted(f"{o} - grpo" for o in ZOO if o != "grpo")
    styles = objective_styles(ZOO)
    markers = [line for line in ax.get_lines() if line.get_marker() not in ("None", "", None, "|")]
    colours = {to_hex(line.get_color()) for line in markers}
    assert colours == {styles[o]["color"].lower() for o in ZOO if o != "grpo"}


def test_colour_is_fixed_whatever_the_other_objectives():
    full = objective_styles(ZOO)
    assert {o: full[o]["color"] for o in PUBLISHED} == PUBLISHED
    assert objective_styles(["grpo", "cfpo"]) == {o: full[o] for o in ("grpo", "cfpo")}
    for subset in (["gspo"], ["cfpo", "pg-is"], ["sapo", "grpo", "cispo"], [*ZOO, "ablation-a", "ablation-b"]):
        styles = objective_styles(subset)
        assert all(styles[o] == full[o] for o in subset if o in full), subset
    ten = objective_styles([*ZOO, "zeta", "alpha"])  # unknown names take unpinned colours, yellow last
    assert len({s["color"] for s in ten.values()}) == 10 and all(s["color"] in PALETTE for s in ten.values())
    assert len({(s["linestyle"], s["marker"]) for s in ten.values()}) == 10
    assert "#F0E442" not in {s["color"] for s in ten.values()}  # faint yellow only past 10 lines


def test_stable_regime_map_with_a_partial_grid_and_a_short_last_row():
    rows = [("grpo", 1, 1, 0), ("grpo", 2, 2, 2), ("cfpo", 1, 1, 0), ("gspo", 1, 1, 1), ("sapo", 1, 1, 0),
            ("pg-is", 1, 1, 0)]  # (2, 2) swept by grpo only; (1, 2) and (2, 1) by no one
    table = pd.DataFrame([{"objective": o, "batch_ratio": b, "iterations": i, "collapsed_n": k, "seeds": 2,
                           "final_val_mean": 0.5 - 0.1 * k, "auc_val_mean": np.nan if o == "sapo" else 0.4}
                          for o, b, i, k in rows])
    fig = figures.stable_regime_figure(table, "partial", "proxy")
    panels = titled(fig)
    assert len(panels) == 10 and panels[0].get_gridspec().get_geometry() == (2, 4)
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in panels}
    assert texts["cfpo: final val reward"] == ["0.500\n0/2 collapsed", "no runs"]  # grpo ran (2, 2): shown
    hatched = {t: sum(isinstance(p, Rectangle) and p.get_hatch() == figures.HATCH for p in ax.patches)
               for t, ax in ((ax.get_title(), ax) for ax in panels)}
    assert hatched["grpo: final val reward"] == 1 and hatched["gspo: final val reward"] == 1
    fig.savefig(io.BytesIO(), format="png")  # lays out and renders without error (NaN-only cells too)
