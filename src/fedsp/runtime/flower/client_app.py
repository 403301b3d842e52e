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
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsp.runtime.flower import payload, secagg, worker
from fedsp.runtime.flower.jobs import Done, Job, partition_of, store_for, work  # noqa: F401  (read here too)

log = logging.getLogger("fedsp.flower.client")
PROFILE_ENV = "FEDSP_CLIENT_PROFILE"
app = ClientApp(mods=[secagg.client_mod])  # SecAgg+ messages only; plain ones pass untouched


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
