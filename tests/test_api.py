"""The Python API, used as a script would: only names importable from ``fedsp`` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedsp

COLOURS = ("red", "green", "blue")
ROWS = {
    "prompt-completion": [{"prompt": f"Say {c}:", "completion": f" {c}"} for c in COLOURS * 4],
    "messages": [
        {"messages": [{"role": "user", "content": f"Say {c}."}, {"role": "assistant", "content": c}]}
        for c in COLOURS * 4
    ],
    "alpaca": [{"instruction": f"Say {c}.", "input": "", "output": c} for c in COLOURS * 4],
    "multiple-choice": [
        {"question": f"Say {c}.", "choices": list(COLOURS), "answer": c} for c in COLOURS * 4
    ],
}
TINY = {
    "model": "tiny-llama",
    "clients": 2,
    "rounds": 2,
    "local_steps": 2,
    "kd_steps": 2,
    "prefix_len": 4,
    "max_length": 96,
    "max_new_tokens": 4,
    "progress": False,
}
SRC = str(Path(fedsp.__file__).resolve().parents[1])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-m", "fedsp.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("kind", list(ROWS))
def test_a_run_on_rows_held_in_memory_of_each_format(kind, tmp_path):
    # Prepare
    rows = ROWS[kind]
    config = fedsp.RunConfig(**TINY, out=str(tmp_path / "run"))
    # Execute
    run = fedsp.run(config, data={"train": rows, "validation": rows[:6], "test": rows[:9]})
    # Assert: the folder, the rounds, the final figures on the 9 test rows, the rows written once
    assert run.folder == tmp_path / "run" and run.prefix == tmp_path / "run" / "prefix.safetensors"
    assert [m["round"] for m in run.metrics] == [0, 1, 2]
    assert run.results["final"]["n"] == 9 and run.results["data_format"] == kind
    saved = json.loads((run.folder / "config.json").read_text())
    assert saved["task"] == "custom" and saved["data_dir"] == run.config.data_dir
    data_dir = Path(saved["data_dir"])
    assert data_dir.parent == (tmp_path / "data").resolve()
    written = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    assert written == rows
    if kind != "alpaca":
        return
    # the same rows again: the same folder, not a second copy
    again = fedsp.run(
        fedsp.RunConfig(**{**TINY, "rounds": 1}, out=str(tmp_path / "again")),
        data={"train": rows, "validation": rows[:6], "test": rows[:9]},
    )
    assert again.config.data_dir == run.config.data_dir
    assert len(list((tmp_path / "data").iterdir())) == 1


def test_load_run_evaluates_generates_and_exports_as_the_cli_does(tmp_path):
    # Prepare: an Alpaca run
    rows = ROWS["alpaca"]
    config = fedsp.RunConfig(**TINY, out=str(tmp_path / "run"))
    run = fedsp.run(config, data={"train": rows, "validation": rows, "test": rows})
    loaded = fedsp.load_run(run.folder)
    # Execute
    score = loaded.evaluate()
    texts = loaded.generate(["Say red.", {"instruction": "Say blue.", "input": "now"}])
    single = loaded.generate("Say red.")
    cli = _cli("generate", str(run.folder), "Say red.")
    adapter = loaded.export(tmp_path / "adapter")
    # Assert: the run's own figures, the same greedy text as `fedsp generate`, an adapter folder
    assert {k: score[k] for k in run.results["final"]} == run.results["final"]
    assert cli.returncode == 0 and cli.stdout == single + "\n"
    assert isinstance(texts, list) and texts[0] == single
    assert (adapter / "adapter_config.json").is_file()


def test_errors_name_the_configuration_field(tmp_path):
    with pytest.raises(
        fedsp.FedSPError, match=r"^clients must be an integer in \[1, 100000\], got 0$"
    ) as err:
        fedsp.RunConfig(clients=0)
    assert err.value.field == "clients"
    with pytest.raises(fedsp.FedSPError, match=r"^local_steps must be an integer in \[0, 1000000\], got -1$"):
        fedsp.RunConfig(local_steps=-1)
    with pytest.raises(fedsp.FedSPError, match=r"data needs a 'train' split and a 'validation' or 'test'"):
        fedsp.run(fedsp.RunConfig(**TINY, out=str(tmp_path / "r")), data={"train": ROWS["alpaca"]})
    with pytest.raises(fedsp.FedSPError, match=r"data\['train'\] row 2: expected a mapping, got str"):
        fedsp.run(fedsp.RunConfig(**TINY), data={"train": [{"prompt": "a"}, "b"], "test": []})
    # the command line keeps its flags
    bad = _cli("run", "--clients", "0")
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "fedsp: error: --clients must be an integer in [1, 100000], got 0"
    )


def test_zero_limits_mean_every_example():
    assert fedsp.RunConfig(eval_limit=0, val_limit=0).eval_limit is None
    assert fedsp.RunConfig(eval_limit=0, val_limit=0).val_limit is None
