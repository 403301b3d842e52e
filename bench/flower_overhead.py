"""Per-round time and peak memory: in-process runner vs Flower simulation, same tiny configuration.

    .venv/bin/python bench/flower_overhead.py --clients 10 --per-round 10 --rounds 3
    .venv/bin/python bench/flower_overhead.py --clients 100 --per-round 10 --rounds 3 --engines flower

Each engine runs in a fresh subprocess (so peak RSS is its own); prints one JSON line per engine:
mean seconds per round (from metrics.jsonl, rounds 2.. so start-up is excluded), wall seconds,
and peak RSS of the process and of its children (Ray actors) in MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from fedsp.config import RunConfig
config = RunConfig.from_dict(json.loads(sys.argv[1]))
t0 = time.perf_counter()
if config.engine == "flower":
    from fedsp.runtime.flower.simulation import run
else:
    from fedsp.runtime.inprocess import run
outcome = run(config)
wall = time.perf_counter() - t0
rounds = [json.loads(l) for l in (outcome.out_dir / "metrics.jsonl").read_text().splitlines()][2:]
print("RESULT", json.dumps({"engine": config.engine, "clients": config.clients, "per_round": round(config.fraction_fit * config.clients),
      "seconds_per_round": sum(r["seconds"] for r in rounds) / max(1, len(rounds)), "wall_seconds": wall,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="inprocess,flower")
    args = parser.parse_args()
    for engine in args.engines.split(","):
        out = Path(tempfile.mkdtemp(prefix="fedsp-bench-")) / engine
        config = {"model": "tiny-llama", "clients": args.clients, "rounds": args.rounds, "local_steps": 1,
                  "kd_steps": 2, "eval_limit": 8, "val_limit": 8, "prefix_len": 4, "max_length": 96,
                  "eval_every_round": False, "zero_shot_eval": False, "progress": False, "engine": engine,
                  "fraction_fit": args.per_round / args.clients, "out": str(out)}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            sys.exit(f"{engine} failed:\n{done.stderr[-2000:]}")
        print(lines[-1][len("RESULT ") :], flush=True)


if __name__ == "__main__":
    main()
