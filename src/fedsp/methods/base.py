"""What every method's parties look like to the round driver (:mod:`fedsp.runtime.rounds`), in any engine.

A round, for any federated method, in the glossary's six steps (docs/architecture.md):
  1. broadcast: ``server.broadcast()`` -> the tensors sent down to each sampled client;
  2. clients train: ``client.fit(state)`` on each client -> a :class:`ClientUpdate`;
  3. updates back: the updates go up, and the round driver checks them;
  4. aggregate: ``server.aggregate(state, updates)`` with the round's aggregate of the updates (made by
     the runtime's one aggregation rule, :mod:`fedsp.runtime.privacy`);
  5. server tunes: ``server.tune()`` on the server's own data;
  6. validate: ``server.validation_loss()`` (the server keeps the best state it has seen); the loss of
     the aggregate before step 5 too (``track=False``), so each round records what the clients'
     aggregate and what the server's step changed.
Centralised methods are a course without clients: only steps 5-6 happen.

Split learning (SFPrompt): ``client.fit`` may return a :class:`Request` instead
of its update, a message for the server in the middle of the round; the server's
``respond(partition, request)`` answers it and the client continues with
``client.answer(request)``, until it returns its update. A client's
``state_dict`` holds the round in progress between two such messages, so a
Flower node can serve each in a fresh process.

Clients are stateful across rounds; ``state_dict`` / ``load_state_dict`` hold
everything a client keeps between rounds (its model weights where it trains
them, optimiser and schedule states, the position of its data stream), so an
engine keeps that state on disk between rounds, not in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from fedsp.errors import FedSPError
from fedsp.models.prefix import Prefix
from fedsp.models.vocabulary import vocabulary_buffers


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends up after a round: its tensors, its example count (FedAvg weight), its losses."""

    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """A named message between a client and the server in the middle of a round (split learning)."""

    step: str
    tensors: dict[str, torch.Tensor]


class Client(Protocol):
    def fit(self, state: dict[str, torch.Tensor]) -> ClientUpdate | Request: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Server(Protocol):
    def broadcast(self) -> dict[str, torch.Tensor]: ...

    def aggregate(self, state: dict[str, torch.Tensor] | None, updates: Sequence[ClientUpdate]) -> None:
        """Take ``state``, the round's aggregate (None: no client took part); ``updates`` for reports."""
        ...

    def tune(self) -> float: ...

    def validation_loss(self, track: bool = True) -> float:
        """The validation loss of the current state; ``track``: kept as the best state when lowest (False:
        a measurement only, e.g. of the round's aggregate before the server's own step)."""
        ...

    def use_best(self) -> None: ...

    def evaluation_target(self) -> tuple[PreTrainedModel, Prefix | None]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BestKept:
    """The lowest validation loss a server has seen and the state that had it: every method's best-round
    bookkeeping, in one place.

    ``snapshot`` copies what the server would restore (a prefix, prompts and a head, adapter layers, a whole
    model); ``restore`` loads such a copy back. With ``from_start`` the state before round 1 is the best
    until a round beats it; without (a whole model: a copy of it is not free), nothing is kept until a
    round is measured, and restoring then leaves the server as it is. A checkpoint holds both under the
    keys ``best_val_loss`` and ``best_state`` (as every version before this one wrote them)."""

    def __init__(
        self,
        snapshot: Callable[[], dict[str, torch.Tensor]],
        restore: Callable[[dict[str, torch.Tensor]], None],
        from_start: bool = True,
    ) -> None:
        self._snapshot, self._restore = snapshot, restore
        self.loss = float("inf")
        self.state: dict[str, torch.Tensor] = snapshot() if from_start else {}

    def offer(self, loss: float) -> None:
        """Keep the server's current state when ``loss`` is the lowest so far."""
        if loss < self.loss:
            self.loss, self.state = loss, self._snapshot()

    def restore(self) -> None:
        """Put the best state back into the server (nothing kept: nothing changes)."""
        if self.state:
            self._restore(self.state)

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.loss, "best_state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss, self.state = state["best_val_loss"], state["best_state"]


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean of ``values``; nan when there are none (a phase of 0 steps)."""
    return sum(values) / len(values) if values else float("nan")


@runtime_checkable
class ManyPrefixes(Server, Protocol):
    """A server holding one prefix per data owner, scored one by one (the local-only baseline)."""

    def evaluation_targets(self) -> list[tuple[PreTrainedModel, Prefix]]:
        """Each owner's (model, best prefix), in partition order."""
        ...


