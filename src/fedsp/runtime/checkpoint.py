"""What survives a crash: the server's checkpoint in the results folder, each client's state on its disk.

``checkpoint.pt`` (written atomically after every completed round) holds the
round, the server's ``state_dict``, the RNG states of the server process, the
metrics so far and the configuration; ``fedsp run --resume DIR`` refuses a
folder whose configuration differs. A client's state (``Client.state_dict``:
its trained auxiliary model, optimiser and data-stream states) lives in a
:class:`ClientStore` directory per node, tagged with the round that produced
it; the last two are kept, so a server that crashed mid-round can re-run that
round from the clients' previous states. With ``--state-moments bfloat16`` the
AdamW moments in a client's state are kept in bfloat16 (:func:`compact_state`);
the weights it trains stay exact, and a loaded optimiser casts the moments back
to its parameters' dtype.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsp import wire
from fedsp.config import SPEED_ONLY, STATE_MOMENTS, RunConfig
from fedsp.errors import FedSPError
from fedsp.files import atomic_write
from fedsp.methods.builders import build_course
from fedsp.runtime import results
from fedsp.runtime.privacy import Aggregator
from fedsp.runtime.run_state import RunState

CHECKPOINT = "checkpoint.pt"
# Where a checkpoint's prefix puts the input: "peft" (P..P+T-1). Checkpoints without the key were written
# before fedsp followed PEFT (input at 0..T-1 after the prefix); a run cannot continue under another rule.
POSITIONS = "peft"
log = logging.getLogger("fedsp.checkpoint")
_NOT_COMPARED = (*SPEED_ONLY, "out")  # may differ between the first run and its resume


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> None:
    atomic_save({**state, "rng": rng_states(), "positions": POSITIONS}, out_dir / CHECKPOINT)


def load_checkpoint(out_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of ``out_dir``; a clear error if it is missing or made by another configuration."""
    path = out_dir / CHECKPOINT
    if not path.is_file():
        raise FedSPError(
            f"--resume {str(out_dir)!r}: no {CHECKPOINT} there (no completed round to resume from)"
        )
    try:
        state = torch.load(path, weights_only=False)
    except Exception as err:  # a truncated or foreign file
        first = " ".join(str(err).split())[:200]
        raise FedSPError(f"--resume {str(out_dir)!r}: {CHECKPOINT} cannot be read ({first})") from None
    needed = {"round", "config", "server", "history", "rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise FedSPError(f"--resume {str(out_dir)!r}: {CHECKPOINT} cannot be read (not a fedsp checkpoint)")
    if state.get("positions") != POSITIONS:
        raise FedSPError(
            f"--resume {str(out_dir)!r}: {CHECKPOINT} was written by an older fedsp, which placed the input "
            "at positions 0..T-1 after the prefix (now P..P+T-1, PEFT's convention); its prefix cannot "
            "continue training here: start a new run (fedsp export converts its best prefix)"
        )
    written = RunConfig.from_dict(state["config"], strict=False, source=str(path)).to_dict()  # any version
    differ = config_differences(written, config)
    if differ:
        raise FedSPError(
            f"--resume {str(out_dir)!r} was made by a different configuration ({differ}); "
            "resume with the same options or start a new run"
        )
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    keys = sorted((set(saved) | set(current)) - set(_NOT_COMPARED))
    return ", ".join(
        f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)
    )


MOMENT_DTYPES = dict(zip(STATE_MOMENTS, (torch.float32, torch.bfloat16), strict=True))  # --state-moments


def compact_state(state: Any, moments: str) -> Any:
    """``state`` with the floating tensors of every optimiser state in it (AdamW's ``exp_avg`` and
    ``exp_avg_sq``; not ``step``) in the ``moments`` dtype; everything else as it is (not copied)."""
    dtype = MOMENT_DTYPES[moments]
    if dtype == torch.float32:
        return state

    def walk(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"state", "param_groups"}:  # an optimiser's state_dict
            per_param = {
                key: {name: t.to(dtype) if _moment(name, t) else t for name, t in entries.items()}
                for key, entries in value["state"].items()
            }
            return {"state": per_param, "param_groups": value["param_groups"]}
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(walk(item) for item in value)
        return value

    return walk(state)


def _moment(name: str, value: Any) -> bool:
    return name != "step" and torch.is_tensor(value) and value.is_floating_point()


