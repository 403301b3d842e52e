"""Tests of fedsp.data: bundled task data, local files in Hugging Face schema, partitions."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from fedsp.data import (
    TASKS,
    MCExample,
    eval_split,
    hellaswag_clean,
    load_task,
    partition_dirichlet,
    partition_iid,
    task_splits,
)
from fedsp.errors import FedSPError


def write_jsonl(folder: Path, split: str, rows: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(folder: Path, split: str, rows: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


# ------------------------------------------------------------------ bundled data


def test_task_names():
    assert TASKS == (
        "arc_easy",
        "arc_challenge",
        "openbookqa",
        "piqa",
        "hellaswag",
        "sciq",
        "medmcqa",
        "race",
        "squad",
        "custom",
    )


@pytest.mark.parametrize(
    ("task", "split", "count"),
    [
        ("arc_easy", "train", 2251),
        ("arc_easy", "validation", 570),
        ("arc_easy", "test", 2376),
        ("arc_challenge", "train", 1119),
        ("arc_challenge", "validation", 299),
        ("arc_challenge", "test", 1172),
        ("openbookqa", "train", 4957),
        ("openbookqa", "validation", 500),
        ("openbookqa", "test", 500),
        ("piqa", "train", 16113),
        ("piqa", "validation", 1838),
        ("hellaswag", "validation", 10042),
        ("sciq", "train", 700),
        ("sciq", "validation", 100),
        ("sciq", "test", 200),
        ("medmcqa", "train", 2929),
        ("medmcqa", "validation", 418),
        ("medmcqa", "test", 836),
    ],
)
def test_bundled_counts_and_invariants(task, split, count):
    examples = load_task(task, split)
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    for e in examples:
        assert e.id.startswith(f"{task}/{split}/")
        assert e.context == e.context.rstrip() and e.context
        assert 2 <= len(e.choices) <= 5
        assert all(c and c == c.strip() for c in e.choices)
        assert 0 <= e.gold < len(e.choices)


@pytest.mark.parametrize(
    ("task", "splits", "evaluate"),
    [
        ("arc_easy", ("train", "validation", "test"), "test"),
        ("arc_challenge", ("train", "validation", "test"), "test"),
        ("openbookqa", ("train", "validation", "test"), "test"),
        ("piqa", ("train", "validation"), "validation"),
        ("hellaswag", ("train", "validation"), "validation"),
        ("sciq", ("train", "validation", "test"), "test"),
        ("medmcqa", ("train", "validation", "test"), "test"),
    ],
)
def test_bundled_splits(task, splits, evaluate):
    assert task_splits(task) == splits
    assert eval_split(task) == evaluate


def test_bundled_templates_on_real_rows():
    assert load_task("arc_easy", "validation")[0] == MCExample(
        id="arc_easy/validation/MCAS_2000_4_6",
        context="Question: Which technology was developed most recently?\nAnswer:",
        choices=("cellular telephone", "television", "refrigerator", "airplane"),
        gold=0,
    )
    assert load_task("openbookqa", "validation")[0] == MCExample(
        id="openbookqa/validation/8-376",
        context="Frilled sharks and angler fish live far beneath the surface of the ocean, "
        "which is why they are known as",
        choices=("Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"),
        gold=0,
    )
    # PIQA row 1 has trailing spaces in both solutions: stripped.
    assert load_task("piqa", "validation")[1] == MCExample(
        id="piqa/validation/1",
        context="Question: dresser\nAnswer:",
        choices=("replace drawer with bobby pin", "finish, woodgrain with  bobby pin"),
        gold=1,
    )
    assert load_task("hellaswag", "validation")[0] == MCExample(
        id="hellaswag/validation/24",
        context="Roof shingle removal: A man is sitting on a roof. He",
        choices=(
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ),
        gold=3,
    )
    # An ARC-Challenge item with 3 choices.
    three = {e.id: e for e in load_task("arc_challenge", "train")}[
        "arc_challenge/train/NYSEDREGENTS_2004_4_8"
    ]
    assert three.choices == ("slower", "faster", "in the same amount of time") and three.gold == 0
    assert Counter(len(e.choices) for e in load_task("arc_easy", "test")) == {4: 2365, 3: 7, 5: 4}


def test_sciq_carved_splits():
    parts = {s: load_task("sciq", s) for s in ("train", "validation", "test")}
    rows = [int(e.id.rsplit("/", 1)[1]) for s in parts for e in parts[s]]
    assert sorted(rows) == list(range(1000))  # disjoint and complete
    assert [e.id for e in parts["test"][:3]] == ["sciq/test/0", "sciq/test/4", "sciq/test/8"]
    assert all(e.gold == 3 for s in parts for e in parts[s])
    # Row 0 has an empty support: the lm-eval template keeps the leading newline.
    assert parts["test"][0] == MCExample(
        id="sciq/test/0",
        context="\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:",
        choices=("Linnaeus", "shaw", "Scopes", "darwin"),
        gold=3,
    )
    with_support = parts["train"][1]
    assert with_support.id == "sciq/train/2"
    assert with_support.context.startswith("A frameshift mutation is a deletion or insertion")
    assert with_support.context.endswith(
        "sequence of bases in RNA:.\nQuestion: A frameshift mutation is a deletion or insertion of one "
        "or more of what that changes the reading frame of the base sequence?\nAnswer:"
    )
    assert with_support.choices == ("proteins", "carotenoids", "genes", "nucleotides")


def test_loading_is_cached_but_returns_fresh_lists():
    first = load_task("arc_easy", "validation")
    first.clear()
    again = load_task("arc_easy", "validation")
    assert len(again) == 570
    assert again[0] is load_task("arc_easy", "validation")[0]


# ------------------------------------------ bundled row == same row in a local file


def test_local_arc_row_matches_bundled(tmp_path):
    row = {
        "id": "MCAS_2000_4_6",
        "question": "Which technology was developed most recently?",
        "choices": {
            "text": ["cellular telephone", "television", "refrigerator", "airplane"],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "A",
    }
    write_jsonl(tmp_path, "validation", [row])
    assert load_task("arc_easy", "validation", tmp_path) == [load_task("arc_easy", "validation")[0]]


def test_local_hellaswag_and_piqa_rows_match_bundled(tmp_path):
    hs = {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "source_id": "activitynet~v_-JhWjGDPHMY",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
    }
    write_jsonl(tmp_path / "hs", "validation", [hs])
    assert load_task("hellaswag", "validation", tmp_path / "hs") == [load_task("hellaswag", "validation")[0]]
    piqa = [
        {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
        {
            "goal": "dresser",
            "sol1": "replace drawer with bobby pin ",
            "sol2": "finish, woodgrain with  bobby pin ",
            "label": 1,
        },
    ]
    write_json(tmp_path / "piqa", "validation", piqa)
    assert load_task("piqa", "validation", tmp_path / "piqa")[1] == load_task("piqa", "validation")[1]


# ----------------------------------------------------- local files, every task


def test_local_arc_numeric_labels_and_five_choices(tmp_path):
    rows = [
        {
            "id": "Q1",
            "question": " What melts? ",
            "choices": {"text": ["ice", "rock", "glass"], "label": ["1", "2", "3"]},
            "answerKey": "1",
        },
        {
            "id": "Q2",
            "question": "Pick E.",
            "choices": {"text": ["a", "b", "c", "d", "e"], "label": ["A", "B", "C", "D", "E"]},
            "answerKey": "E",
        },
    ]
    write_jsonl(tmp_path, "train", rows)
    assert load_task("arc_challenge", "train", tmp_path) == [
        MCExample("arc_challenge/train/Q1", "Question: What melts?\nAnswer:", ("ice", "rock", "glass"), 0),
        MCExample("arc_challenge/train/Q2", "Question: Pick E.\nAnswer:", ("a", "b", "c", "d", "e"), 4),
    ]


def test_local_openbookqa(tmp_path):
    row = {
        "id": "7-980",
        "question_stem": "The sun is responsible for",
        "choices": {
            "text": ["puppies", "children", "flowers", "plants sprouting"],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "D",
    }
    write_json(tmp_path, "test", [row])
    assert load_task("openbookqa", "test", tmp_path) == [
        MCExample(
            "openbookqa/test/7-980",
            "The sun is responsible for",
            ("puppies", "children", "flowers", "plants sprouting"),
            3,
        )
    ]


def test_local_piqa_ids_are_positions(tmp_path):
    rows = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Kick the lid.", "label": 0}] * 2
    write_jsonl(tmp_path, "train", rows)
    expected = MCExample(
        "piqa/train/0", "Question: Open a jar\nAnswer:", ("Twist the lid.", "Kick the lid."), 0
    )
    assert load_task("piqa", "train", tmp_path) == [expected, replace(expected, id="piqa/train/1")]


def test_local_hellaswag_wikihow_cleaning(tmp_path):
    row = {
        "ind": 7,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
        "ctx_b": "",
        "endings": ["[step] Scrub the grates  with a brush.", "Pour water on it. [substeps] Wait."],
        "label": 0,
    }
    other = dict(row, ind=7, ctx_a="A man is on a roof.", ctx_b="he PULLS up Shingles.", label=1)
    write_jsonl(tmp_path, "train", [row, other])
    assert load_task("hellaswag", "train", tmp_path) == [
        MCExample(
            "hellaswag/train/7",
            "Home and Garden: How to clean a grill. Heat the grill.",
            ("Scrub the grates with a brush.", "Pour water on it. Wait."),
            0,
        ),
        # ctx_b.capitalize() lower-cases the rest, as lm-eval does; the repeated ind gets "#2".
        MCExample(
            "hellaswag/train/7#2",
            "Home and Garden: A man is on a roof. He pulls up shingles.",
            ("Scrub the grates with a brush.", "Pour water on it. Wait."),
            1,
        ),
    ]


def test_hellaswag_clean_is_idempotent():
    raw = "  Fitness: [header] How to run [title] Warm up.   Stretch [step] first. "
    once = hellaswag_clean(raw)
    assert once == "Fitness: How to run. Warm up. Stretch first."
    assert hellaswag_clean(once) == once


def test_local_sciq(tmp_path):
    row = {
        "question": "What gas do plants absorb?",
        "distractor3": "helium",
        "distractor1": "oxygen",
        "distractor2": "neon",
        "correct_answer": "carbon dioxide",
        "support": "  Plants take in carbon dioxide.\n",
    }
    write_jsonl(tmp_path, "validation", [row, dict(row, support="")])
    assert load_task("sciq", "validation", tmp_path) == [
        MCExample(
            "sciq/validation/0",
            "Plants take in carbon dioxide.\nQuestion: What gas do plants absorb?\nAnswer:",
            ("oxygen", "neon", "helium", "carbon dioxide"),
            3,
        ),
        MCExample(
            "sciq/validation/1",
            "\nQuestion: What gas do plants absorb?\nAnswer:",
            ("oxygen", "neon", "helium", "carbon dioxide"),
            3,
        ),
    ]


def test_local_race(tmp_path):
    row = {
        "example_id": "high1234.txt",
        "article": "Tom went to the park. He saw a dog.",
        "answer": "C",
        "question": "What did Tom see?",
        "options": ["a cat", "a bird", "a dog", "a fish"],
    }
    write_jsonl(tmp_path, "test", [row])
    write_json(tmp_path, "train", [row])
    assert load_task("race", "test", tmp_path) == [
        MCExample(
            "race/test/high1234.txt",
            "Article: Tom went to the park. He saw a dog.\n\nQuestion: What did Tom see?\n\nAnswer:",
            ("a cat", "a bird", "a dog", "a fish"),
            2,
        )
    ]
    assert task_splits("race", tmp_path) == ("train", "test")
    assert eval_split("race", tmp_path) == "test"


def test_local_splits_formats_and_blank_lines(tmp_path):
    row = {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}
    write_jsonl(tmp_path, "train", [row])
    # A .json file in JSON-lines form (what datasets' to_json writes), with blank lines.
    (tmp_path / "validation.json").write_text("\n" + json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    assert task_splits("piqa", tmp_path) == ("train", "validation")
    assert eval_split("piqa", tmp_path) == "validation"
    assert len(load_task("piqa", "validation", str(tmp_path))) == 2
    # A split in two files (.jsonl and .json) is refused naming both: neither is picked silently
    write_json(tmp_path, "train", [row, row, row])
    expect_error(
        "holds the train split twice: train.jsonl and train.json", load_task, "piqa", "train", tmp_path
    )


# -------------------------------------------------------------------- user errors


def expect_error(match: str, fn, *args):
    # a library error names the field (data_dir); the same error on the command line the flag (--data-dir)
    match = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: f"(?:--{m[1]}|{m[1].replace('-', '_')})", match)
    with pytest.raises(FedSPError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value).strip()
    return str(info.value)


def test_unknown_task_and_split(tmp_path):
    message = expect_error("arc_eesy", load_task, "arc_eesy", "train")
    assert "arc_easy" in message and "race" in message
    expect_error("unknown task 'mmlu'", task_splits, "mmlu")
    message = expect_error("'dev'", load_task, "arc_easy", "dev")
    assert "validation" in message


def test_race_without_data_dir():
    expect_error("race.*--data-dir", load_task, "race", "train")
    expect_error("race.*--data-dir", eval_split, "race")


def test_missing_bundled_split():
    message = expect_error("piqa.*'test'", load_task, "piqa", "test")
    assert "train, validation" in message


def test_missing_data_dir_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    expect_error(str(missing), load_task, "arc_easy", "train", missing)
    expect_error(str(missing), task_splits, "arc_easy", missing)
    write_jsonl(tmp_path, "train", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    message = expect_error("no test file", load_task, "piqa", "test", tmp_path)
    assert str(tmp_path / "test.jsonl") in message and str(tmp_path / "test.json") in message
    expect_error("no test or validation split", eval_split, "piqa", tmp_path)


ARC_ROW = {
    "id": "X",
    "question": "Q?",
    "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}


@pytest.mark.parametrize(
    ("task", "bad_row", "match"),
    [
        (
            "arc_easy",
            {k: v for k, v in ARC_ROW.items() if k != "question"},
            "row 2: missing field 'question'",
        ),
        ("arc_easy", dict(ARC_ROW, answerKey="E"), "row 2: answerKey 'E' out of range"),
        (
            "arc_easy",
            dict(ARC_ROW, choices={"text": [], "label": []}),
            "row 2: field 'choices.text' has no choices",
        ),
        (
            "arc_easy",
            dict(ARC_ROW, choices={"text": ["a", ""], "label": ["A", "B"]}),
            "row 2: choice 1 is empty",
        ),
        ("arc_easy", dict(ARC_ROW, choices=["a", "b"]), "row 2: field 'choices' must be an object"),
        ("arc_easy", dict(ARC_ROW, question=3), "row 2: field 'question' must be a string"),
        (
            "piqa",
            {"goal": "g", "sol1": "a", "sol2": "b", "label": 2},
            r"row 2: label 2 out of range, allowed 0\.\.1",
        ),
        ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": -1}, "row 2: label -1 out of range"),
        ("piqa", {"goal": "g", "sol1": "a", "label": 0}, "row 2: missing field 'sol2'"),
        (
            "hellaswag",
            {"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": "7"},
            "row 2: label '7' out of range",
        ),
        (
            "hellaswag",
            {"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": [], "label": "0"},
            "no choices",
        ),
        (
            "sciq",
            {"question": "q", "distractor1": "a", "distractor2": "b", "correct_answer": "c", "support": ""},
            "'distractor3'",
        ),
        (
            "race",
            {"article": "t", "question": "q", "options": ["a", "b"], "answer": "C"},
            "row 2: answer 'C' out of range",
        ),
        (
            "race",
            {"article": "t", "question": "q", "options": [], "answer": "A"},
            "field 'options' has no choices",
        ),
    ],
)
def test_malformed_rows(tmp_path, task, bad_row, match):
    good = {
        "arc_easy": ARC_ROW,
        "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
        "hellaswag": {"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": "0"},
        "sciq": {
            "question": "q",
            "distractor1": "a",
            "distractor2": "b",
            "distractor3": "d",
            "correct_answer": "c",
            "support": "",
        },
        "race": {"article": "t", "question": "q", "options": ["a", "b"], "answer": "B"},
    }[task]
    path = write_jsonl(tmp_path, "train", [good, bad_row])
    message = expect_error(match, load_task, task, "train", tmp_path)
    assert str(path) in message


def test_malformed_files(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"goal": "g"}\n{not json\n')
    expect_error(r"train\.jsonl row 2: not valid JSON", load_task, "piqa", "train", tmp_path)
    path.write_text("[1, 2]")
    expect_error(r"train\.jsonl row 1: expected a JSON object, got int", load_task, "piqa", "train", tmp_path)
    path.write_text("\n\n")
    expect_error(r"train\.jsonl has no rows", load_task, "piqa", "train", tmp_path)


# --------------------------------------------------------------------- partitions


def assert_partition(shards: list[list[int]], n: int, num_shards: int) -> None:
    assert len(shards) == num_shards
    assert all(shard == sorted(shard) for shard in shards)
    assert sorted(i for shard in shards for i in shard) == list(range(n))


def test_partition_iid():
    shards = partition_iid(103, 11, seed=12345)
    assert_partition(shards, 103, 11)
    assert [len(s) for s in shards] == [10] * 4 + [9] * 7
    assert partition_iid(103, 11, seed=12345) == shards
    assert partition_iid(103, 11, seed=1) != shards
    assert partition_iid(5, 1, seed=0) == [[0, 1, 2, 3, 4]]
    assert_partition(partition_iid(3, 3, seed=0), 3, 3)
    expect_error("0 examples", partition_iid, 0, 1, 0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 0, 1), "num_shards"),
        ((3, 4, 1), "num_shards=4"),
        ((10, 2, -1), "seed"),
        ((10.5, 2, 1), "n must be an integer"),
    ],
)
def test_partition_iid_bad_args(args, match):
    expect_error(match, partition_iid, *args)


def label_skew(labels: list[int], shards: list[list[int]]) -> float:
    """Mean over shards of the share of the shard's most common label."""
    shares = [Counter(labels[i] for i in s).most_common(1)[0][1] / len(s) for s in shards]
    return sum(shares) / len(shares)


