"""Job config: overrides, batch-shape mapping onto TRL's knobs, hashing."""
import pytest

from harness.config import ConfigError, config_hash, load_config, parse_overrides
from harness.trl_args import shape_of

CONFIG = "configs/proxy.yaml"


def test_overrides_parse_yaml_scalars_and_dotted_keys():
    assert parse_overrides(["a.b=1", "c=x", "d=[1,2]", "e=true"]) == {"a": {"b": 1}, "c": "x", "d": [1, 2], "e": True}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])


def test_scientific_notation_becomes_a_float():
    # YAML 1.1 reads 1e-5 as a string; GRPOConfig's annotation says float
    assert load_config(CONFIG, ["trl.learning_rate=1e-5"]).trl["learning_rate"] == 1e-5


@pytest.mark.parametrize("batch_ratio, iterations, spg, ga", [(1, 1, 4, 4), (2, 1, 4, 2), (4, 1, 4, 1), (4, 8, 4, 1)])
def test_batch_shape_maps_axes_onto_trl(batch_ratio, iterations, spg, ga):
    cfg = load_config(CONFIG, [f"batch_ratio={batch_ratio}", f"iterations={iterations}"])  # 64 completions, micro 16
    shape = shape_of(cfg)
    got = (shape.steps_per_generation, shape.gradient_accumulation_steps, shape.num_iterations)
    assert got == (spg, ga, iterations)
    assert shape.steps_per_generation // shape.gradient_accumulation_steps == batch_ratio
    assert shape.optimizer_steps_per_rollout_batch == batch_ratio * iterations


def test_batch_shape_splits_the_global_batch_over_processes():
    cfg = load_config(CONFIG, ["batch_ratio=2", "trl.per_device_train_batch_size=8"])
    one, two = shape_of(cfg, 1), shape_of(cfg, 2)
    # same global batches: 64 completions per rollout batch, 32 per optimizer step, on 1 or 2 processes
    assert one.steps_per_generation * 8 == two.steps_per_generation * 8 * 2 == 64
    assert one.gradient_accumulation_steps * 8 == two.gradient_accumulation_steps * 8 * 2 == 32
    with pytest.raises(ValueError, match="x 8 processes"):
        shape_of(cfg, 8)


def test_hash_ignores_where_a_job_writes_and_proxy_section_of_real_models():
    a = load_config(CONFIG, ["output_dir=/tmp/a", "experiment=x"])
    b = load_config(CONFIG, ["output_dir=/tmp/b", "experiment=y", "torch_threads=2"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(CONFIG, ["seed=1"]))
    real = ["model=Qwen/Qwen2.5-0.5B-Instruct", "task=gsm8k"]
    assert config_hash(load_config(CONFIG, real)) == config_hash(load_config(CONFIG, [*real, "proxy.hidden_size=64"]))


@pytest.mark.parametrize("override, message", [
    ("trl.learning_rate=-1", "trl.learning_rate=-1.0: rejected by the optimizer (adamw_torch_fused): Invalid learning"),
    ("trl.temperature=0", "trl.temperature=0.0: rejected by sampling: `temperature` (=0.0) has to be a strictly"),
    ("trl.max_completion_length=0", "trl.max_completion_length=0: rejected by the generation config"),
    ("trl.top_k=-1", "trl.top_k=-1: rejected by sampling"),
    ("trl.lr_scheduler_type=cosine_with_min_lr", "rejected by the learning-rate scheduler (cosine_with_min_lr)"),
    ("trl.num_generations=1", "trl.num_generations=1: rejected by GRPOConfig"),
    ("trl.beta=-0.5", "trl.beta=-0.5: allowed: a finite number >= 0"),
    ("trl.epsilon=-0.2", "trl.epsilon=-0.2: allowed: a finite number > 0"),
    ("trl.epsilon=.inf", "trl.epsilon=inf: allowed: a finite number > 0"),
    ("trl.top_p=1.5", "trl.top_p=1.5: allowed: 0 < top_p <= 1"),
    ("trl.weight_decay=-1", "trl.weight_decay=-1.0: allowed"),
    ("trl.loss_type=nope", "trl.loss_type='nope': allowed: one of grpo,"),
    ("trl.learning_rate=[1,", "trl.learning_rate=[1,: not a YAML value"),
])
def test_values_are_checked_by_the_objects_the_job_builds(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, ["trl.num_generations=4", "trl.per_device_train_batch_size=4", override])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_expensive_build_runs_once_per_distinct_trl_section_and_shape(monkeypatch):
    from harness import checks
    from harness.sweep.spec import load_spec, make_plan

    calls = []
    real = checks._build
    monkeypatch.setattr(checks, "_BUILT", {})
    monkeypatch.setattr(checks, "_build", lambda cfg, shape: calls.append(shape) or real(cfg, shape))
    plan = make_plan(*load_spec("grpo-vs-cfpo"), "proxy-full")
    assert len(plan.cells) == 96 and len(calls) == len(set(calls)) == 16  # batch_ratio x iterations


def test_paths_must_be_writable_folders(tmp_path):
    from harness.checks import writable_dir, writable_file

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        writable_dir("output_dir", tmp_path / "f")
    with pytest.raises(ConfigError, match="is not a folder"):
        writable_dir("output_dir", tmp_path / "f" / "sub")
    with pytest.raises(ConfigError, match="is a folder"):
        writable_file("--result", tmp_path)
    writable_dir("output_dir", tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()
