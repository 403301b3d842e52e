"""Per-round time and peak memory: in-process vs Flower simulation vs loopback deployment, same run.

    .venv/bin/python bench/flower_overhead.py --clients 3 --per-round 3 --rounds 3   # every engine
    .venv/bin/python bench/flower_overhead.py --method sfprompt --clients 3 --per-round 3 --rounds 3
    .venv/bin/python bench/flower_overhead.py --model smollm2 --method fedsp --rounds 2 --timeout 3000
    .venv/bin/python bench/flower_overhead.py --clients 10 --per-round 10 --engines inprocess,flower
    .venv/bin/python bench/flower_overhead.py --clients 100 --per-round 10 --rounds 3 --engines flower
    .venv/bin/python bench/flower_overhead.py --clients 5 --per-round 5 --server-steps 0 \
        --engines flower,flower+secagg      # SecAgg+'s cost, and its error on the prefix
    .venv/bin/python bench/flower_overhead.py --model smollm2 --clients 1000 --per-round 10 --rounds 3 \
        --engines inprocess,flower --set task=sciq --set local_steps=1 --timeout 3000   # 1,000 owners

Engines: ``inprocess`` (``fedsp run``), ``flower`` (``fedsp run --engine flower``: Ray simulation),
``loopback`` (``scripts/flower_loopback.py``: a SuperLink and one SuperNode per client on 127.0.0.1,
TLS and SuperNode authentication, each SuperNode with a warm worker), ``loopback-cold`` (the same
without warm workers: every message's ClientApp process imports torch and builds the client
itself); ``+secagg`` after an engine's name runs it with
``--secure-aggregation`` (Flower's SecAgg+). Each engine runs in a fresh subprocess, one after the
other, so run all of them in one invocation to compare them under the same machine load. One JSON
line per engine: mean seconds and bytes (down + up, every message, split learning's included) per
round (rounds 2.., so start-up and the first shipping of the auxiliary model are excluded; round 1's
own is ``first_round_seconds``, with Flower's discovery of the nodes in it), wall
seconds, and peak memory of the whole process tree (the engine's process, Ray's workers, SuperLink,
SuperNodes and their ClientApp processes), sampled every 0.25 s: summed RSS (shared pages counted
once per process) and summed PSS (shared pages split between processes). ``prefix_max_abs_diff``:
the largest difference between this engine's final server prefix and the first engine's (with
``--server-steps 0`` the prefix is the aggregate, so this is what SecAgg+'s quantisation adds up
to).
``--model``: ``tiny-llama`` (default) or ``smollm2``, the runs of ``scripts/flower_loopback.py``
(``fedsp.runtime.flower.loopback.RUNS``); ``--method``: any federated method (default fedsp).
For the loopback engine, ``client_process`` is where a ClientApp process's time went, the mean per
message kind over every message of the run (``FEDSP_CLIENT_PROFILE``, see
``fedsp.runtime.flower.client_app.Profile``): before the handler (Python, Flower, the app's loading),
imports, building the client, the work, and the handler in all.
``--set KEY=VALUE`` (repeatable) sets any other run option (``RunConfig`` field, value as JSON or
text), e.g. ``--set aux_embedding=lowrank:128 --set state_moments=bfloat16 --set wire_dtype=int8``.
Disk: the clients' folder (``clients/`` in the results folder, every client's stored client model and
states, both engines) is measured with the memory: ``peak_clients_disk_mb`` its largest total,
``clients_on_disk`` how many client folders it then held, and ``state_bytes_per_client`` the state a
client keeps between rounds (``results.json`` ``client_state``).
``--json-out FILE`` also writes the lines as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil

from fedsp.runtime.flower.client_app import PROFILE_ENV
from fedsp.runtime.flower.loopback import RUNS

CHILD = r"""
import json, sys, time
from pathlib import Path
keys, engine = json.loads(sys.argv[1]), sys.argv[2]
engine, secure = engine.removesuffix("+secagg"), engine.endswith("+secagg")
keys["secure_aggregation"] = secure
t0 = time.perf_counter()
timeout = keys.pop("timeout")
if engine in ("loopback", "loopback-cold"):
    from fedsp.runtime.flower.loopback import WORKER_IDLE_S, run_loopback
    out = Path(keys.pop("out"))
    idle = 0.0 if engine == "loopback-cold" else WORKER_IDLE_S
    run_loopback(keys, out, out.parent / "loopback-work", nodes=keys["clients"], timeout_s=timeout,
                 worker_idle_s=idle)
else:
    from fedsp.config import RunConfig
    config = RunConfig.from_dict({**keys, "engine": engine})
    if engine == "flower":
        from fedsp.runtime.flower.simulation import run
    else:
        from fedsp.runtime.inprocess import run
    out = run(config).out_dir
every = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
rounds = every[2:]
import torch
server = torch.load(out / "checkpoint.pt", weights_only=False)["server"]
prefix = server.get("prefix") or server["state"]  # a prefix (FedSP and its relatives), or prompts + tail
torch.save(prefix, out.parent / "prefix.pt")
per = max(1, len(rounds))
sent = sum(r["bytes_down"] + r["bytes_up"] + r.get("split_bytes", 0) for r in rounds)
state = json.loads((out / "results.json").read_text()).get("client_state") or {}
print("RESULT", json.dumps({"seconds_per_round": sum(r["seconds"] for r in rounds) / per,
                            "first_round_seconds": every[1]["seconds"],
                            "bytes_per_round": sent / per,
                            "state_bytes_per_client": state.get("bytes_per_client"),
                            "wall_seconds": time.perf_counter() - t0}))
"""


def folder_bytes(root: Path) -> tuple[int, int]:
    """Bytes of the files under ``root`` (0 when absent), and how many client folders (``partition-K``,
    at any depth) it holds."""
    total, folders = 0, 0
    if not root.is_dir():
        return 0, 0
    for path, subfolders, files in os.walk(root):
        folders += sum(name.startswith("partition-") for name in subfolders)
        for name in files:
            try:
                total += os.stat(os.path.join(path, name)).st_size
            except OSError:  # written or removed meanwhile
                pass
    return total, folders


class TreeMemory:
    """Peak summed RSS and PSS (MB) of a process and all its descendants, sampled in a thread; with
    ``folder``, the peak size of that folder (MB) and how many folders it then held."""

    def __init__(self, pid: int, every_s: float = 0.25, folder: Path | None = None) -> None:
        self.root, self.every_s, self.folder = psutil.Process(pid), every_s, folder
        self.peak_rss = self.peak_pss = 0.0
        self.peak_disk, self.folders_at_peak = 0.0, 0
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
            if self.folder is not None:
                size, folders = folder_bytes(self.folder)
                if size / 2**20 > self.peak_disk:
                    self.peak_disk, self.folders_at_peak = size / 2**20, folders
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(engine: str, args: argparse.Namespace) -> dict[str, object]:
    out = Path(tempfile.mkdtemp(prefix="fedsp-bench-")) / engine
    keys = {
        **RUNS[args.model],
        "method": args.method,
        "clients": args.clients,
        "rounds": args.rounds,
        "progress": False,
        "fraction_fit": args.per_round / args.clients,
        "out": str(out),
        "timeout": args.timeout,
    }
    if args.server_steps is not None:
        keys["server_steps"] = args.server_steps
    keys.update(args.set)
    profile = out.parent / "client-profile.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(keys), engine],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, PROFILE_ENV: str(profile)},
    )
    memory = TreeMemory(proc.pid, folder=out / "clients")
    stdout, stderr = proc.communicate(timeout=args.timeout + 60)
    memory.stop()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{engine} failed:\n{stderr[-3000:]}")
    result: dict[str, object] = {
        "engine": engine,
        "model": args.model,
        "method": args.method,
        "clients": args.clients,
        "per_round": args.per_round,
        "rounds": args.rounds,
        **json.loads(lines[-1][len("RESULT ") :]),
        "peak_tree_rss_mb": round(memory.peak_rss, 1),
        "peak_tree_pss_mb": round(memory.peak_pss, 1),
        "processes": len(memory.processes_seen),
        "peak_clients_disk_mb": round(memory.peak_disk, 1),
        "clients_on_disk": memory.folders_at_peak,
        "options": {k: v for k, v in keys.items() if k not in ("out", "timeout")},
        "prefix_file": str(out.parent / "prefix.pt"),
    }
    if engine.startswith("loopback") and profile.is_file():
        result["client_process"] = client_process(profile)
    return result


def client_process(profile: Path) -> dict[str, dict[str, float]]:
    """Mean seconds per phase of the ClientApp processes, by message kind, and how many messages."""
    records = [json.loads(line) for line in profile.read_text().splitlines() if line.strip()]
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({r["kind"] for r in records}):
        mine = [r for r in records if r["kind"] == kind]
        phases = [k for k in mine[0] if k.endswith("_s")]
        out[kind] = {
            "messages": len(mine),
            **{k: round(sum(r[k] for r in mine) / len(mine), 2) for k in phases},
        }
    return out


def run_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (KEY, VALUE as JSON, else as text)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="inprocess,flower,loopback,loopback-cold")
    parser.add_argument("--server-steps", type=int, help="server tuning steps a round (default: the run's)")
    parser.add_argument("--model", choices=sorted(RUNS), default="tiny-llama", help="the run (default tiny)")
    parser.add_argument("--method", default="fedsp", help="a federated method (default fedsp)")
    parser.add_argument("--timeout", type=float, default=590.0, help="seconds per engine (default 590)")
    parser.add_argument("--json-out", help="also write the results as a JSON list to this file")
    parser.add_argument(
        "--set",
        action="append",
        type=run_option,
        default=[],
        metavar="KEY=VALUE",
        help="any other run option (a RunConfig field), repeatable",
    )
    args = parser.parse_args()
    import torch

    results: list[dict[str, object]] = []
    first: dict[str, torch.Tensor] | None = None
    for engine in args.engines.split(","):
        result = measure(engine, args)
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