def test_partition_dirichlet():
    labels = [i % 4 for i in range(1000)]
    skewed = partition_dirichlet(labels, 5, alpha=0.05, seed=12345)
    assert_partition(skewed, 1000, 5)
    assert partition_dirichlet(labels, 5, alpha=0.05, seed=12345) == skewed
    assert partition_dirichlet(labels, 5, alpha=0.05, seed=7) != skewed
    even = partition_dirichlet(labels, 5, alpha=1000.0, seed=12345)
    assert_partition(even, 1000, 5)
    assert label_skew(labels, skewed) > 0.75
    assert label_skew(labels, even) < 0.35
    iid = partition_iid(1000, 5, seed=12345)
    assert label_skew(labels, iid) < 0.35
    big = partition_dirichlet(labels, 10, alpha=0.5, seed=3, min_size=40)
    assert_partition(big, 1000, 10)
    assert min(map(len, big)) >= 40


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0, 1, 0], 2, 0.0, 1), "alpha"),
        (([0, 1, 0], 2, -1.0, 1), "alpha"),
        (([0, 1, 0], 2, float("nan"), 1), "alpha"),
        (([0, 1, 0], 0, 1.0, 1), "num_shards"),
        (([0, 1], 3, 1.0, 1), "num_shards=3"),
        (([0, 1, 0, 1], 2, 1.0, 1, 3), "min_size=3"),
        (([0, "b"], 2, 1.0, 1), r"labels\[1\]"),
        (([0] * 20, 10, 0.001, 1), "alpha=0.001"),  # one label, tiny alpha: shards stay empty
    ],
)
def test_partition_dirichlet_bad_args(args, match):
    expect_error(match, partition_dirichlet, *args)
