"""A Flower message's work, free of Flower's types: what a node's handler does itself, or hands to its
warm worker (:mod:`fedsp.runtime.flower.worker`) when it keeps one.

A :class:`Job` is one order or split message with the node's settings; :func:`work` is the client's half
of the round (or of a split step) in the present process, giving a :class:`Done`. The handlers
(:mod:`fedsp.runtime.flower.client_app`) and the worker both import this module; neither imports the
other's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsp.errors import FedSPError
from fedsp.runtime.flower import configure_environment, payload
from fedsp.runtime.messages import Reply

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

    from fedsp.methods.base import Client
    from fedsp.runtime.checkpoint import ClientStore


def partition_of(node_config: Mapping[str, Any]) -> int:
    if "partition-id" not in node_config:
        raise FedSPError("this SuperNode has no partition-id; start it with --node-config 'partition-id=K'")
    return int(node_config["partition-id"])


def store_for(
    node_config: Mapping[str, Any], run_key: str, partition: int, moments: str = "float32"
) -> ClientStore:
    from fedsp.runtime.checkpoint import ClientStore

    root = (
        node_config.get("state-dir")
        or os.environ.get("FEDSP_FLOWER_STATE_DIR")
        or configure_environment() / "client-state"
    )
    return ClientStore(Path(str(root)) / run_key / f"partition-{partition}", moments)


@dataclass(frozen=True)
class Job:
    """One message's work, free of Flower's types (so a node's warm worker can take it over)."""

    kind: str  # "train" (an order: the prefix, the client model when shipped) or "split" (a turn)
    meta: dict[str, Any]  # the ``fedsp`` record's values (a TrainOrder)
    node_config: dict[str, Any]
    payload: bytes  # the prefix, or the server's split message
    aux: bytes | None = None  # the client model, when shipped with this order


@dataclass(frozen=True)
class Done:
    """A job's outcome: the reply (None: an injected empty reply, tests only) and the time spent building."""

    reply: Reply | None
    build_s: float


def work(job: Job) -> Done:
    """A message's work in this process: the client's half of a round (or of a split step)."""
    from fedsp import wire
    from fedsp.runtime import faults
    from fedsp.runtime.attacks import attack_for
    from fedsp.runtime.clients import client_round, client_turn
    from fedsp.runtime.messages import Order, Turn

    order = payload.TrainOrder.from_record(job.meta)  # type: ignore[arg-type]
    here = partition_of(job.node_config)
    if order.partition != here:
        raise FedSPError(f"order for partition {order.partition} reached partition {here}")
    store = store_for(job.node_config, order.run_key, order.partition, order.config.state_moments)
    attack = attack_for(order.config, order.partition)
    timer: list[float] = [0.0]
    if job.kind == "split":
        turn = Turn(order.rnd, order.partition, order.step, job.payload)
        build = _builder(order, job.node_config, store, None, timer)
        reply = client_turn(
            turn,
            store,
            build,
            order.config.seed,
            has_model=store.has_aux(),
            attack=attack,
            wire_dtype=order.config.wire_dtype,
        )
        return Done(reply, timer[0])
    # an order: the client model, shipped now (else on this node's disk); the round; the update
    shipped = wire.decode(job.aux) if job.aux is not None else None
    step = Order(order.rnd, order.partition, ship=shipped is not None, expects_state=order.expects_state)
    reply = client_round(
        step,
        job.payload,
        store,
        _builder(order, job.node_config, store, shipped, timer),
        order.config.seed,
        shipped=shipped,
        has_model=store.has_aux(),
        attack=attack,
        wire_dtype=order.config.wire_dtype,
    )
    return Done(None if faults.wants(step, "empty-reply") else reply, timer[0])


def _builder(
    order: payload.TrainOrder,
    node_config: Mapping[str, Any],
    store: ClientStore,
    shipped: dict[str, Tensor] | None,
    timer: list[float],
) -> Callable[[], Client]:
    """How this node makes its client: from the shipped (or stored) client model and its own rows."""
    from fedsp import wire
    from fedsp.runtime.flower.client_side import build_client, client_rows, tokenizer_for

    def build() -> Client:
        t0 = time.perf_counter()
        config = order.config
        data_dir = str(node_config["data-dir"]) if node_config.get("data-dir") else None
        rows = client_rows(config, order.partition, data_dir, cache=store.root)
        pad_id = tokenizer_for(config.model).pad_token_id
        # kept as it came (compressed with --wire-dtype int8/bfloat16: less disk per client), decoded here
        message = shipped if shipped is not None else store.load_aux()
        weights = wire.decode_shipped(message, config.wire_dtype)
        client = build_client(
            config,
            order.model_config,
            order.client_layers,
            weights,
            rows,
            order.partition,
            pad_id,
            tokenizer_for(config.model),
        )
        timer[0] += time.perf_counter() - t0
        return client

    return build
