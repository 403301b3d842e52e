"""Fault injection: misbehaving clients in both engines, a server killed with SIGKILL, two runs on one folder.

Clients misbehave through the test-only hook ``FEDSP_FAULTS`` (:mod:`fedsp.runtime.faults`), which
both engines run in the client half of every round; nothing private is monkey-patched.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from fedsp.cli import main
from fedsp.config import RunConfig
from fedsp.runtime import faults, inprocess
from fedsp.runtime.checkpoint import CHECKPOINT

TINY = RunConfig(
    model="tiny-llama",
    clients=3,
    rounds=2,
    local_steps=1,
    kd_steps=2,
    eval_limit=4,
    val_limit=4,
    prefix_len=4,
    max_length=96,
    progress=False,
    dtype="float32",
    eval_every_round=False,
    zero_shot_eval=False,
)


def _plan(monkeypatch, *planned: dict) -> None:
    monkeypatch.setenv(faults.ENV, json.dumps(list(planned)))


def _run(config: RunConfig):
    if config.engine == "flower":
        from fedsp.runtime.flower import simulation

        return simulation.run(config)
    return inprocess.run(config)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def _completed(out) -> int:
    """Rounds a run has completed so far (its metrics.jsonl holds round 0, then one line a round)."""
    path = out / "metrics.jsonl"
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def _prefix(out) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT, weights_only=False)["server"]["prefix"]


@pytest.mark.parametrize("engine", ["inprocess", "flower"])
def test_failing_malformed_and_nan_clients_are_left_out_and_recorded(
    engine, tmp_path, monkeypatch, read_metrics
):
    # Prepare: of 6 clients, in round 1 client 0 fails, 1 replies garbage, 2 sends NaN, 3 claims -5
    # examples; in round 2 two fail
    config = replace(TINY, clients=6, out=str(tmp_path / "run"), engine=engine, min_replies=2)
    _plan(
        monkeypatch,
        {"client": 0, "round": 1, "kind": "fail"},
        {"client": 1, "round": 1, "kind": "malformed"},
        {"client": 2, "round": 1, "kind": "nan"},
        {"client": 3, "round": 1, "kind": "claim", "value": -5},
        {"client": 4, "round": 2, "kind": "fail"},
        {"client": 5, "round": 2, "kind": "fail"},
    )
    # Execute
    outcome = _run(config)
    # Assert: each misbehaving client is out of its round, with its reason; the others count
    first, second = read_metrics(outcome.out_dir)[1:]
    assert first["failed_clients"] == [0, 1] and first["num_clients"] == 2
    assert [r["client"] for r in first["rejections"]] == [2, 3] and "NaN" in first["rejections"][0]["reason"]
    assert "not positive" in first["rejections"][1]["reason"]
    assert second["failed_clients"] == [4, 5] and second["num_clients"] == 4
    assert outcome.results["rounds"] == 2


def test_an_empty_flower_reply_is_a_failure_not_a_crash(tmp_path, monkeypatch, read_metrics):
    from fedsp.runtime.flower import simulation

    _plan(monkeypatch, {"client": 1, "round": 1, "kind": "empty-reply"})
    outcome = simulation.run(replace(TINY, rounds=1, out=str(tmp_path / "run"), engine="flower"))
    record = read_metrics(outcome.out_dir)[1]
    assert record["failed_clients"] == [1] and record["num_clients"] == 2


def test_a_client_that_hangs_past_the_timeout_is_left_out(tmp_path, monkeypatch, read_metrics):
    from fedsp.runtime.flower import simulation

    # Prepare: two clients, one Ray actor each; client 1 sleeps past --client-timeout, which leaves
    # client 0 room for the actor's start-up (importing torch and building the client) even on a busy machine
    _plan(monkeypatch, {"client": 1, "round": 1, "kind": "hang", "value": 45})
    config = replace(
        TINY, clients=2, rounds=1, out=str(tmp_path / "run"), engine="flower", client_timeout=35.0
    )
    # Execute
    outcome = simulation.run(config)
    # Assert
    record = read_metrics(outcome.out_dir)[1]
    assert record["failed_clients"] == [1] and record["num_clients"] == 1


def test_an_inprocess_client_that_hangs_past_the_timeout_is_left_out(tmp_path, monkeypatch, read_metrics):
    # Prepare: client 1 sleeps 6 s in round 1, the round waits 3 s for each client
    import threading

    _plan(monkeypatch, {"client": 1, "round": 1, "kind": "hang", "value": 6})
    config = replace(TINY, clients=2, rounds=1, out=str(tmp_path / "run"), client_timeout=3.0)
    # Execute
    outcome = inprocess.run(config)
    for worker in threading.enumerate():  # the late client finishes on its own; let it, before the next test
        if worker.name.startswith("client-"):
            worker.join()
    # Assert
    record = read_metrics(outcome.out_dir)[1]
    assert record["failed_clients"] == [1] and record["num_clients"] == 1


def test_a_huge_example_claim_is_cut_to_the_cap_and_recorded(tmp_path, monkeypatch, read_metrics):
    # Prepare: client 0 claims a billion examples and scales its update 9.5x (no server tuning: the
    # final prefix is the aggregate); once without a weight cap, once with --max-client-weight 800
    config = replace(TINY, rounds=1, server_steps=0)
    honest = _prefix(inprocess.run(replace(config, out=str(tmp_path / "honest"))).out_dir)
    _plan(
        monkeypatch,
        {"client": 0, "kind": "claim", "value": 1e9},
        {"client": 0, "kind": "scale", "value": 9.5},
    )
    # Execute
    uncapped = inprocess.run(replace(config, out=str(tmp_path / "uncapped")))
    capped = inprocess.run(replace(config, out=str(tmp_path / "capped"), max_client_weight=800))
    # Assert: the cap is applied and recorded, and it takes most of the attacker's pull away
    record = read_metrics(capped.out_dir)[1]
    assert record["capped_weights"] == [{"client": 0, "claimed": 10**9, "used": 800}]
    assert read_metrics(uncapped.out_dir)[1]["capped_weights"] == []
    pulled, bounded = _distance(_prefix(uncapped.out_dir), honest), _distance(_prefix(capped.out_dir), honest)
    assert bounded < 0.5 * pulled, (bounded, pulled)


def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_prefix(tmp_path):
    # Prepare: the uninterrupted run, and 8 runs of the same configuration killed with SIGKILL
    config = replace(TINY, rounds=6, local_steps=3, eval_every_round=True)  # rounds of about 0.1 s
    started = time.perf_counter()
    reference = inprocess.run(replace(config, out=str(tmp_path / "reference")))
    span = time.perf_counter() - started  # a run once its process is up (imports are what vary most)
    expected = _prefix(reference.out_dir)
    rng = random.Random(0)
    child = (
        "import json, sys; from fedsp.config import RunConfig; from fedsp.runtime import inprocess; "
        "inprocess.run(RunConfig.from_dict(json.loads(sys.argv[1])))"
    )
    outcomes = {"resumed": 0, "no checkpoint yet": 0, "finished before the kill": 0}
    for trial in range(8):
        out = tmp_path / f"killed-{trial}"
        keys = json.dumps(replace(config, out=str(out)).to_dict())
        proc = subprocess.Popen(
            [sys.executable, "-c", child, keys], env={**os.environ, "PYTHONHASHSEED": "0"}
        )
        # the kill at a random point of the run itself, timed from its folder's first file (a child's
        # imports take 3-10 s depending on the machine and its load); in half the trials from its first
        # checkpoint, so that some kills land between rounds however loaded the machine is (under load,
        # the start before round 1 can take most of the span)
        first = "config.json" if trial % 2 == 0 else CHECKPOINT
        deadline = time.monotonic() + 120
        while not (out / first).is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, (1.2 if trial % 2 == 0 else 0.3) * span))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = (out / "results.json").is_file()
        # Execute: resume whatever the kill left
        code = main(["run", "--resume", str(out), "--quiet"]) if (out / "config.json").is_file() else None
        # Assert: resumed to the same prefix, or nothing to resume from (one-line error), or already done
        if code is None or not (out / CHECKPOINT).is_file():
            assert code in (None, 2)
            outcomes["no checkpoint yet"] += 1
            continue
        assert code == 0, trial
        got = _prefix(out)
        assert all(torch.equal(got[k], expected[k]) for k in expected), trial
        outcomes["finished before the kill" if finished else "resumed"] += 1
    print("kill -9 trials:", outcomes)
    assert sum(outcomes.values()) == 8 and outcomes["resumed"] >= 2  # 13 of 20 resumed on an idle machine


def test_a_second_process_on_a_live_folder_is_refused_naming_the_pid(tmp_path, capsys):
    # Prepare: a long run in another process
    out = tmp_path / "live"
    keys = json.dumps(replace(TINY, rounds=200, out=str(out)).to_dict())
    child = (
        "import json, sys; from fedsp.config import RunConfig; from fedsp.runtime import inprocess; "
        "inprocess.run(RunConfig.from_dict(json.loads(sys.argv[1])))"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, keys])
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT).is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / CHECKPOINT).is_file()
        # Execute: resume it, and start a new run into it, while it runs
        resumed = main(["run", "--resume", str(out), "--quiet"])
        resume_err = capsys.readouterr().err.strip().splitlines()
        again = main(["run", "--model", "tiny-llama", "--out", str(out), "--quiet"])
        again_err = capsys.readouterr().err.strip().splitlines()
    finally:
        proc.kill()
        proc.wait()
    # Assert
    assert resumed == 2 and len(resume_err) == 1 and f"(PID {proc.pid})" in resume_err[0]
    assert again == 2 and "already exists" in again_err[0]


def test_kill_9_of_a_flower_simulation_then_resume_gives_the_uninterrupted_prefix(tmp_path):
    # Prepare: the uninterrupted run (in-process: the simulation computes the same prefix to 1e-6, which
    # test_flower checks, and a Ray start less keeps the suite short), and a simulation killed after 2
    # completed rounds (mid-run: rounds before and after the kill)
    config = replace(TINY, rounds=4, engine="flower")
    expected = _prefix(inprocess.run(replace(config, engine="inprocess", out=str(tmp_path / "ref"))).out_dir)
    child = (
        "import json, sys; from fedsp.config import RunConfig; from fedsp.runtime.flower import simulation; "
        "simulation.run(RunConfig.from_dict(json.loads(sys.argv[1])))"
    )
    out = tmp_path / "killed-after-2"
    keys = json.dumps(replace(config, out=str(out)).to_dict())
    proc = subprocess.Popen([sys.executable, "-c", child, keys], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and _completed(out) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Execute
    code = main(["run", "--resume", str(out), "--quiet"])
    # Assert: the resumed simulation ends exactly where the uninterrupted one did
    got = _prefix(out)
    assert code == 0 and all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=0) for k in expected)
