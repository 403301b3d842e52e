"""The data of one run: the train split cut into shards, the validation rows, the fixed evaluation examples.

Shard 0 is the server's (KD, prefix initialisation, server tuning), shards
1..K the clients'. Every engine and every method starts from the same
:class:`RunData` for the same configuration, so their numbers compare.

Validation never overlaps evaluation. The server's validation rows choose the
best prefix, so they must not be the questions it is scored on:

* A task evaluated on its test split with a separate validation split (ARC,
  OpenBookQA, the carved SciQ / SQuAD / MedMCQA splits) uses that split's first
  ``--val-limit`` rows.
* A task evaluated on its validation split (PIQA and HellaSwag have no labelled
  test split), or one with no validation split, holds its validation rows out of
  the train split instead, before sharding: the train rows ordered by
  ``sha256("<data seed>:<example id>")``, skipping every row whose question
  (context, or prompt) also appears in the evaluation split, and the first
  ``--val-limit`` of them taken (with ``--val-limit 0`` a tenth of the train
  split, :data:`HELDOUT_PERCENT`). The evaluation split is then evaluated whole
  (or its first ``--eval-limit`` rows), the same rows for every limit, and the
  held-out rows train no one. A train split too small to hold them out and still
  give every shard a row is refused, saying how many rows it is short.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from fedsp.config import RunConfig
from fedsp.data.batching import Encoded, encode_example, encode_pair, text_ids
from fedsp.data.partition import (
    group_field,
    group_values,
    partition_by_group,
    partition_dirichlet,
    partition_iid,
)
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
HELDOUT_PERCENT = 10  # validation held out of train, as a share of it, when --val-limit is 0 (all)


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
    shards: dict[str, Any] = field(default_factory=dict)  # how the rows were dealt out (results.json)


@dataclass(frozen=True)
class SplitExamples:
    """The examples of a run before tokenising: disjoint training pool, validation and evaluation."""

    train: list[Example]  # the rows that are sharded (held-out validation rows removed)
    validation: list[Example]
    evaluated: list[Example]
    eval_split: str
    val_source: str  # "validation", or "train" when held out of the train split


def generation_stop(config: RunConfig) -> tuple[str, ...]:
    """The stop texts of a generative run: ``--stop``, else the task's own, else none (end of text)."""
    stop = config.stop if config.stop is not None else TASK_STOPS.get(config.task)
    return (stop,) if stop else ()


def question_text(example: Example) -> str:
    """The text a question is asked with: its context (multiple choice) or prompt (generative)."""
    return example.context if isinstance(example, MCExample) else example.prompt


