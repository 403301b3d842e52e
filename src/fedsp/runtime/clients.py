"""The client's half of a round, the same in every engine (in-process, a Flower node).

:func:`client_round`: take the client model if it came with the order, else
find it and the previous round's state in the client's store (or answer
``need-aux`` / ``lost-state``, and the server sends the model again); build the
client, load its state, run ``client.fit`` under the round's per-client seed
(:func:`~fedsp.runtime.participation.client_rng_seed`, so the result depends on
neither process nor order), write the new state, reply with the encoded update.
Split learning (SFPrompt): when ``fit`` returns a request for the server instead
of its update, the client's round in progress goes to the store and the reply is
a ``step``; :func:`client_turn` takes the server's answer, continues the round
from the store and replies with the next step or the update.
Nothing here is the server's: a Flower node imports this module, not the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from fedsp import wire
from fedsp.methods.base import Client, ClientUpdate, Request, SplitClient
from fedsp.protection import Attack
from fedsp.runtime import faults, participation
from fedsp.runtime.attacks import attacked
from fedsp.runtime.checkpoint import ClientStore
from fedsp.runtime.messages import LOST_STATE, NEED_AUX, OK, STATE_BYTES, STEP, Order, Reply, Turn

log = logging.getLogger("fedsp.clients")
RESIDUAL = "wire_residual"  # kept with a client's state: what its compressed updates left out so far


def client_round(
    order: Order,
    prefix: bytes,
    store: ClientStore,
    build: Callable[[], Client],
    seed: int,
    shipped: Mapping[str, torch.Tensor] | None = None,
    has_model: bool = True,
    attack: Attack | None = None,
    wire_dtype: str = wire.FLOAT32,
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
    store.end_turns()  # an earlier round left unfinished (the client failed, or the server gave up on it)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is untouched
        client = build()
        residual = None
        if saved is not None:
            state = dict(saved[1])
            residual = state.pop(RESIDUAL, None)
            client.load_state_dict(state)
        torch.manual_seed(participation.client_rng_seed(seed, order.rnd, order.partition))
        sent = wire.decode_broadcast(prefix, wire_dtype)
        outcome = client.fit({name: t.clone() for name, t in sent.items()})
    return _conclude(order, store, client, sent, outcome, attack, wire_dtype, residual)


def client_turn(
    turn: Turn,
    store: ClientStore,
    build: Callable[[], Client],
    seed: int,
    has_model: bool = True,
    attack: Attack | None = None,
    wire_dtype: str = wire.FLOAT32,
) -> Reply:
    """The client's answer to the server's ``turn`` in the middle of its round (split learning)."""
    saved = store.load_turn(turn.rnd) if has_model else None
    if saved is None:
        return Reply.failed(turn.partition, f"it has no round {turn.rnd} in progress to continue")
    order = Order(turn.rnd, turn.partition, ship=False, expects_state=True)
    faults.before_turn(order, saved["turns"])  # tests only
    with torch.random.fork_rng(devices=[]):
        client = build()
        if not isinstance(client, SplitClient):
            return Reply.failed(turn.partition, "this method's client takes no split messages")
        client.load_state_dict(saved["client"])
        turns = int(saved["turns"]) + 1
        torch.manual_seed(participation.client_rng_seed(seed, turn.rnd, turn.partition) + turns)
        outcome = client.answer(Request(turn.step, wire.decode(turn.payload)))
    residual = saved.get(RESIDUAL)
    return _conclude(order, store, client, saved["sent"], outcome, attack, wire_dtype, residual, turns)


def _conclude(
    order: Order,
    store: ClientStore,
    client: Client,
    sent: dict[str, torch.Tensor],
    outcome: ClientUpdate | Request,
    attack: Attack | None,
    wire_dtype: str = wire.FLOAT32,
    residual: dict[str, torch.Tensor] | None = None,
    turns: int = 0,
) -> Reply:
    """The reply to the server: the next split message (the round in progress kept), or the update.

    ``sent`` is the broadcast as received; ``residual`` what the rounding of the earlier updates left
    out (error feedback, compressed ``wire_dtype`` only), kept with the client's state.
    """
    if isinstance(outcome, Request):
        turn = {"client": client.state_dict(), "sent": sent, "turns": turns, RESIDUAL: residual}
        store.save_turn(order.rnd, turn)
        return Reply(order.partition, STEP, wire.encode(outcome.tensors), step=outcome.step)
    sends = outcome.state if attack is None else attacked(attack, sent, outcome.state)
    payload, left_out = wire.encode_update(sends, sent, wire_dtype, residual)
    state = client.state_dict()
    size = store.save(order.rnd, state if left_out is None else {**state, RESIDUAL: left_out})
    store.end_turns(order.rnd)
    metrics = {name: float(value) for name, value in outcome.metrics.items()}
    metrics[STATE_BYTES] = float(size)  # what the client keeps on disk between rounds (a count only)
    reply = Reply(order.partition, OK, payload, outcome.num_examples, metrics)
    return faults.after_fit(order, sent, reply)
