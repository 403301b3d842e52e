"""A run is never silent and never lost: --quiet still prints a line a round, SIGTERM keeps the completed
rounds and says how to resume, a resume says so, and other libraries' chatter stays out unless --verbose."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsp.cli import main

ROOT = Path(__file__).resolve().parents[1]
CAPITALS = str(ROOT / "examples" / "capitals")
TINY = [
    *("--model", "tiny-llama", "--task", "custom", "--data-dir", CAPITALS, "--clients", "2"),
    *("--local-steps", "2", "--kd-steps", "2", "--prefix-len", "4", "--max-length", "64"),
    *("--max-new-tokens", "4", "--eval-limit", "4", "--val-limit", "4"),
]


# `fedsp run` whose rounds from the second on are followed by a pause of up to a minute (a stop ends it)
SLOW_ROUNDS = """
import sys, time
from fedsp.runtime.session import Session
record_round = Session.finish_round
def finish_round(self, *args, **kwargs):
    record = record_round(self, *args, **kwargs)
    if record["round"] >= 2:
        time.sleep(60)
    return record
Session.finish_round = finish_round
from fedsp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _rounds_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["round"] for line in path.read_text().splitlines() if line), default=0)


def test_quiet_prints_one_line_a_round_and_no_other_librarys_bars(tmp_path, capsys):
    # Execute
    assert main(["run", *TINY, "--rounds", "3", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    captured = capsys.readouterr()
    # Assert: three round lines, in order, with their seconds; no bars, no third-party notices
    rounds = [line for line in captured.out.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1", "round 2", "round 3"]
    assert all(line.endswith(" s)") and "val_loss" in line for line in rounds)
    for noise in ("Loading weights", "Writing model shards", "it/s]", "FutureWarning"):
        assert noise not in captured.err, captured.err


@pytest.mark.parametrize("kind", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_a_round_is_recorded_waits_until_the_round_is_whole(tmp_path, capsys, monkeypatch, kind):
    # Prepare: the stop arrives after round 1's checkpoint, just before its metrics line is written
    from fedsp.runtime import results

    write = results.append_metrics

    def stopped_midway(path, record):
        if record["round"] == 1:
            signal.raise_signal(kind)
        write(path, record)

    monkeypatch.setattr(results, "append_metrics", stopped_midway)
    out = tmp_path / "cut"
    # Act (Ctrl-C as Python takes it by default: a suite started in the background inherits it ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["run", *TINY, "--rounds", "3", "--out", str(out), "--quiet"])
    finally:
        signal.signal(signal.SIGINT, before)
    # Assert: round 1 is in metrics.jsonl and printed, and the stop names it as the last completed round
    printed = capsys.readouterr()
    assert code == (143 if kind == signal.SIGTERM else 130)
    assert _rounds_done(out) == 1
    assert [line.split(":")[0] for line in printed.out.splitlines() if line.startswith("round ")] == [
        "round 1"
    ]
    how = "stopped (SIGTERM)" if kind == signal.SIGTERM else "interrupted"
    assert (
        printed.err.strip().splitlines()[-1]
        == f"fedsp: {how} after round 1; fedsp run --resume {out} continues"
    )


def test_a_disk_error_while_a_stop_is_held_is_said_as_the_disk_error(tmp_path, capsys, monkeypatch):
    # Prepare: SIGTERM arrives while round 1 is recorded, then metrics.jsonl cannot be written
    import errno

    from fedsp.runtime import results

    write = results.append_metrics

    def full_disk(path, record):
        if record["round"] == 0:  # round 0 (before any round) is written as usual
            return write(path, record)
        signal.raise_signal(signal.SIGTERM)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(results, "append_metrics", full_disk)
    # Act
    code = main(["run", *TINY, "--rounds", "2", "--out", str(tmp_path / "full"), "--quiet"])
    # Assert: the error that stopped the run is named (exit 2), not taken for the held stop (143)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "no space left on the device" in last.lower(), last


def test_the_clean_up_of_a_stopped_run_waits_for_a_round_another_thread_is_recording(tmp_path):
    # Prepare: an engine's thread recording round 1 (it holds the session's lock) when the main thread stops
    import threading

    from fedsp.config import RunConfig
    from fedsp.errors import RunInterrupted
    from fedsp.runtime.session import run_course

    given = {flag.lstrip("-"): value for flag, value in zip(TINY[::2], TINY[1::2], strict=True)}
    config = RunConfig.from_dict({**given, "rounds": 3, "progress": False, "out": str(tmp_path / "t")})
    holding, seen = threading.Event(), {}

    def record_round_one(session):
        with session.recording:
            holding.set()
            time.sleep(0.5)
            session.history.append({"round": 1, "val_loss": 1.0})

    def drive(session):
        seen["session"] = session
        thread = threading.Thread(target=record_round_one, args=(session,))
        thread.start()
        holding.wait()
        seen["thread"] = thread
        raise KeyboardInterrupt

    # Act
    with pytest.raises(RunInterrupted) as stopped:
        run_course(config, None, drive)
    seen["thread"].join()
    # Assert: the round the thread was recording counts as completed, and the session is closed, so an
    # engine's thread that finishes a later round does not record it (Session.finish_round)
    assert stopped.value.completed == 1 and seen["session"].closed


def test_sigterm_keeps_the_completed_rounds_and_resume_ends_as_an_uninterrupted_run(tmp_path, capsys):
    # Prepare: the uninterrupted run
    rounds = ["--rounds", "8"]
    assert main(["run", *TINY, *rounds, "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    capsys.readouterr()
    # Execute: the same run in a process stopped with SIGTERM once two rounds completed. The child waits
    # after each round from the second on, outside the round's record, so the stop cannot come after the
    # last round however slowly this machine runs the test (a tiny round takes a fraction of a second)
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-c", SLOW_ROUNDS, "run", *TINY, *rounds, "--out", str(out), "--quiet"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and _rounds_done(out) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    kept = _rounds_done(out)
    assert proc.returncode == 143, (proc.returncode, stderr[-2000:])
    assert 2 <= kept < 8
    last = stderr.strip().splitlines()[-1]
    assert last == f"fedsp: stopped (SIGTERM) after round {kept}; fedsp run --resume {out} continues"
    assert stdout.count("\nround ") + stdout.startswith("round ") == kept  # one line per completed round
    # Execute: resume it
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    resumed = capsys.readouterr()
    # Assert: it says it resumes, prints the remaining rounds, and ends with the same prefix and metrics
    assert f"fedsp: resuming {out} after round {kept} of 8" in resumed.err
    assert [line.split(":")[0] for line in resumed.out.splitlines() if line.startswith("round ")] == [
        f"round {r}" for r in range(kept + 1, 9)
    ]
    whole, again = load_file(tmp_path / "whole" / "prefix.safetensors"), load_file(out / "prefix.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    final = [json.loads((f / "results.json").read_text())["final"] for f in (tmp_path / "whole", out)]
    assert final[0] == final[1]
    losses = [
        [m["val_loss"] for m in map(json.loads, (f / "metrics.jsonl").read_text().splitlines())]
        for f in (tmp_path / "whole", out)
    ]
    assert losses[0] == losses[1]
