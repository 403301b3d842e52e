"""Peak memory of an in-process run against the number of clients: it must not grow with the federation.

    .venv/bin/python bench/client_memory.py                      # tiny-llama: 10 vs 500 clients, 10 a round
    .venv/bin/python bench/client_memory.py --preset smollm2     # SmolLM2: 10 vs 50 clients, 5 a round

Each run is a fresh ``python`` process (``fedsp.runtime.inprocess.run``) that reports its own peak
resident memory (``getrusage`` ``ru_maxrss``) and wall time; the in-process engine builds a client
when it is sampled and drops it after the round, its state on disk (``clients/`` in the results
folder). Prints a Markdown table (peak RSS, its ratio to the smallest federation, wall seconds) and
writes JSON to ``results/bench/client_memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import RESULTS, print_table, write_json

CHILD = r"""
import json, resource, sys, time
keys = json.loads(sys.argv[1])
t0 = time.perf_counter()
from fedsp.config import RunConfig
from fedsp.runtime.inprocess import run
outcome = run(RunConfig.from_dict(keys))
rounds = [json.loads(line) for line in (outcome.out_dir / "metrics.jsonl").read_text().splitlines()][1:]
print("RESULT", json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "wall_seconds": time.perf_counter() - t0,
                            "clients_per_round": [r["num_clients"] for r in rounds]}))
"""

# (label, options shared by the runs, [(clients, fraction_fit)]): each pair samples the same number a round
PRESETS: dict[str, tuple[dict[str, Any], list[tuple[int, float]]]] = {
    "tiny": (
        dict(
            model="tiny-llama",
            rounds=3,
            local_steps=1,
            kd_steps=2,
            eval_limit=20,
            val_limit=20,
            prefix_len=4,
            max_length=96,
        ),
        [(10, 1.0), (500, 0.02)],
    ),
    "smollm2": (
        dict(model="smollm2", rounds=1, local_steps=1, kd_steps=2, eval_limit=20, val_limit=20),
        [(10, 0.5), (50, 0.1)],
    ),
}


def measure(keys: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(keys)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"client_memory: the run failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", default=str(RESULTS / "client_memory.json"))
    args = parser.parse_args()
    shared, federations = PRESETS[args.preset]
    rows, records = [], []
    with tempfile.TemporaryDirectory() as work:
        for clients, fraction in federations:
            keys = {
                **shared,
                "clients": clients,
                "fraction_fit": fraction,
                "zero_shot_eval": False,
                "eval_every_round": False,
                "progress": False,
                "out": str(Path(work) / f"run-{clients}"),
            }
            result = measure(keys)
            records.append({"clients": clients, "fraction_fit": fraction, **result, "options": keys})
            base = records[0]["peak_rss_mb"]
            per_round = result["clients_per_round"][0]
            rows.append(
                [
                    shared["model"],
                    clients,
                    per_round,
                    shared["rounds"],
                    f"{result['peak_rss_mb']:.0f}",
                    f"{result['peak_rss_mb'] / base:.3f}",
                    f"{result['wall_seconds']:.0f}",
                ]
            )
    print_table(["model", "clients", "a round", "rounds", "peak RSS MB", "vs smallest", "wall s"], rows)
    write_json(args.out, {"preset": args.preset, "runs": records})


if __name__ == "__main__":
    main()
