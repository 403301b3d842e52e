"""The ClientApp: one data owner's handlers, plain functions of (Message, Context).

``train`` (one round of the method's client, steps numbered as in
:mod:`fedsp.methods.fedsp`'s client round):
  1. read the order (round, partition, run key) and the prefix;
  2. if the message carries the auxiliary model: keep it on this node's disk
     and start fresh; else rebuild the client from disk and load its state
     from the previous round; a client that lost it replies ``lost-state``
     (``need-aux`` when it never had the model) and the server ships again;
  3. ``client.fit(prefix)`` under the round's seed (same as in-process);
  4. write the client's state atomically, reply with the update.
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

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsp.errors import FedSPError
from fedsp.runtime.flower import configure_environment, payload

if TYPE_CHECKING:
    from fedsp.runtime.checkpoint import ClientStore

log = logging.getLogger("fedsp.flower.client")
app = ClientApp()


def partition_of(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise FedSPError("this SuperNode has no partition-id; start it with --node-config 'partition-id=K'")
    return int(context.node_config["partition-id"])


def store_for(context: Context, run_key: str, partition: int) -> ClientStore:
    from fedsp.runtime.checkpoint import ClientStore

    root = (context.node_config.get("state-dir") or os.environ.get("FEDSP_FLOWER_STATE_DIR")
            or configure_environment() / "client-state")  # fmt: skip
    return ClientStore(Path(str(root)) / run_key / f"partition-{partition}")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This node's partition id (the server orders and samples clients by it, not by node id)."""
    return Message(
        RecordDict({payload.META: ConfigRecord({"partition": partition_of(context)})}), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from fedsp.runtime import participation
    from fedsp.runtime.flower.client_side import build_client, client_rows, tokenizer_for

    # 1) the order and the prefix
    order = payload.TrainOrder.from_record(msg.content[payload.META])  # type: ignore[arg-type]
    if order.partition != partition_of(context):
        raise FedSPError(f"order for partition {order.partition} reached partition {partition_of(context)}")
    prefix, _ = payload.from_record(msg.content[payload.PREFIX])  # type: ignore[arg-type]
    store = store_for(context, order.run_key, order.partition)
    # 2) the client model: shipped now, or rebuilt from this node's disk
    if payload.AUX in msg.content:
        shipped, _ = payload.from_record(msg.content[payload.AUX])  # type: ignore[arg-type]
        store.reset()
        store.save_aux(shipped)
        saved = None
    else:
        if not store.has_aux():
            return _status(msg, payload.NEED_AUX)
        saved = store.load_before(order.rnd)
        if saved is None and order.expects_state:
            log.warning("partition %d: client state lost; asking for the auxiliary model", order.partition)
            return _status(msg, payload.LOST_STATE)
        shipped = store.load_aux()
    config = order.config
    rows = client_rows(config, order.partition, _data_dir(context))
    pad_id = tokenizer_for(config.model).pad_token_id
    client = build_client(
        config, order.model_config, order.client_layers, shipped, rows, order.partition, pad_id
    )
    if saved is not None:
        client.load_state_dict(saved[1])
    # 3) the round, under the same seed as in-process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(participation.client_rng_seed(config.seed, order.rnd, order.partition))
        update = client.fit(prefix)
    # 4) state to disk, update to the server
    store.save(order.rnd, client.state_dict())
    meta = ConfigRecord(
        {"status": payload.OK, "partition": order.partition, "num-examples": update.num_examples}
    )
    content = RecordDict({payload.UPDATE: payload.to_record(update.state), payload.META: meta,
                          payload.METRICS: MetricRecord({k: float(v) for k, v in update.metrics.items()})})  # fmt: skip
    return Message(content, reply_to=msg)


def _status(msg: Message, status: str) -> Message:
    return Message(RecordDict({payload.META: ConfigRecord({"status": status})}), reply_to=msg)


def _data_dir(context: Context) -> str | None:
    value = context.node_config.get("data-dir")
    return str(value) if value else None
