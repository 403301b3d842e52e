"""Fault injection for tests (not for users): chosen clients in chosen rounds misbehave, in every engine.

Set ``FEDSP_FAULTS`` to a JSON list before a run starts (the Flower simulation's
workers inherit the environment), for example::

    FEDSP_FAULTS='[{"client": 1, "round": 2, "kind": "fail"}, {"client": 0, "kind": "claim", "value": 1e9}]'

A fault without ``round`` applies to every round. Kinds:
  - ``fail``: the client raises before it trains (its round fails);
  - ``hang``: the client sleeps ``value`` seconds before it trains (on Flower, past
    ``--client-timeout`` the server leaves it out);
  - ``malformed``: the reply's update is not a tensor message;
  - ``claim``: the reply claims ``value`` examples;
  - ``scale``: the update moves ``value`` times as far from the broadcast as trained;
  - ``sign-flip``: the update moves the opposite way;
  - ``nan``: the update holds NaN;
  - ``empty-reply`` (Flower only): the reply message carries no records at all;
  - ``fail-split`` (split learning): the client raises when it gets the server's ``value``-th
    message of the round (1: the body's outputs of the first split step).
Every engine runs the client half of a round through
:func:`fedsp.runtime.clients.client_round`, which calls :func:`before_fit` and
:func:`after_fit`; the Flower ClientApp also asks :func:`wants` for ``empty-reply``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

import torch

from fedsp import wire
from fedsp.errors import FedSPError
from fedsp.runtime.messages import OK, Order, Reply

ENV = "FEDSP_FAULTS"
KINDS = ("fail", "hang", "malformed", "claim", "scale", "sign-flip", "nan", "empty-reply", "fail-split")


@dataclass(frozen=True)
class Fault:
    client: int
    kind: str
    round: int | None = None  # None: every round
    value: float = 0.0

    def applies(self, order: Order) -> bool:
        return self.client == order.partition and self.round in (None, order.rnd)


def planned() -> list[Fault]:
    """The faults ``FEDSP_FAULTS`` asks for (none when it is unset)."""
    text = os.environ.get(ENV)
    if not text:
        return []
    faults = [Fault(**entry) for entry in json.loads(text)]
    unknown = sorted({f.kind for f in faults} - set(KINDS))
    if unknown:
        raise ValueError(f"{ENV}: unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    return faults


def wants(order: Order, kind: str) -> Fault | None:
    return next((f for f in planned() if f.kind == kind and f.applies(order)), None)


class InjectedFault(RuntimeError):
    """What a ``fail`` fault raises."""


def before_fit(order: Order) -> None:
    if wants(order, "fail"):
        raise InjectedFault(f"injected failure of client {order.partition} in round {order.rnd}")
    hang = wants(order, "hang")
    if hang:
        time.sleep(hang.value)


def before_turn(order: Order, turns: int) -> None:
    """Before the client takes the server's ``turns + 1``-th split message of the round."""
    fault = wants(order, "fail-split")
    if fault and int(fault.value) == turns + 1:
        raise InjectedFault(
            f"injected failure of client {order.partition} at split message {turns + 1} of round {order.rnd}"
        )


def after_fit(order: Order, sent: dict[str, torch.Tensor], reply: Reply) -> Reply:
    """The reply as the planned faults make it (``sent``: the round's broadcast, as the client got it;
    the moves read the update as a float32 state: tests of --wire-dtype float32)."""
    if reply.status != OK:
        return reply
    if wants(order, "malformed"):
        reply = replace(reply, payload=b"\x00 not a tensor message")
    claim = wants(order, "claim")
    if claim:
        reply = replace(reply, num_examples=int(claim.value))
    moves = [f for f in planned() if f.applies(order) and f.kind in ("scale", "sign-flip", "nan")]
    if moves and not wants(order, "malformed"):
        state = wire.decode(reply.payload)
        if any(name.endswith(wire.SCALE) for name in state):  # int8 codes (bfloat16 ones look like states)
            raise FedSPError(
                f"FEDSP_FAULTS {', '.join(f.kind for f in moves)} moves a float32 state; this run's updates "
                "are compressed changes (--wire-dtype): use float32"
            )
        for fault in moves:
            factor = {"scale": fault.value, "sign-flip": -1.0}.get(fault.kind)
            for name, tensor in state.items():
                if factor is None:  # nan
                    state[name] = torch.full_like(tensor, float("nan"))
                else:
                    state[name] = sent[name] + factor * (tensor - sent[name])
        reply = replace(reply, payload=wire.encode(state))
    return reply
