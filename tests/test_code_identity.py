"""A run's code identity (harness.tracking.code_state) in a real git repository made for the test: a clean tree,
an uncommitted edit, an untracked new module, a commit made meanwhile, and a change outside the source."""
import subprocess

import pytest

from harness import tracking


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "job.py").write_text("STEP = 1\n")
    (tmp_path / "results").mkdir()
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    return tmp_path


def test_clean_edit_untracked_and_commit(repo):
    clean = tracking.code_state()
    assert clean["git.dirty"] == "false" and "git.diff_hash" not in clean and len(clean["git.commit"]) == 40
    assert tracking.code_diff() == ""

    (repo / "harness" / "job.py").write_text("STEP = 2\n")
    edited = tracking.code_state()
    assert edited["git.dirty"] == "true" and edited["git.commit"] == clean["git.commit"]
    assert "-STEP = 1" in tracking.code_diff() and "+STEP = 2" in tracking.code_diff()

    (repo / "harness" / "new.py").write_text("X = 1\n")  # untracked: git status --untracked-files=no misses it
    untracked = tracking.code_state()
    assert untracked["git.dirty"] == "true" and untracked["git.diff_hash"] != edited["git.diff_hash"]
    assert "untracked file harness/new.py\nX = 1" in tracking.code_diff()

    (repo / "results" / "table.csv").write_text("a\n")  # outputs are not code
    assert tracking.code_state() == untracked

    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "mid-sweep")
    committed = tracking.code_state()
    assert committed["git.dirty"] == "false" and committed["git.commit"] != clean["git.commit"]


def test_not_a_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    assert tracking.code_state() == {"git.commit": "unknown", "git.dirty": "false"}
