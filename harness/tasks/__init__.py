"""Tasks: prompts with a verifiable answer, split into train and held-out validation prompts.

Adding a task is one class and one name (in one of the modules below, or your own, imported here):

    @register_task("my-task")
    class MyTask(Task):
        name = "my-task"
        def train_rows(self, n, seed): ...
        def val_rows(self, n): ...
        def score(self, completion, answer): ...

Modules: `registry` (the registry, Row, Task, the TieBreakReward mixin), `chain_sum` (the offline proxy's
task), `reasoning` (GSM8K and MATH on real data, scored by math-verify).
"""
from harness.tasks.chain_sum import ChainSum, ChainSumProbe  # registers its tasks
from harness.tasks.reasoning import GSM8K, MATH, GSM8KProbe  # registers its tasks
from harness.tasks.registry import TASKS, Row, Task, TieBreakReward, get_task, register_task

__all__ = ["TASKS", "Row", "Task", "TieBreakReward", "get_task", "register_task", "ChainSum", "ChainSumProbe",
           "GSM8K", "GSM8KProbe", "MATH"]