def split_examples(config: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> SplitExamples:
    """The training pool, the validation examples and the evaluated examples of ``config``, kept apart
    as the module docstring says."""
    train = load_task(config.task, "train", config.data_dir, tokenizer)
    split = eval_split(config.task, config.data_dir)
    eval_examples = load_task(config.task, split, config.data_dir, tokenizer)
    evaluated = eval_examples[: config.eval_limit] if config.eval_limit else eval_examples
    if split != "validation" and "validation" in task_splits(config.task, config.data_dir):
        validation = load_task(config.task, "validation", config.data_dir, tokenizer)
        validation = validation[: config.val_limit] if config.val_limit else validation
        val_source = "validation"
    else:
        train, validation = hold_out(train, eval_examples, config, split)
        val_source = "train"
    generative = is_generative(train)
    if is_generative(eval_examples) != generative or is_generative(validation) != generative:
        raise FedSPError(
            f"task {config.task!r}: the train, {val_source} and {split} files must all be multiple choice "
            "or all generative"
        )
    return SplitExamples(train, validation, evaluated, split, val_source)


def hold_out(
    train: Sequence[Example], eval_examples: Sequence[Example], config: RunConfig, split: str
) -> tuple[list[Example], list[Example]]:
    """``train`` less the validation rows held out of it, and those rows (both in train order)."""
    count = config.val_limit or max(1, len(train) * HELDOUT_PERCENT // 100)
    source = "--val-limit" if config.val_limit else f"--val-limit 0: {HELDOUT_PERCENT}% of the train split"
    asked = {question_text(ex) for ex in eval_examples}
    eligible = [i for i, ex in enumerate(train) if question_text(ex) not in asked]
    what = (
        f"task {config.task!r} holds its validation rows out of the train split (it is evaluated on {split})"
    )
    if len(eligible) < count:
        raise FedSPError(
            f"{what}: {len(eligible)} of its {len(train)} rows ask no evaluated question, "
            f"{count - len(eligible)} short of the {count} validation rows ({source}); lower --val-limit"
        )
    shards = config.clients + 1
    if len(train) - count < shards:
        raise FedSPError(
            f"{what}: {len(train)} rows less {count} held out for validation ({source}) leave "
            f"{len(train) - count}, {shards - len(train) + count} short of one row for each of the {shards} "
            "shards; lower --val-limit or --clients"
        )
    seed = config.partition_seed
    eligible.sort(key=lambda i: hashlib.sha256(f"{seed}:{train[i].id}".encode()).hexdigest())
    held = set(eligible[:count])
    return [ex for i, ex in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def shard_indices(config: RunConfig, train: Sequence[Example]) -> list[list[int]]:
    """The K+1 shards of ``train`` by ``--partition`` (see :mod:`fedsp.data.partition`); with
    ``--server-rows N`` the server's shard is cut to N of its rows (a seeded draw), the clients' shards
    unchanged: the rest of the server's shard trains no one."""
    shards = _partition(config, train)
    if config.server_rows is not None:
        own = shards[0]
        if config.server_rows > len(own):
            raise FedSPError(
                f"--server-rows {config.server_rows} is more than the server's shard of {len(own)} rows "
                f"({len(train)} training rows cut into {config.clients + 1} shards)"
            )
        rng = np.random.default_rng([config.partition_seed, 1])
        shards[0] = sorted(int(i) for i in rng.choice(own, size=config.server_rows, replace=False))
    return shards


def _partition(config: RunConfig, train: Sequence[Example]) -> list[list[int]]:
    num_shards = config.clients + 1
    if len(train) < num_shards:
        raise FedSPError(
            f"task {config.task!r} has {len(train)} training examples, fewer than {num_shards} shards"
        )
    if config.partition == "iid":
        return partition_iid(len(train), num_shards, config.partition_seed)
    by_field = group_field(config.partition)
    if by_field is not None:
        values = group_values([ex.meta for ex in train], by_field, [ex.id for ex in train])
        return partition_by_group(values, num_shards, config.partition_seed, by_field)
    if is_generative(train):
        raise FedSPError(
            f"--partition {config.partition} shares examples out by their gold choice; task {config.task!r} "
            "is generative (no choices): use --partition iid or by:FIELD"
        )
    labels = [ex.gold for ex in train if isinstance(ex, MCExample)]
    return partition_dirichlet(labels, num_shards, config.alpha, config.partition_seed)


def shards_summary(config: RunConfig, train: Sequence[Example], shards: list[list[int]]) -> dict[str, Any]:
    """How skewed the clients' shards are: rows per shard, and per client how many distinct gold choices
    (multiple choice) and, under ``by:FIELD``, how many of the field's groups it holds."""
    clients = shards[1:]
    summary: dict[str, Any] = {
        "partition": config.partition,
        "server_rows": len(shards[0]),
        "client_rows": [len(shard) for shard in clients],
    }
    if config.partition == "dirichlet":
        summary["alpha"] = config.alpha
    if not is_generative(train):
        summary["client_gold_choices"] = [
            len({ex.gold for i in shard if isinstance(ex := train[i], MCExample)}) for shard in clients
        ]
    by_field = group_field(config.partition)
    if by_field is not None:
        summary["client_groups"] = [len({train[i].meta.get(by_field) for i in shard}) for shard in clients]
    return summary


def prepare_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> RunData:
    """Train split -> K+1 shards (shard 0 the server's); validation rows; the fixed evaluation examples."""
    examples = split_examples(config, tokenizer)
    shards = shard_indices(config, examples.train)
    encoded = encode_training(tokenizer, examples.train, config.max_length)
    evaluated = examples.evaluated
    return RunData(
        server_rows=[encoded[i] for i in shards[0]],
        client_rows=[[encoded[i] for i in shard] for shard in shards[1:]],
        val_rows=[encode_example(tokenizer, ex, config.max_length) for ex in examples.validation],
        eval_examples=evaluated,
        eval_split=examples.eval_split,
        truncation=truncation_counts(tokenizer, encoded, evaluated, config.max_length, config.max_new_tokens),
        generative=is_generative(examples.train),
        data_format=custom_format("train", config.data_dir)
        if config.task == CUSTOM and config.data_dir
        else None,
        shards=shards_summary(config, examples.train, shards),
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
        lengths = [len(text_ids(tokenizer, ex.prompt)) for ex in prompts]
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
