"""What the server and a client say to each other in a round, in every engine (no torch needed here).

The round driver (:mod:`fedsp.runtime.rounds`) hands an engine one
:class:`Order` per sampled client with the encoded broadcast; the engine
returns a :class:`Reply` per client that answered. The Flower engine carries
both in messages (:mod:`fedsp.runtime.flower.payload`); the in-process engine
passes them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

# a reply's status: an update; "send me the client model" (never had it, or lost its state); a failure
OK, NEED_AUX, LOST_STATE, FAILED = "ok", "need-aux", "lost-state", "failed"


@dataclass(frozen=True)
class Order:
    """What the server asks of one client in a round (the broadcast payload goes with it)."""

    rnd: int
    partition: int
    ship: bool  # the client model goes with this order (its first round, or sent again)
    expects_state: bool  # the client trained before and must still hold its state


@dataclass(frozen=True)
class Reply:
    """A client's answer: an encoded update (``ok``), a request for the client model, or a failure."""

    partition: int
    status: str  # OK, NEED_AUX, LOST_STATE or FAILED
    payload: bytes = b""  # the encoded update (wire format), when ``ok``
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why it failed

    @classmethod
    def failed(cls, partition: int, reason: str) -> Reply:
        return cls(partition, FAILED, reason=reason)


class Engine(Protocol):
    """How orders reach clients and replies come back; everything else is the driver's."""

    def exchange(self, orders: Sequence[Order], prefix: bytes) -> list[Reply]:
        """Deliver ``orders`` (with the encoded broadcast ``prefix``); a reply per client that answered."""
        ...
