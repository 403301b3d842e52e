"""Your own task in, a usable prompt out: the custom formats, SQuAD, and ``fedsp eval/generate/export``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fedsp.cli import main
from fedsp.data.batching import collate, encode_example, encode_segments
from fedsp.data.formats import ALPACA_PROMPT_NO_INPUT
from fedsp.data.tasks import GenExample, MCExample, load_task
from fedsp.errors import FedSPError
from fedsp.evaluation.generative import generate
from fedsp.models import loading
from fedsp.models.export import read_prefix_file
from fedsp.models.forward import hidden_states
from fedsp.models.loading import byte_tokenizer, load_global_model
from fedsp.runtime.outputs import shift_rotary_keys

# A chat template in the usual shape: each turn tagged by its role; a generation prompt opens a turn.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
COLOURS = ("red", "green", "blue")
ROWS = {
    "prompt-completion": [{"prompt": f"Say {c}:", "completion": f" {c}"} for c in COLOURS * 4],
    "alpaca": [{"instruction": f"Say {c}.", "input": "", "output": c} for c in COLOURS * 4],
    "multiple-choice": [
        {"question": f"Say {c}.", "choices": list(COLOURS), "answer": i % 3 if i % 2 else c}
        for i, c in enumerate(COLOURS * 4)
    ],
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {c}."},
                {"role": "assistant", "content": c},
            ]
        }
        for c in COLOURS * 4
    ],
}
TINY_RUN = [
    *("--model", "tiny-llama", "--clients", "2", "--rounds", "2", "--local-steps", "2"),
    *("--kd-steps", "2", "--prefix-len", "4", "--max-length", "64", "--max-new-tokens", "4", "--quiet"),
]


def _chat_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _write(folder: Path, rows: list[dict], suffix: str = ".jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        path = folder / f"{split}{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif suffix == ".json":
            path.write_text(json.dumps(rows))
        else:  # csv: lists as JSON cells
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                for r in rows:
                    writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return folder


def test_the_readme_example_data_loads_as_the_readme_says():
    # the README's worked example (examples/capitals): 32 / 6 / 10 prompt-completion rows, no country twice
    folder = Path(__file__).resolve().parents[1] / "examples" / "capitals"
    splits = {s: load_task("custom", s, folder) for s in ("train", "validation", "test")}
    assert {s: len(rows) for s, rows in splits.items()} == {"train": 32, "validation": 6, "test": 10}
    rows = [row for split in splits.values() for row in split]
    assert all(isinstance(row, GenExample) and row.prompt.endswith("?\nA:") for row in rows)
    assert len({row.prompt for row in rows}) == 48
    assert splits["train"][0].completion == " Paris"
    assert splits["test"][0].prompt == "Q: What is the capital of Italy?\nA:"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
@pytest.mark.parametrize("kind", ["prompt-completion", "alpaca", "multiple-choice"])
def test_each_format_loads_from_each_file_kind(kind, suffix, tmp_path):
    # Prepare
    folder = _write(tmp_path / "own", ROWS[kind], suffix)
    # Execute
    examples = load_task("custom", "train", folder)
    # Assert: twelve examples of the right kind, ids by position
    assert len(examples) == 12 and examples[3].id == "custom/train/3"
    first = examples[0]
    if kind == "multiple-choice":
        assert isinstance(first, MCExample)
        assert (first.context, first.choices, first.gold) == ("Question: Say red.\nAnswer:", COLOURS, 0)
        assert [ex.gold for ex in examples[:4]] == [0, 1, 2, 0]  # an answer text, then an index
    else:
        assert isinstance(first, GenExample) and first.references == ("red",)
        if kind == "alpaca":
            assert first.prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Say red.")
            assert first.completion == "red"
        else:
            assert (first.prompt, first.completion) == ("Say red:", " red")


def test_chat_rows_train_on_the_assistant_turns_only():
    # Prepare: a hand-written conversation with two assistant turns; one byte = one token
    tokenizer = _chat_tokenizer()
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "red"},
        ]
    }
    from fedsp.data.formats import custom_examples

    (example,), kind = custom_examples([(1, row)], Path("chat.jsonl"), "train", tokenizer)
    # Execute
    encoded = encode_example(tokenizer, example, 512)
    labels = collate([encoded], tokenizer.pad_token_id)["labels"][0]
    # Assert: token by token, the labelled tokens are exactly the two rendered assistant turns
    assert kind == "messages"
    text = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n<|user|>Colour?\n<|assistant|>red\n"
    assert tokenizer.decode(list(encoded.ids)) == text
    scored = [tokenizer.decode([int(t)]) if t >= 0 else "_" for t in labels]
    expected = ["_"] * len(text)
    for piece in ("Hello\n", "red\n"):
        start = text.index("<|assistant|>" + piece) + len("<|assistant|>")
        expected[start : start + len(piece)] = list(piece)
    assert scored == expected
    # generation continues the conversation before the last assistant turn, scored against its content
    assert example.prompt == text[: -len("red\n")] and example.references == ("red",)


def test_a_long_chat_is_cut_from_the_left_with_its_labels():
    # Prepare: two assistant turns; room for the last 12 tokens only (one byte = one token)
    tokenizer = _chat_tokenizer()
    segments = (("<|user|>Hi\n<|assistant|>", False), ("Hello\n", True), ("<|user|>C?\n<|assistant|>", False))
    segments += (("red\n", True),)
    # Execute
    row = encode_segments(tokenizer, segments, 12)
    # Assert: the kept text is the tail, its labels are the tail's, and the cut is counted by kind
    text = "".join(t for t, _ in segments)
    assert tokenizer.decode(list(row.ids)) == text[-12:]
    assert [tokenizer.decode([i]) for i, s in zip(row.ids, row.scored, strict=True) if s] == list("red\n")
    assert (row.answer_cut, row.context_cut) == (len("Hello\n"), len(text) - 12 - len("Hello\n"))
    assert row.num_answer == len("red\n")


def test_a_csv_prompt_that_reads_as_json_stays_text(tmp_path):
    folder = tmp_path / "own"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.csv").write_text('prompt,completion\n"[1, 2]"," {""a"": 1}"\n')
    (example,) = load_task("custom", "train", folder)
    assert (example.prompt, example.completion) == ("[1, 2]", ' {"a": 1}')


def test_completions_cut_below_the_threshold_are_trained_and_counted(tmp_path):
    # Prepare: one of 40 training rows has a completion longer than --max-length 64
    rows = [{"prompt": f"Say {c}:", "completion": f" {c}"} for c in COLOURS * 13]
    rows.append({"prompt": "Say:", "completion": " red" * 30})
    folder = _write(tmp_path / "own", rows)
    out = tmp_path / "run"
    # Execute
    assert main(["run", *TINY_RUN, "--task", "custom", "--data-dir", str(folder), "--out", str(out)]) == 0
    # Assert
    truncation = json.loads((out / "results.json").read_text())["truncation"]
    assert (truncation["train_answers_cut"], truncation["train_rows"]) == (1, 40)


def test_prompt_completion_rows_train_on_the_completion_only():
    tokenizer = byte_tokenizer()
    example = GenExample("x", "Say red:", " red", ("red",))
    batch = collate([encode_example(tokenizer, example, 64)], tokenizer.pad_token_id)
    labelled = [int(t) for t in batch["labels"][0] if t >= 0]
    assert tokenizer.decode(labelled) == " red"


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
@pytest.mark.parametrize("kind", ["prompt-completion", "alpaca", "messages", "multiple-choice"])
def test_each_format_trains_in_a_run(kind, family, tmp_path, monkeypatch, read_metrics):
    # Prepare: the tiny model's tokenizer gets a chat template (it has none)
    monkeypatch.setattr(loading, "byte_tokenizer", _chat_tokenizer)
    folder = _write(tmp_path / "own", ROWS[kind])
    out = tmp_path / "run"
    # Execute
    args = ["--task", "custom", "--data-dir", str(folder), "--out", str(out), "--model", family]
    code = main(["run", *TINY_RUN, *args])
    # Assert: the server's validation loss went down; generative runs report EM / F1 / ROUGE-L
    assert code == 0
    losses = [m["val_loss"] for m in read_metrics(out)]
    assert losses[-1] < losses[0]
    final = json.loads((out / "results.json").read_text())["final"]
    assert set(final) >= (
        {"acc", "acc_norm"} if kind == "multiple-choice" else {"exact_match", "f1", "rouge_l"}
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny FedSP run on prompt-completion rows (generative)."""
    root = tmp_path_factory.mktemp("finished")
    folder = _write(root / "own", ROWS["prompt-completion"])
    out = root / "run"
    assert main(["run", *TINY_RUN, "--task", "custom", "--data-dir", str(folder), "--out", str(out)]) == 0
    return out


