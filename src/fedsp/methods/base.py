"""What every method's parties look like to the round driver (:mod:`fedsp.runtime.rounds`), in any engine.

A round, for any federated method:
  1. ``server.broadcast()`` -> the tensors sent down to each sampled client;
  2. ``client.fit(state)`` on each client -> a :class:`ClientUpdate` sent up;
  3. ``server.aggregate(state, updates)`` with the round's aggregate of the updates (made by the
     runtime's one aggregation rule, :mod:`fedsp.runtime.privacy`), then ``server.tune()`` on the
     server's own data;
  4. ``server.validation_loss()`` (the server keeps the best state it has seen).
Centralised methods are a course without clients: only steps 3-4 happen.

Clients are stateful across rounds; ``state_dict`` / ``load_state_dict`` hold
everything a client keeps between rounds (its model weights where it trains
them, optimiser and schedule states, the position of its data stream), so an
engine keeps that state on disk between rounds, not in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from fedsp.models.prefix import Prefix


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends up after a round: its tensors, its example count (FedAvg weight), its losses."""

    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Client(Protocol):
    def fit(self, state: dict[str, torch.Tensor]) -> ClientUpdate: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Server(Protocol):
    def broadcast(self) -> dict[str, torch.Tensor]: ...

    def aggregate(self, state: dict[str, torch.Tensor] | None, updates: Sequence[ClientUpdate]) -> None:
        """Take ``state``, the round's aggregate (None: no client took part); ``updates`` for reports."""
        ...

    def tune(self) -> float: ...

    def validation_loss(self) -> float: ...

    def use_best(self) -> None: ...

    def evaluation_target(self) -> tuple[PreTrainedModel, Prefix | None]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ClientModelInfo:
    """What a client holds, for the efficiency tables and the model-privacy statement."""

    params: int  # unique trainable-or-frozen parameters the client holds
    fraction_of_global: float
    global_layers: tuple[int, ...]  # which global-model decoder layers the client receives
    model_private: bool  # False when clients receive the whole global model


@dataclass
class Course:
    """The parties of one run of one method, ready for a runtime to drive."""

    server: Server
    make_client: Callable[[int], Client]  # client for partition 0..num_clients-1
    num_clients: int  # 0 for centralised methods
    client_model: ClientModelInfo | None
    shipped_once: dict[str, torch.Tensor] = field(default_factory=dict)  # sent to every client before round 1
    notes: dict[str, Any] = field(default_factory=dict)  # method-specific facts for results.json
