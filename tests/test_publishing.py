"""Publishing refuses numbers that cannot be traced to committed code: a study written under the repository's
results/ must have every run from one clean commit, unless --allow-dirty stamps every output provisional."""
from __future__ import annotations

import pytest
from mlflow import MlflowClient

import analysis.layout
from analysis.cli import main
from analysis.synthetic import make_study


@pytest.fixture()
def published(tmp_path, monkeypatch):
    """A synthetic study whose runs all carry commit `c0ffee` from a clean tree, and a stand-in for the
    repository's results/ (the real one holds the published studies and must not be written by a test)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_study(uri, "p", cells=[(1, 1), (2, 2)], seeds=(0, 1), rollout_batches=10)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("p/proxy").experiment_id])
    runs = [r for r in runs if r.data.tags.get("harness.status") in ("complete", "diverged")]  # the counted ones
    for run in runs:
        client.set_tag(run.info.run_id, "git.commit", "c0ffee")
        client.set_tag(run.info.run_id, "git.dirty", "false")
    results = tmp_path / "results"
    monkeypatch.setattr(analysis.layout, "PUBLISHED_ROOT", results)
    argv = ["tables", "p", "--scale", "proxy", "--results-dir", str(results), "--tracking-uri", uri,
            "--spec", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("study: p\n")
    return client, runs, results, argv


def test_one_clean_commit_is_published(published, capsys):
    _, _, results, argv = published
    assert main(argv) == 0
    assert "provisional" not in (results / "p" / "proxy" / "tables" / "aggregate.csv").read_text()


def test_a_dirty_run_is_refused_with_nothing_written(published, capsys):
    client, runs, results, argv = published
    client.set_tag(runs[0].info.run_id, "git.dirty", "true")
    client.set_tag(runs[0].info.run_id, "git.diff_hash", "d1ff" * 16)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "c0ffee (dirty tree, diff d1ffd1ffd1ff): 1 runs" in err and "--allow-dirty" in err
    assert not (results / "p").exists()


def test_several_commits_or_unknown_code_are_refused(published, capsys):
    client, runs, results, argv = published
    client.set_tag(runs[0].info.run_id, "git.commit", "beef")
    assert main(argv) == 2
    assert "beef: 1 runs" in capsys.readouterr().err
    client.delete_tag(runs[0].info.run_id, "git.commit")
    assert main(argv) == 2
    assert "unknown: 1 runs" in capsys.readouterr().err
    assert not (results / "p").exists()


def test_allow_dirty_stamps_report_and_every_table(published, capsys):
    client, runs, results, argv = published
    client.set_tag(runs[0].info.run_id, "git.dirty", "true")
    argv = ["figures", *argv[1:], "--allow-dirty"]
    assert main(argv) == 0
    out = results / "p" / "proxy"
    tables = sorted((out / "tables").iterdir())
    assert len(tables) == 15
    for path in tables:
        assert "provisional: code not committed (c0ffee" in path.read_text(), path.name
    readme = (out / "README.md").read_text()
    assert "Provisional: code not committed" in readme and "--allow-dirty" in readme.splitlines()[2]


def test_outside_results_the_report_says_it_and_nothing_is_refused(published, tmp_path, capsys):
    client, runs, _, argv = published
    client.set_tag(runs[0].info.run_id, "git.dirty", "true")
    elsewhere = tmp_path / "elsewhere"
    argv = ["figures", *argv[1:]]
    argv[argv.index("--results-dir") + 1] = str(elsewhere)
    assert main(argv) == 0
    assert "Code versions differ or are not clean" in (elsewhere / "p" / "proxy" / "README.md").read_text()


def test_report_attached_to_the_sweep_run_and_published_runs_import_once(published, tmp_path, capsys):
    """figures read from MLflow log the report next to the runs; `import` loads runs/ into another store."""
    client, _, results, argv = published
    assert main(["figures", *argv[1:]]) == 0
    exp = client.get_experiment_by_name("p/proxy")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`harness.sweep` = 'true'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert logged == {"study/README.md", "study/tables", "study/figures"}
    assert "primary (auc_val" in client.get_experiment(exp.experiment_id).tags["mlflow.note.content"]

    other = f"sqlite:///{tmp_path / 'browse.db'}"
    common = ["p", "--scale", "proxy", "--results-dir", str(results), "--tracking-uri", other]
    assert main(["import", *common]) == 0
    assert "8 runs imported" in capsys.readouterr().out
    assert main(["import", *common]) == 0
    again = capsys.readouterr().out
    assert "0 runs imported" in again and "8 already there" in again
    browse = MlflowClient(other)
    copies = browse.search_runs([browse.get_experiment_by_name("p/proxy (published)").experiment_id])
    assert len(copies) == 8
    source = {r.data.tags["harness.source_run"]: r for r in copies}
    original = client.get_run(next(iter(source)))
    copy = source[original.info.run_id]
    assert copy.data.tags["objective"] == original.data.tags["objective"]
    assert [m.value for m in browse.get_metric_history(copy.info.run_id, "val/reward")] == \
        [m.value for m in client.get_metric_history(original.info.run_id, "val/reward")]


def test_the_confirmatory_report_names_its_exploration_and_tests_its_own_question(tmp_path, capsys):
    """A scale with `confirms:` is analysed with its own hypothesis, and its report links the exploration it came
    from (and the exploration's report links its confirmation)."""
    import yaml

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_study(uri, "q", scale="confirm", cells=[(1, 1), (2, 2), (4, 4)], seeds=(5, 6), rollout_batches=10)
    make_study(uri, "q", scale="explore", cells=[(1, 1), (2, 2), (4, 4)], seeds=(0, 1), rollout_batches=10)
    spec = tmp_path / "q.yaml"
    spec.write_text(yaml.safe_dump({
        "study": "q", "hypothesis": {"cells": "off-policy"},
        "scales": {"explore": {"seeds": [0, 1]},
                   "confirm": {"confirms": "explore", "seeds": [5, 6], "hypothesis": {"cells": [[4, 4]]}}}}))
    common = ["--results-dir", str(tmp_path / "out"), "--tracking-uri", uri, "--spec", str(spec)]
    assert main(["figures", "q", "--scale", "confirm", *common]) == 0
    assert "mean over 4x4" in capsys.readouterr().out  # the scale's own question, not the sweep's
    readme = (tmp_path / "out" / "q" / "confirm" / "README.md").read_text()
    assert "**Confirmatory**" in readme and "[explore](../explore/README.md)" in readme
    assert "(the exploration's: 0, 1)" in readme and "(scales.confirm.hypothesis)" in readme
    assert main(["figures", "q", "--scale", "explore", *common]) == 0
    explored = (tmp_path / "out" / "q" / "explore" / "README.md").read_text()
    assert "**Exploratory**" in explored and "[confirm](../confirm/README.md)" in explored
