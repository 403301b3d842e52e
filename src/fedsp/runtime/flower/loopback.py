"""A real Flower deployment on this machine: a SuperLink and K SuperNodes over TLS, SuperNodes authenticated.

:func:`run_loopback` (``scripts/flower_loopback.py`` on the command line) does, within one time bound:
  1. write into a throwaway work folder: a CA and the SuperLink's certificate (or check given ones),
     one key pair per SuperNode, the Flower app folder, and a Flower home whose ``config.toml``
     names the SuperLink (connection ``loopback``: address and CA);
  2. start ``flower-superlink`` (TLS, ``--enable-supernode-auth``) on a free port of 127.0.0.1;
  3. register every SuperNode's public key (``flwr supernode register``);
  4. check with a TLS handshake that the SuperLink answers with a certificate the CA vouches for,
     start K ``flower-supernode`` s (partition ``k`` of K, own state folder, own private key, own
     data folder if given, a warm worker, cores / K torch threads) and wait until each one says it
     connected;
  5. ``flwr run`` the app with the fedsp run keys, and wait for the results folder;
  6. stop every process it started, helpers included (:class:`~.processes.Processes`).
Every failure it can name is one :class:`~fedsp.errors.FedSPError` line: a TLS file missing or not
matching, a SuperLink that does not listen or whose certificate the CA does not verify, a SuperNode
that is refused (key not registered) or cannot reach the SuperLink, a run that ends without results;
with Flower's own error lines from the process's log.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedsp.errors import FedSPError
from fedsp.runtime.flower import FLOWER_ENV, worker
from fedsp.runtime.flower.pki import (
    Certificates,
    check_certificates,
    make_certificates,
    make_node_key,
    probe_superlink,
)
from fedsp.runtime.flower.processes import Processes, error_lines, log_tail, wait_until

WORKER_IDLE_S = 300.0  # each SuperNode keeps a warm worker, stopped after 5 idle minutes (0: none)
CONNECTION = "loopback"  # the SuperLink connection's name in $FLWR_HOME/config.toml
CONNECTED = "SuperNode ID:"  # what flower-supernode logs once the SuperLink accepted it
REFUSED = "Failed to activate SuperNode"  # ... and what it logs when the SuperLink refuses its key
# A tiny-llama run that downloads nothing (the configuration of bench/flower_overhead.py)
TINY_RUN: dict[str, object] = {
    "model": "tiny-llama",
    "rounds": 2,
    "local_steps": 1,
    "kd_steps": 2,
    "eval_limit": 8,
    "val_limit": 8,
    "prefix_len": 4,
    "max_length": 96,
    "eval_every_round": False,
    "zero_shot_eval": False,
}

# The real model at the default CPU scale, for 2 rounds (``scripts/flower_loopback.py --model smollm2``):
# the configuration the README's deployment figures and bench/flower_overhead.py --model smollm2 use
SMOLLM2_RUN: dict[str, object] = {
    "model": "smollm2",
    "rounds": 2,
    "eval_every_round": False,
    "zero_shot_eval": False,
}
RUNS = {"tiny-llama": TINY_RUN, "smollm2": SMOLLM2_RUN}

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedsp-app"
version = "0.1.0"
description = "FedSP on Flower: the fedsp package (installed on every machine) as a Flower app"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fedsp"

[tool.flwr.app.components]
serverapp = "fedsp.runtime.flower.server_app:app"
clientapp = "fedsp.runtime.flower.client_app:app"

[tool.flwr.app.config]
config = ""          # path on the server of a fedsp run-keys file (TOML/YAML/JSON, as fedsp run --config)
out = ""             # results folder on the server ("": runs/<method>-<task>-<time>)
resume = ""          # a results folder to continue
wait-seconds = 120   # how long the server waits for every partition's SuperNode to connect
"""


