"""What a worker's forkserver imports once (harness.sweep.forkserver): the training stack a job needs before
its first step, and the git state of the code it loaded.

The git state is read here, not by each forked job: a forked job runs the code the forkserver imported, which
is what a commit made mid-sweep does not change, so that is the commit its MLflow run must name.
"""
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import mlflow.tracking  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import trl  # noqa: F401

import harness.callbacks  # noqa: F401
import harness.checks  # noqa: F401
import harness.job  # noqa: F401
import harness.objectives  # noqa: F401
import harness.proxy_model  # noqa: F401
import harness.tasks  # noqa: F401
import harness.train_cli  # noqa: F401
import harness.trainer  # noqa: F401
import harness.validation  # noqa: F401
from harness import tracking

tracking.loaded_diff()  # the git state and diff, cached for the forked jobs
