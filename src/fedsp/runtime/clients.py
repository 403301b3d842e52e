"""The client's half of a round, the same in every engine (in-process, a Flower node).

:func:`client_round`: take the client model if it came with the order, else
find it and the previous round's state in the client's store (or answer
``need-aux`` / ``lost-state``, and the server sends the model again); build the
client, load its state, run ``client.fit`` under the round's per-client seed
(:func:`~fedsp.runtime.participation.client_rng_seed`, so the result depends on
neither process nor order), write the new state, reply with the encoded update.
Nothing here is the server's: a Flower node imports this module, not the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from fedsp import wire
from fedsp.methods.base import Client
from fedsp.protection import Attack
from fedsp.runtime import faults, participation
from fedsp.runtime.attacks import attacked
from fedsp.runtime.checkpoint import ClientStore
from fedsp.runtime.messages import LOST_STATE, NEED_AUX, OK, Order, Reply

log = logging.getLogger("fedsp.clients")


def client_round(
    order: Order,
    prefix: bytes,
    store: ClientStore,
    build: Callable[[], Client],
    seed: int,
    shipped: Mapping[str, torch.Tensor] | None = None,
    has_model: bool = True,
    attack: Attack | None = None,
) -> Reply:
    """The client's half of a round, the same in every engine.

    ``build`` makes the client from the model it holds; ``shipped`` is the client
    model when it came with the order and the engine keeps it in the store (Flower);
    ``has_model`` says whether the client holds one from an earlier round. With ``attack`` (an
    evaluation of robust aggregation, ``--attack``) the client keeps its honest state and sends the
    attacked one.
    """
    saved = None
    if order.ship:  # a (new) client model: forget every earlier state
        store.reset()
        if shipped is not None:
            store.save_aux(dict(shipped))
    elif not has_model:
        return Reply(order.partition, NEED_AUX)
    else:
        saved = store.load_before(order.rnd)
        if saved is None and order.expects_state:
            log.warning("partition %d: client state lost; asking for the client model", order.partition)
            return Reply(order.partition, LOST_STATE)
    faults.before_fit(order)  # tests only: FEDSP_FAULTS (fedsp.runtime.faults)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is untouched
        client = build()
        if saved is not None:
            client.load_state_dict(saved[1])
        torch.manual_seed(participation.client_rng_seed(seed, order.rnd, order.partition))
        sent = wire.decode(prefix)
        update = client.fit({name: t.clone() for name, t in sent.items()})
        sends = update.state if attack is None else attacked(attack, sent, update.state)
    store.save(order.rnd, client.state_dict())
    metrics = {name: float(value) for name, value in update.metrics.items()}
    reply = Reply(order.partition, OK, wire.encode(sends), update.num_examples, metrics)
    return faults.after_fit(order, prefix, reply)
