"""The data of one run: the train split cut into shards, the validation rows, the fixed evaluation examples.

Shard 0 is the server's (KD, prefix initialisation, server tuning), shards
1..K the clients'. Every engine and every method starts from the same
:class:`RunData` for the same configuration, so their numbers compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from fedsp.config import RunConfig
from fedsp.data.batching import Encoded, encode_example, encode_pair
from fedsp.data.partition import partition_dirichlet, partition_iid
from fedsp.data.tasks import (
    CUSTOM,
    Example,
    GenExample,
    MCExample,
    custom_format,
    eval_split,
    is_generative,
    load_task,
    task_splits,
)
from fedsp.errors import FedSPError

# A run refuses training data whose completions --max-length cuts in more than this fraction of rows.
MAX_ANSWERS_CUT = 0.05
TASK_STOPS = {"squad": "\n"}  # where a generation ends when --stop is not given (besides end of text)


@dataclass
class RunData:
    server_rows: list[Encoded]
    client_rows: list[list[Encoded]]
    val_rows: list[Encoded]
    eval_examples: list[Example]
    eval_split: str
    truncation: dict[str, int] = field(default_factory=dict)  # what --max-length cut (results.json)
    generative: bool = False  # the examples are scored by generation, not by choices
    data_format: str | None = None  # --task custom: the rows' format (fedsp.data.formats)


def generation_stop(config: RunConfig) -> tuple[str, ...]:
    """The stop texts of a generative run: ``--stop``, else the task's own, else none (end of text)."""
    stop = config.stop if config.stop is not None else TASK_STOPS.get(config.task)
    return (stop,) if stop else ()


def prepare_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> RunData:
    """Train split -> K+1 shards (shard 0 the server's); validation rows; the fixed evaluation examples."""
    train = load_task(config.task, "train", config.data_dir, tokenizer)
    num_shards = config.clients + 1
    if len(train) < num_shards:
        raise FedSPError(
            f"task {config.task!r} has {len(train)} training examples, fewer than {num_shards} shards"
        )
    generative = is_generative(train)
    if config.partition == "iid":
        shards = partition_iid(len(train), num_shards, config.data_seed)
    elif generative:
        raise FedSPError(
            f"--partition {config.partition} shares examples out by their gold choice; task {config.task!r} "
            "is generative (no choices): use --partition iid"
        )
    else:
        labels = [ex.gold for ex in train if isinstance(ex, MCExample)]
        shards = partition_dirichlet(labels, num_shards, config.alpha, config.data_seed)
    encoded = encode_training(tokenizer, train, config.max_length)
    split = eval_split(config.task, config.data_dir)
    eval_examples = load_task(config.task, split, config.data_dir, tokenizer)
    val_source = "validation" if "validation" in task_splits(config.task, config.data_dir) else split
    val_examples = load_task(config.task, val_source, config.data_dir, tokenizer)
    if is_generative(eval_examples) != generative or is_generative(val_examples) != generative:
        raise FedSPError(
            f"task {config.task!r}: the train, {val_source} and {split} files must all be multiple choice "
            "or all generative"
        )
    if split == "validation":  # no labelled test split: keep the evaluated examples out of validation
        val_examples = val_examples[config.eval_limit or len(val_examples) :] or val_examples
    val_examples = val_examples[: config.val_limit] if config.val_limit else val_examples
    evaluated = eval_examples[: config.eval_limit] if config.eval_limit else eval_examples
    return RunData(
        server_rows=[encoded[i] for i in shards[0]],
        client_rows=[[encoded[i] for i in shard] for shard in shards[1:]],
        val_rows=[encode_example(tokenizer, ex, config.max_length) for ex in val_examples],
        eval_examples=evaluated,
        eval_split=split,
        truncation=truncation_counts(tokenizer, encoded, evaluated, config.max_length, config.max_new_tokens),
        generative=generative,
        data_format=custom_format("train", config.data_dir)
        if config.task == CUSTOM and config.data_dir
        else None,
    )


def encode_training(
    tokenizer: PreTrainedTokenizerBase, train: Sequence[Example], max_length: int
) -> list[Encoded]:
    """The training rows of ``train``; completions longer than ``max_length`` are counted (results.json),
    and more than :data:`MAX_ANSWERS_CUT` of the rows losing answer tokens is an error."""
    encoded = [encode_example(tokenizer, ex, max_length) for ex in train]
    cut = [i for i, row in enumerate(encoded) if row.answer_cut]
    if len(cut) > MAX_ANSWERS_CUT * len(encoded):
        first = encoded[cut[0]]
        raise FedSPError(
            f"--max-length {max_length} cuts the answer (completion) of {len(cut)} of {len(encoded)} "
            f"training rows, more than {MAX_ANSWERS_CUT:.0%} (first: {train[cut[0]].id}, "
            f"{first.answer_cut + first.num_answer} answer tokens); raise --max-length or shorten them"
        )
    return encoded


def truncation_counts(
    tokenizer: PreTrainedTokenizerBase,
    train: list[Encoded],
    evaluated: list[Example],
    max_length: int,
    max_new_tokens: int = 0,
) -> dict[str, int]:
    """How many training rows and evaluated questions ``--max-length`` cuts (context, or answer too)."""
    counts = {
        "max_length": max_length,
        "train_rows": len(train),
        "train_contexts_cut": sum(1 for r in train if r.context_cut),
        "train_answers_cut": sum(1 for r in train if r.answer_cut),
        "eval_questions": len(evaluated),
    }
    prompts = [ex for ex in evaluated if isinstance(ex, GenExample)]
    if prompts:  # generation keeps room for --max-new-tokens after the prompt
        room = max(1, max_length - max_new_tokens)
        lengths = [len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]) for ex in prompts]
        return {**counts, "eval_contexts_cut": sum(1 for n in lengths if n > room)}
    scored = [
        [encode_pair(tokenizer, ex.context, " " + c, max_length) for c in ex.choices]
        for ex in evaluated
        if isinstance(ex, MCExample)
    ]
    return {
        **counts,
        "eval_contexts_cut": sum(1 for rows in scored if any(r.context_cut for r in rows)),
        # scoring keeps every choice whole (its context cut to make room); these are longer than max_length
        "eval_choices_over_max_length": sum(1 for rows in scored if any(r.answer_cut for r in rows)),
    }
