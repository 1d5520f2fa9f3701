"""`python -m harness train CONFIG [key=value ...]`: one training job, logged to MLflow.

The train command without the sweep's commands: harness.cli adds it to the full command line, and a job that
a sweep worker forks (harness.sweep.forkserver) runs `main` here, so nothing a job imports leads back to the
sweep.
Bad input is one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import sys

from harness import contract
from harness.config import ConfigError, load_config
from harness.redact import redact, redacted_streams


def _kv(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, value


def _train(args: argparse.Namespace) -> int:
    from harness.job import run_job

    _check_tracking()  # first: a config is seconds of imports to check, a down server one request
    cfg = load_config(args.config, args.overrides)
    _check_paths(cfg, args.result)
    result = run_job(cfg, tags=dict(args.tag), parent_run_id=args.parent_run_id, result_path=args.result)
    return 0 if result["status"] in contract.FINISHED else 1


def _check_paths(cfg, result: str | None) -> None:
    """Where the job will write: its folder, result.json and a local MLflow store (harness.checks)."""
    from harness.checks import writable_dir, writable_file
    from harness.tracking import tracking_uri

    writable_dir("output_dir", cfg.output_dir)
    if result:
        writable_file("--result", result)
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        writable_file("MLflow store", uri.removeprefix("sqlite:///"))


def _check_tracking() -> None:
    """A tracking server that does not answer now: one line, at once (MLflow's client would retry for
    minutes before the first run exists). A sweep worker re-queues the cell (harness.sweep.outcome)."""
    from harness.tracking import require_reachable

    require_reachable()


def add_train_command(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="run one training job and log it to MLflow")
    train.add_argument("config", help="job config YAML (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    train.add_argument("--tag", type=_kv, action="append", default=[], help="extra MLflow run tag KEY=VALUE")
    train.add_argument("--parent-run-id", default=None, help="nest the run under this MLflow run")
    train.add_argument("--result", default=None, help="where to write result.json (default: output_dir)")
    train.set_defaults(func=_train)


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Run the chosen subcommand; a ConfigError is one line on stderr and exit code 2. Whatever the command
    (or a library under it) writes to stdout and stderr has its URLs' passwords hidden (harness.redact)."""
    with redacted_streams():
        args = parser.parse_args(argv)
        try:
            return args.func(args)
        except ConfigError as e:
            print(f"error: {redact(str(e))}", file=sys.stderr)
            return 2


def main(argv: list[str]) -> int:
    """`python -m harness train ...`, the train command alone; argv as that command's, from "train" on."""
    parser = argparse.ArgumentParser(prog="harness")
    add_train_command(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser, argv)
