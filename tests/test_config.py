"""Job config: overrides, batch-shape mapping onto TRL's knobs, hashing."""
import pytest

from harness.config import ConfigError, config_hash, load_config, parse_overrides, shape_of

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
    assert (shape.steps_per_generation, shape.gradient_accumulation_steps, shape.num_iterations) == (spg, ga, iterations)
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
