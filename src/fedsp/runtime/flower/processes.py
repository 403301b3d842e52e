"""The processes of one local deployment: started with logs, found again by a token, stopped together.

Flower's daemons start helpers in sessions of their own (``flower-superexec``, then a fresh
``flwr-serverapp`` / ``flwr-clientapp`` per run or message), so killing the process groups we
started is not enough, and a helper whose parent died is re-parented out of our tree. Every process
started here carries a random token in its environment (``FEDSP_DEPLOYMENT_TOKEN``), which all its
descendants inherit: :meth:`Processes.stop` ends every live process that carries the token
(SIGTERM, then SIGKILL after a grace period) and reaps the ones we started. On Linux each started
process also gets SIGTERM if the Python process that started it dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

TOKEN_VAR = "FEDSP_DEPLOYMENT_TOKEN"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def carrying(token: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose environment holds ``TOKEN_VAR=token``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if proc.environ().get(TOKEN_VAR) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def log_tail(path: Path, lines: int = 3, width: int = 400) -> str:
    """The last ``lines`` non-empty lines of a log, colour codes removed, on one line."""
    if not path.is_file():
        return "(no log)"
    text = _ANSI.sub("", path.read_text(errors="replace"))
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return (" | ".join(kept) or "(empty log)")[-width:]


def error_lines(path: Path, width: int = 400) -> str:
    """Flower's last error block in a log (from an ``ERROR`` line to the link to the docs), on one line."""
    if not path.is_file():
        return "(no log)"
    lines = [line.strip() for line in _ANSI.sub("", path.read_text(errors="replace")).splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("ERROR")]
    if not starts:
        return log_tail(path, width=width)
    first = starts[-1]  # the block may hold several ERROR lines: go back to its first
    for i in range(first - 1, -1, -1):
        if not lines[i] or lines[i].startswith(("INFO", "WARNING")):
            break
        first = i if lines[i].startswith("ERROR") else first
    block = []
    for line in lines[first:]:
        if not line or line.startswith(("For more information", "INFO")):
            break
        block.append(line.removeprefix("ERROR :").strip())
    return " | ".join(part for part in block if part)[:width]


class Processes:
    """Processes started for one deployment; use as a context manager so that all of them stop."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.token = secrets.token_hex(8)
        self.env = {**env, TOKEN_VAR: self.token}
        self.logs = logs
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(
        self, name: str, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a session of its own, stdout and stderr to ``<logs>/<name>.log`` (``env``:
        variables to add to the deployment's)."""
        with self.log(name).open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.started[name] = proc
        return proc

    def alive(self) -> list[psutil.Process]:
        """Every live process of this deployment (started here, or a descendant of one)."""
        return carrying(self.token)

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """End every process of the deployment; returns the pids that were still running."""
        running = {p.pid: p for p in self.alive()}
        for proc in self.started.values():  # whole groups first: helpers that did not inherit the env
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        for proc in running.values():
            _signal(proc, signal.SIGTERM)
        _, survivors = psutil.wait_procs(list(running.values()), timeout=grace_s)
        for proc in survivors + self.alive():
            _signal(proc, signal.SIGKILL)
        for proc in self.started.values():
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        psutil.wait_procs(self.alive(), timeout=grace_s)
        return sorted(running)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(condition, timeout_s: float, poll_s: float = 0.2) -> bool:  # noqa: ANN001
    """Poll ``condition()`` until it is true (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
