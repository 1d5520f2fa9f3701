"""`python -m harness <command>`: train one job, or run / join / inspect a sweep.

Bad input is one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import argparse

from harness.sweep.cli import add_sweep_commands
from harness.train_cli import add_train_command, dispatch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_command(sub)
    add_sweep_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)
