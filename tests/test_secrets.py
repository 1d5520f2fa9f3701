"""Credentials stay out of every output, unreachable services are one fast line, and `--launcher slurm` is
refused where it cannot work.

The end-to-end tests run a real PostgreSQL server whose ledger role needs a password (scram-sha-256 over TCP)
and a real `mlflow server` reached with `http://user:password@...`, then a tiny sweep of real `harness train`
jobs through the CLI; both passwords must appear nowhere: files under the results folder, the MLflow store
(tags, params, artifacts; also the server's own files), the ledger (attrs, and a pg_dump of its database),
what `sweep` and `status` print, and the command lines of the processes the sweep starts. PostgreSQL: Debian's
binaries as in tests/test_scale_out.py (skipped with the reason where they are absent).
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_sweep_e2e import TINY
from test_tracking_outage import Server

from harness.launch import free_port
from harness.redact import STORAGE_ENV, EnvSecret, redact
from tests.pg_server import PgServer, as_user

REPO = Path(__file__).resolve().parent.parent
DB_PASSWORD = f"dbpw{uuid.uuid4().hex[:16]}"
TRACKING_PASSWORD = f"mlpw{uuid.uuid4().hex[:16]}"
SECRETS = (DB_PASSWORD.encode(), TRACKING_PASSWORD.encode())


# -------------------------------------------------------------------------------------------- redact itself
@pytest.mark.parametrize("text,expected", [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("error: API request to http://me:p%40ss@10.0.0.1:5000/api/2.0/x failed",
     "error: API request to http://me:***@10.0.0.1:5000/api/2.0/x failed"),
    ("'postgresql+psycopg2://u:a/b@h/db' and https://x:y@z",
     "'postgresql+psycopg2://u:***@h/db' and https://x:***@z"),
    ("postgresql://:pw@h/db", "postgresql://:***@h/db"),
    ("http://127.0.0.1:5000/#/experiments", "http://127.0.0.1:5000/#/experiments"),
    ("postgresql://u@h/db sqlite:///r/mlflow.db", "postgresql://u@h/db sqlite:///r/mlflow.db"),
    ("no url here: a:b@c", "no url here: a:b@c"),
])
def test_redact(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected


def test_env_secret_pickles_as_the_variable_name(monkeypatch):
    url = f"postgresql://u:{DB_PASSWORD}@h/db"
    blob = pickle.dumps({"storage": EnvSecret(url, STORAGE_ENV)})
    assert DB_PASSWORD.encode() not in blob
    monkeypatch.setenv(STORAGE_ENV, url)
    assert pickle.loads(blob) == {"storage": url}
    monkeypatch.delenv(STORAGE_ENV)
    with pytest.raises(RuntimeError, match=STORAGE_ENV):
        pickle.loads(blob)


# ---------------------------------------------------------------------------------------- one-line refusals
SPEC = {"study": "refused",
        "base": {"model": "proxy", "task": "chain-sum", "generation_batch_size": 16, "val_prompts": 8,
                 "trl": {"num_generations": 4, "per_device_train_batch_size": 8}},
        "axes": {"objective": ["grpo", "cfpo"]}, "seeds": [0],
        "scales": {"proxy": {"base": {"rollout_batches": 2}}}}


def _refused(tmp_path: Path, *args: str, env: dict[str, str], limit_s: float = 10.0) -> str:
    """Runs `harness sweep` that must be refused: exit 2, one line on stderr, quickly, nothing written.
    Returns the line."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    results = tmp_path / "results"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "harness", "sweep", str(spec), "--scale", "proxy", "--workers",
                        "1", "--results-dir", str(results), *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    took = time.time() - t0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    assert took < limit_s, f"refused after {took:.1f} s: {lines[0]}"
    assert not results.exists() or not any(results.iterdir()), sorted(results.rglob("*"))
    for secret in SECRETS:
        assert secret.decode() not in r.stdout + r.stderr
    return lines[0]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", **extra}
    env.pop("HARNESS_RESULTS", None)
    return env


