"""Synthetic verifiable tasks a tiny model can learn on a CPU, with rule rewards."""

from streamrl.tasks.synthetic import TASKS, exact_match_reward, make_example, write_task_jsonl

__all__ = ["TASKS", "exact_match_reward", "make_example", "write_task_jsonl"]
