"""Hostile but realistic input (issue 39): config files built to hurt, wording for the right command, a
run's files reproducible by their hash, and a disk that fills up on the server.

Every refused case exits with status 2 and one line ``fedsp: error: ...``; every accepted one runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedsp.cli import main

TINY = [
    *("--model", "tiny-llama", "--clients", "2", "--rounds", "1", "--local-steps", "1", "--kd-steps", "0"),
    *("--eval-limit", "4", "--val-limit", "4", "--prefix-len", "4", "--max-length", "96", "--quiet"),
]


def _one_line(capsys) -> str:
    """The one error line on stderr (notes about the data, said before it, aside)."""
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("fedsp: note: ")]
    assert len(err) == 1 and err[0].startswith("fedsp: error: "), err
    return err[0]


def _digests(folder: Path) -> dict[str, str]:
    """The files' sha256; the adapter's config with its run folder written as RUN (a tiny model's adapter
    names its base by the folder it was saved in, RUN/base-model)."""
    names = ["prefix.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"]
    digests = {}
    for name in names:
        data = (folder / name).read_bytes()
        if name.endswith(".json"):
            data = data.replace(str(folder.resolve()).encode(), b"RUN").replace(str(folder).encode(), b"RUN")
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def test_two_identical_runs_write_byte_identical_prefix_and_adapter_files(tmp_path):
    # Execute: the same tiny run twice, into the same folder (a tiny model's adapter names its base by the
    # folder it saved it in, RUN/base-model, so identical runs are runs with the same --out)
    digests = []
    for name in ("a", "b"):
        assert main(["run", *TINY, "--out", str(tmp_path / "run")]) == 0
        assert not (tmp_path / "run" / ".lock").exists()  # a finished run leaves no lock behind
        digests.append(hashlib.sha256((tmp_path / "run" / "adapter" / "adapter_config.json").read_bytes()))
        digests.append(_digests(tmp_path / "run"))
        (tmp_path / "run").rename(tmp_path / name)
    # Assert: anyone can check a reproduction by its hash
    assert digests[0].hexdigest() == digests[2].hexdigest() and digests[1] == digests[3]


def _laughs() -> str:
    """A YAML "billion laughs": 9 levels of 9 aliases each, 9^9 strings once expanded."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in "bcdefghi":
        below = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{', '.join([f'*{below}'] * 9)}]")
    return "\n".join(lines) + "\n"


CONFIG_CASES = [
    ("toml-nested-100000", "c.toml", "rounds = " + "[" * 100_000 + "\n", "nests values deeper than 16"),
    ("yaml-nested-100000", "c.yaml", "rounds: " + "[" * 100_000 + "\n", "nests values deeper than 16"),
    ("json-nested-100000", "c.json", '{"rounds": ' + "[" * 100_000 + "}", "nests values deeper than 16"),
    ("yaml-nested-40", "c.yaml", "rounds: " + "[" * 40 + "]" * 40 + "\n", "rounds nests values deeper"),
    ("yaml-billion-laughs", "c.yaml", _laughs(), "aliases (*a) are not allowed"),
    ("toml-2mib", "c.toml", "# " + "x" * (2 << 20) + "\n", "a configuration is at most 1,048,576 bytes"),
    ("toml-long-unknown-key", "c.toml", "x" * 100_000 + " = 1\n", "unknown keys ['xxxx"),
    ("toml-long-value", "c.toml", 'method = "' + "x" * 100_000 + '"\n', "--method 'xxxx"),
    ("toml-bool-rounds", "c.toml", "rounds = true\n", "rounds = True is not an integer"),
    ("yaml-list-model", "c.yaml", "model: [a, b]\n", "model = ['a', 'b'] is not a text"),
]


