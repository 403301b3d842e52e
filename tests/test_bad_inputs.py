"""The bad-input corpus: each case is a command (and the files it names) with the one line it must get.

Every case exits with status 2, prints exactly one line on stderr (``fedsp: error: ...``), no
traceback, and leaves nothing behind: no results folder, nothing overwritten.
"""

from __future__ import annotations

import json

import pytest

from fedsp.cli import main

TINY = [
    "--model",
    "tiny-llama",
    "--clients",
    "2",
    "--rounds",
    "1",
    "--local-steps",
    "1",
    "--kd-steps",
    "0",
    "--eval-limit",
    "4",
    "--val-limit",
    "4",
    "--prefix-len",
    "4",
    "--max-length",
    "96",
    "--quiet",
]


def _arc_row(i: int, choices=("red", "green", "blue", "black"), answer: str = "A") -> dict:
    return {
        "id": f"q{i}",
        "question": f"Say {choices[0]}.",
        "answerKey": answer,
        "choices": {"text": list(choices), "label": list("ABCD"[: len(choices)])},
    }


def _data_dir(tmp_path, bad_row: dict | None = None):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [_arc_row(i) for i in range(12)] + ([bad_row] if bad_row else [])
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# (case id, function of tmp_path -> extra CLI arguments, fragment of the one line)
CASES = [
    (
        "yaml-malformed",
        lambda p: ["--config", _file(p, "c.yaml", b"rounds: [1, 2\nmodel: x\n")],
        "cannot be parsed",
    ),
    (
        "config-layer-choice-int",
        lambda p: ["--config", _file(p, "c.toml", b"aux_layer_choice = 5\n")],
        "indices [5] outside 0..3",
    ),
    (
        "config-layer-choice-float",
        lambda p: ["--config", _file(p, "c.toml", b"aux_layer_choice = 1.5\n")],
        "aux_layer_choice = 1.5 is not valid",
    ),
    (
        "toml-utf16",
        lambda p: ["--config", _file(p, "c.toml", "rounds = 2\n".encode("utf-16"))],
        "not UTF-8 text",
    ),
    ("toml-binary", lambda p: ["--config", _file(p, "c.toml", bytes(range(256)))], "not UTF-8 text"),
    ("toml-bad-value", lambda p: ["--config", _file(p, "c.toml", b'alpha = "lots"\n')], "alpha"),
    ("out-parent-is-a-file", lambda p: ["--out", _file(p, "f.txt", b"x") + "/run"], "not a folder"),
    ("model-fake-gguf", lambda p: ["--model", _file(p, "m.gguf", b"not a gguf file")], "cannot be read"),
    ("model-empty-folder", lambda p: ["--model", str(p)], "no model files"),
    ("prefix-len-huge", lambda p: ["--prefix-len", "100000"], "--prefix-len must be an integer in [1, 4096]"),
    (
        "prefix-and-length-beyond-gpt2-positions",
        lambda p: ["--model", "tiny-gpt2", "--prefix-len", "2000"],
        "positions",
    ),
    (
        "max-length-beyond-opt-positions",
        lambda p: ["--model", "tiny-opt", "--max-length", "4000"],
        "positions",
    ),
    ("max-length-1", lambda p: ["--max-length", "1"], "--max-length 1 is too short"),
    (
        "duplicated-choices",
        lambda p: [
            "--task",
            "arc_easy",
            "--data-dir",
            str(_data_dir(p, _arc_row(99, ("red", "red", "blue", "black")))),
        ],
        "duplicated choices",
    ),
    (
        "one-choice",
        lambda p: ["--task", "arc_easy", "--data-dir", str(_data_dir(p, _arc_row(99, ("red",))))],
        "at least two choices",
    ),
    ("resume-foreign-checkpoint", lambda p: _foreign_run(p, b"garbage, not a checkpoint"), "cannot be read"),
]


def _foreign_run(tmp_path, checkpoint: bytes) -> list[str]:
    run = tmp_path / "oldrun"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "tiny-llama", "rounds": 1}))
    (run / "checkpoint.pt").write_bytes(checkpoint)
    return ["--resume", str(run)]


