# Recipes for the GRPO-vs-CFPO harness. Run `just --list` for the menu.
set positional-arguments

python := env_var_or_default("PYTHON", "python")

# create .venv and install the pinned stack (CPU); add the `vllm` extra on GPU machines
setup:
    python3 -m venv .venv
    .venv/bin/pip install -q -c constraints.txt -e '.[dev]'

# run one training job: just train configs/proxy.yaml objective=cfpo batch_ratio=4
train config *overrides:
    {{python}} -m harness train "$@"

# run a whole sweep (sweeps/NAME.yaml or a path): just sweep grpo-vs-cfpo --workers 2
sweep name *args:
    {{python}} -m harness sweep "$@"

# join a running sweep from another process or machine (same ledger storage and MLflow store)
worker name *args:
    {{python}} -m harness worker "$@"

# print a sweep's ledger as a table
status name *args:
    {{python}} -m harness status "$@"

# regenerate a study's figures, tables and report page from MLflow
figures name *args:
    {{python}} -m analysis figures "$@"

# regenerate a study's tables only
tables name *args:
    {{python}} -m analysis tables "$@"

# the test suite (CPU; GPU tests are skipped with a reason), after the lint
test *args: lint
    {{python}} -m pytest -q "$@"

# ruff's checks, configured in pyproject.toml
lint:
    {{python}} -m ruff check .

# benchmarks: training step overhead and analysis regeneration, as side-by-side ratios
bench:
    {{python}} -m harness.step_bench
    {{python}} -m analysis.regen_bench

# MLflow UI on the harness's store ($MLFLOW_TRACKING_URI, else results/mlflow.db): just ui --port 5000
ui *args:
    {{python}} -m harness.ui mlflow "$@"

# optuna-dashboard on a sweep's ledger: just dashboard grpo-vs-cfpo --scale proxy --port 8080
dashboard name *args:
    {{python}} -m harness.ui dashboard "$@"
