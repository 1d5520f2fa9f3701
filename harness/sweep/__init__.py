"""Sweeps: a YAML spec -> a grid of job configs (cells) -> an Optuna-backed ledger -> workers running jobs.

Modules: `spec` (spec file, validation, cells), `ledger` (cell states in Optuna storage), `worker` (pulls cells
and runs `python -m harness train`), `driver` (one `sweep` invocation: validate, enqueue, launch, watch),
`display` (live progress and the status table), `cli` (the `sweep`, `worker` and `status` commands).
"""
