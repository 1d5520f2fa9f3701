"""Shared fixtures: an isolated results root per test, and one small warm-started proxy model per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A proxy small enough to build in about half a minute, warm-started until sampled answers are sometimes
# right (so advantages, gradients and parameter updates are non-zero in a few RL steps).
TINY_PROXY = ["proxy.hidden_size=64", "proxy.intermediate_size=256", "proxy.num_hidden_layers=2",
              "proxy.num_attention_heads=4", "proxy.warmstart_steps=400", "proxy.warmstart_lr=0.003"]
# A job of a few seconds on that proxy.
TINY_JOB = TINY_PROXY + ["rollout_batches=3", "eval_every=1", "val_prompts=16", "generation_batch_size=16",
                         "trl.num_generations=4", "trl.per_device_train_batch_size=4",
                         "trl.max_completion_length=28", "trl.learning_rate=0.001"]


@pytest.fixture(scope="session")
def proxy_cache(tmp_path_factory) -> Path:
    """One cache folder for the whole session: the tiny proxy is built once, by the first job that needs it."""
    return tmp_path_factory.mktemp("proxy-cache")


@pytest.fixture
def harness_env(tmp_path, proxy_cache, monkeypatch) -> dict[str, str]:
    """Environment for a harness subprocess: results and MLflow store in tmp_path, shared proxy cache."""
    env = {**os.environ, "HARNESS_RESULTS": str(tmp_path / "results"), "HARNESS_CACHE": str(proxy_cache),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"}
    for key in ("HARNESS_RESULTS", "HARNESS_CACHE", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, env[key])
    return env


def run_harness(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is available; elsewhere they are skipped with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
