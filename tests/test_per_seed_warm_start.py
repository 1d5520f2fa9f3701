"""`proxy.init_seed: seed`: each job seed warm-starts its own proxy model, and the seeds stay replicates of one
experiment (same replicate hash, pooled by the analysis, reported as per-seed checkpoints)."""
import json

import pytest
from conftest import TINY_JOB, run_harness
from mlflow import MlflowClient

from analysis.errors import AnalysisError
from analysis.load import load_study
from analysis.synthetic import log_run
from harness.config import build_config, config_hash


def test_config_identity():
    one, two = (build_config({"model": "proxy", "seed": s, "proxy": {"init_seed": "seed"}}) for s in (1, 2))
    assert config_hash(one, without_seed=True) == config_hash(two, without_seed=True)
    assert config_hash(one) != config_hash(two)
    assert one.proxy.for_seed(1).init_seed == 1 and two.proxy.for_seed(2).init_seed == 2
    shared = build_config({"model": "proxy", "seed": 3, "proxy": {"init_seed": 5}})
    assert shared.proxy.for_seed(3).init_seed == 5


def store_with(tmp_path, init_seed: str) -> str:
    uri = f"sqlite:///{tmp_path / init_seed / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("w/proxy", artifact_location=(tmp_path / "a").as_uri())
    for seed, start in ((0, 0.30), (1, 0.35)):
        for objective in ("grpo", "cfpo"):
            log_run(client, exp, study="w", scale="proxy", objective=objective, batch_ratio=2, iterations=2,
                    seed=seed, metrics={"val/reward": {0: start, 4: start + 0.01}},
                    params={"proxy.init_seed": init_seed, "proxy.warmstart_val_reward": str(start)})
    return uri


def test_the_analysis_pools_per_seed_checkpoints_but_not_unexplained_ones(tmp_path):
    data = load_study("w", "proxy", tracking_uri=store_with(tmp_path, "seed"), cache_dir=tmp_path / "c1")
    assert len(data.runs) == 4
    # the same different warm starts with a shared init_seed are not seeds of one experiment
    with pytest.raises(AnalysisError, match="proxy.warmstart_val_reward"):
        load_study("w", "proxy", tracking_uri=store_with(tmp_path, "0"), cache_dir=tmp_path / "c2")


def test_each_seed_trains_from_its_own_warm_start(harness_env, tmp_path):
    paths = {}
    for seed in (1, 2):
        out = tmp_path / f"s{seed}"
        proc = run_harness(["train", "configs/proxy.yaml", *TINY_JOB, "rollout_batches=1", f"seed={seed}",
                            "proxy.init_seed=seed", f"output_dir={out}", "experiment=w"], harness_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = MlflowClient(harness_env["MLFLOW_TRACKING_URI"]).get_run(
            json.loads((out / "result.json").read_text())["run_id"])
        assert run.data.params["proxy.init_seed"] == "seed"
        paths[seed] = run.data.params["proxy.path"]
    assert paths[1] != paths[2]
    metas = [json.loads((tmp_path / p / "meta.json").read_text()) for p in paths.values()]
    assert [m["proxy"]["init_seed"] for m in metas] == [1, 2]