@pytest.mark.parametrize("case,name,text,fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_config_file_built_to_hurt_gets_one_short_line(case, name, text, fragment, tmp_path, capsys):
    # Prepare
    path = tmp_path / name
    path.write_text(text)
    # Execute
    code = main(["run", *TINY, "--config", str(path), "--out", str(tmp_path / "run")])
    # Assert: refused at once, in a line a person can read
    line = _one_line(capsys)
    assert code == 2 and fragment in line and len(line) < 600, line[:600]
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_a_byte_order_mark_and_a_relative_data_dir_is_read(tmp_path, arc_rows):
    # Prepare: the data next to the config file, the command started elsewhere
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (folder / "data" / f"{split}.jsonl").write_text(arc_rows(12))
    (folder / "run.toml").write_bytes(b'\xef\xbb\xbfrounds = 2\ndata_dir = "data"\n')
    from fedsp.cli import build_parser, config_from_args

    # Execute
    config = config_from_args(build_parser().parse_args(["run", "--config", str(folder / "run.toml")]))
    # Assert
    assert config.rounds == 2 and config.data_dir == str(folder / "data")


def test_every_error_line_is_cut_to_a_readable_length(tmp_path, capsys):
    # Execute: a task name of 100,000 characters reaches the results folder's name
    code = main(["run", *TINY, "--task", "t" * 100_000])
    # Assert
    line = _one_line(capsys)
    assert code == 2 and len(line) <= 520 and "t" * 100 in line


def test_min_replies_above_the_clients_sampled_is_refused_at_start(tmp_path, capsys):
    code = main(["run", *TINY, "--min-replies", "3", "--out", str(tmp_path / "run")])
    line = _one_line(capsys)
    assert code == 2 and line == (
        "fedsp: error: --min-replies 3 is more than the 2 clients sampled a round (--clients 2, "
        "--fraction-fit 1); a round can accept at most 2 updates"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_data_file_with_a_utf8_byte_order_mark_reads_as_without(suffix, tmp_path):
    from fedsp.data.sources import read_local

    # Prepare: the same rows with and without the mark some editors write
    texts = {
        ".jsonl": '{"prompt": "Say red:", "completion": " red"}\n',
        ".json": '[{"prompt": "Say red:", "completion": " red"}]',
        ".csv": "prompt,completion\nSay red:, red\n",
    }
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(texts[suffix], encoding="utf-8")
    marked.write_text(texts[suffix], encoding="utf-8-sig")
    # Execute / Assert
    assert marked.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert read_local(marked) == read_local(plain) == ((1, {"prompt": "Say red:", "completion": " red"}),)


def test_a_permission_error_on_the_data_promises_no_resume(tmp_path, monkeypatch, capsys):
    # Prepare: the train file cannot be looked at (simulated: the tests run as root)
    import errno
    import pathlib

    folder = tmp_path / "own"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text('{"prompt": "Say red:", "completion": " red"}\n' * 12)
    stat = pathlib.Path.stat

    def refuse(path, *args, **kwargs):
        if path.name == "train.jsonl":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", refuse)
    # Execute
    code = main(["run", *TINY, "--task", "custom", "--data-dir", str(folder), "--out", str(tmp_path / "r")])
    # Assert: the file and the reason; no run folder, so nothing to resume
    line = _one_line(capsys)
    assert (
        code == 2
        and line == f"fedsp: error: data file {folder}/train.jsonl cannot be read: permission denied"
    )
    assert not (tmp_path / "r").exists()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder on a disk that ``fill()`` fills and ``free()`` frees: an 8 MiB tmpfs where it can be
    mounted (root), else every file write failing with ENOSPC while it is full (simulated)."""
    import errno
    import os
    import subprocess

    import fedsp.files

    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True
    )
    full = {"on": False}
    fsync = os.fsync

    def fill() -> None:
        if mounted.returncode == 0:
            with open(folder / "filler", "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                        handle.flush()
                except OSError:
                    pass
        full["on"] = True

    def refusing_fsync(fd: int) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    def free() -> None:
        (folder / "filler").unlink(missing_ok=True)
        full["on"] = False

    if mounted.returncode != 0:
        monkeypatch.setattr(fedsp.files.os, "fsync", refusing_fsync)
    yield folder, fill, free, mounted.returncode == 0
    if mounted.returncode == 0:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("engine", ["inprocess", pytest.param("flower", marks=pytest.mark.slow)])
def test_a_full_disk_stops_the_run_in_one_line_and_resume_ends_as_uninterrupted(
    engine, tmp_path, small_disk, monkeypatch, capsys
):
    import re

    from fedsp.runtime import participation

    folder, fill, free, mounted = small_disk
    if engine == "flower" and not mounted:
        pytest.skip("Flower's clients run in other processes: a full disk needs a real small one (mount)")
    two_rounds = [*TINY, "--rounds", "2", "--engine", engine]
    assert main(["run", *two_rounds, "--out", str(tmp_path / "reference")]) == 0
    capsys.readouterr()
    # Execute: the disk fills as round 2 starts (the clients write their states into the results folder)
    sample = participation.sample_clients

    def filling(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
        if rnd == 2:
            fill()
        return sample(num_clients, fraction, seed, rnd)

    monkeypatch.setattr(participation, "sample_clients", filling)
    run = folder / "run"
    code = main(["run", *two_rounds, "--out", str(run)])
    if engine == "flower":  # Flower's own log lines come too (a deprecation warning, a client stopped)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err[-3000:]
        errors = [x for x in err.splitlines() if x.startswith("fedsp: error: ")]
        assert len(errors) == 1, err[-3000:]
        line = errors[0]
    else:
        line = _one_line(capsys)
    # Assert: the file, what it holds, the reason and what is kept; no client taken for failed
    assert code == 2, line
    assert re.fullmatch(
        rf"fedsp: error: cannot write {run}/clients/(\w+/)?partition-(\d)/state-2\.pt \(client \2's state "
        rf"after round 2, kept in the results folder by this run's engine\): no space left on the device; "
        rf"rounds 1-1 are kept: once the disk is fixed, fedsp run --resume {run} continues",
        line,
    ), line
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1] and metrics[1]["failed_clients"] == []
    assert not (run / ".lock").exists()
    # Execute: space freed, the run resumed
    free()
    monkeypatch.setattr(participation, "sample_clients", sample)
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    # Assert: the prefix of the uninterrupted run, byte for byte
    assert _digests(run) == _digests(tmp_path / "reference")


def test_flowers_two_tracebacks_of_a_clients_fedsp_error_become_one_line():
    import logging

    from fedsp.runtime.flower.simulation import ClientErrorsInOneLine

    # Prepare: what Flower's simulation logs for a ClientApp raising FedSPError (Ray's text, then its own)
    reason = "partition 1: a value of 5.5e+29 in the update is beyond SecAgg+'s range of +-8"
    remote = (
        'ray::ClientAppActor.run() (pid=1, ip=127.0.0.1)\n  File "secagg.py", line 101, in masked\n'
        f"    raise FedSPError(reason)\nfedsp.errors.FedSPError: {reason}\n\nThe above exception was the "
        f"direct cause of the following exception:\nflwr.clientapp.client_app.ClientAppException: {reason}"
    )
    records = [
        logging.LogRecord("flwr", logging.ERROR, "vce_api.py", 143, message, None, None)
        for message in (remote, "Traceback (most recent call last):\n" + remote, "a round halted")
    ]
    # Execute
    one_line = ClientErrorsInOneLine()
    kept = [r.getMessage() for r in records if one_line.filter(r)]
    # Assert
    assert kept == [f"a client stopped: {reason}", "a round halted"]
