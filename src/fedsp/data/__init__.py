"""Task data: multiple-choice examples with the reference templates, and shard partitions."""

from fedsp.data.partition import partition_dirichlet, partition_iid
from fedsp.data.tasks import TASKS, MCExample, eval_split, hellaswag_clean, load_task, task_splits

__all__ = [
    "TASKS",
    "MCExample",
    "eval_split",
    "hellaswag_clean",
    "load_task",
    "partition_dirichlet",
    "partition_iid",
    "task_splits",
]
