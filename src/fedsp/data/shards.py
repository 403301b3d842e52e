"""The data of one run: the train split cut into shards, the validation rows, the fixed evaluation examples.

Shard 0 is the server's (KD, prefix initialisation, server tuning), shards
1..K the clients'. Every engine and every method starts from the same
:class:`RunData` for the same configuration, so their numbers compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from fedsp.config import RunConfig
from fedsp.data.batching import Encoded, encode_gold, encode_pair
from fedsp.data.partition import partition_dirichlet, partition_iid
from fedsp.data.tasks import MCExample, eval_split, load_task, task_splits
from fedsp.errors import FedSPError


@dataclass
class RunData:
    server_rows: list[Encoded]
    client_rows: list[list[Encoded]]
    val_rows: list[Encoded]
    eval_examples: list[MCExample]
    eval_split: str
    truncation: dict[str, int] = field(default_factory=dict)  # what --max-length cut (results.json)


def prepare_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> RunData:
    """Train split -> K+1 shards (shard 0 the server's); validation rows; the fixed evaluation examples."""
    train = load_task(config.task, "train", config.data_dir)
    num_shards = config.clients + 1
    if len(train) < num_shards:
        raise FedSPError(
            f"task {config.task!r} has {len(train)} training examples, fewer than {num_shards} shards"
        )
    if config.partition == "iid":
        shards = partition_iid(len(train), num_shards, config.data_seed)
    else:
        shards = partition_dirichlet([ex.gold for ex in train], num_shards, config.alpha, config.data_seed)
    encoded = [encode_gold(tokenizer, ex, config.max_length) for ex in train]
    split = eval_split(config.task, config.data_dir)
    eval_examples = load_task(config.task, split, config.data_dir)
    val_source = "validation" if "validation" in task_splits(config.task, config.data_dir) else split
    val_examples = load_task(config.task, val_source, config.data_dir)
    if split == "validation":  # no labelled test split: keep the evaluated examples out of validation
        val_examples = val_examples[config.eval_limit or len(val_examples) :] or val_examples
    val_examples = val_examples[: config.val_limit] if config.val_limit else val_examples
    evaluated = eval_examples[: config.eval_limit] if config.eval_limit else eval_examples
    return RunData(
        server_rows=[encoded[i] for i in shards[0]],
        client_rows=[[encoded[i] for i in shard] for shard in shards[1:]],
        val_rows=[encode_gold(tokenizer, ex, config.max_length) for ex in val_examples],
        eval_examples=evaluated,
        eval_split=split,
        truncation=truncation_counts(tokenizer, encoded, evaluated, config.max_length),
    )


def truncation_counts(
    tokenizer: PreTrainedTokenizerBase, train: list[Encoded], evaluated: list[MCExample], max_length: int
) -> dict[str, int]:
    """How many training rows and evaluated questions ``--max-length`` cuts (context, or answer too)."""
    scored = [
        [encode_pair(tokenizer, ex.context, " " + c, max_length) for c in ex.choices] for ex in evaluated
    ]
    return {
        "max_length": max_length,
        "train_rows": len(train),
        "train_contexts_cut": sum(1 for r in train if r.context_cut),
        "train_answers_cut": sum(1 for r in train if r.answer_cut),
        "eval_questions": len(evaluated),
        "eval_contexts_cut": sum(1 for rows in scored if any(r.context_cut for r in rows)),
        # scoring keeps every choice whole (its context cut to make room); these are longer than max_length
        "eval_choices_over_max_length": sum(1 for rows in scored if any(r.answer_cut for r in rows)),
    }
