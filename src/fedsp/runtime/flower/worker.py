"""A SuperNode's warm worker: one long-lived process that does the node's jobs, so a message's fresh
``flwr-clientapp`` process does not import torch and the model code each time.

Flower 1.42 starts a fresh ClientApp process for every message. With the node setting
``worker-idle-seconds=N`` (``--node-config``), the ClientApp's handler hands its job
(:class:`~fedsp.runtime.flower.jobs.Job`: the order or split message, the node's settings, the
payloads) to this node's worker and returns its reply; the worker runs exactly the code the handler
would (:func:`~fedsp.runtime.flower.jobs.work`), with torch, the tokenizer and the encoded rows
already in memory. Nothing of a client lives only in the worker: its state is in the node's store
between messages, as without it.

- One worker per node (its state folder and partition), listening on a Unix socket in a folder only
  this user can open (``$TMPDIR/fedsp-workers-<uid>``), behind a random key
  (:mod:`multiprocessing.connection`'s challenge); the first message starts it.
- It stops after N seconds without a job, when the process that started its first caller (the
  SuperNode's) is gone, on SIGTERM, or when asked (:func:`stop`), and removes its socket and key.
- A worker that cannot be started or reached, or dies during a job, costs nothing but time: the
  handler does the job itself, and says so in the node's log.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import pickle
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsp.runtime.flower.jobs import Done, Job

log = logging.getLogger("fedsp.flower.worker")
SETTING = "worker-idle-seconds"  # node setting: keep a warm worker, stopped after this many idle seconds
START_S = 60.0  # how long a handler waits for a new worker to listen
STOP = "stop"  # what a caller sends instead of a job to end the worker


def idle_seconds(node_config: Mapping[str, Any]) -> float:
    """The node's ``worker-idle-seconds`` (0: no worker), checked."""
    value = node_config.get(SETTING, 0)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0:
        from fedsp.errors import FedSPError

        raise FedSPError(f"node setting {SETTING}={value!r}: expected seconds >= 0 (0: no warm worker)")
    return seconds


def home() -> Path:
    """The folder of this user's workers' sockets and keys (mode 0700)."""
    folder = Path(tempfile.gettempdir()) / f"fedsp-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()  # not a link to someone else's folder
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder} is not this user's private folder")
    return folder


def address(node_config: Mapping[str, Any]) -> Path:
    """The socket of this node's worker: one per state folder and partition (short: sockets have a
    length limit)."""
    from fedsp.version import __version__

    # a new fedsp (version or files) gets a new worker; the old one idles out
    code = (Path(__file__).stat().st_mtime_ns, __version__)
    key = f"{os.path.abspath(str(node_config.get('state-dir', '')))}|{node_config.get('partition-id')}|{code}"
    return home() / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.sock"


def ask(job: Job) -> Done | None:
    """The job done by the node's worker (started if need be); None when the node keeps none or it
    could not be used (the caller then does the job itself)."""
    idle = idle_seconds(job.node_config)
    if idle <= 0:
        return None
    try:
        path = address(job.node_config)
        with _connect(path, idle) as conn:
            conn.send(job)
            kind, value = conn.recv()  # ('done', Done) or ('error', the exception the job raised)
    except (OSError, EOFError, ValueError, TypeError, AuthenticationError) as err:  # none, or it died
        log.warning("fedsp: the node's warm worker could not do this job (%s); doing it here", err)
        return None
    if kind == "error":  # the job itself failed in the worker: fail here as the handler would have
        raise value
    return value


def stop(node_config: Mapping[str, Any]) -> int | None:
    """Stop the node's worker now; its process id (None: it had none running)."""
    path = address(node_config)
    try:
        with Client(str(path), "AF_UNIX", authkey=_key_file(path).read_bytes()) as conn:
            conn.send(STOP)
            return int(conn.recv()[1])
    except (OSError, EOFError, AuthenticationError):
        return None


def _key_file(path: Path) -> Path:
    return path.with_suffix(".key")


def _connect(path: Path, idle: float) -> Connection:
    """A connection to the worker at ``path``, starting it (once, under a lock) if none answers."""
    try:
        return Client(str(path), "AF_UNIX", authkey=_key_file(path).read_bytes())
    except (OSError, EOFError, AuthenticationError):
        pass
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per node; the others wait and connect
        try:
            return Client(str(path), "AF_UNIX", authkey=_key_file(path).read_bytes())
        except (OSError, EOFError, AuthenticationError):
            pass
        path.unlink(missing_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(_key_file(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        parent = os.getppid()  # the SuperNode's process (or its SuperExec): the worker ends with it
        with open(path.with_suffix(".log"), "ab") as logfile:
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(path), str(idle), str(parent)],
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_S
        while True:
            try:
                return Client(str(path), "AF_UNIX", authkey=key)
            except (OSError, EOFError, AuthenticationError):
                if proc.poll() is not None:  # it could not start: its log says why
                    raise OSError(f"the worker exited at start (see {path.with_suffix('.log')})") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def serve(path: Path, idle: float, parent: int) -> None:
    """The worker: jobs one at a time until ``idle`` seconds pass without one or ``parent`` is gone."""
    key = _key_file(path).read_bytes()
    listener = Listener(str(path), "AF_UNIX", authkey=key)
    last = [time.monotonic()]

    def leave(*_: object, told: Connection | None = None) -> None:
        for name in (path, _key_file(path)):  # (the lock file stays: a starter may hold it)
            name.unlink(missing_ok=True)
        logfile = path.with_suffix(".log")
        if logfile.is_file() and not logfile.stat().st_size:
            logfile.unlink()
        if told is not None:  # whoever asked learns it is gone (its files are)
            told.send(("stopped", os.getpid()))
        os._exit(0)

    def watch() -> None:  # a thread: the accept below has no timeout of its own
        while True:
            time.sleep(1.0)
            if not _alive(parent) or time.monotonic() - last[0] > idle:
                leave()

    signal.signal(signal.SIGTERM, leave)
    threading.Thread(target=watch, daemon=True).start()
    from fedsp.runtime.flower.client_side import tokenizer_for  # noqa: F401  (imports torch, models)
    from fedsp.runtime.flower.jobs import work

    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError):  # a caller without the key, or one that left
            continue
        with conn:
            last[0] = float("inf")  # busy: never idle during a job
            try:
                job = conn.recv()
                if job == STOP:
                    leave(told=conn)
                try:
                    answer: tuple[str, Any] = ("done", work(job))
                except Exception as err:  # the job's own failure goes back to its caller
                    answer = ("error", err)
                conn.send(answer)
            except (OSError, EOFError, AuthenticationError, pickle.PicklingError, TypeError):
                pass  # the caller left, or the answer does not travel: the caller does the job itself
            gc.collect()  # clients hold reference cycles (optimisers, modules): freed job by job
            last[0] = time.monotonic()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
