"""HarnessGRPOTrainer against TRL's own GRPOTrainer._compute_loss on real, reused rollout batches.

- the `grpo` arm is bit-identical to stock TRL (it *is* stock TRL, plus read-only diagnostics);
- the harness's objective pipeline, fed TRL's clipped formula, reproduces stock TRL for every supported
  aggregation and with the KL penalty on: so CFPO shares masks, aggregation and KL handling with GRPO;
- CFPO equals GRPO, loss and gradients, when the ratio is exactly 1.
Shapes: steps_per_generation 2 with no gradient accumulation, and steps_per_generation 4 over gradient
accumulation 2 (two micro-batches per optimizer step: the path where dapo rescales its normaliser).
"""
import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from analysis.paired import CONTROL_OBJECTIVES
from harness.config import ProxyModel
from harness.objectives import SHARED_LOSS_TYPES, Objective, clipped_surrogate, get_objective
from harness.proxy_model import build_model, build_tokenizer
from harness.trainer import HarnessGRPOTrainer

ALPHABET = "0123456789+=,;"


def digit_reward(completions, **_):
    """Any deterministic, varied score gives non-zero advantages without a warm-started model."""
    return [sum(ch in "13579" for ch in c) / (1 + len(c)) for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer(ALPHABET)
    build_model(ProxyModel(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def trained_trainer(model_dir, tmp_path, beta, objective="grpo", steps_per_generation=2, accumulation=1):
    """A trainer after 3 optimizer steps on one rollout batch used for 2 iterations: its buffered
    micro-batches carry old log-probs from a policy that has since moved (r != 1)."""
    from datasets import Dataset

    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        per_device_train_batch_size=8, num_generations=4, steps_per_generation=steps_per_generation,
        gradient_accumulation_steps=accumulation,
        num_iterations=2, max_steps=3, max_completion_length=12, learning_rate=5e-2, beta=beta, seed=0,
        logging_steps=1, save_strategy="no", disable_tqdm=True)
    data = Dataset.from_dict({"prompt": [f"{a}+{a + 1}+7=" for a in range(10, 60)]})
    trainer = HarnessGRPOTrainer(model=model_dir, reward_funcs=digit_reward, args=args, train_dataset=data,
                                 objective=get_objective(objective))
    trainer.train()
    trainer.model.train()
    inputs = trainer._buffered_inputs[0]
    assert inputs.get("old_per_token_logps") is not None
    return trainer, inputs


def loss_and_grad(trainer, fn, inputs):
    trainer.model.zero_grad()
    loss = fn(trainer.model, inputs)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads.clone()


def stock(trainer):
    return lambda model, inputs: GRPOTrainer._compute_loss(trainer, model, inputs)


@pytest.fixture(scope="module", params=[(0.0, 2, 1), (0.1, 2, 1), (0.1, 4, 2)],
                ids=["beta0", "beta0.1", "beta0.1-spg4-ga2"])
def reused_batch(request, model_dir, tmp_path_factory):
    beta, spg, ga = request.param
    trainer, inputs = trained_trainer(model_dir, tmp_path_factory.mktemp("out"), beta=beta,
                                      steps_per_generation=spg, accumulation=ga)
    assert trainer.current_gradient_accumulation_steps == ga and trainer.args.steps_per_generation == spg
    return trainer, inputs


def test_grpo_arm_is_bit_identical_to_stock_trl(reused_batch):
    trainer, inputs = reused_batch
    l_stock, g_stock = loss_and_grad(trainer, stock(trainer), inputs)
    l_arm, g_arm = loss_and_grad(trainer, trainer._compute_loss, inputs)
    assert torch.equal(l_stock, l_arm) and torch.equal(g_stock, g_arm)


@pytest.mark.parametrize("loss_type", SHARED_LOSS_TYPES)
def test_objective_pipeline_reproduces_stock_trl(reused_batch, loss_type):
    trainer, inputs = reused_batch
    trainer.loss_type = loss_type
    try:
        l_stock, g_stock = loss_and_grad(trainer, stock(trainer), inputs)
        trainer.objective = Objective("clip-formula", clipped_surrogate, stock_trl=False, knobs={"epsilon": None})
        l_ours, g_ours = loss_and_grad(trainer, trainer._compute_loss, inputs)
    finally:
        trainer.objective, trainer.loss_type = get_objective("grpo"), "dapo"
    assert l_stock.abs() > 0 and g_stock.abs().max() > 0  # not a vacuous comparison
    torch.testing.assert_close(l_ours, l_stock, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours, g_stock, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("loss_type", SHARED_LOSS_TYPES)
def test_cfpo_equals_grpo_when_ratio_is_one(reused_batch, loss_type):
    trainer, inputs = reused_batch
    on_policy = {**inputs, "old_per_token_logps": None}  # TRL's own on-policy path: r == 1 exactly
    trainer.loss_type = loss_type
    try:
        l_stock, g_stock = loss_and_grad(trainer, stock(trainer), on_policy)
        trainer.objective = get_objective("cfpo")
        l_cfpo, g_cfpo = loss_and_grad(trainer, trainer._compute_loss, on_policy)
    finally:
        trainer.objective, trainer.loss_type = get_objective("grpo"), "dapo"
    torch.testing.assert_close(l_cfpo, l_stock, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_cfpo, g_stock, rtol=1e-5, atol=1e-8)


def test_cfpo_differs_off_policy_and_logs_diagnostics(reused_batch):
    trainer, inputs = reused_batch
    trainer._metrics["train"].clear()
    try:
        trainer.objective = get_objective("cfpo")
        l_cfpo, g_cfpo = loss_and_grad(trainer, trainer._compute_loss, inputs)
    finally:
        trainer.objective = get_objective("grpo")
    l_stock, g_stock = loss_and_grad(trainer, stock(trainer), inputs)
    assert not torch.allclose(g_cfpo, g_stock)
    m = trainer._metrics["train"]
    assert m["rollout/ratio_measured"][-1] == 1.0
    assert m["ratio/abs_dev_mean"][-1] > 0 and m["rollout_kl"][-1] > 0
    assert m["cfpo/penalty_mean"][-1] > 0
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"):
        assert key in m


def test_unsupported_settings_are_rejected_for_custom_objectives(model_dir, tmp_path):
    from datasets import Dataset

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      loss_type="cispo")
    with pytest.raises(ValueError, match="trl.loss_type must be one of"):
        HarnessGRPOTrainer(model=model_dir, reward_funcs=digit_reward, args=args,
                           train_dataset=Dataset.from_dict({"prompt": ["1+2+3="] * 8}),
                           objective=get_objective("cfpo"))


def test_ratio_extremes_are_extremes_over_the_optimizer_step(reused_batch):
    """TRL averages each metric over the micro-batches of a logging window; ratio/max and ratio/min must be
    the largest and smallest ratio of the whole optimizer step instead."""
    trainer, _ = reused_batch
    logs: list[dict] = []
    trainer.control.should_log = True
    m = trainer._metrics["train"]
    m.clear()
    m["ratio/max"] += [1.5, 3.0, float("nan")]
    m["ratio/min"] += [0.5, 0.9]
    m["ratio/mean"] += [1.0, 2.0]
    trainer.callback_handler.on_log = lambda args, state, control, logs_: logs.append(dict(logs_)) or control
    try:
        trainer.log({"loss": 0.0})
    finally:
        del trainer.callback_handler.on_log
    assert logs[-1]["ratio/max"] == 3.0 and logs[-1]["ratio/min"] == 0.5
    assert logs[-1]["ratio/mean"] == 1.5  # everything else keeps TRL's mean


# ------------------------------------------------------------------------------------------ the zoo against TRL
# (objective, harness loss_type, TRL's loss_type, TRL's importance_sampling_level, epsilon_low, epsilon_high): TRL
# 1.16 ties cispo to the dapo aggregation and sapo to grpo's, so the harness's term is compared there; eps_max 1.1
# for cispo so the cap binds on these batches.
TRL_TWINS = [("cispo", "dapo", "cispo", "token", 0.2, 1.1), ("sapo", "grpo", "sapo", "token", 0.2, 0.2),
             ("gspo", "grpo", "grpo", "sequence", 3e-4, 4e-4), ("gspo", "dapo", "dapo", "sequence", 3e-4, 4e-4)]


@pytest.mark.parametrize("name, ours, theirs, level, eps_low, eps_high", TRL_TWINS,
                         ids=[f"{t[0]}-{t[1]}" for t in TRL_TWINS])
def test_zoo_terms_equal_trl_own_on_reused_batches(reused_batch, name, ours, theirs, level, eps_low, eps_high):
    trainer, inputs = reused_batch
    saved = trainer.loss_type, trainer.importance_sampling_level, trainer.epsilon_low, trainer.epsilon_high
    trainer.epsilon_low, trainer.epsilon_high = eps_low, eps_high
    try:
        trainer.loss_type, trainer.importance_sampling_level = theirs, level
        l_trl, g_trl = loss_and_grad(trainer, stock(trainer), inputs)
        trainer.loss_type, trainer.importance_sampling_level = ours, "token"
        trainer.objective = get_objective(name)
        trainer._metrics["train"].clear()
        l_ours, g_ours = loss_and_grad(trainer, trainer._compute_loss, inputs)
    finally:
        trainer.objective = get_objective("grpo")
        trainer.loss_type, trainer.importance_sampling_level, trainer.epsilon_low, trainer.epsilon_high = saved
    assert l_trl.abs() > 0 and g_trl.abs().max() > 0
    torch.testing.assert_close(l_ours, l_trl, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-5, atol=1e-8)
    if name == "cispo":  # the cap was active: the comparison covers the truncated branch
        assert trainer._metrics["train"]["cispo/truncated_mean"][-1] > 0


def test_gppo_has_clip_higher_value_and_a_gradient_where_it_clips(reused_batch):
    """GPPO's forward value is clip-higher's (TRL's grpo clip at 0.2 / 0.28); its gradient differs once tokens
    are clipped, since those keep (1 +- eps) A grad log pi."""
    trainer, inputs = reused_batch
    saved = trainer.epsilon_low, trainer.epsilon_high
    trainer.epsilon_low, trainer.epsilon_high = 0.2, 0.28
    try:
        l_clip, g_clip = loss_and_grad(trainer, stock(trainer), inputs)
        trainer.objective = get_objective("gppo")
        trainer._metrics["train"].clear()
        l_gppo, g_gppo = loss_and_grad(trainer, trainer._compute_loss, inputs)
        clipped = trainer._metrics["train"]["gppo/clipped_mean"][-1]
    finally:
        trainer.objective = get_objective("grpo")
        trainer.epsilon_low, trainer.epsilon_high = saved
    torch.testing.assert_close(l_gppo, l_clip, rtol=1e-6, atol=1e-9)
    assert clipped > 0 and not torch.allclose(g_gppo, g_clip)


@pytest.mark.parametrize("name", sorted(CONTROL_OBJECTIVES - {"grpo"}) + ["cispo", "sapo", "gspo"])
def test_on_policy_control_objectives_train_exactly_like_grpo(reused_batch, name):
    """analysis.paired.CONTROL_OBJECTIVES must agree bit for bit on the on-policy cell: their gradient at r = 1 is
    TRL's grpo gradient exactly; cispo's, sapo's and gspo's equal it only up to rounding, so they are left out."""
    trainer, inputs = reused_batch
    on_policy = {**inputs, "old_per_token_logps": None}
    _, g_stock = loss_and_grad(trainer, stock(trainer), on_policy)
    objective = get_objective(name)
    knobs = {k: v for k, v in objective.knobs.items() if v is not None and k.startswith("epsilon")}
    saved = trainer.epsilon_low, trainer.epsilon_high
    trainer.epsilon_low = knobs.get("epsilon", saved[0])
    trainer.epsilon_high = knobs.get("epsilon_high", trainer.epsilon_low)
    try:
        trainer.objective = objective
        _, g_ours = loss_and_grad(trainer, trainer._compute_loss, on_policy)
    finally:
        trainer.objective = get_objective("grpo")
        trainer.epsilon_low, trainer.epsilon_high = saved
    if name in CONTROL_OBJECTIVES:
        assert torch.equal(g_ours, g_stock)
    elif name == "gspo" and trainer.beta != 0:  # TRL's bias-corrected KL is weighted by the sequence ratio, whose
        assert not torch.allclose(g_ours, g_stock)  # gradient spreads over the sequence (TRL's GSPO does the same)
    else:  # the policy gradient by other operations (sapo: through 4/tau and tau; gspo: through the mean log-ratio
        # of each sequence; cispo: A log pi, exact only without the KL term): equal up to rounding
        torch.testing.assert_close(g_ours, g_stock, rtol=1e-5, atol=1e-8)
