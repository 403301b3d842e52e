"""Your own rows from start to finish: each format's template at generation, ChatML on a model without a chat
template, ``fedsp compare`` on your own folder, and the adapter in PEFT alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedsp.cli import main
from fedsp.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

COLOURS = ("red", "green", "blue")
TINY_RUN = [
    *("--model", "tiny-llama", "--clients", "2", "--rounds", "2", "--local-steps", "2"),
    *("--kd-steps", "2", "--prefix-len", "4", "--max-length", "96", "--max-new-tokens", "4", "--quiet"),
]
# PEFT and transformers alone, in a fresh interpreter: the adapter's base, the adapter, greedy tokens
PEFT_ALONE = """
import json, sys
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter, steps, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
tokenizer = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
out = []
for prompt in prompts:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    new = model.generate(**ids, max_new_tokens=steps, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    out.append(tokenizer.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
print(json.dumps({"fedsp_imported": "fedsp" in sys.modules, "texts": out}))
"""


def _folder(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path: Path, rows: list[dict], *extra: str) -> Path:
    out = tmp_path / "run"
    data = _folder(tmp_path / "own", rows)
    args = ["run", *TINY_RUN, "--task", "custom", "--data-dir", str(data), "--out", str(out), *extra]
    assert main(args) == 0
    return out


def test_an_alpaca_run_generates_with_the_alpaca_template_and_takes_alpaca_rows(tmp_path, capsys):
    # Prepare
    run = _run(tmp_path, [{"instruction": f"Say {c}.", "input": "", "output": c} for c in COLOURS * 4])
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"instruction": "Say red."}\n{"instruction": "Name it.", "input": "a ruby"}\n')
    capsys.readouterr()
    # Execute
    assert main(["generate", str(run), "--input", str(prompts)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["generate", str(run), "Say red."]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(run), "--raw", ALPACA_PROMPT_NO_INPUT.format(instruction="Say red.")]) == 0
    raw = capsys.readouterr().out
    # Assert: each row in the template the run trained with; a bare prompt is its instruction
    assert [line["prompt"] for line in lines] == [
        ALPACA_PROMPT_NO_INPUT.format(instruction="Say red."),
        ALPACA_PROMPT.format(instruction="Name it.", input="a ruby"),
    ]
    assert plain == raw == lines[0]["completion"] + "\n"


def test_chat_rows_on_a_model_without_a_chat_template_use_chatml_with_one_note(tmp_path, capsys):
    # Prepare: tiny-llama's byte tokenizer has no chat template
    rows = [
        {"messages": [{"role": "user", "content": f"Say {c}."}, {"role": "assistant", "content": c}]}
        for c in COLOURS * 4
    ]
    # Execute
    run = _run(tmp_path, rows)
    err = capsys.readouterr().err
    assert main(["generate", str(run), "--input", str(tmp_path / "own" / "test.jsonl")]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    # Assert: trained; one note; generation renders the conversation up to the assistant's turn
    assert json.loads((run / "results.json").read_text())["data_format"] == "messages"
    notes = [line for line in err.splitlines() if "ChatML" in line]
    assert len(notes) <= 1  # said once per process (an earlier test may have said it)
    assert first["prompt"] == "<|im_start|>user\nSay red.<|im_end|>\n<|im_start|>assistant\n"


def test_the_chatml_note_is_one_line(capsys):
    from fedsp.data import formats
    from fedsp.models.loading import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.name_or_path = "note-test"
    formats.render_chat(tokenizer, [{"role": "user", "content": "Hi"}], True, "here")
    formats.render_chat(tokenizer, [{"role": "user", "content": "Hi"}], True, "here")
    assert capsys.readouterr().err == (
        "fedsp: note: note-test's tokenizer has no chat template; chat rows use ChatML "
        "(<|im_start|>ROLE\\nTEXT<|im_end|>)\n"
    )


def test_fedsp_compare_runs_on_your_own_multiple_choice_rows(tmp_path, capsys):
    # Prepare
    rows = [{"question": f"Say {c}.", "choices": list(COLOURS), "answer": c} for c in COLOURS * 6]
    data = _folder(tmp_path / "own", rows)
    argv = ["compare", "--model", "tiny-llama", "--task", "custom", "--data-dir", str(data)]
    argv += ["--methods", "zero-shot,fedsp", "--seeds", "0", "--clients", "2", "--rounds", "1"]
    # Execute
    code = main([*argv, "--out", str(tmp_path / "grid")])
    # Assert: both cells ran on the 18 test rows; the table names the task
    assert code == 0
    for cell in ("custom__zero-shot__s0", "custom__fedsp__s0"):
        results = json.loads((tmp_path / "grid" / "cells" / cell / "results.json").read_text())
        assert results["task"] == "custom" and results["final"]["n"] == 18
    assert "custom" in (tmp_path / "grid" / "table12_methods.md").read_text()
    # generative rows are refused by name, and so is a folder without --tasks custom
    gen = _folder(tmp_path / "gen", [{"prompt": "a", "completion": " b"}] * 12)
    assert main(["compare", "--task", "custom", "--data-dir", str(gen), "--out", str(tmp_path / "g2")]) == 2
    assert "these are prompt-completion rows" in capsys.readouterr().err
    assert main(["compare", "--data-dir", str(data), "--out", str(tmp_path / "g3")]) == 2
    assert "--tasks custom and --data-dir go together" in capsys.readouterr().err


def test_the_adapter_of_a_tiny_run_loads_in_peft_alone_and_generates_as_fedsp(tmp_path, capsys):
    # Prepare: a run whose prefix moves the greedy text (a large learning rate)
    rows = [{"prompt": f"Colour {c}:", "completion": f" {c} {c}"} for c in COLOURS * 4]
    run = _run(tmp_path, rows, "--lr", "0.5")
    prompts = ["Colour red:", "Colour blue:", "Say"]
    ours, bare = [], []
    for prompt in prompts:
        capsys.readouterr()
        assert main(["generate", str(run), prompt, "--max-new-tokens", "6"]) == 0
        ours.append(capsys.readouterr().out[:-1])
        assert main(["generate", str(run), prompt, "--max-new-tokens", "6", "--no-prefix"]) == 0
        bare.append(capsys.readouterr().out[:-1])
    # Execute: no fedsp on the path of a fresh interpreter
    proc = subprocess.run(
        [sys.executable, "-c", PEFT_ALONE, str(run / "adapter"), "6", json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    # Assert: PEFT's greedy text is fedsp's; the prefix changed it
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.splitlines()[-1])
    assert theirs == {"fedsp_imported": False, "texts": ours}
    assert ours != bare
