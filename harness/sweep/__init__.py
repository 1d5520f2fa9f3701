"""Sweeps: a YAML spec -> a grid of job configs (cells) -> an Optuna-backed ledger -> workers running jobs.

    python -m harness sweep grpo-vs-cfpo --scale auto --workers 2     # run, or resume after a crash / Ctrl-C
    python -m harness worker grpo-vs-cfpo --storage URL               # add a worker from another machine
    python -m harness status grpo-vs-cfpo                             # table of cells from the ledger

Modules: `spec` (spec file, cells; `fields` and `scales` what it may say), `ledger` (cell states in Optuna
storage; `storage` where it lives), `worker` (pulls
cells and runs `python -m harness train`), `outcome` (what an attempt's end means for its cell: a pure decision),
`adopt` (what an attempt came to: its result file, else its MLflow run, so a finished job is never run twice),
`watchdog` (cell time limit and stall limit), `claim` (the one-driver lock, in the ledger's storage), `driver`
(one `sweep` invocation: validate, enqueue, launch, watch), `mlflow_runs` (the sweep's MLflow parent run; MLflow
brought in line with the ledger), `display` (live progress, status table), `cost` and `estimate` (expected
durations, the dry run), `forkserver` (jobs forked from a preloaded process), `cli`.
GPU packing and the job's command line (`accelerate launch` for multi-GPU cells) are in `harness.launch`;
several machines and GPUs: docs/SCALE_OUT.md.
"""
