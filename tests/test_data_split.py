"""Tests of how a run's data is split: validation kept apart from evaluation, ``--partition by:FIELD``,
and the bundled MedMCQA task."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from fedsp.config import RunConfig
from fedsp.data.partition import group_values, partition_by_group
from fedsp.data.shards import prepare_data, question_text, shard_indices, split_examples
from fedsp.data.tasks import TASKS, Example, MCExample, carved_sizes, load_task
from fedsp.errors import FedSPError
from fedsp.models.loading import byte_tokenizer

BUNDLED = tuple(t for t in TASKS if t not in ("race", "custom"))


def full_text(example: Example) -> tuple[str, ...]:
    """Everything an example shows: question and choices, or prompt and completion."""
    if isinstance(example, MCExample):
        return (example.context, *example.choices)
    return (example.prompt, example.completion)


def expect_error(match: str, fn, *args):
    # a library error names the field (data_dir); the same error on the command line the flag (--data-dir)
    match = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: f"(?:--{m[1]}|{m[1].replace('-', '_')})", match)
    with pytest.raises(FedSPError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value).strip()
    return str(info.value)


def write_jsonl(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def piqa_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"goal": f"goal {i}", "sol1": "yes", "sol2": "no", "label": i % 2} for i in range(start, start + n)
    ]


# ------------------------------------------------- validation never overlaps evaluation


def test_bundled_tasks_are_the_tasks_tested():
    assert "medmcqa" in BUNDLED and "squad" in BUNDLED and len(BUNDLED) == len(TASKS) - 2


@pytest.mark.parametrize("eval_limit", [None, 200, 500])
@pytest.mark.parametrize("task", BUNDLED)
def test_validation_never_overlaps_the_evaluated_examples(task, eval_limit):
    # Prepare: --eval-limit 0 comes with --val-limit 0, as in the paper scale
    config = RunConfig(task=task, eval_limit=eval_limit, val_limit=None if eval_limit is None else 100)

    # Execute
    data = split_examples(config)

    # Assert: disjoint by id and by text; the held-out rows left the training pool
    evaluated_ids = {ex.id for ex in data.evaluated}
    val_ids = {ex.id for ex in data.validation}
    assert data.validation and data.evaluated
    assert not evaluated_ids & val_ids
    assert not val_ids & {ex.id for ex in data.train}
    assert not evaluated_ids & {ex.id for ex in data.train}
    assert not {full_text(ex) for ex in data.evaluated} & {full_text(ex) for ex in data.validation}
    if data.val_source == "train":  # held out of train: no evaluated question asked again
        assert not {question_text(ex) for ex in data.evaluated} & {
            question_text(ex) for ex in data.validation
        }
        train = load_task(task, "train")
        assert len(data.train) + len(data.validation) == len(train)
    if eval_limit is not None:
        assert len(data.evaluated) == min(eval_limit, len(load_task(task, data.eval_split)))


@pytest.mark.parametrize("task", ["piqa", "hellaswag"])
def test_tasks_evaluated_on_validation_hold_out_train_rows(task):
    # Execute
    whole = split_examples(RunConfig(task=task, eval_limit=None, val_limit=None))
    limited = [split_examples(RunConfig(task=task, eval_limit=n, val_limit=50)) for n in (200, 500)]

    # Assert: the whole validation split is evaluated; a tenth of train validates; the held-out rows
    # do not depend on --eval-limit, and a smaller --val-limit takes a subset of a larger one
    assert whole.eval_split == "validation" and whole.val_source == "train"
    assert whole.evaluated == load_task(task, "validation")
    assert len(whole.validation) == len(load_task(task, "train")) // 10
    assert limited[0].validation == limited[1].validation
    assert {ex.id for ex in limited[0].validation} < {ex.id for ex in whole.validation}
    assert all(ex.id.startswith(f"{task}/train/") for ex in whole.validation)


def test_prepared_validation_rows_are_not_the_evaluated_questions():
    """The defect: with --eval-limit 0 PIQA chose its best prefix on the very questions it scored."""
    # Prepare
    tokenizer = byte_tokenizer()
    config = RunConfig(task="piqa", model="tiny-llama", eval_limit=None, val_limit=None, max_length=1024)

    # Execute
    data = prepare_data(config, tokenizer)

    # Assert
    from fedsp.data.batching import encode_example

    evaluated_rows = {encode_example(tokenizer, ex, config.max_length) for ex in data.eval_examples}
    assert len(data.eval_examples) == 1838 and len(data.val_rows) == 16113 // 10
    assert not evaluated_rows & set(data.val_rows)
    assert sum(map(len, data.client_rows)) + len(data.server_rows) + len(data.val_rows) == 16113


def test_held_out_validation_skips_evaluated_questions_and_train_only_folders(tmp_path):
    # Prepare: train repeats two validation goals; a second folder has train and test only
    write_jsonl(tmp_path / "a", "train", piqa_rows(30) + piqa_rows(2))
    write_jsonl(tmp_path / "a", "validation", piqa_rows(2))
    write_jsonl(tmp_path / "b", "train", piqa_rows(30))
    write_jsonl(tmp_path / "b", "test", piqa_rows(5, 100))

    # Execute
    a = split_examples(RunConfig(task="piqa", data_dir=str(tmp_path / "a"), clients=3, val_limit=28))
    b = split_examples(RunConfig(task="piqa", data_dir=str(tmp_path / "b"), clients=3, val_limit=4))

    # Assert: all 28 rows that ask no evaluated question validate; the 4 repeats stay in training
    assert sorted(question_text(ex) for ex in a.train) == sorted(
        2 * [question_text(ex) for ex in a.evaluated]
    )
    assert len(a.validation) == 28
    assert b.eval_split == "test" and b.val_source == "train" and len(b.validation) == 4
    assert len(b.train) == 26


def test_too_few_train_rows_to_hold_out_validation_is_refused(tmp_path):
    # Prepare
    write_jsonl(tmp_path, "train", piqa_rows(12) + piqa_rows(3))
    write_jsonl(tmp_path, "validation", piqa_rows(3))

    # Execute / Assert: goals 3..11 (9 rows) ask no evaluated question; 20 asked
    message = expect_error(
        "9 of its 15 rows ask no evaluated question, 11 short of the 20 validation rows",
        split_examples,
        RunConfig(task="piqa", data_dir=str(tmp_path), clients=2, val_limit=20),
    )
    assert "evaluated on validation" in message
    # 15 rows less 9 held out leave 6, 5 short of one row for each of 11 shards
    expect_error(
        "leave 6, 5 short of one row for each of the 11 shards",
        split_examples,
        RunConfig(task="piqa", data_dir=str(tmp_path), clients=10, val_limit=9),
    )


# ------------------------------------------------------------- --partition by:FIELD


def examples(values: list[str], field: str = "topic") -> list[MCExample]:
    return [MCExample(f"t/train/{i}", f"q{i}", ("a", "b"), 0, meta={field: v}) for i, v in enumerate(values)]


def test_partition_by_field_gives_each_client_whole_groups():
    # Prepare: 7 topics of sizes 1..7
    values = [f"topic{k}" for k in range(1, 8) for _ in range(k)]
    train = examples(values)
    config = RunConfig(clients=3, partition="by:topic", data_seed=5)

    # Execute
    shards = shard_indices(config, train)

    # Assert: a partition; shard 0 an IID sample of n // (K+1) rows; no topic on two clients
    assert sorted(i for s in shards for i in s) == list(range(len(values)))
    assert all(s == sorted(s) for s in shards) and len(shards[0]) == len(values) // 4
    topics = [{values[i] for i in s} for s in shards[1:]]
    assert all(topics) and sum(map(len, topics)) == len(set().union(*topics))
    # the rest by hand: groups largest first, each to the client with the fewest rows (lowest index)
    left = Counter(values[i] for i in range(len(values)) if i not in set(shards[0]))
    sizes = [0, 0, 0]
    for count in sorted(left.values(), reverse=True):
        sizes[sizes.index(min(sizes))] += count
    assert [len(s) for s in shards[1:]] == sizes
    assert shard_indices(config, train) == shards  # seeded
    assert shard_indices(RunConfig(clients=3, partition="by:topic", data_seed=6), train) != shards


def test_partition_by_group_hand_computed():
    # 2 shards: server takes 6 // 2 = 3 rows, the client all the rest whatever their groups
    shards = partition_by_group(["a", "a", "b", "b", "c", "c"], 2, seed=0, field="f")
    assert len(shards[0]) == 3 and sorted(shards[0] + shards[1]) == list(range(6))
    # 1 shard: the server's alone
    assert partition_by_group(["a", "b"], 1, seed=0) == [[0, 1]]


def test_partition_by_unknown_field_lists_the_fields():
    train = examples(["x", "y", "z", "w"])
    message = expect_error(
        r"--partition by:subject: the training rows have no field 'subject'; fields they all have: topic",
        shard_indices,
        RunConfig(clients=2, partition="by:subject"),
        train,
    )
    assert "topic" in message
    partly = [*train, MCExample("t/train/9", "q9", ("a", "b"), 0, meta={"other": "v"})]
    expect_error(
        r"1 of 5 training rows have no field 'topic' \(first: t/train/9\); fields they all have: none",
        group_values,
        [ex.meta for ex in partly],
        "topic",
        [ex.id for ex in partly],
    )


def test_partition_by_field_with_fewer_groups_than_clients_is_refused():
    train = examples(["x", "y", "z"] * 10)
    expect_error(
        "the clients' rows hold 3 distinct topic values, fewer than the 4 clients",
        shard_indices,
        RunConfig(clients=4, partition="by:topic"),
        train,
    )


@pytest.mark.parametrize(
    ("partition", "match"),
    [
        ("by:", "needs a field name after by:"),
        ("by: topic", "needs a field name after by:"),
        ("zipf", "choose one of: iid, dirichlet, by:FIELD"),
    ],
)
def test_partition_option_is_checked(partition, match):
    expect_error(match, lambda: RunConfig(partition=partition))


def test_hellaswag_by_activity_label_gives_clients_disjoint_labels():
    # Prepare
    config = RunConfig(task="hellaswag", clients=10, partition="by:activity_label")
    train = split_examples(config).train

    # Execute
    shards = shard_indices(config, train)

    # Assert
    labels = [{train[i].meta["activity_label"] for i in shard} for shard in shards[1:]]
    assert all(labels) and sum(map(len, labels)) == len(set().union(*labels))
    assert len({train[i].meta["activity_label"] for i in shards[0]}) > 100  # the server's: IID
    assert sorted(i for s in shards for i in s) == list(range(len(train)))


def test_generative_task_partitions_by_field_but_not_dirichlet():
    train = split_examples(RunConfig(task="squad")).train
    shards = shard_indices(RunConfig(task="squad", clients=4, partition="by:title"), train)
    titles = [{train[i].meta["title"] for i in s} for s in shards[1:]]
    assert sum(map(len, titles)) == len(set().union(*titles))
    expect_error(
        "use --partition iid or by:FIELD",
        shard_indices,
        RunConfig(task="squad", partition="dirichlet"),
        train,
    )


# ------------------------------------------------------------------------- MedMCQA


def test_medmcqa_is_bundled_and_carved():
    # Execute
    parts = {s: load_task("medmcqa", s) for s in ("train", "validation", "test")}

    # Assert: 70/10/20% of the 4183 rows; disjoint by id and by question; valid golds
    assert carved_sizes(4183) == {"train": 2929, "validation": 418, "test": 836}
    assert carved_sizes(1000) == {"train": 700, "validation": 100, "test": 200}  # SciQ, SQuAD: as before
    assert [len(p) for p in parts.values()] == [2929, 418, 836]
    ids = [{ex.id.rsplit("/", 1)[1] for ex in p} for p in parts.values()]
    assert len(set().union(*ids)) == 4183
    questions = [{question_text(ex) for ex in p} for p in parts.values()]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    for ex in (ex for p in parts.values() for ex in p):
        assert isinstance(ex, MCExample) and len(ex.choices) == 4 and 0 <= ex.gold < 4
        assert ex.context.startswith("Question: ") and ex.context.endswith("\nAnswer:")
        assert ex.meta["subject_name"] and str(ex.gold) == ex.meta["cop"]
    first = parts["test"][0]
    assert first == MCExample(
        id="medmcqa/test/45258d3d-b974-44dd-a161-c3fccbdadd88",
        context="Question: Which of the following is not true for myelinated nerve fibers:\nAnswer:",
        choices=(
            "Impulse through myelinated fibers is slower than non-myelinated fibers",
            "Membrane currents are generated at nodes of Ranvier",
            "Saltatory conduction of impulses is seen",
            "Local anesthesia is effective only when the nerve is not covered by myelin sheath",
        ),
        gold=0,
    )
    assert first.meta["subject_name"] == "Physiology"


def test_medmcqa_local_row_matches_bundled(tmp_path):
    row = {
        "id": "45258d3d-b974-44dd-a161-c3fccbdadd88",
        "question": "Which of the following is not true for myelinated nerve fibers:",
        "opa": "Impulse through myelinated fibers is slower than non-myelinated fibers",
        "opb": "Membrane currents are generated at nodes of Ranvier",
        "opc": "Saltatory conduction of impulses is seen",
        "opd": "Local anesthesia is effective only when the nerve is not covered by myelin sheath",
        "cop": 0,
        "subject_name": "Physiology",
        "topic_name": None,
    }
    write_jsonl(tmp_path, "test", [row, {**row, "cop": 4}])
    expect_error(r"row 2: cop 4 out of range, allowed 0\.\.3", load_task, "medmcqa", "test", tmp_path)
    write_jsonl(tmp_path, "test", [row])
    local = load_task("medmcqa", "test", tmp_path)[0]
    assert local == load_task("medmcqa", "test")[0]
    assert dict(local.meta) == {k: str(v) for k, v in row.items() if v is not None}


def test_medmcqa_by_subject_name():
    # Prepare
    config = RunConfig(task="medmcqa", clients=8, partition="by:subject_name")
    train = split_examples(config).train

    # Execute
    shards = shard_indices(config, train)

    # Assert: every subject on one client only; no topic_name partition (most rows have none)
    subjects = [{train[i].meta["subject_name"] for i in s} for s in shards[1:]]
    assert all(subjects) and sum(map(len, subjects)) == len(set().union(*subjects))
    expect_error(
        "training rows have no field 'topic_name'",
        shard_indices,
        RunConfig(task="medmcqa", partition="by:topic_name"),
        train,
    )