def test_ledger_server_down_is_one_line(tmp_path):
    port = free_port()
    line = _refused(tmp_path, "--storage", f"postgresql://sweeper:{DB_PASSWORD}@127.0.0.1:{port}/harness",
                    env=_env(tmp_path))
    assert f"postgresql://sweeper:***@127.0.0.1:{port}/harness" in line and "cannot connect" in line, line


def test_tracking_server_down_is_one_line(tmp_path):
    port = free_port()
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"http://harness:{TRACKING_PASSWORD}@127.0.0.1:{port}")
    line = _refused(tmp_path, env=env)
    assert f"http://harness:***@127.0.0.1:{port} is unreachable" in line, line


def test_job_with_tracking_server_down_is_one_line(tmp_path):
    port = free_port()
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"http://harness:{TRACKING_PASSWORD}@127.0.0.1:{port}",
               HARNESS_RESULTS=str(tmp_path / "results"))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "harness", "train", "configs/proxy.yaml",
                        f"output_dir={tmp_path / 'job'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    assert time.time() - t0 < 10  # MLflow's own retries would take minutes
    assert f"http://harness:***@127.0.0.1:{port} is unreachable" in lines[0]
    assert TRACKING_PASSWORD not in r.stdout + r.stderr
    assert not (tmp_path / "job").exists()


def test_slurm_with_a_sqlite_mlflow_store_is_refused(tmp_path):
    line = _refused(tmp_path, "--launcher", "slurm", env=_env(tmp_path))
    assert line.startswith("error: --launcher slurm: the MLflow store is SQLite"), line


def _path_without(*binaries: str, extra: Path | None = None) -> str:
    """$PATH without the folders that hold `binaries`, with `extra` first."""
    keep = [d for d in os.environ["PATH"].split(os.pathsep) if d and not any(
        (Path(d) / b).exists() for b in binaries)]
    return os.pathsep.join(([str(extra)] if extra else []) + keep)