# The privacy and robustness options (TINY has 2 clients, all sampled each round)
CASES += [
    (
        "dp-clip-zero",
        lambda p: ["--dp-noise-multiplier", "1", "--dp-clip", "0"],
        "--dp-clip must be in (0, 1e+09], got 0.0",
    ),
    ("dp-clip-negative", lambda p: ["--dp-epsilon", "4", "--dp-clip", "-1"], "got -1.0"),
    (
        "dp-noise-negative",
        lambda p: ["--dp-noise-multiplier", "-0.5", "--dp-clip", "1"],
        "--dp-noise-multiplier must be in [0, 10000], got -0.5",
    ),
    (
        "dp-epsilon-zero",
        lambda p: ["--dp-epsilon", "0", "--dp-clip", "1"],
        "--dp-epsilon must be in (0, 1e+06]",
    ),
    (
        "dp-delta-one",
        lambda p: ["--dp-epsilon", "4", "--dp-clip", "1", "--dp-delta", "1"],
        "in (0, 1), got 1.0",
    ),
    ("dp-delta-zero", lambda p: ["--dp-epsilon", "4", "--dp-clip", "1", "--dp-delta", "0"], "--dp-delta"),
    ("dp-without-clip", lambda p: ["--dp-epsilon", "4"], "needs --dp-clip C"),
    ("dp-clip-without-noise", lambda p: ["--dp-clip", "1"], "clipped-mean:C"),
    (
        "dp-with-median",
        lambda p: ["--dp-epsilon", "4", "--dp-clip", "1", "--aggregation", "median"],
        "use mean",
    ),
    (
        "dp-adaptive-too-few-clients",
        lambda p: ["--dp-noise-multiplier", "1", "--dp-clip", "1", "--dp-clip-quantile", "0.5"],
        "needs more than 10 clients a round",
    ),
    (
        "dp-quantile-one",
        lambda p: ["--dp-epsilon", "4", "--dp-clip", "1", "--dp-clip-quantile", "1"],
        "(0, 1)",
    ),
    ("aggregation-unknown", lambda p: ["--aggregation", "mode"], "--aggregation 'mode' is not valid"),
    ("trimmed-mean-no-f", lambda p: ["--aggregation", "trimmed-mean"], "trimmed-mean:F"),
    ("trimmed-mean-fraction", lambda p: ["--aggregation", "trimmed-mean:0.2"], "is not valid"),
    ("trimmed-mean-too-large", lambda p: ["--aggregation", "trimmed-mean:1"], "leaves none of the 2 clients"),
    ("clipped-mean-negative", lambda p: ["--aggregation", "clipped-mean:-3"], "clipped-mean:C (C > 0)"),
    ("attack-unknown", lambda p: ["--attack", "flip", "--attackers", "1"], "--attack 'flip' is not valid"),
    ("attack-without-attackers", lambda p: ["--attack", "sign-flip"], "go together"),
    (
        "attackers-not-partitions",
        lambda p: ["--attack", "sign-flip", "--attackers", "1,5"],
        "[5] are not partitions",
    ),
    ("attackers-not-numbers", lambda p: ["--attack", "sign-flip", "--attackers", "a,b"], "partition ids"),
    ("secagg-inprocess", lambda p: ["--secure-aggregation", "true"], "--engine flower only"),
    (
        "dp-budget-without-noise",
        lambda p: ["--dp-epsilon", "4", "--dp-noise-multiplier", "0", "--dp-clip", "1"],
        "cannot hold with --dp-noise-multiplier 0",
    ),
    (
        "dp-with-split-learning",
        lambda p: ["--method", "sfprompt", "--dp-epsilon", "4", "--dp-clip", "1"],
        "activations and gradients",
    ),
    (
        "secagg-clip-beyond-range",
        lambda p: [
            *("--secure-aggregation", "true", "--engine", "flower", "--clients", "3"),
            *("--dp-noise-multiplier", "1", "--dp-clip", "9"),
        ],
        "at most 8",
    ),
    (
        "secagg-too-few-clients",
        lambda p: ["--secure-aggregation", "true", "--engine", "flower"],
        "needs at least 3 clients a round",
    ),
    (
        "secagg-with-median",
        lambda p: [
            "--secure-aggregation",
            "true",
            "--engine",
            "flower",
            "--clients",
            "4",
            "--aggregation",
            "median",
        ],
        "needs each update",
    ),
]


def _custom_dir(tmp_path, bad_row: dict | None = None, suffix: str = ".jsonl", rows=None) -> list[str]:
    """``--task custom --data-dir`` a folder of prompt-completion rows, ``bad_row`` appended to each split."""
    folder = tmp_path / "own"
    folder.mkdir()
    good = rows or [{"prompt": f"Say {c}:", "completion": f" {c}"} for c in ("red", "green", "blue") * 4]
    for split in ("train", "validation", "test"):
        lines = [*good, bad_row] if bad_row else good
        (folder / f"{split}{suffix}").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return ["--task", "custom", "--data-dir", str(folder)]


def _chat(*roles: str) -> dict:
    return {"messages": [{"role": r, "content": f"{r} text"} for r in roles]}


