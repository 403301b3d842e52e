"""Task data: multiple-choice and generative examples with the reference templates, your own formats, and
shard partitions."""

from fedsp.data.partition import partition_dirichlet, partition_iid
from fedsp.data.tasks import TASKS, GenExample, MCExample, eval_split, load_task, task_splits
from fedsp.data.templates import hellaswag_clean

__all__ = [
    "TASKS",
    "GenExample",
    "MCExample",
    "eval_split",
    "hellaswag_clean",
    "load_task",
    "partition_dirichlet",
    "partition_iid",
    "task_splits",
]