def _fake(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


@pytest.mark.parametrize("case", ["no client", "controller down", "controller hangs"])
def test_slurm_without_a_controller_is_refused(tmp_path, case):
    fake = tmp_path / "bin"
    if case != "no client":
        _fake(fake, "sinfo", "exit 0")
        _fake(fake, "scontrol", {"controller down": "echo 'Slurmctld(primary) at ctl is DOWN'; exit 1",
                                 "controller hangs": f"exec {shutil.which('sleep')} 60"}[case])
    # A tracking server (refused later, if ever reached): the SLURM check comes before it.
    env = _env(tmp_path, PATH=_path_without("sinfo", "scontrol", extra=fake if fake.exists() else None),
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    hangs = case == "controller hangs"  # scontrol is given 5 s
    line = _refused(tmp_path, "--launcher", "slurm", env=env, limit_s=12.0 if hangs else 10.0)
    want = {"no client": "sinfo and scontrol not on PATH", "controller down": "is DOWN",
            "controller hangs": "within 5 s"}[case]
    assert line.startswith("error: --launcher slurm: ") and want in line, line


# -------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ledger_server() -> Iterator[dict]:
    """PostgreSQL on 127.0.0.1 whose role `sweeper` logs in with a password (scram-sha-256 over TCP); the
    superuser only over the server's socket. Yields its URL and what pg_dump needs."""
    server = PgServer("harness-pg-secret-", password=True)
    try:
        server.start(f"CREATE ROLE sweeper LOGIN PASSWORD '{DB_PASSWORD}'", "CREATE DATABASE harness OWNER sweeper")
        yield {"url": f"postgresql://sweeper:{DB_PASSWORD}@127.0.0.1:{server.port}/harness",
               "dump": server.dump("harness"), "user": server.user}
    finally:
        server.close()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[tuple[Server, str]]:
    """`mlflow server` on 127.0.0.1 and the URI the sweep uses for it, with a user and password (the server
    ignores them, as a reverse proxy's basic auth would be answered upstream)."""
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server, f"http://harness:{TRACKING_PASSWORD}@127.0.0.1:{server.port}"
    finally:
        server.stop()


def _no_secret(where: str, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for secret in SECRETS:
        assert secret not in raw, f"{secret.decode()} in {where}"


class _Descendants:
    """Command lines of every process started under `root` (not root's own: a password typed on the `sweep`
    command line is the user's), as seen while it runs."""

    def __init__(self, root: int):
        self.root, self.seen = root, {}

    def scan(self) -> None:
        parent = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                parent[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
        for pid in parent:
            p = parent[pid]
            while p not in (0, 1, self.root) and p in parent:
                p = parent[p]
            if p != self.root:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if cmd:  # empty: a process that has exited, not yet reaped
                self.seen[pid] = cmd


def _check_stores(results: Path, server: Server, ledger: dict) -> None:
    """No password in any file under results, in the MLflow store, or in the ledger."""
    import optuna
    from mlflow.tracking import MlflowClient

    from harness.sweep.storage import open_storage

    files = [p for p in results.rglob("*") if p.is_file()]
    assert files
    for p in files:
        _no_secret(str(p), p.read_bytes())
    for p in Path(server.log).parent.rglob("*"):  # the server's sqlite store and artifacts
        if p.is_file():
            _no_secret(str(p), p.read_bytes())
    client = MlflowClient(server.uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs
    for r in runs:
        _no_secret(f"run {r.info.run_id} tags", repr(r.data.tags))
        _no_secret(f"run {r.info.run_id} params", repr(r.data.params))
        into = results.parent / "artifacts" / r.info.run_id
        into.mkdir(parents=True)
        folder = client.download_artifacts(r.info.run_id, "", str(into))
        for p in Path(folder).rglob("*"):
            if p.is_file():
                _no_secret(f"artifact {p}", p.read_bytes())
    storage = open_storage(ledger["url"])
    for study in optuna.get_all_study_summaries(storage):
        sid = storage.get_study_id_from_name(study.study_name)
        _no_secret(f"study {study.study_name}", repr(storage.get_study_user_attrs(sid))
                   + repr(storage.get_study_system_attrs(sid)))
        for t in storage.get_all_trials(sid):
            _no_secret(f"trial {t.number}", repr(t.user_attrs) + repr(t.system_attrs))
    dump = subprocess.run(ledger["dump"], capture_output=True, timeout=120, **as_user(ledger["user"]))
    assert dump.returncode == 0 and b"harness.cell" in dump.stdout, dump.stderr
    _no_secret("pg_dump of the ledger", dump.stdout)


@pytest.mark.slow
def test_no_password_anywhere_after_a_sweep(tmp_path, harness_env, ledger_server, tracking_server):
    server, tracking = tracking_server
    env = {**harness_env, "MLFLOW_TRACKING_URI": tracking}
    results = tmp_path / "results"
    sets = [a for s in [*(t for t in TINY if not t.startswith("batch_ratio")), "batch_ratio=[1]"]
            for a in ("--set", s)]
    common = ["grpo-vs-cfpo", "--scale", "proxy-full", "--storage", ledger_server["url"], "--results-dir",
              str(results)]
    driver = subprocess.Popen([sys.executable, "-m", "harness", "sweep", *common, "--workers", "2", *sets],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commands = _Descendants(driver.pid)
    try:
        while driver.poll() is None:
            commands.scan()
            time.sleep(0.1)
        out, err = driver.communicate(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out + err
    _no_secret("sweep's output", out + err)
    assert "ledger postgresql://sweeper:***@127.0.0.1:" in out, out
    workers = [c for c in commands.seen.values() if b" worker " in c]
    assert len(workers) >= 2, [c[:200] for c in commands.seen.values()]  # both local workers, seen running
    for pid, cmd in commands.seen.items():
        _no_secret(f"command line of pid {pid}: {cmd[:300]!r}", cmd)

    status = subprocess.run([sys.executable, "-m", "harness", "status", *common], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "2 complete" in status.stdout, status.stdout + status.stderr
    assert "sweeper:***@127.0.0.1" in status.stdout, status.stdout
    _no_secret("status output", status.stdout + status.stderr)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("grpo-vs-cfpo/proxy-full").experiment_id
    parents = [r for r in client.search_runs([exp]) if r.data.tags.get("harness.sweep") == "true"]
    assert [r.data.params["storage"] for r in parents] == [redact(ledger_server["url"])]
    job_logs = list((results / "grpo-vs-cfpo" / "proxy-full" / "jobs").rglob("attempt-*.log"))
    assert len(job_logs) == 2 and all("harness:***@127.0.0.1" in p.read_text() for p in job_logs), job_logs
    _check_stores(results, server, ledger_server)


# A stand-in job whose last words name both URLs, as a library's error would; it creates its MLflow run first,
# so the worker's failure record reaches the run's harness.error tag too. The first attempt's words name the
# tracking server (an outage: re-queued, no attempt spent), the second's the ledger (failed).
FAILING_JOB = r'''
import os, sys
from mlflow.tracking import MlflowClient
args = sys.argv[1:]
tags = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--tag")
c = MlflowClient()
exp = c.get_experiment_by_name(f"{tags['harness.study']}/{tags['harness.scale']}").experiment_id
c.create_run(exp, tags={**tags, "harness.status": "running"})
marker = os.environ["FAKE_MARKER"]
if not os.path.exists(marker):
    open(marker, "w").close()
    print(f"MlflowException: API request to {os.environ['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/"
          "log-batch failed with exception ConnectionError", flush=True)
else:
    print(f"OperationalError: could not reach {os.environ['FAKE_LEDGER']}: timeout expired", flush=True)
sys.exit(1)
'''


@pytest.mark.slow
def test_recorded_errors_hide_passwords(tmp_path, ledger_server, tracking_server):
    """What a worker records of a failed job (its last line, the tracking server it blames) reaches the
    ledger, the run's harness.error tag, the worker's log and `status` without the passwords."""
    from mlflow.tracking import MlflowClient

    server, tracking = tracking_server
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "study": "failing", "axes": {"objective": ["grpo"]}}))
    (tmp_path / "job.py").write_text(FAILING_JOB)
    results = tmp_path / "results"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "FAKE_LEDGER": ledger_server["url"],
           "HARNESS_TRAIN_CMD": f"{sys.executable} {tmp_path / 'job.py'}",
           "FAKE_MARKER": str(tmp_path / "marker")}
    env.pop("HARNESS_RESULTS", None)
    common = [str(spec), "--scale", "proxy", "--storage", ledger_server["url"], "--results-dir", str(results)]
    sweep = subprocess.run([sys.executable, "-m", "harness", "sweep", *common, "--workers", "1",
                            "--max-attempts", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert sweep.returncode == 1, sweep.stdout + sweep.stderr  # the cell failed for good
    _no_secret("sweep's output", sweep.stdout + sweep.stderr)
    assert "postgresql://sweeper:***@127.0.0.1" in sweep.stdout, sweep.stdout

    from harness.sweep.ledger import OUTCOME, Ledger
    from harness.sweep.storage import open_storage

    ledger = Ledger(open_storage(ledger_server["url"]), "failing/proxy", create=False)
    errors = [(t.user_attrs.get(OUTCOME) or {}).get("error") for t in ledger.trials()]
    assert len(errors) == 2, errors
    blamed = f"MLflow tracking server http://harness:***@127.0.0.1:{server.port} failed the job's request"
    assert errors[0].startswith(blamed), errors
    assert errors[1].startswith("exit 1: OperationalError: could not reach postgresql://sweeper:***@"), errors
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("failing/proxy").experiment_id
    tagged = sorted(r.data.tags.get("harness.error", "") for r in client.search_runs([exp])
                    if "harness.cell" in r.data.tags)
    assert len(tagged) == 2 and all("***@127.0.0.1" in t for t in tagged), tagged
    status = subprocess.run([sys.executable, "-m", "harness", "status", *common], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "1 failed" in status.stdout, status.stdout + status.stderr
    _no_secret("status output", status.stdout + status.stderr)
    # The stand-in's own log is what it wrote (it is not `harness train`: nothing filters it); the rest is
    # ours.
    stand_in_logs = set((results / "failing" / "proxy" / "jobs").rglob("attempt-*.log"))
    assert len(stand_in_logs) == 2
    for p in results.rglob("*"):
        if p.is_file() and p not in stand_in_logs:
            _no_secret(str(p), p.read_bytes())
