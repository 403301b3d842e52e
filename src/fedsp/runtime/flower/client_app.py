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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsp.errors import FedSPError
from fedsp.runtime.flower import configure_environment, payload, secagg, worker
from fedsp.runtime.messages import Reply

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

    from fedsp.methods.base import Client
    from fedsp.runtime.checkpoint import ClientStore

log = logging.getLogger("fedsp.flower.client")
PROFILE_ENV = "FEDSP_CLIENT_PROFILE"
app = ClientApp(mods=[secagg.client_mod])  # SecAgg+ messages only; plain ones pass untouched


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


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This node's partition id (the server orders and samples clients by it, not by node id)."""
    return Message(
        RecordDict({payload.META: ConfigRecord({"partition": partition_of(context.node_config)})}),
        reply_to=msg,
    )


class Profile:
    """Where one handler call's time goes, appended as a JSON line to ``$FEDSP_CLIENT_PROFILE`` when set.

    ``before_handler_s``: from the process's start to the handler (Python, Flower's start-up, the app's
    installation and loading); ``build_s`` (the client: rows, model skeleton, weights, state);
    ``work_s``: the rest of the handler (imports of torch and the model code unless a warm worker did
    the job, the round or split step, the state written); ``handler_s`` in all; ``via``: ``worker`` or
    ``here``. bench/flower_overhead.py reads these.
    """

    def __init__(self, kind: str) -> None:
        self.kind, self.start, self.build_s, self.via = kind, time.perf_counter(), 0.0, "here"
        self.path = os.environ.get(PROFILE_ENV)
        self.age = 0.0
        if self.path:
            import psutil

            self.age = time.time() - psutil.Process().create_time()

    def write(self) -> None:
        if not self.path:
            return
        handler_s = time.perf_counter() - self.start
        record = {"kind": self.kind, "via": self.via, "pid": os.getpid(), "before_handler_s": self.age}
        record.update(work_s=handler_s - self.build_s, build_s=self.build_s, handler_s=handler_s)
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """An order: the round's prefix, and the client model when the server ships it (step 1-4 above)."""
    aux = payload.record_bytes(msg.content[payload.AUX]) if payload.AUX in msg.content else None  # type: ignore[arg-type]
    return _answer("train", msg, context, aux)


@app.train("split")
def split(msg: Message, context: Context) -> Message:
    """The server's answer in the middle of a split round: the client continues it from its store."""
    return _answer("split", msg, context)


def _answer(kind: str, msg: Message, context: Context, aux: bytes | None = None) -> Message:
    """The message's job, done by the node's warm worker when it keeps one, else here."""
    profile = Profile("train" if kind == "train" else "train.split")
    meta: Any = msg.content[payload.META]
    sent: Any = msg.content[payload.PREFIX]
    job = Job(kind, dict(meta), dict(context.node_config), payload.record_bytes(sent), aux)
    done = worker.ask(job)
    profile.via = "worker" if done is not None else "here"
    done = done or work(job)
    profile.build_s = done.build_s
    if done.reply is None:  # tests only: FEDSP_FAULTS empty-reply
        return Message(RecordDict(), reply_to=msg)
    answer = Message(payload.reply_content(done.reply), reply_to=msg)
    profile.write()
    return answer


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