class ClientStore:
    """One client's state on its own disk: the auxiliary model it received and its per-round state.

    ``moments``: the dtype its optimiser moments are kept in between rounds (``--state-moments``)."""

    AUX = "aux.safetensors"

    def __init__(self, root: Path, moments: str = "float32") -> None:
        self.root = Path(root)
        self.moments = moments

    def has_aux(self) -> bool:
        return (self.root / self.AUX).is_file()

    def save_aux(self, tensors: dict[str, torch.Tensor]) -> None:
        atomic_write(self.root / self.AUX, wire.encode(tensors))

    def load_aux(self) -> dict[str, torch.Tensor]:
        return wire.decode((self.root / self.AUX).read_bytes())

    def reset(self) -> None:
        """Forget every round's state (a new auxiliary model arrived)."""
        for rnd in self.rounds():
            (self.root / f"state-{rnd}.pt").unlink(missing_ok=True)
        self.end_turns()

    # a split round in progress: the client between two of its messages, one file per round (a late
    # writer of an abandoned round never touches the next one's)
    def _turn(self, rnd: int) -> Path:
        return self.root / f"turn-{rnd}.pt"

    def save_turn(self, rnd: int, state: dict[str, Any]) -> None:
        atomic_save({"round": rnd, **state}, self._turn(rnd))

    def load_turn(self, rnd: int) -> dict[str, Any] | None:
        """Round ``rnd`` in progress (None: none, or unreadable)."""
        path = self._turn(rnd)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, weights_only=False)
        except Exception as err:  # truncated or foreign: the round cannot go on
            log.warning("split round state %s cannot be read (%s)", path, str(err).splitlines()[0])
            return None
        return state if state.get("round") == rnd else None

    def end_turns(self, rnd: int | None = None) -> None:
        """Forget round ``rnd`` in progress (None: every round's)."""
        if rnd is not None:
            self._turn(rnd).unlink(missing_ok=True)
        elif self.root.is_dir():
            for path in self.root.glob("turn-*.pt"):
                path.unlink(missing_ok=True)

    def rounds(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = (re.fullmatch(r"state-(\d+)\.pt", p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, rnd: int, state: dict[str, Any]) -> int:
        """Keep the state produced by round ``rnd`` and the latest one before it; the others are deleted.
        Returns the bytes the new state takes on disk.

        The one before is what a server that crashed in round ``rnd`` resumes this client from (with
        partial participation it can be many rounds older than ``rnd - 1``).
        """
        path = self.root / f"state-{rnd}.pt"
        atomic_save(compact_state(state, self.moments), path)
        size = path.stat().st_size
        earlier = [r for r in self.rounds() if r < rnd]
        keep = {rnd, earlier[-1]} if earlier else {rnd}
        for old in self.rounds():
            if old not in keep:  # older ones, and later ones of a round the server never completed
                (self.root / f"state-{old}.pt").unlink(missing_ok=True)
        return size

    def load_before(self, rnd: int) -> tuple[int, dict[str, Any]] | None:
        """The latest state from a round before ``rnd`` (None: the client has not trained yet, or lost it)."""
        earlier = [r for r in self.rounds() if r < rnd]
        if not earlier:
            return None
        path = self.root / f"state-{earlier[-1]}.pt"
        try:
            return earlier[-1], torch.load(path, weights_only=False)
        except Exception as err:  # truncated or foreign: as good as lost (the server ships the model again)
            log.warning(
                "client state %s cannot be read (%s); treated as lost", path, str(err).splitlines()[0]
            )
            return None


def save_run(run: RunState, rnd: int) -> None:
    """The run's checkpoint after round ``rnd`` (called by ``Session.finish_round``; runtimes add
    ``runtime_state``)."""
    assert run.course is not None
    save_checkpoint(
        run.out_dir,
        {
            "round": rnd,
            "config": run.config.to_dict(),
            "server": run.course.server.state_dict(),
            "history": run.history,
            "zero_shot": run.zero_shot,
            "last_eval": run.last_eval,
            "audit": run.audit.state_dict() if run.audit else None,
            "runtime": run.runtime_state,
            "aggregator": run.aggregator.state_dict() if run.aggregator else None,
            "wall_seconds": time.perf_counter() - run.started,
        },
    )


def restore_run(run: RunState, saved: dict[str, Any]) -> None:
    """Continue after the checkpointed round: server state, metrics, RNG states, runtime state."""
    run.zero_shot, run.last_eval, run.history = (
        saved["zero_shot"],
        saved["last_eval"],
        saved["history"],
    )
    if saved["server"] is not None:
        run.course = run.course or build_course(run.config, run.loaded, run.data)
        run.once_bytes = wire.num_bytes(run.course.shipped_once)
        run.course.server.load_state_dict(saved["server"])
        run.aggregator = Aggregator(run.config, run.course.num_clients)
        if saved.get("aggregator") is not None:  # absent in checkpoints of older versions
            run.aggregator.load_state_dict(saved["aggregator"])
    if run.audit is not None and saved.get("audit") is not None:
        run.audit.load_state_dict(saved["audit"])
    run.runtime_state = saved.get("runtime", {})
    run.first_round = saved["round"] + 1
    # wall_seconds counts every process's time on the run (not the pause between them); absent in
    # checkpoints of older versions: only this process's time is counted
    run.started -= saved.get("wall_seconds", 0.0)
    # metrics.jsonl may hold a round that finished after the checkpoint was written: keep the checkpoint's
    lines = "".join(json.dumps(results._clean(h)) + "\n" for h in run.history)
    atomic_write(run.out_dir / "metrics.jsonl", lines.encode())
    set_rng_states(saved["rng"])
    # said whatever --quiet: the user asked for a new run or a continued one, and should know which
    print(
        f"fedsp: resuming {run.out_dir} after round {saved['round']} of {run.config.rounds}",
        file=sys.stderr,
        flush=True,
    )
