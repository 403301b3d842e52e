"""A client's local round, timed, for each model-private method side by side (and FedPrompt).

    .venv/bin/python bench/client_round.py [--methods fedsp offsite-tuning fedprompt] [--reps 3]
                                           [--set KEY=VALUE ...] [--out FILE]

For each method: the run's parties are built as ``fedsp run`` builds them (SmolLM2, ARC-Easy, 10
clients, the run defaults; FedSP's distilled auxiliary model comes from the KD cache when it is there),
then client 0's ``fit`` on the server's broadcast is timed ``--reps`` times, after one untimed warm-up.
One ``fit`` is one local round: FedSP alternates T alignment and T prompt steps (2T optimiser steps);
FedPrompt tunes the prefix for T steps through the global model; Offsite-Tuning tunes its adapter
layers for T steps on the emulator. Reported: seconds per round (median), per optimiser step, and the
client model's parameters. Run it with nothing else on the machine for a speed figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import machine, write_json

from fedsp.config import RunConfig
from fedsp.data.shards import prepare_data
from fedsp.experiments.compare import parse_settings
from fedsp.methods.builders import build_course
from fedsp.methods.table import ALTERNATE, spec_for
from fedsp.models.loading import load_global_model


def steps_per_round(config: RunConfig) -> int:
    """Optimiser steps in one local round of ``config.method``'s client."""
    shape = spec_for(config.method).client
    assert shape is not None, f"{config.method} has no clients"
    return 2 * config.local_steps if shape.mode == ALTERNATE else config.local_steps


def time_method(method: str, settings: dict, reps: int) -> dict:
    config = RunConfig.from_dict({"method": method, "val_limit": 8, "progress": False, **settings})
    loaded = load_global_model(config.model, config.dtype, config.seed)
    data = prepare_data(config, loaded.tokenizer)
    started = time.perf_counter()
    course = build_course(config, loaded, data)
    built = time.perf_counter() - started
    client = course.make_client(0)
    state = course.server.broadcast()
    client.fit(state)  # warm-up: first-touch allocations, lazy imports
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        client.fit(state)
        seconds.append(time.perf_counter() - t0)
    per_round = statistics.median(seconds)
    steps = steps_per_round(config)
    info = course.client_model
    return {
        "method": method,
        "seconds_per_round": per_round,
        "rounds_timed": seconds,
        "optimiser_steps_per_round": steps,
        "seconds_per_step": per_round / steps,
        "client_params": info.params if info else None,
        "fraction_of_global": info.fraction_of_global if info else None,
        "seconds_to_build_the_course": built,
        "batch_size": config.batch_size,
        "local_steps": config.local_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["fedsp", "offsite-tuning", "fedprompt"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run option")
    parser.add_argument("--out", default="bench_client_round.json")
    args = parser.parse_args()
    settings = parse_settings(args.set)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        settings.setdefault("out", str(Path(scratch) / "unused"))
        for method in args.methods:
            row = time_method(method, settings, args.reps)
            rows.append(row)
            print(
                f"{method:16s} {row['seconds_per_round']:7.2f} s a round, "
                f"{row['seconds_per_step']:6.2f} s a step ({row['optimiser_steps_per_round']} steps), "
                f"client model {row['client_params']:,} params",
                file=sys.stderr,
            )
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            write_json(args.out, {"machine": machine(device), "settings": settings, "rows": rows})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