def write_app(folder: Path) -> Path:
    """The Flower app folder (only a ``pyproject.toml``: the components live in the installed package)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class LoopbackResult:
    """What a finished loopback run left: the results folder and what the run recorded."""

    out_dir: Path
    rounds: int  # rounds completed
    replies: list[int]  # accepted client updates per round
    seconds_per_round: list[float]
    startup_seconds: float  # SuperLink + registration + SuperNodes connected
    wall_seconds: float
    stopped_pids: list[int]  # processes still running at the end, then stopped


class Loopback:
    """One deployment on 127.0.0.1 in ``work``; a context manager that stops every process it started.

    The steps are methods so that a caller (or a test) can stop after any of them; every wait is
    bounded by ``connect_s`` and by the overall ``timeout_s`` counted from construction.
    """

    def __init__(
        self,
        work: Path,
        nodes: int = 3,
        timeout_s: float = 240.0,
        connect_s: float = 60.0,
        certificates: Certificates | None = None,
        data_dirs: list[Path] | None = None,
        worker_idle_s: float = WORKER_IDLE_S,
    ) -> None:
        if nodes < 1:
            raise FedSPError(f"a deployment needs at least one SuperNode, got {nodes}")
        if data_dirs is not None and len(data_dirs) != nodes:
            raise FedSPError(f"{len(data_dirs)} data folders for {nodes} SuperNodes: give one per SuperNode")
        for folder in data_dirs or []:
            if not (Path(folder) / "train.jsonl").is_file():
                raise FedSPError(f"data folder {str(folder)!r} has no train.jsonl")
        self.data_dirs = [Path(d).resolve() for d in data_dirs] if data_dirs else None
        self.worker_idle_s = worker_idle_s
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.timeout_s, self.connect_s = timeout_s, connect_s
        self.work, self.nodes, self.host = work.resolve(), nodes, "127.0.0.1"
        self.certs = (
            check_certificates(certificates) if certificates else make_certificates(self.work / "tls")
        )
        self.keys = [make_node_key(self.work / "keys", f"node-{k}") for k in range(nodes)]
        self.port = free_port(self.host)
        self.home = self.work / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": CONNECTION,
                        CONNECTION: {"address": self.address, "root-certificates": str(self.certs.ca)},
                    }
                }
            )
        )
        self.app = write_app(self.work / "app")
        self.processes = Processes(self._environment(), self.work / "logs")
        self.node_ids: dict[int, int] = {}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        bin_dir = str(Path(sys.executable).parent)  # flower-superlink starts flower-superexec by name
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        return env

    def _tool(self, name: str) -> str:
        path = Path(sys.executable).parent / name
        return str(path) if path.exists() else (shutil.which(name) or name)

    def _bound(self, step_s: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FedSPError(f"the loopback deployment did not finish within {self.timeout_s:.0f} s")
        return min(step_s, left)

    # 2) the SuperLink
    def start_superlink(self) -> None:
        proc = self.processes.start(
            "superlink",
            [
                self._tool("flower-superlink"),
                "--ssl-ca-certfile",
                str(self.certs.ca),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
                "--enable-supernode-auth",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )
        bound = self._bound(self.connect_s)
        if not wait_until(lambda: proc.poll() is not None or _listening(self.host, self.port), bound):
            raise FedSPError(
                f"the SuperLink did not listen on {self.address} within {bound:.0f} s; "
                f"its log ends: {log_tail(self.processes.log('superlink'))}"
            )
        if proc.poll() is not None:
            raise FedSPError(
                f"the SuperLink exited with code {proc.returncode}; "
                f"its log says: {error_lines(self.processes.log('superlink'))}"
            )

    # 3) SuperNode authentication: the SuperLink accepts the registered public keys only
    def register(self, which: list[int] | None = None) -> dict[int, int]:
        """Register the public keys of SuperNodes ``which`` (default: all); {node index: Flower node id}."""
        which = list(range(self.nodes)) if which is None else which
        probe_superlink(self.address, self.certs.ca)
        procs = {
            k: self.processes.start(
                f"register-{k}",
                [
                    self._tool("flwr"),
                    "supernode",
                    "register",
                    str(self.keys[k][1]),
                    CONNECTION,
                    "--format",
                    "json",
                ],
            )
            for k in which
        }
        bound = self._bound(self.connect_s)
        for k, proc in procs.items():
            if not wait_until(lambda p=proc: p.poll() is not None, bound):
                raise FedSPError(f"registering SuperNode {k}'s key took more than {bound:.0f} s")
            log = self.processes.log(f"register-{k}")
            reply = _json_in(log.read_text(errors="replace"))
            if proc.returncode != 0 or not reply.get("success"):
                raise FedSPError(
                    f"the SuperLink at {self.address} did not register SuperNode {k}'s key: "
                    f"{log_tail(log, lines=1)}"
                )
            self.node_ids[k] = int(str(reply["node-id"]))
        return dict(self.node_ids)

    # 4) the SuperNodes: partition k of K, their own state folder and private key
    def start_supernodes(self, superlink: str | None = None) -> None:
        """Start every SuperNode and wait until each is connected (``superlink``: another address to try)."""
        target = superlink or self.address
        probe_superlink(target, self.certs.ca)  # unreachable, or a certificate the SuperNodes would refuse
        # the nodes share this machine's cores (as the simulation's Ray actors do, one core each): torch's
        # default of one thread per core in every node would oversubscribe them several times over
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.nodes))}
        procs = {}
        for k in range(self.nodes):
            state = self.work / "nodes" / f"node-{k}"
            node_config = f'partition-id={k} num-partitions={self.nodes} state-dir="{state}"'
            if self.worker_idle_s > 0:  # a warm worker per node (fedsp.runtime.flower.worker)
                node_config += f" {worker.SETTING}={self.worker_idle_s:g}"
            if self.data_dirs:
                node_config += f' data-dir="{self.data_dirs[k]}"'
            procs[k] = self.processes.start(
                f"supernode-{k}",
                [
                    self._tool("flower-supernode"),
                    "--superlink",
                    target,
                    "--root-certificates",
                    str(self.certs.ca),
                    "--auth-supernode-private-key",
                    str(self.keys[k][0]),
                    "--host",
                    self.host,
                    "--port",
                    str(free_port(self.host)),
                    "--node-config",
                    node_config,
                ],
                env=threads,
            )
        bound = self._bound(self.connect_s)
        until = time.monotonic() + bound  # one bound for all of them: they connect in parallel
        for k, proc in procs.items():
            log = self.processes.log(f"supernode-{k}")

            def settled(p=proc, log=log) -> bool:  # noqa: ANN001
                return p.poll() is not None or CONNECTED in log.read_text(errors="replace")

            connected = wait_until(settled, max(0.0, until - time.monotonic()))
            text = log.read_text(errors="replace")
            if proc.poll() is not None and CONNECTED not in text:
                why = (
                    "the SuperLink refused its key (is it registered? flwr supernode register)"
                    if REFUSED in text
                    else f"it exited with code {proc.returncode}"
                )
                raise FedSPError(
                    f"SuperNode {k} could not join the SuperLink at {target}: {why}; "
                    f"its log says: {error_lines(log)}"
                )
            if not connected:
                raise FedSPError(
                    f"SuperNode {k} did not connect to the SuperLink at {target} within "
                    f"{bound:.0f} s (is the SuperLink running there, with a certificate "
                    f"from {self.certs.ca.name}?); its log ends: {log_tail(log)}"
                )

    # 5) the run
    def run_app(self, run_keys: dict[str, object], out: Path) -> LoopbackResult:
        """``flwr run`` the app with ``run_keys`` (fedsp run keys; ``clients`` = the SuperNodes)."""
        clients = int(run_keys.get("clients", self.nodes))  # type: ignore[call-overload]
        if clients != self.nodes:
            raise FedSPError(f"the run has {clients} clients but the deployment {self.nodes} SuperNodes")
        startup = time.monotonic() - self.started
        out = out.resolve()
        run_file = self.work / "run.json"
        run_file.write_text(json.dumps({**run_keys, "clients": self.nodes, "progress": False}))
        settings = self.work / "run-config.toml"
        settings.write_text(
            tomli_w.dumps({"config": str(run_file), "out": str(out), "wait-seconds": int(self.connect_s)})
        )
        proc = self.processes.start(
            "flwr-run",
            [self._tool("flwr"), "run", str(self.app), CONNECTION, "--stream", "--run-config", str(settings)],
        )
        bound = self._bound(self.timeout_s)
        if not wait_until(lambda: proc.poll() is not None, bound, poll_s=0.5):
            raise FedSPError(
                f"the run did not finish within the deployment's {self.timeout_s:.0f} s; "
                f"the last round logged: {log_tail(self.processes.log('flwr-run'), lines=1)}"
            )
        if not (out / "results.json").is_file():
            raise FedSPError(
                f"the run ended without results in {out}: {_error_line(self.processes.log('flwr-run'))}"
            )
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
        return LoopbackResult(
            out,
            len(metrics),
            [int(m["num_clients"]) for m in metrics],
            [float(m["seconds"]) for m in metrics],
            startup,
            time.monotonic() - self.started,
            [],
        )

    def stop(self) -> list[int]:
        return self.processes.stop()

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_loopback(
    run_keys: dict[str, object],
    out: Path,
    work: Path,
    nodes: int = 3,
    timeout_s: float = 240.0,
    connect_s: float = 60.0,
    certificates: Certificates | None = None,
    data_dirs: list[Path] | None = None,
    worker_idle_s: float = WORKER_IDLE_S,
) -> LoopbackResult:
    """Steps 1-6 of the module docstring; every process started is stopped before this returns."""
    with Loopback(work, nodes, timeout_s, connect_s, certificates, data_dirs, worker_idle_s) as deployment:
        try:
            deployment.start_superlink()
            deployment.register()
            deployment.start_supernodes()
            result = deployment.run_app(run_keys, out)
        finally:
            stopped = deployment.stop()
    return LoopbackResult(**{**result.__dict__, "stopped_pids": stopped})


def _json_in(text: str) -> dict[str, object]:
    start = text.find("{")
    try:
        value = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _error_line(log: Path) -> str:
    lines = [line for line in log_tail(log, lines=200, width=100_000).split(" | ") if "Error" in line]
    return (lines[-1] if lines else log_tail(log, lines=2))[:400]
