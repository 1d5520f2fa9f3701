"""The one error type of the analysis package."""
from __future__ import annotations


class AnalysisError(Exception):
    """Bad input (empty study, metric nobody logged, ...): the CLI prints it on one line and exits with code 2."""
