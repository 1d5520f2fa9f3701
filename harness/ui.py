"""`python -m harness.ui mlflow|dashboard`: the runs (MLflow UI) or a sweep's ledger (optuna-dashboard).

    python -m harness.ui mlflow [--host 127.0.0.1] [--port 5000] [--workers 1]
    python -m harness.ui dashboard NAME [--scale proxy] [--port 8080]

`mlflow` starts `mlflow server` on the harness's store (`harness.tracking.tracking_uri()`:
$MLFLOW_TRACKING_URI, else results/mlflow.db with artifacts in results/mlartifacts) and prints the UI's
address once the server answers /health. `dashboard` serves the sweep's Optuna ledger
(results/<study>/<scale>/ledger.journal, or --storage) with optuna-dashboard. Both stay in the foreground
until Ctrl-C or SIGTERM. Bad input: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness import contract
from harness.config import ConfigError
from harness.redact import redact

READY_TIMEOUT_S = 120.0  # the MLflow server took 9-16 s to answer /health on 2 cores


# ---------------------------------------------------------------------------------------------------- mlflow
def mlflow_server_command(uri: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow server` command line serving a local store; artifacts of a sqlite store sit beside it (as
    `harness.tracking.ensure_experiment` places them), so experiments made by the UI match those made by
    jobs. The store itself is not on it (a database URL holds a password, and `ps` shows command lines):
    mlflow reads it from $MLFLOW_BACKEND_STORE_URI (server_env)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--workers", str(workers)]
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ConfigError(f"{db}: no MLflow store yet; run a job or a sweep first (or set "
                              "MLFLOW_TRACKING_URI)")
        artifacts = (db.parent / "mlartifacts").as_uri()
        cmd += ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts]
    return cmd


def server_env(uri: str) -> dict[str, str]:
    """The environment of `mlflow server` on store `uri`."""
    return {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}


def wait_until_ready(url: str, proc: subprocess.Popen | None, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll `url` until it answers 200; raise if `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before answering {url}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from {url} after {timeout:.0f} s")
        time.sleep(0.3)


def _check_server_options(args: argparse.Namespace) -> None:
    """Before a server starts: a bad port or host is one line here, not a server's traceback."""
    from harness.checks import port

    if getattr(args, "workers", 1) < 1:
        raise ConfigError(f"--workers {args.workers}: allowed: 1 or more")
    port("--port", args.host, args.port)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _mlflow(args: argparse.Namespace) -> int:
    from harness.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):  # a tracking server already serves its own UI
        print(f"MLFLOW_TRACKING_URI is a tracking server; its UI is {redact(uri.rstrip('/'))}/#/experiments",
              flush=True)
        return 0
    cmd = mlflow_server_command(uri, args.host, args.port, args.workers)
    _check_server_options(args)
    # Own process group: on Ctrl-C / SIGTERM the whole server (uvicorn and its workers) is stopped from here.
    proc = subprocess.Popen(cmd, start_new_session=True, env=server_env(uri))

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        wait_until_ready(f"http://{_client_host(args.host)}:{args.port}/health", proc)
        print(f"MLflow UI on {redact(uri)}: http://{_client_host(args.host)}:{args.port}/#/experiments",
              flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------------------------------------- dashboard
def ledger_storage(name: str, scale: str, storage: str | None, results_dir: str | None) -> tuple[str, str]:
    """(storage url or journal path, study name) of an existing sweep, resolved as `python -m harness
    status`."""
    from harness.sweep.scale_choice import pick_scale
    from harness.sweep.spec import load_spec, scale_spec
    from harness.sweep.storage import check_storage

    if results_dir:
        os.environ["HARNESS_RESULTS"] = str(Path(results_dir).resolve())
    from harness.tracking import results_root

    spec, path = load_spec(name)
    results = results_root()
    if scale == "auto":  # the scale whose ledger is here, if only one is
        here = [s for s in spec.scales if contract.ledger_path(results, spec.study, s).is_file()]
        scale = here[0] if len(here) == 1 and storage is None else pick_scale(spec, path, "auto")[0]
    else:  # one the spec defines, or its tuning stage (<scale>/tune: the trials, and the per-objective studies)
        scale_spec(spec, path, contract.split_stage(scale)[0])
    journal = contract.ledger_path(results, spec.study, scale)
    url = check_storage(storage, journal)
    if storage is None and not journal.is_file():
        raise ConfigError(f"{journal}: no ledger; start the sweep with `python -m harness sweep {name} "
                          f"--scale {scale}` (or give --storage / --results-dir)")
    return url, contract.experiment_name(spec.study, scale)


def _dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    from harness.sweep.storage import open_storage

    url, study = ledger_storage(args.name, args.scale, args.storage, args.results_dir)
    _check_server_options(args)
    # The ledger's own opener: the same journal backend and file lock the sweep's workers use.
    storage = open_storage(url)
    server = threading.Thread(target=optuna_dashboard.run_server, args=(storage,),
                              kwargs={"host": args.host, "port": args.port}, daemon=True)
    server.start()
    base = f"http://{_client_host(args.host)}:{args.port}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                wait_until_ready(f"{base}/api/studies", None, timeout=1)
                break
            except TimeoutError:
                if not server.is_alive():
                    print(f"error: optuna-dashboard stopped before answering {base}", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print(f"error: no answer from {base} after {READY_TIMEOUT_S:.0f} s", file=sys.stderr)
                    return 1
        print(f"optuna-dashboard for sweep {study} ({redact(url)}): {base}/dashboard/", flush=True)
        while server.is_alive():
            server.join(0.5)
        return 1
    except KeyboardInterrupt:
        return 0


# ------------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness.ui", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mlflow", help="MLflow UI on the harness's store (tracking_uri())")
    m.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only)")
    m.add_argument("--port", type=int, default=5000)
    m.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    m.set_defaults(func=_mlflow)

    d = sub.add_parser("dashboard", help="optuna-dashboard on a sweep's ledger")
    d.add_argument("name", metavar="NAME", help="sweeps/NAME.yaml, or a path to a sweep spec")
    # Any scale the sweep file defines: checked once the spec is loaded (ledger_storage).
    d.add_argument("--scale", default="auto",
                   help="a scale of the sweep file (SCALE/tune: its tuning stage, whose optuna-dashboard also "
                        "shows each objective's tuning study), or auto: the scale whose ledger exists, if only "
                        "one does; else the first scale whose device is here (device: cuda needs a GPU)")
    d.add_argument("--storage", default=None,
                   help="ledger: a journal file path or postgresql://... (default: "
                        "results/<study>/<scale>/ledger.journal)")
    d.add_argument("--results-dir", default=None,
                   help="results root (default $HARNESS_RESULTS, else ./results)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(func=_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    from harness.cli import dispatch

    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
