"""Run folders and caches that cannot be corrupted: finished runs stay as they are, leftovers are cleaned,
a truncated cache entry or client state is noticed and rebuilt, and scoring is by choice text."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace

import torch

from fedsp.cli import main
from fedsp.config import RunConfig
from fedsp.data.tasks import MCExample
from fedsp.evaluation.multiple_choice import evaluate_multiple_choice
from fedsp.files import atomic_write
from fedsp.runtime import inprocess
from fedsp.runtime.checkpoint import CHECKPOINT, atomic_save

TINY = RunConfig(
    model="tiny-llama",
    clients=2,
    rounds=2,
    local_steps=1,
    kd_steps=2,
    eval_limit=4,
    val_limit=4,
    prefix_len=4,
    max_length=96,
    progress=False,
    dtype="float32",
)


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    # Prepare
    outcome = inprocess.run(replace(TINY, out=str(tmp_path / "run")))
    before = {p.name: p.read_bytes() for p in outcome.out_dir.iterdir() if p.is_file()}
    capsys.readouterr()  # what the run itself said
    # Execute
    code = main(["run", "--resume", str(outcome.out_dir), "--quiet"])
    # Assert: exit 0, one line saying so, every file byte-identical
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1 and "finished all its 2 rounds already" in err[0]
    assert {p.name: p.read_bytes() for p in outcome.out_dir.iterdir() if p.is_file()} == before


def test_leftover_temporaries_of_a_killed_writer_are_removed_on_resume(tmp_path, interrupted_run):
    # Prepare: a killed run, and the half-written temporary file a SIGKILL during a checkpoint leaves
    out = interrupted_run(replace(TINY, out=str(tmp_path / "run")), 2)
    (out / f".{CHECKPOINT}.abc123.tmp").write_bytes(b"")
    # Execute
    code = main(["run", "--resume", str(out), "--quiet"])
    # Assert
    assert code == 0 and not list(out.glob(".*.tmp"))


def test_a_resumed_runs_wall_time_counts_the_interrupted_process_too(tmp_path, interrupted_run):
    # Prepare: a run stopped after round 1 whose first process, say, ran for 1000 s
    out = interrupted_run(replace(TINY, out=str(tmp_path / "run")), 2)
    saved = torch.load(out / CHECKPOINT, weights_only=False)
    assert 0 < saved["wall_seconds"] < 1000
    atomic_save({**saved, "wall_seconds": 1000.0}, out / CHECKPOINT)
    # Execute
    t0 = time.perf_counter()
    code = main(["run", "--resume", str(out), "--quiet"])
    leg = time.perf_counter() - t0
    # Assert: the run's wall time is both processes' (the pause between them not counted)
    wall = json.loads((out / "results.json").read_text())["wall_seconds"]
    assert code == 0 and 1000 < wall < 1000 + leg


def test_a_truncated_client_state_is_treated_as_lost_and_the_run_completes(
    tmp_path, interrupted_run, read_metrics
):
    # Prepare: client 1's round-1 state cut in half
    out = interrupted_run(replace(TINY, out=str(tmp_path / "run")), 2)
    state = out / "clients" / "partition-1" / "state-1.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    # Execute
    code = main(["run", "--resume", str(out), "--quiet"])
    # Assert: both clients count in round 2 (client 1 got the model again and started afresh)
    assert code == 0 and read_metrics(out)[-1]["num_clients"] == 2


def test_a_truncated_kd_cache_entry_is_named_and_rebuilt(tmp_path, monkeypatch):
    # Prepare: a distilled auxiliary model in the cache, then the entry cut short
    monkeypatch.setenv("FEDSP_CACHE_DIR", str(tmp_path / "cache"))
    first = inprocess.run(replace(TINY, rounds=1, out=str(tmp_path / "first")))
    (entry,) = (tmp_path / "cache" / "aux").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    # Execute
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = inprocess.run(replace(TINY, rounds=1, out=str(tmp_path / "second")))
    # Assert: a warning names the file, the entry is whole again, the run is the same as the first
    assert any(str(entry) in str(w.message) and "distilling it again" in str(w.message) for w in caught)
    assert entry.stat().st_size > 1000
    assert second.results["final"] == first.results["final"]


def test_concurrent_writers_of_one_file_never_collide_on_a_temporary_name(tmp_path):
    # Two writers of the same target: each through its own temporary file; the last complete one wins
    target = tmp_path / "results.json"
    atomic_write(target, lambda handle: (handle.write(b'{"a": 1}'), atomic_write(target, b'{"b": 2}')))
    assert json.loads(target.read_text()) == {"a": 1} and not list(tmp_path.glob(".*.tmp"))


def test_a_duplicated_gold_choice_scores_as_its_copy(tmp_path):
    # Prepare: the gold answer (index 2) is also choice 0; both copies score alike, the first wins argmax
    from fedsp.models.loading import load_global_model

    loaded = load_global_model("tiny-llama", seed=0)
    question = MCExample("dup/0", "Question: say red\nAnswer:", ("red", "green", "red", "blue"), 2)
    # Execute
    result = evaluate_multiple_choice(loaded.model, loaded.tokenizer, [question], None, progress=False)
    # Assert: whichever copy the model picks, the answer's text is right or wrong as a whole
    picked = question.choices[result.predictions[0]]
    assert result.acc == (1.0 if picked == "red" else 0.0)


def test_an_out_path_that_cannot_be_made_is_one_line_naming_it(tmp_path, capsys):
    code = main(["run", "--model", "tiny-llama", "--out", "/proc/fedsp-no-such/run", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'/proc/fedsp-no-such/run' cannot be created" in err[0]


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys, read_metrics):
    # Prepare: the disk fills up when round 2's checkpoint is written
    import errno

    from fedsp.runtime import checkpoint

    out = tmp_path / "run"
    write = checkpoint.atomic_write

    def full_disk(path, content):
        if path.name == CHECKPOINT and torch_round(content) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, content)

    def torch_round(content):
        import io

        import torch

        buffer = io.BytesIO()
        content(buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)["round"]

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    args = [
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
        "4",
        "--val-limit",
        "4",
        "--prefix-len",
        "4",
        "--max-length",
        "96",
        "--quiet",
        "--out",
        str(out),
    ]
    # Execute: the run stops in one line; with room again, it resumes
    code = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("fedsp: note:")]
    monkeypatch.setattr(checkpoint, "atomic_write", write)
    resumed = main(["run", "--resume", str(out), "--quiet"])
    # Assert: round 1 was kept, round 2 ran again, no temporary file is left
    assert code == 2 and len(err) == 1 and "no space left on the device" in err[0] and CHECKPOINT in err[0]
    assert resumed == 0 and [m["round"] for m in read_metrics(out)] == [0, 1, 2]
    assert not list(out.glob(".*.tmp"))


def test_a_full_disk_at_the_start_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    # Prepare: no room for the run's first file, config.json
    import errno

    from fedsp.runtime import results

    def full_disk(path, content):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(results, "atomic_write", full_disk)
    out = tmp_path / "run"
    # Execute
    code = main(["run", "--model", "tiny-llama", "--out", str(out), "--quiet"])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "config.json: no space left on the device" in err[0]
    assert not out.exists()
