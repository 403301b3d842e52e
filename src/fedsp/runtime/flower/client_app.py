"""The ClientApp: one data owner's handlers, plain functions of (Message, Context).

``train`` (one round of the method's client):
  1. read the order (round, partition, run key) and the prefix;
  2. if the message carries the auxiliary model: keep it on this node's disk
     and start fresh; else rebuild the client from disk and load its state
     from the previous round; a client that lost it replies ``lost-state``
     (``need-aux`` when it never had the model) and the server ships again;
  3. ``client.fit(prefix)`` under the round's seed;
  4. write the client's state atomically, reply with the update.
Steps 2-4 are :func:`fedsp.runtime.clients.client_round`, the client half the
in-process engine runs too.
``train.split`` (split learning, SFPrompt): the server's answer in the middle of
the client's round (the body's outputs, or the gradient of the activations);
the client continues the round from its store
(:func:`fedsp.runtime.clients.client_turn`) and replies with its next message or
its update.
``query`` tells the server which partition this node holds.

Node settings (``--node-config``): ``partition-id`` (required in
deployment), ``data-dir`` (a folder with the owner's ``train.jsonl``),
``state-dir`` (where client states live; default ``$FEDSP_FLOWER_STATE_DIR``, set by the
simulation to the results folder's ``clients/``, else ``$FLWR_HOME/client-state``).

In deployment every message starts a fresh ``flwr-clientapp`` process that imports this module:
torch and the model code are imported inside ``train``, so a ``query`` takes about a second
instead of the seconds an import of torch and transformers takes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsp.errors import FedSPError
from fedsp.runtime.flower import configure_environment, payload, secagg

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

    from fedsp.methods.base import Client
    from fedsp.runtime.checkpoint import ClientStore

log = logging.getLogger("fedsp.flower.client")
PROFILE_ENV = "FEDSP_CLIENT_PROFILE"
app = ClientApp(mods=[secagg.client_mod])  # SecAgg+ messages only; plain ones pass untouched


def partition_of(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise FedSPError("this SuperNode has no partition-id; start it with --node-config 'partition-id=K'")
    return int(context.node_config["partition-id"])


def store_for(context: Context, run_key: str, partition: int) -> ClientStore:
    from fedsp.runtime.checkpoint import ClientStore

    root = (
        context.node_config.get("state-dir")
        or os.environ.get("FEDSP_FLOWER_STATE_DIR")
        or configure_environment() / "client-state"
    )
    return ClientStore(Path(str(root)) / run_key / f"partition-{partition}")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This node's partition id (the server orders and samples clients by it, not by node id)."""
    return Message(
        RecordDict({payload.META: ConfigRecord({"partition": partition_of(context)})}), reply_to=msg
    )


class Profile:
    """Where one handler call's time goes, appended as a JSON line to ``$FEDSP_CLIENT_PROFILE`` when set.

    ``before_handler_s``: from the process's start to the handler (Python, Flower's start-up, the app's
    installation and loading); then ``imports_s`` (torch and the model code), ``build_s`` (the client:
    rows, model skeleton, weights, state), ``work_s`` (the round or split step, the state written),
    ``handler_s`` in all. bench/flower_overhead.py reads these.
    """

    def __init__(self, kind: str) -> None:
        self.kind, self.start = kind, time.perf_counter()
        self.last, self.build_s = self.start, 0.0
        self.times: dict[str, float] = {}
        self.path = os.environ.get(PROFILE_ENV)
        self.age = 0.0
        if self.path:
            import psutil

            self.age = time.time() - psutil.Process().create_time()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"{name}_s"], self.last = now - self.last, now

    def write(self) -> None:
        if not self.path:
            return
        self.mark("work")
        self.times["work_s"] -= self.build_s
        record = {"kind": self.kind, "pid": os.getpid(), "before_handler_s": self.age, **self.times}
        record.update(build_s=self.build_s, handler_s=time.perf_counter() - self.start)
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")


@app.train()
def train(msg: Message, context: Context) -> Message:
    profile = Profile("train")
    from fedsp import wire
    from fedsp.runtime import faults
    from fedsp.runtime.attacks import attack_for
    from fedsp.runtime.clients import client_round
    from fedsp.runtime.messages import Order

    profile.mark("imports")
    # 1) the order and the prefix
    order = _order(msg, context)
    prefix = payload.record_bytes(msg.content[payload.PREFIX])  # type: ignore[arg-type]
    store = store_for(context, order.run_key, order.partition)
    shipped = None
    if payload.AUX in msg.content:  # 2) the client model, shipped now (else on this node's disk)
        shipped = wire.decode(payload.record_bytes(msg.content[payload.AUX]))  # type: ignore[arg-type]
    config = order.config
    # 3-4) the round, the state to disk, the update to the server: the same client half as in-process
    step = Order(order.rnd, order.partition, ship=shipped is not None, expects_state=order.expects_state)
    reply = client_round(
        step,
        prefix,
        store,
        _builder(order, context, store, shipped, profile),
        config.seed,
        shipped=shipped,
        has_model=store.has_aux(),
        attack=attack_for(config, order.partition),
    )
    if faults.wants(step, "empty-reply"):  # tests only (fedsp.runtime.faults)
        return Message(RecordDict(), reply_to=msg)
    answer = Message(payload.reply_content(reply), reply_to=msg)
    profile.write()
    return answer


@app.train("split")
def split(msg: Message, context: Context) -> Message:
    """The server's answer in the middle of a split round: the client continues it from its store."""
    profile = Profile("train.split")
    from fedsp.runtime.attacks import attack_for
    from fedsp.runtime.clients import client_turn
    from fedsp.runtime.messages import Turn

    profile.mark("imports")
    order = _order(msg, context)
    store = store_for(context, order.run_key, order.partition)
    turn = Turn(order.rnd, order.partition, order.step, payload.record_bytes(msg.content[payload.PREFIX]))  # type: ignore[arg-type]
    reply = client_turn(
        turn,
        store,
        _builder(order, context, store, None, profile),
        order.config.seed,
        has_model=store.has_aux(),
        attack=attack_for(order.config, order.partition),
    )
    answer = Message(payload.reply_content(reply), reply_to=msg)
    profile.write()
    return answer


def _order(msg: Message, context: Context) -> payload.TrainOrder:
    order = payload.TrainOrder.from_record(msg.content[payload.META])  # type: ignore[arg-type]
    if order.partition != partition_of(context):
        raise FedSPError(f"order for partition {order.partition} reached partition {partition_of(context)}")
    return order


def _builder(
    order: payload.TrainOrder,
    context: Context,
    store: ClientStore,
    shipped: dict[str, Tensor] | None,
    profile: Profile,
) -> Callable[[], Client]:
    """How this node makes its client: from the shipped (or stored) client model and its own rows."""
    from fedsp.runtime.flower.client_side import build_client, client_rows, tokenizer_for

    def build() -> Client:
        t0 = time.perf_counter()
        config = order.config
        rows = client_rows(config, order.partition, _data_dir(context), cache=store.root)
        pad_id = tokenizer_for(config.model).pad_token_id
        weights = shipped if shipped is not None else store.load_aux()
        client = build_client(
            config, order.model_config, order.client_layers, weights, rows, order.partition, pad_id
        )
        profile.build_s += time.perf_counter() - t0
        return client

    return build


def _data_dir(context: Context) -> str | None:
    value = context.node_config.get("data-dir")
    return str(value) if value else None
