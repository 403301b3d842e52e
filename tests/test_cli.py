"""The command line: a tiny end-to-end run, its results folder, and one-line errors for bad input."""

from __future__ import annotations

import json
import warnings
from dataclasses import fields

import pytest

from fedsp.cli import build_parser, main
from fedsp.config import RunConfig
from fedsp.runtime.results import plot_curves

TINY = [
    "run",
    "--model",
    "tiny-llama",
    "--clients",
    "2",
    "--rounds",
    "2",
    "--local-steps",
    "1",
    "--kd-steps",
    "2",
    "--eval-limit",
    "8",
    "--val-limit",
    "8",
    "--prefix-len",
    "4",
    "--max-length",
    "96",
    "--quiet",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main([*TINY, "--out", str(out)])
    return code, out


def test_tiny_run_writes_the_results_folder(tiny_run):
    code, out = tiny_run
    # Assert: exit 0 and every promised file with its keys
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "tiny-llama" and config["rounds"] == 2 and config["prefix_len"] == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        for key in (
            "client_losses",
            "server_loss",
            "val_loss",
            "params_down",
            "params_up",
            "bytes_down",
            "bytes_up",
            "seconds",
            "acc",
            "acc_norm",
        ):
            assert key in m, key
        assert len(m["client_losses"]) == 2
        assert m["params_down"] == m["params_up"] == 4 * 4 * 2 * 32  # P x L x (k, v) x kv_dim
        assert m["bytes_up"] > 2 * 4 * m["params_up"]  # two clients, float32, plus a small header
    res = json.loads((out / "results.json").read_text())
    for key in (
        "method",
        "task",
        "model",
        "zero_shot",
        "final",
        "rounds",
        "comm",
        "client_model",
        "wall_seconds",
    ):
        assert key in res, key
    assert res["zero_shot"]["n"] == res["final"]["n"] == 8
    assert res["comm"]["params_up_per_round"] == 4 * 4 * 2 * 32
    assert 0 < res["client_model"]["fraction_of_global"] < 1
    assert (out / "curves.png").stat().st_size > 1000


def test_existing_out_folder_is_refused_and_kept(tiny_run, capsys):
    _, out = tiny_run
    before = (out / "results.json").read_text()
    code = main([*TINY, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(out) in err and "Traceback" not in err
    assert (out / "results.json").read_text() == before


def test_ctrl_c_says_which_round_completed_and_how_to_resume(tmp_path, interrupt_at, capsys):
    # Prepare: a run stopped as round 2 starts
    out = tmp_path / "cut"
    interrupt_at(2)
    # Act
    code = main([*TINY, "--out", str(out)])
    # Assert: exit 130, the last line naming the last completed round and the resume command
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err[-1] == f"fedsp: interrupted after round 1; fedsp run --resume {out} continues"
    # ... which works: the run finishes from there
    interrupt_at(None)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]


def test_ctrl_c_before_any_round_says_nothing_was_kept(tmp_path, interrupt_at, capsys):
    out = tmp_path / "cut"
    interrupt_at(1)
    code = main([*TINY, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err[-1] == "fedsp: interrupted before the first round completed; nothing was kept"
    assert not out.exists()


def _bad(args, capsys, tmp_path):
    code = main([*TINY, "--out", str(tmp_path / "never"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedsp: error: ") and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task", "trivia"], "trivia"),
        (["--model", "nosuchmodel"], "nosuchmodel"),
        (["--model", "/no/such/folder"], "does not exist"),
        (["--model", "missing.gguf"], "missing.gguf"),
        (["--aux-layers", "9"], "between 1 and the model's 4 layers"),
        (["--prefix-len", "0"], "--prefix-len"),
        (["--clients", "0"], "--clients"),
        (["--partition", "zipf"], "zipf"),
        (["--dtype", "float8"], "float8"),
        (["--aux-layer-choice", "left"], "left"),
        (["--data-dir", "/no/such/data"], "/no/such/data"),
    ],
)
def test_bad_options_get_one_line_errors(args, expected, capsys, tmp_path):
    assert expected in _bad(args, capsys, tmp_path)


def test_malformed_data_row_is_named(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = {
        "id": "q1",
        "question": "Which?",
        "choices": {"text": ["a", "b"], "label": ["A", "B"]},
        "answerKey": "A",
    }
    bad = {
        "id": "q2",
        "question": "Which?",
        "choices": {"text": ["a", "b"], "label": ["A", "B"]},
        "answerKey": "E",
    }
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in [good, good, bad]) + "\n")
    (data / "validation.jsonl").write_text(json.dumps(good) + "\n")
    err = _bad(["--data-dir", str(data)], capsys, tmp_path)
    assert "train.jsonl" in err and "E" in err


def test_config_file_keys_and_unknown_key(tmp_path, capsys):
    # Prepare
    good = tmp_path / "run.toml"
    good.write_text('model = "tiny-gpt2"\nrounds = 5\naux-layer-choice = "top"\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 2\nroundz: 3\n")
    # Execute
    from fedsp.cli import config_from_args

    config = config_from_args(build_parser().parse_args(["run", "--config", str(good), "--rounds", "7"]))
    # Assert: file keys apply, the command line wins
    assert (config.model, config.rounds, config.aux_layer_choice) == ("tiny-gpt2", 7, "top")
    err = _bad(["--config", str(bad)], capsys, tmp_path)
    assert "roundz" in err


def test_help_documents_every_option(capsys):
    # Every configuration key (but progress, which --quiet sets) is an option with its help and default
    keys = [f.name for f in fields(RunConfig) if f.name != "progress"]
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in keys:
        flag = "--" + key.replace("_", "-")
        assert f"{flag} {key.upper()} " in text, flag
        assert (
            f"(default: {getattr(RunConfig(), key)})" in text.split(f"{flag} {key.upper()} ", 1)[1][:400]
        ), flag
    for flag in ("--config", "--quiet", "--resume"):
        assert flag in text, flag
    assert len(keys) == len(set(keys)) >= 40


def test_curves_without_per_round_accuracy_plot_cleanly(tmp_path):
    # Arrange: a run that evaluated only its final prefix (no acc in any round, no zero-shot)
    metrics = [{"round": 0, "val_loss": 3.9}, {"round": 1, "val_loss": 3.3, "server_loss": 5.4}]
    path = tmp_path / "curves.png"
    # Act: matplotlib's "no artists with labels" warning would be an error here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(metrics, None, path, "fedsp")
    # Assert: the picture is written and no temporary file is left behind
    assert path.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
