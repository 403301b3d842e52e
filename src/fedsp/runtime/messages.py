"""What the server and a client say to each other in a round, in every engine (no torch needed here).

The round driver (:mod:`fedsp.runtime.rounds`) hands an engine one
:class:`Order` per sampled client with the encoded broadcast; the engine
returns a :class:`Reply` per client that answered. The Flower engine carries
both in messages (:mod:`fedsp.runtime.flower.payload`); the in-process engine
passes them as they are.

Split learning (SFPrompt) needs the server in the middle of a client's round:
such a client answers an order with a ``step`` reply (a named message to the
server, e.g. its activations at the cut); the driver has the server answer it
and sends the answer back as a :class:`Turn`; the client replies to that with
its next step or its update. Every such message crosses the engine, counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fedsp.runtime.privacy import Summed

# a reply's status: an update; "send me the client model" (never had it, or lost its state); a failure;
# a message to the server in the middle of the client's round (split learning), answered by a Turn
OK, NEED_AUX, LOST_STATE, FAILED, STEP = "ok", "need-aux", "lost-state", "failed", "step"
STATE_BYTES = "state_bytes"  # a reply's metric: the bytes of the state the client saved (a count only)


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
    step: str = ""  # with STEP: what the payload is (e.g. "activations"); the server answers it

    @classmethod
    def failed(cls, partition: int, reason: str) -> Reply:
        return cls(partition, FAILED, reason=reason)


@dataclass(frozen=True)
class Turn:
    """The server's answer to a client's ``step`` reply, in the same round: a named, encoded message."""

    rnd: int
    partition: int
    step: str  # what the payload is (e.g. "outputs")
    payload: bytes


class Engine(Protocol):
    """How orders reach clients and replies come back; everything else is the driver's.

    This is all the round driver (:class:`~fedsp.runtime.rounds.RoundDriver`) asks of an engine: the
    in-process one (:class:`~fedsp.runtime.rounds.InProcessEngine`) and Flower's
    (:class:`~fedsp.runtime.flower.server_app.FlowerEngine`) declare each member."""

    @property
    def concurrent(self) -> bool:
        """Whether clients are reached together (Flower) or one at a time (in-process: a split round's
        conversations then run one after the other, so the server holds one client's step at a time)."""
        ...

    def exchange(self, orders: Sequence[Order], prefix: bytes) -> list[Reply]:
        """Deliver ``orders`` (with the encoded broadcast ``prefix``); a reply per client that answered."""
        ...

    def exchange_summed(self, orders: Sequence[Order], prefix: bytes) -> tuple[list[Reply], Summed]:
        """``exchange`` under ``--secure-aggregation``: each client's status and clear metrics, and the
        sum of the updates alone; an engine that cannot sum securely raises a one-line FedSPError."""
        ...

    def converse(self, turns: Sequence[Turn]) -> list[Reply]:
        """Deliver the server's answers to ``step`` replies; a reply per client that answered."""
        ...
