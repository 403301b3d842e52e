"""The results folder of a run: config.json, metrics.jsonl, results.json, curves.png.

A run always writes into a new folder. Without ``--out`` the folder is
``runs/<method>-<task>-<timestamp>`` (a numeric suffix is added if that name
exists); an ``--out`` that already exists is refused, so nothing is overwritten.
Files are written atomically (temp file + rename); metrics are appended and
flushed per round, so an interrupted run keeps every completed round.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from fedsp.errors import FedSPError
from fedsp.files import atomic_write, io_reason


def create_run_dir(out: str | None, method: str, task: str, root: str | Path = "runs") -> Path:
    """A new results folder (``out``, or a fresh ``runs/<method>-<task>-<time>``); never an existing one."""
    if out is not None:
        path = Path(out)
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            raise FedSPError(
                f"--out folder {str(path)!r} already exists; choose a new folder (nothing was changed)"
            ) from None
        except OSError as err:
            raise FedSPError(f"--out folder {str(path)!r} cannot be created: {io_reason(err)}") from None
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{method}-{task}-{stamp}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as err:
            raise FedSPError(f"results folder {str(path)!r} cannot be created: {io_reason(err)}") from None


class RunLock:
    """An exclusive lock on a results folder, held while a process runs in it (``.lock`` holds its PID).

    A second run, or ``--resume``, on a folder whose run is alive is refused, naming that PID. The lock
    is the kernel's (``flock``): it goes with the process, even one killed with SIGKILL. Released, the
    file is removed (a finished or failed run leaves no ``.lock``): it is unlinked while still locked, and
    a taker checks that the file it locked is still the one at the path, so two processes never both
    hold a folder through an old and a new file.
    """

    NAME = ".lock"

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / self.NAME
        while True:
            self.handle = self.path.open("a+")
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.handle.seek(0)
                pid = self.handle.read().strip() or "unknown"
                self.handle.close()
                raise FedSPError(
                    f"results folder {str(folder)!r} is in use by a running fedsp process (PID {pid}); "
                    "wait for it to finish or stop it first"
                ) from None
            if self._still_at_path():
                break
            self.handle.close()  # its holder removed it as we took it: take the new one
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()

    def _still_at_path(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if not self.handle.closed:
            self.path.unlink(missing_ok=True)  # still locked: whoever opened it meanwhile retries
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def stopped_by_disk(err: OSError, folder: str | None, completed: int) -> FedSPError:
    """The one line for a run stopped by its disk: the file, what it holds, the reason, what is kept."""
    path = str(err.filename) if err.filename else "a file"
    kept = (
        f"rounds 1-{completed} are kept: once the disk is fixed, fedsp run --resume {folder} continues"
        if folder is not None and completed > 0
        else "no round had completed, so nothing was kept"
    )
    return FedSPError(f"cannot write {path} ({file_role(Path(path))}): {io_reason(err)}; {kept}")


def file_role(path: Path) -> str:
    """What a file of a results folder holds, in a few words (for an error about writing it)."""
    client = re.fullmatch(r"partition-(\d+)", path.parent.name)
    if client is not None:
        held = {"state": "state after round {}", "turn": "split round {} in progress"}
        found = re.fullmatch(r"(state|turn)-(\d+)\.pt", path.name)
        what = held[found.group(1)].format(found.group(2)) if found else "model"
        return f"client {client.group(1)}'s {what}, kept in the results folder by this run's engine"
    roles = {
        "checkpoint.pt": "the checkpoint of the last round",
        "metrics.jsonl": "the rounds' metrics",
        "results.json": "the results",
        "config.json": "the configuration",
        "prefix.safetensors": "the best prefix",
        "curves.png": "the curves' plot",
        "audit.json": "the audit of what was sent",
    }
    if path.name in roles:
        return roles[path.name]
    return "the PEFT adapter" if path.parent.name.startswith((".adapter", "adapter")) else "a file of the run"


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON through a uniquely named temporary file in the same folder, then rename."""
    atomic_write(path, (json.dumps(_clean(data), indent=2) + "\n").encode())


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(_clean(record)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(
    metrics: list[dict[str, Any]],
    zero_shot: tuple[str, float] | None,
    path: Path,
    title: str,
    chance: float | None = None,
) -> None:
    """Validation loss and the evaluation figures (accuracy, or EM / F1 / ROUGE-L) per round, side by side.

    ``zero_shot``: the untrained model's headline figure (name, value), drawn as a line; ``chance``: the
    accuracy (%) of a random guess, drawn as a dotted line. Every score is labelled with its value, and
    the score axis spans at least 20 points (:func:`fedsp.plotting.percent_limits`).
    """
    import matplotlib

    from fedsp.plotting import label_points, percent_limits

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [m["round"] for m in metrics]
    gains = [m for m in metrics if m.get("clients_gain") is not None]
    fig, axes = plt.subplots(1, 3 if gains else 2, figsize=(15 if gains else 10, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    if gains:  # what each half of a round did to the validation loss (positive: it went down)
        _plot_gains(axes[2], gains)
    ax_loss.plot(rounds, [m.get("val_loss") for m in metrics], marker="o", label="server validation loss")
    ax_loss.plot(
        rounds, [m.get("server_loss") for m in metrics], marker=".", alpha=0.6, label="server training loss"
    )
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("answer-token loss")
    ax_loss.legend()
    generative = any(m.get("f1") is not None for m in metrics) or (
        zero_shot is not None and zero_shot[0] != "acc"
    )
    names = ("exact_match", "f1", "rouge_l") if generative else ("acc", "acc_norm")
    shown: list[float] = []
    for i, (name, marker) in enumerate(zip(names, "os^", strict=False)):
        with_figure = [m for m in metrics if m.get(name) is not None]
        if with_figure:
            xs, ys = [m["round"] for m in with_figure], [100 * m[name] for m in with_figure]
            ax_acc.plot(xs, ys, marker=marker, label=name, color=f"C{i}")
            if i == 0:  # the headline figure's values; the others would pile onto it
                label_points(ax_acc, xs, ys, colour="C0")
            shown += ys
    if zero_shot is not None:
        shown.append(100 * zero_shot[1])
        ax_acc.axhline(
            100 * zero_shot[1],
            color="grey",
            linestyle="--",
            label=f"zero-shot {zero_shot[0]} {100 * zero_shot[1]:.1f}",
        )
    if chance is not None and not generative:
        shown.append(chance)
        ax_acc.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"chance {chance:g}")
    if shown:
        ax_acc.set_ylim(*percent_limits(shown))
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("score (%)" if generative else "accuracy (%)")
    if ax_acc.lines:
        ax_acc.legend()
    else:  # the run evaluated only its final prefix (eval_every_round off, no zero-shot evaluation)
        ax_acc.text(
            0.5,
            0.5,
            "evaluated once, at the end:\nsee results.json",
            ha="center",
            va="center",
            transform=ax_acc.transAxes,
        )
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_gains(ax: Any, rounds: list[dict[str, Any]]) -> None:
    """Bars per round: how much the clients' aggregate and the server's own step each lowered the server's
    validation loss (``clients_gain``, ``server_gain`` of metrics.jsonl)."""
    xs = [m["round"] for m in rounds]
    width = 0.4
    clients, server = [m["clients_gain"] for m in rounds], [m["server_gain"] for m in rounds]
    ax.bar([x - width / 2 for x in xs], clients, width, label="clients' aggregate")
    ax.bar([x + width / 2 for x in xs], server, width, label="server's step")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss lowered by (nats)")
    ax.set_title("who moved the model", fontsize=10)
    ax.legend(fontsize=8)