# Your own data (--task custom): each problem named with its file, row and field
CASES += [
    ("custom-without-data-dir", lambda p: ["--task", "custom"], "--task custom reads your own files"),
    (
        "custom-unknown-format",
        lambda p: _custom_dir(p, rows=[{"text": "a", "label": 1}]),
        "keys found: label, text",
    ),
    (
        "custom-empty-completion",
        lambda p: _custom_dir(p, {"prompt": "Say red:", "completion": " "}),
        "row 13: field 'completion' is empty",
    ),
    (
        "custom-mixed-keys",
        lambda p: _custom_dir(p, {"prompt": "a", "output": "b"}),
        "missing field 'completion'",
    ),
    (
        "custom-no-assistant-turn",
        lambda p: _custom_dir(p, rows=[_chat("user", "assistant", "user")]),
        "no final assistant turn",
    ),
    (
        "custom-roles-do-not-alternate",
        lambda p: _custom_dir(p, rows=[_chat("system", "user", "user", "assistant")]),
        "messages[2].role is 'user' where 'assistant' was expected",
    ),
    (
        "custom-chat-without-template",
        lambda p: _custom_dir(p, rows=[_chat("user", "assistant")] * 12),
        "this tokenizer has none",
    ),
    (
        "custom-completion-longer-than-max-length",
        lambda p: _custom_dir(p, rows=[{"prompt": "Say:", "completion": " red" * 40}] * 12),
        "cuts the answer (completion) of 12 of 12 training rows",
    ),
    (
        "custom-choice-answer-not-a-choice",
        lambda p: _custom_dir(
            p, rows=[{"question": "Say red", "choices": ["red", "blue"], "answer": "green"}]
        ),
        "neither a choice index nor one of the choices",
    ),
    (
        "custom-generative-dirichlet",
        lambda p: [*_custom_dir(p), "--partition", "dirichlet"],
        "is generative (no choices): use --partition iid",
    ),
    ("custom-csv-short-row", lambda p: _custom_csv(p), "not as many cells as the header has columns"),
    ("stop-empty", lambda p: ["--task", "squad", "--stop", ""], "stop must be a non-empty text"),
    (
        "max-new-tokens-zero",
        lambda p: ["--max-new-tokens", "0"],
        "--max-new-tokens must be an integer in [1, 1000000]",
    ),
    (
        "max-new-tokens-fill-max-length",
        lambda p: ["--task", "squad", "--max-new-tokens", "96"],
        "--max-new-tokens 96 leaves no room for a prompt in --max-length 96",
    ),
]


def _custom_dir_with(tmp_path, change) -> list[str]:
    """A good ``_custom_dir`` whose train split ``change`` alters (a folder, a loop, a second file)."""
    args = _custom_dir(tmp_path)
    change(tmp_path / "own")
    return args


def _train_is_a_folder(folder) -> None:
    (folder / "train.jsonl").unlink()
    (folder / "train.jsonl").mkdir()


def _train_is_a_loop(folder) -> None:
    (folder / "train.jsonl").unlink()
    (folder / "train.jsonl").symlink_to(folder / "loop.jsonl")
    (folder / "loop.jsonl").symlink_to(folder / "train.jsonl")


# A data path that is not a plain file, and a split in two files: each named as such (issue 39)
CASES += [
    (
        "custom-train-is-a-folder",
        lambda p: _custom_dir_with(p, _train_is_a_folder),
        "own/train.jsonl is a folder, not a file",
    ),
    (
        "custom-train-is-a-symlink-loop",
        lambda p: _custom_dir_with(p, _train_is_a_loop),
        "own/train.jsonl cannot be read: a loop of symbolic links",
    ),
    (
        "custom-train-twice",
        lambda p: _custom_dir_with(
            p, lambda f: (f / "train.json").write_text((f / "train.jsonl").read_text())
        ),
        "holds the train split twice: train.jsonl and train.json; keep one",
    ),
]


def _custom_csv(tmp_path) -> list[str]:
    folder = tmp_path / "own"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text("prompt,completion\nSay red:, red\nSay blue:\n")
    return ["--task", "custom", "--data-dir", str(folder)]


@pytest.mark.parametrize("case,extra,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_leaves_nothing(case, extra, fragment, tmp_path, capsys, monkeypatch):
    # Prepare: run in a fresh folder so that any results folder it made would show
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDSP_CACHE_DIR", str(tmp_path / "cache"))
    args = extra(tmp_path)
    out = tmp_path / "out-of-this-run"
    before = sorted(p.name for p in tmp_path.iterdir())
    command = ["run", *TINY, *args] if "--resume" in args else ["run", *TINY, "--out", str(out), *args]
    if "--out" in args:
        command = ["run", *TINY, *args]
    # Execute
    code = main(command)
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (case, err)
    assert len(err) == 1 and err[0].startswith("fedsp: error: "), err
    assert fragment in err[0], err[0]
    assert not out.exists() and "Traceback" not in err[0]
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != "cache")
    assert after == [n for n in before if n != "cache"], "the run left something behind"