@runtime_checkable
class Emulated(Server, Protocol):
    """A server whose clients hold a model of their own in place of the global one (the model-private
    methods): its final state is also scored on the clients' model (``results.json``: ``emulator``)."""

    def emulator_target(self) -> tuple[PreTrainedModel, Prefix | None] | None:
        """The clients' model with the server's current prompt or adapter, as ``evaluation_target`` gives
        the global one; None: the clients hold the global model itself, or nothing to score."""
        ...


@runtime_checkable
class TunesModelWeights(Server, Protocol):
    """A server whose result is a change of the global model's own weights (Offsite-Tuning's adapter
    layers), not a prefix: it writes that change into a results folder for use outside fedsp."""

    def write_weights(self, out_dir: Path, base_model: str, metadata: dict[str, str]) -> dict[str, str]:
        """Write the current (best) weights into ``out_dir``; what ``results.json``'s ``export`` records:
        ``layers`` (a safetensors file of whole layers) or ``adapter`` (a PEFT LoRA adapter folder)."""
        ...


@runtime_checkable
class SplitClient(Client, Protocol):
    """A client whose round goes through the server (split learning)."""

    def answer(self, message: Request) -> ClientUpdate | Request:
        """Continue the round with the server's answer to the last request."""
        ...


@runtime_checkable
class SplitServer(Server, Protocol):
    """A server that takes part in its clients' rounds (split learning)."""

    def respond(self, partition: int, message: Request) -> Request:
        """Answer a client's request in the middle of its round; a message that does not fit (shape,
        dtype, order) raises :class:`~fedsp.errors.FedSPError`."""
        ...

    def forget(self, partition: int) -> None:
        """Drop what the server holds of a client's round in progress (it failed or was left out)."""
        ...


@dataclass(frozen=True)
class ClientModelInfo:
    """What a client holds, for the efficiency tables and the model-privacy statement."""

    params: int  # unique trainable-or-frozen parameters the client holds
    fraction_of_global: float
    global_layers: tuple[int, ...]  # which global-model decoder layers the client receives
    model_private: bool  # False when clients receive the whole global model
    privacy: str = ""  # what of the global model a client does hold, where "private" needs saying


@dataclass
class Course:
    """The parties of one run of one method, ready for a runtime to drive."""

    server: Server
    make_client: Callable[[int], Client]  # client for partition 0..num_clients-1
    num_clients: int  # 0 for centralised methods
    client_model: ClientModelInfo | None
    shipped_once: dict[str, torch.Tensor] = field(default_factory=dict)  # sent to every client before round 1
    notes: dict[str, Any] = field(default_factory=dict)  # method-specific facts for results.json


def load_shipped(
    model: PreTrainedModel, shipped: dict[str, torch.Tensor], names: set[str] | None = None
) -> None:
    """Copy ``shipped`` into ``model``'s parameters ``names`` (all of them by default), and the kept ids
    of a pruned vocabulary, which must match: how a Flower node's client takes the weights it was
    shipped (a node never has the global weights, only their shapes)."""
    own: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters() if names is None or n in names}
    own.update(vocabulary_buffers(model))
    if set(own) != set(shipped):
        missing, extra = sorted(set(own) - set(shipped))[:3], sorted(set(shipped) - set(own))[:3]
        raise FedSPError(
            f"the shipped client model does not fit this client's architecture "
            f"(missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for name, param in own.items():
            if param.shape != shipped[name].shape:
                raise FedSPError(
                    f"shipped tensor {name} has shape {tuple(shipped[name].shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            param.copy_(shipped[name])
