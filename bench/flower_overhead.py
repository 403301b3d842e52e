"""Per-round time and peak memory: in-process vs Flower simulation vs loopback deployment, same tiny run.

    .venv/bin/python bench/flower_overhead.py --clients 3 --per-round 3 --rounds 3   # all three engines
    .venv/bin/python bench/flower_overhead.py --clients 10 --per-round 10 --engines inprocess,flower
    .venv/bin/python bench/flower_overhead.py --clients 100 --per-round 10 --rounds 3 --engines flower
    .venv/bin/python bench/flower_overhead.py --clients 5 --per-round 5 --server-steps 0 \
        --engines flower,flower+secagg      # SecAgg+'s cost, and its error on the prefix

Engines: ``inprocess`` (``fedsp run``), ``flower`` (``fedsp run --engine flower``: Ray simulation),
``loopback`` (``scripts/flower_loopback.py``: a SuperLink and one SuperNode per client on 127.0.0.1,
TLS and SuperNode authentication); ``+secagg`` after an engine's name runs it with
``--secure-aggregation`` (Flower's SecAgg+). Each engine runs in a fresh subprocess, one after the
other, so run all of them in one invocation to compare them under the same machine load. One JSON
line per engine: mean seconds and bytes (down + up, every message) per round (rounds 2.., so
start-up and the first shipping of the auxiliary model are excluded), wall seconds, and peak
memory of the whole process tree (the engine's process, Ray's workers, SuperLink, SuperNodes and
their ClientApp processes), sampled every 0.25 s: summed RSS (shared pages counted once per
process) and summed PSS (shared pages split between processes). ``prefix_max_abs_diff``: the
largest difference between this engine's final server prefix and the first engine's (with
``--server-steps 0`` the prefix is the aggregate, so this is what SecAgg+'s quantisation adds up to).
``--json-out FILE`` also writes the lines as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil

CHILD = r"""
import json, sys, time
from pathlib import Path
keys, engine = json.loads(sys.argv[1]), sys.argv[2]
engine, secure = engine.removesuffix("+secagg"), engine.endswith("+secagg")
keys["secure_aggregation"] = secure
t0 = time.perf_counter()
if engine == "loopback":
    from fedsp.runtime.flower.loopback import run_loopback
    out = Path(keys.pop("out"))
    run_loopback(keys, out, out.parent / "loopback-work", nodes=keys["clients"], timeout_s=590)
else:
    from fedsp.config import RunConfig
    config = RunConfig.from_dict({**keys, "engine": engine})
    if engine == "flower":
        from fedsp.runtime.flower.simulation import run
    else:
        from fedsp.runtime.inprocess import run
    out = run(config).out_dir
rounds = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][2:]
import torch
prefix = torch.load(out / "checkpoint.pt", weights_only=False)["server"]["prefix"]
torch.save(prefix, out.parent / "prefix.pt")
per = max(1, len(rounds))
print("RESULT", json.dumps({"seconds_per_round": sum(r["seconds"] for r in rounds) / per,
                            "bytes_per_round": sum(r["bytes_down"] + r["bytes_up"] for r in rounds) / per,
                            "wall_seconds": time.perf_counter() - t0}))
"""


class TreeMemory:
    """Peak summed RSS and PSS (MB) of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.root, self.every_s = psutil.Process(pid), every_s
        self.peak_rss = self.peak_pss = 0.0
        self.processes_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in tree:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                self.processes_seen.add(proc.pid)
            self.peak_rss = max(self.peak_rss, rss / 2**20)
            self.peak_pss = max(self.peak_pss, pss / 2**20)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(
    engine: str, clients: int, per_round: int, rounds: int, server_steps: int | None = None
) -> dict[str, object]:
    out = Path(tempfile.mkdtemp(prefix="fedsp-bench-")) / engine
    keys = {
        "model": "tiny-llama",
        "clients": clients,
        "rounds": rounds,
        "local_steps": 1,
        "kd_steps": 2,
        "eval_limit": 8,
        "val_limit": 8,
        "prefix_len": 4,
        "max_length": 96,
        "eval_every_round": False,
        "zero_shot_eval": False,
        "progress": False,
        "fraction_fit": per_round / clients,
        "out": str(out),
    }
    if server_steps is not None:
        keys["server_steps"] = server_steps
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(keys), engine],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    memory = TreeMemory(proc.pid)
    stdout, stderr = proc.communicate(timeout=600)
    memory.stop()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{engine} failed:\n{stderr[-3000:]}")
    return {
        "engine": engine,
        "clients": clients,
        "per_round": per_round,
        "rounds": rounds,
        **json.loads(lines[-1][len("RESULT ") :]),
        "peak_tree_rss_mb": round(memory.peak_rss, 1),
        "peak_tree_pss_mb": round(memory.peak_pss, 1),
        "processes": len(memory.processes_seen),
        "prefix_file": str(out.parent / "prefix.pt"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="inprocess,flower,loopback")
    parser.add_argument("--server-steps", type=int, help="server tuning steps a round (default: the run's)")
    parser.add_argument("--json-out", help="also write the results as a JSON list to this file")
    args = parser.parse_args()
    import torch

    results: list[dict[str, object]] = []
    first: dict[str, torch.Tensor] | None = None
    for engine in args.engines.split(","):
        result = measure(engine, args.clients, args.per_round, args.rounds, args.server_steps)
        prefix = torch.load(str(result.pop("prefix_file")), weights_only=False)
        first = prefix if first is None else first
        result["prefix_max_abs_diff"] = max(float((prefix[k] - first[k]).abs().max()) for k in first)
        results.append(result)
        print(json.dumps(results[-1]), flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
