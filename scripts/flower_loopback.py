"""FedSP deployed on Flower on this machine: one SuperLink, K SuperNodes, TLS and SuperNode authentication.

    .venv/bin/python scripts/flower_loopback.py                      # tiny model, 3 SuperNodes, 2 rounds
    .venv/bin/python scripts/flower_loopback.py --method sfprompt    # split learning across the nodes
    .venv/bin/python scripts/flower_loopback.py --model smollm2 --method sfprompt --timeout 1800
    .venv/bin/python scripts/flower_loopback.py --config run.toml --nodes 3 --out runs/deployed
    .venv/bin/python scripts/flower_loopback.py --ca-cert ca.crt --server-cert server.pem \
        --server-key server.key
    .venv/bin/python scripts/flower_loopback.py --data-dir owner0 --data-dir owner1 --data-dir owner2
    .venv/bin/python scripts/flower_loopback.py --write-app ./fedsp-app   # only write the Flower app folder

Makes a throwaway CA, server certificate and SuperNode keys (unless given), starts the SuperLink and
the SuperNodes (each with its partition and, given ``--data-dir``, its own data folder holding a
``train.jsonl``), registers their keys, runs the app, and stops every process it started (also on
Ctrl-C, SIGTERM and the --timeout). Prints the results folder and seconds per round; ``--json``
prints one JSON line instead. Errors are one line (exit status 2). Steps:
``fedsp.runtime.flower.loopback``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from fedsp.config import load_config_file
from fedsp.errors import FedSPError
from fedsp.runtime.flower import configure_environment
from fedsp.runtime.flower.loopback import RUNS, WORKER_IDLE_S, run_loopback, write_app
from fedsp.runtime.flower.pki import Certificates


def _stop_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_loopback's clean-up like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (= clients of the run)")
    parser.add_argument("--rounds", type=int, help="rounds (default: the config's, else 2)")
    parser.add_argument("--config", help="fedsp run keys (TOML/YAML/JSON); default: --model's run")
    parser.add_argument(
        "--model",
        choices=sorted(RUNS),
        default="tiny-llama",
        help="without --config: tiny-llama (a small run that downloads nothing) or smollm2 (the default "
        "CPU-scale run of the real model)",
    )
    parser.add_argument("--method", help="the run's method (fedsp, sfprompt, ...; default: the config's)")
    parser.add_argument("--out", help="results folder (default: runs/flower-loopback-<time>)")
    parser.add_argument(
        "--work", help="folder for certificates, keys, logs (default: a temp folder, removed)"
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for everything (default 240)")
    parser.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to start and connect")
    parser.add_argument("--ca-cert", help="use this CA certificate (with --server-cert, --server-key)")
    parser.add_argument("--server-cert", help="the SuperLink's certificate, valid for 127.0.0.1")
    parser.add_argument("--server-key", help="the SuperLink's private key")
    parser.add_argument(
        "--data-dir",
        action="append",
        metavar="DIR",
        help="a data owner's folder with train.jsonl; once per SuperNode (default: bundled shards)",
    )
    parser.add_argument(
        "--worker-idle-seconds",
        type=float,
        default=WORKER_IDLE_S,
        help="each SuperNode keeps a warm worker that does its jobs, stopped after this many idle "
        f"seconds (default {WORKER_IDLE_S:g}; 0: none, every message's process does its own job)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--write-app", metavar="DIR", help="only write the Flower app folder to DIR")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if args.write_app:
        print(write_app(Path(args.write_app)) / "pyproject.toml")
        return 0
    home = configure_environment()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="loopback-", dir=_mkdir(home)))
    try:
        given = (args.ca_cert, args.server_cert, args.server_key)
        if any(given) and not all(given):
            raise FedSPError("--ca-cert, --server-cert and --server-key go together")
        certs = Certificates(*map(Path, given)) if all(given) else None
        run_keys = load_config_file(args.config) if args.config else dict(RUNS[args.model])
        run_keys["rounds"] = args.rounds or run_keys.get("rounds", 2)
        if args.method:
            run_keys["method"] = args.method
        out = Path(args.out or f"runs/flower-loopback-{time.strftime('%Y%m%d-%H%M%S')}")
        data_dirs = [Path(d) for d in args.data_dir] if args.data_dir else None
        result = run_loopback(
            run_keys,
            out,
            work,
            args.nodes,
            args.timeout,
            args.connect_timeout,
            certs,
            data_dirs,
            args.worker_idle_seconds,
        )
    except FedSPError as err:
        print(f"flower_loopback: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flower_loopback: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({**result.__dict__, "out_dir": str(result.out_dir)}))
    else:
        rounds = ", ".join(f"{s:.1f}" for s in result.seconds_per_round)
        print(
            f"done: {result.rounds} rounds, clients per round {result.replies}, "
            f"seconds per round [{rounds}], "
            f"start-up {result.startup_seconds:.1f} s, wall {result.wall_seconds:.1f} s; "
            f"results in {result.out_dir}"
        )
    return 0


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
