"""Where the wall time of a ``fedsp run`` goes: the run under cProfile, its time per stage.

    .venv/bin/python bench/run_breakdown.py [-- fedsp run options ...] [--out FILE.json]

Runs ``fedsp run`` (default options unless given after ``--``; the results
folder goes to a temporary directory) under :mod:`cProfile`, then reports the
inclusive time of the stages below (a stage's time includes everything it
calls, so nested stages overlap: the ``within`` column says in which). The
profiler adds a little per-Python-call overhead; the wall time of the same run
without profiler is in its ``results.json`` only when run plainly.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS, machine, print_table, resolve, write_json

# (label, file name ending, function name, within): inclusive time of every call of that function.
STAGES = [
    ("load global model", "models/loading.py", "load_global_model", "setup"),
    ("prepare data (tokenise, shards)", "data/shards.py", "prepare_data", "setup"),
    ("build auxiliary model", "models/auxiliary.py", "build_auxiliary_model", "setup"),
    ("KD of the auxiliary model", "methods/kd.py", "distill", "setup"),
    (
        "evaluation (zero-shot + rounds + final)",
        "evaluation/multiple_choice.py",
        "evaluate_multiple_choice",
        "-",
    ),
    ("client rounds (FedSPClient.fit)", "methods/fedsp.py", "fit", "rounds"),
    ("server prefix tuning (tune)", "methods/fedsp.py", "tune", "rounds"),
    ("server validation loss", "methods/fedsp.py", "validation_loss", "rounds"),
    ("forward + loss (answer_loss)", "models/forward.py", "answer_loss", "training"),
    ("backward (Tensor.backward)", "torch/_tensor.py", "backward", "training"),
    ("optimiser step (AdamW)", "torch/optim/adam.py", "step", "training"),
    ("gradient clipping", "nn/utils/clip_grad.py", "clip_grad_norm_", "training"),
    ("model copies (copy.deepcopy)", "copy.py", "deepcopy", "-"),
    ("wire encode", "fedsp/wire.py", "encode", "rounds"),
    ("wire decode", "fedsp/wire.py", "decode", "rounds"),
    ("client state to disk (ClientStore.save)", "runtime/checkpoint.py", "save", "rounds"),
    ("auxiliary model to each client's disk", "runtime/checkpoint.py", "save_aux", "setup"),
    ("run checkpoint", "runtime/checkpoint.py", "save_checkpoint", "rounds"),
    ("plot curves", "runtime/results.py", "plot_curves", "finish"),
]


def stage_times(stats: pstats.Stats) -> list[dict]:
    """Per stage: calls and inclusive seconds, summed over every function that matches it."""
    rows = []
    entries = stats.stats  # {(file, line, name): (prim calls, calls, total, cumulative, callers)}
    for label, file_end, name, within in STAGES:
        calls, seconds = 0, 0.0
        for (file, _line, func), (_prim, ncalls, _tt, cumtime, _callers) in entries.items():
            if func == name and file.replace("\\", "/").endswith(file_end):
                calls += ncalls
                seconds += cumtime  # cProfile counts a recursive function's outermost calls only
        rows.append({"stage": label, "within": within, "calls": calls, "seconds": seconds})
    return rows


def main() -> None:
    argv = sys.argv[1:]
    run_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "run_breakdown.json"))
    parser.add_argument("--top", type=int, default=25, help="also list the top N fedsp functions")
    args = parser.parse_args(own)
    from fedsp.cli import main as fedsp_main

    with tempfile.TemporaryDirectory() as tmp:
        command = ["run", "--out", str(Path(tmp) / "run"), *run_args]
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        status = fedsp_main(command)
        profiler.disable()
        wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"fedsp run exited with status {status}")
    stats = pstats.Stats(profiler)
    rows = stage_times(stats)
    print(f"\nfedsp {' '.join(command[:1] + run_args)}: {wall:.0f} s under the profiler")
    print_table(
        ["stage", "within", "calls", "seconds", "% of wall"],
        [[r["stage"], r["within"], r["calls"], r["seconds"], 100 * r["seconds"] / wall] for r in rows],
    )
    top = sorted(
        ((f"{Path(k[0]).name}:{k[2]}", v[1], v[3]) for k, v in stats.stats.items() if "/fedsp/" in k[0]),
        key=lambda t: -t[2],
    )[: args.top]
    print(f"\ntop {args.top} fedsp functions by inclusive time")
    print_table(["function", "calls", "seconds"], [list(t) for t in top])
    write_json(
        args.out,
        {
            "machine": machine(resolve("auto")),
            "command": ["fedsp", *command[:1], *run_args],
            "wall_seconds_profiled": wall,
            "stages": rows,
            "top": [{"function": f, "calls": c, "seconds": s} for f, c, s in top],
        },
    )


if __name__ == "__main__":
    main()