def test_a_finished_run_leaves_its_prefix_and_a_peft_adapter(finished_run):
    results = json.loads((finished_run / "results.json").read_text())
    assert results["export"] == {
        "prefix": "prefix.safetensors",
        "adapter": "adapter",
        "base_model": "tiny-llama",
        "best_round": results["best_round"],
    }
    assert (finished_run / "adapter" / "adapter_config.json").is_file()
    prefix = read_prefix_file(finished_run / "prefix.safetensors")
    assert prefix.config.num_tokens == 4


def test_fedsp_eval_reproduces_the_runs_own_result(finished_run, capsys):
    # Execute
    assert main(["eval", str(finished_run), "--quiet"]) == 0
    # Assert: the JSON line equals results.json's final block, number for number
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((finished_run / "results.json").read_text())["final"]
    assert {k: printed[k] for k in final} == final


def test_fedsp_eval_of_a_multiple_choice_run_reproduces_its_accuracy(tmp_path, capsys):
    folder = _write(tmp_path / "own", ROWS["multiple-choice"])
    out = tmp_path / "run"
    assert main(["run", *TINY_RUN, "--task", "custom", "--data-dir", str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((out / "results.json").read_text())["final"]
    assert (printed["acc"], printed["acc_norm"], printed["n"]) == (
        final["acc"],
        final["acc_norm"],
        final["n"],
    )


def test_fedsp_generate_prints_the_greedy_completion_with_the_prefix(finished_run, capsys):
    # Prepare: the same generation, by hand
    loaded = load_global_model("tiny-llama", seed=0)
    prefix = read_prefix_file(finished_run / "prefix.safetensors")
    ids = loaded.tokenizer("Say blue:", add_special_tokens=False)["input_ids"]
    (expected,) = generate(loaded.model, loaded.tokenizer, [ids], prefix, max_new_tokens=4)
    # Execute
    assert main(["generate", str(finished_run), "Say blue:"]) == 0
    captured = capsys.readouterr()
    # Assert: the completion, and which prefix it used
    assert captured.out.rstrip("\n") == expected.text
    assert "prefix.safetensors (best round" in captured.err


@pytest.mark.parametrize("options", [["--no-prefix"], ["--max-new-tokens", "2", "--no-prefix"]])
def test_fedsp_generate_takes_the_prompt_after_options(finished_run, options, capsys):
    # Prepare: the global model alone, by hand
    loaded = load_global_model("tiny-llama", seed=0)
    ids = loaded.tokenizer("Say blue:", add_special_tokens=False)["input_ids"]
    steps = 2 if "--max-new-tokens" in options else 4
    (expected,) = generate(loaded.model, loaded.tokenizer, [ids], None, max_new_tokens=steps)
    # Execute: the prompt after the options, as in `fedsp generate RUN --no-prefix "text"`
    assert main(["generate", str(finished_run), *options, "Say blue:"]) == 0
    # Assert
    assert capsys.readouterr().out.rstrip("\n") == expected.text


def test_fedsp_generate_cuts_a_long_prompt_from_the_left_as_evaluation_does(finished_run, capsys):
    # Prepare: 12,000 tokens of prompt; the run's window is --max-length 64, so 60 tokens of it are kept
    prompt = "Say red. " * 4000 + "Say blue:"
    loaded = load_global_model("tiny-llama", seed=0)
    ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    prefix = read_prefix_file(finished_run / "prefix.safetensors")
    (expected,) = generate(loaded.model, loaded.tokenizer, [ids[-60:]], prefix, max_new_tokens=4)
    # Execute
    assert main(["generate", str(finished_run), prompt]) == 0
    captured = capsys.readouterr()
    # Assert: the same completion as the prompt's last 60 tokens, and a note saying so
    assert captured.out.rstrip("\n") == expected.text
    assert f"the prompt is cut to its last 60 of {len(ids)} tokens (the run's --max-length 64" in captured.err


@pytest.mark.parametrize("tokens", ["100000", "64", "0", "-3"])
def test_fedsp_generate_names_its_own_options_in_errors(finished_run, tokens, capsys):
    assert main(["generate", str(finished_run), f"--max-new-tokens={tokens}", "Say blue:"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedsp: error: --max-new-tokens {tokens} must be at least 1")
    assert "this run's --max-length of 64 tokens" in err[0]


def test_fedsp_generate_refuses_a_second_prompt(finished_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(finished_run), "Say blue:", "--no-prefix", "Say red:"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: Say red:" in capsys.readouterr().err


def test_fedsp_generate_reads_prompts_from_a_file(finished_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say red:"}\n{"prompt": "Say green:"}\n')
    assert main(["generate", str(finished_run), "--input", str(prompts), "--max-new-tokens", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    loaded = load_global_model("tiny-llama", seed=0)
    prefix = read_prefix_file(finished_run / "prefix.safetensors")
    ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("Say red:", "Say green:")]
    expected = generate(loaded.model, loaded.tokenizer, ids, prefix, max_new_tokens=2)
    assert [line["prompt"] for line in lines] == ["Say red:", "Say green:"]
    assert [line["completion"] for line in lines] == [g.text for g in expected]


def test_fedsp_export_writes_an_adapter_peft_loads(finished_run, tmp_path):
    from peft import PeftModel

    out = tmp_path / "exported"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    loaded = load_global_model("tiny-llama", seed=0, device="cpu")
    prefix = read_prefix_file(finished_run / "prefix.safetensors")
    ids = torch.tensor([list(b"Say blue: blue")])
    with torch.no_grad():
        ours = loaded.model.get_output_embeddings()(
            hidden_states(loaded.model, ids, torch.ones_like(ids), prefix)
        )
        peft_model = PeftModel.from_pretrained(
            load_global_model("tiny-llama", seed=0, device="cpu").model, str(out)
        )
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(ours.log_softmax(-1), theirs.log_softmax(-1), atol=1e-5)


def test_an_older_runs_rotary_prefix_is_turned_to_todays_positions(random_prefix):
    # Prepare: logits as fedsp computed them before (real tokens at 0..T-1 after the prefix)
    loaded = load_global_model("tiny-llama", seed=0, device="cpu")
    model, old = loaded.model, random_prefix(loaded.model, 4)
    ids = torch.tensor([list(b"Say red: red")])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model.base_model(
            input_ids=ids,
            attention_mask=torch.cat([torch.ones(1, 4, dtype=torch.long), mask], dim=1),
            position_ids=torch.arange(ids.shape[1]).view(1, -1),
            past_key_values=old.cache(1),
            use_cache=True,
        ).last_hidden_state
        # Execute: the keys turned by P, under today's positions (P..P+T-1)
        new = random_prefix(model, 4, seed=1)
        new.table.copy_(shift_rotary_keys(old.table, new, model, by=4))
        after = hidden_states(model, ids, mask, new)
    # Assert
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(new.table, old.table)  # the keys did move


def _as_older_run(run: Path, folder: Path, turn_back: bool) -> torch.Tensor:
    """A copy of ``run`` without prefix.safetensors or the export block; with ``turn_back`` its checkpoint's
    prefix put in the older convention (keys turned back by P, no positions mark). The run's own table."""
    import shutil

    shutil.copytree(run, folder)
    (folder / "prefix.safetensors").unlink()
    results = json.loads((folder / "results.json").read_text())
    del results["export"]
    (folder / "results.json").write_text(json.dumps(results))
    table = read_prefix_file(run / "prefix.safetensors").table.detach()
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    if turn_back:
        model = load_global_model("tiny-llama", seed=0).model
        prefix = read_prefix_file(run / "prefix.safetensors")
        state["server"]["best_state"] = {"table": shift_rotary_keys(table, prefix, model, by=-4)}
        del state["positions"]
    else:
        state["server"]["best_state"] = {"table": table.clone()}
    torch.save(state, folder / "checkpoint.pt")
    return table


@pytest.mark.parametrize("older", [True, False], ids=["older-convention", "todays-convention"])
def test_a_run_without_a_prefix_file_exports_from_its_checkpoint(older, finished_run, tmp_path, capsys):
    # Prepare
    table = _as_older_run(finished_run, tmp_path / "old", turn_back=older)
    # Execute
    out = tmp_path / "p.safetensors"
    assert main(["export", str(tmp_path / "old"), "--format", "safetensors", "--out", str(out)]) == 0
    # Assert: the run's own prefix either way (turned forward again only when the mark is missing)
    assert ("an older run" in capsys.readouterr().err) == older
    assert torch.allclose(read_prefix_file(out).table, table, atol=1e-5)


def test_an_older_checkpoint_cannot_be_resumed(finished_run, tmp_path, capsys):
    _as_older_run(finished_run, tmp_path / "old", turn_back=True)
    (tmp_path / "old" / "results.json").unlink()
    assert main(["run", "--resume", str(tmp_path / "old"), "--rounds", "3", "--quiet"]) == 2
    assert "written by an older fedsp" in capsys.readouterr().err


def test_squad_is_bundled_and_carved():
    splits = {s: load_task("squad", s) for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [700, 100, 200]
    ids = [{ex.id.split("/")[-1] for ex in v} for v in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    first = splits["test"][0]
    assert isinstance(first, GenExample)
    assert first.prompt.startswith("Title: Harvard_University\nBackground: Older than The Game by 23 years")
    assert first.prompt.endswith(
        '\nQuestion: Harvard - Yale Regatta predates "The Game" by how many years?\nAnswer:'
    )
    assert first.references == ("23 years", "23")
    assert first.completion == " " + first.references[0]


def test_squad_local_rows_give_the_same_examples_as_bundled(tmp_path):
    bundled = load_task("squad", "test")[0]
    title, rest = bundled.prompt.removeprefix("Title: ").split("\nBackground: ", 1)
    context, question = rest.removesuffix("\nAnswer:").split("\nQuestion: ")
    row = {
        "id": bundled.id.split("/")[-1],
        "title": title,
        "context": context,
        "question": question,
        "answers": {"text": list(bundled.references), "answer_start": [0] * len(bundled.references)},
    }
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    assert load_task("squad", "test", tmp_path)[0] == bundled


# ------------------------------------------------------- bad input on a finished run: one line, exit 2


def _unfinished(tmp_path: Path, _run: Path) -> list[str]:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    return ["eval", str(tmp_path / "half")]


def _lost_model(command: str):
    def make(tmp_path: Path, run: Path) -> list[str]:
        import shutil

        copy = tmp_path / "moved"
        shutil.copytree(run, copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "model": str(tmp_path / "gone")}))
        extra = {"generate": ["Hi"], "export": ["--out", str(tmp_path / "x")], "eval": []}[command]
        return [command, str(copy), *extra]

    return make


def _no_prefix_run(tmp_path: Path, _run: Path) -> list[str]:
    folder = _write(tmp_path / "own", ROWS["prompt-completion"])
    out = tmp_path / "split"
    args = ["--method", "sfprompt", "--task", "custom", "--data-dir", str(folder), "--out", str(out)]
    assert main(["run", *TINY_RUN, *args]) == 0
    return ["eval", str(out)]


RUN_CASES = [
    ("eval-no-folder", lambda p, r: ["eval", str(p / "nothing")], "is not a results folder"),
    ("eval-unfinished", _unfinished, "is an unfinished run: it has no results.json"),
    ("generate-neither", lambda p, r: ["generate", str(r)], "either a prompt text or --input"),
    (
        "generate-bad-input-row",
        lambda p, r: ["generate", str(r), "--input", _rows(p, {"text": 1})],
        "keys found: text",
    ),
    ("generate-lost-model", _lost_model("generate"), "gone"),
    ("eval-lost-model", _lost_model("eval"), "gone"),
    ("export-lost-model", _lost_model("export"), "gone"),
    ("generate-unfinished", lambda p, r: ["generate", *_unfinished(p, r)[1:], "Hi"], "an unfinished run"),
    ("export-no-folder", lambda p, r: ["export", str(p / "nothing"), "--out", str(p / "x")], "not a results"),
    ("eval-run-without-prefix", _no_prefix_run, "--method sfprompt trains no prefix"),
    ("export-out-exists", lambda p, r: ["export", str(r), "--out", str(r)], "exists already"),
    ("eval-unknown-task", lambda p, r: ["eval", str(r), "--task", "nope"], "unknown task 'nope'"),
]


def _rows(tmp_path: Path, row: dict) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("case,command,fragment", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_input_on_a_finished_run(case, command, fragment, finished_run, tmp_path, capsys):
    args = command(tmp_path, finished_run)
    before = sorted(p.name for p in finished_run.iterdir())
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (case, err)
    assert err[-1].startswith("fedsp: error: ") and fragment in err[-1], err
    assert sorted(p.name for p in finished_run.iterdir()) == before


def test_fedsp_compare_refuses_a_generative_task(tmp_path, capsys):
    assert main(["compare", "--tasks", "arc_easy,squad", "--out", str(tmp_path / "grid")]) == 2
    assert "--tasks squad: fedsp compare tabulates accuracy" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_parquet_files_need_pyarrow_or_are_read(tmp_path):
    # Prepare: a Parquet file (written by pyarrow when it is installed; else any bytes with the suffix)
    folder = tmp_path / "own"
    folder.mkdir()
    rows = ROWS["prompt-completion"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        for split in ("train", "validation", "test"):
            (folder / f"{split}.parquet").write_bytes(b"PAR1")
        with pytest.raises(FedSPError, match="reading Parquet needs pyarrow"):
            load_task("custom", "train", folder)
        return
    for split in ("train", "validation", "test"):
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
    assert [ex.prompt for ex in load_task("custom", "train", folder)] == [r["prompt"] for r in rows]
