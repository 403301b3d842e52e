"""The ServerApp: the round driver over Flower's Message API, with the same Session as in-process.

The rounds are :class:`~fedsp.runtime.rounds.RoundDriver`'s (sampling,
broadcast, update checks, aggregation, checkpoints: written once for every
engine); this module supplies only the exchange (:class:`FlowerEngine`):
  1. once, ask every connected node which partition it holds (:func:`discover`);
  2. per order, a ``train`` message to the partition's node: the prefix, the
     ``fedsp`` record (round, partition, run configuration, architecture) and the
     auxiliary model when the order ships it;
  3. collect replies until ``--client-timeout``; an error or a malformed reply
     is that client's failure, never the server's;
  4. split learning (SFPrompt): the driver's answers to the clients' split
     messages go out as ``train.split`` messages, one step of every client at a
     time, and come back the same way (:meth:`FlowerEngine.converse`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsp import wire
from fedsp.config import RunConfig, load_config_file
from fedsp.errors import FedSPError
from fedsp.evaluation import describe
from fedsp.files import WriteError
from fedsp.runtime.flower import payload, secagg
from fedsp.runtime.messages import OK, Order, Reply, Turn
from fedsp.runtime.privacy import Summed
from fedsp.runtime.rounds import RoundDriver, one_line
from fedsp.runtime.session import Session, run_course

log = logging.getLogger("fedsp.flower.server")
UNKNOWN_ACTION = "No train function registered with name"  # Flower's ClientApp, for a message type it lacks
app = ServerApp()


def discover(grid: Grid, num_clients: int, wait_s: float) -> dict[int, int]:
    """{partition id: node id} for partitions 0..K-1, asking every connected node which partition it holds."""
    deadline = time.monotonic() + wait_s
    found: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            queries = [
                Message(RecordDict(), dst_node_id=n, message_type="query", group_id="discover") for n in new
            ]
            for reply in send_and_receive(grid, queries, max(1.0, deadline - time.monotonic())):
                asked.add(reply.metadata.src_node_id)
                if reply.has_error():
                    log.warning(
                        "node %d did not say its partition: %s",
                        reply.metadata.src_node_id,
                        one_line(str(reply.error.reason)),
                    )
                    continue
                try:
                    partition = int(reply.content[payload.META]["partition"])  # type: ignore[arg-type]
                except (KeyError, TypeError, ValueError) as err:
                    log.warning("node %d sent a malformed answer (%s)", reply.metadata.src_node_id, err)
                    continue
                if 0 <= partition < num_clients:
                    found[partition] = reply.metadata.src_node_id
        if len(found) == num_clients:
            return found
        if time.monotonic() > deadline:
            missing = sorted(set(range(num_clients)) - set(found))
            raise FedSPError(
                f"only {len(found)} of {num_clients} clients connected within {wait_s:.0f} s "
                f"(partitions missing: {missing[:10]})"
            )
        time.sleep(0.2)


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Flower's ``send_and_receive``, polling for replies every 0.05-0.5 s instead of every 3 s (what a
    deployed Grid does): each split step and round waits for its last reply, not for the next poll."""
    if not hasattr(grid, "pull_messages"):  # a grid that only sends and receives (the tests' local one)
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    pause = 0.05
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting or (end is not None and time.monotonic() >= end):
            break
        time.sleep(pause if end is None else max(0.0, min(pause, end - time.monotonic())))
        pause = min(0.5, pause * 1.5)
    return replies


class OrderMaker:
    """The ``fedsp`` record of a train message: run configuration, architecture, the client's layers."""

    def __init__(self, session: Session) -> None:
        assert session.course is not None and session.course.client_model is not None
        self.config = session.config
        self.run_key = hashlib.sha256(str(session.out_dir.resolve()).encode()).hexdigest()[:16]
        self.model_config = session.loaded.model.config.to_json_string(use_diff=False)
        self.layers = session.course.client_model.global_layers

    def order(self, rnd: int, partition: int, expects_state: bool, step: str = "") -> payload.TrainOrder:
        return payload.TrainOrder(
            self.config, self.run_key, rnd, partition, expects_state, self.model_config, self.layers, step
        )


class FlowerEngine:
    """The round driver's exchange over Flower's Grid: one ``train`` message per order, replies until the
    timeout; under ``--secure-aggregation`` the same orders go through a SecAgg+ round instead
    (:meth:`exchange_summed`)."""

    concurrent = True  # every client's message goes out at once (split rounds too)

    def __init__(
        self, grid: Grid, session: Session, wait_s: float = 120.0, context: Context | None = None
    ) -> None:
        assert session.course is not None
        self.grid, self.config, self.context = grid, session.config, context
        self.out_dir = session.out_dir.resolve()
        self.nodes = discover(grid, session.course.num_clients, wait_s)  # partition -> node id
        self.orders = OrderMaker(session)
        self.aux_record = payload.to_record(wire.encode(session.course.shipped_once))  # encoded once

    def contents(self, orders: Sequence[Order], prefix: bytes) -> dict[int, RecordDict]:
        """Each order's ``train`` content (prefix, order, the client model when shipped), by node id."""
        prefix_record = payload.to_record(prefix)
        out = {}
        for order in orders:
            meta = self.orders.order(order.rnd, order.partition, order.expects_state).to_record()
            content = RecordDict({payload.PREFIX: prefix_record, payload.META: meta})
            if order.ship:
                content[payload.AUX] = self.aux_record
            out[self.nodes[order.partition]] = content
        return out

    def exchange_summed(self, orders: Sequence[Order], prefix: bytes) -> tuple[list[Reply], Summed]:
        """The orders as one SecAgg+ round: each client's status and clear metrics, and the sum.

        A client that drops out (fails, or misses ``--client-timeout``) is left out of the sum and
        reported failed; one that lacks the client model or its state adds nothing and says so.
        """
        if self.context is None:
            raise RuntimeError("secure aggregation needs the ServerApp's context")
        sent = wire.decode(prefix)
        contents = self.contents(orders, prefix)
        rnd = orders[0].rnd if orders else 0
        outcome = secagg.secure_round(self.grid, self.context, rnd, contents, self.config.client_timeout)
        by_node = {node: k for k, node in self.nodes.items()}
        replies = []
        for node, metrics in outcome.metrics.items():
            k = by_node[node]
            status = str(metrics.pop("status", "failed"))
            metrics.pop("partition", None)
            values = {name: float(v) for name, v in metrics.items() if isinstance(v, (int, float))}
            replies.append(Reply(k, status, b"", 1 if status == OK else 0, values))
        if outcome.total is None:
            raise FedSPError(
                f"round {rnd}: the SecAgg+ round halted (too few of the {len(contents)} clients stayed in "
                "it to unmask the sum); see the Flower log"
            )
        vector = outcome.total
        ok = sum(1 for r in replies if r.status == OK)
        summed = Summed(
            wire.unflatten(vector[:-2], sent),
            ok,
            float(vector[-2]),
            bytes_down=outcome.bytes_down,
            bytes_up=outcome.bytes_up,
        )
        return replies, summed

    def exchange(self, orders: Sequence[Order], prefix: bytes) -> list[Reply]:
        rnd = orders[0].rnd if orders else 0
        messages = [
            Message(content, dst_node_id=node, message_type="train", group_id=f"round-{rnd}")
            for node, content in self.contents(orders, prefix).items()
        ]
        return self.send(messages)

    def converse(self, turns: Sequence[Turn]) -> list[Reply]:
        """The server's answers in split rounds: one ``train.split`` message per turn, all at once."""
        messages = []
        for turn in turns:
            meta = self.orders.order(turn.rnd, turn.partition, True, turn.step).to_record()
            content = RecordDict({payload.PREFIX: payload.to_record(turn.payload), payload.META: meta})
            node = self.nodes[turn.partition]
            messages.append(
                Message(content, dst_node_id=node, message_type="train.split", group_id=f"round-{turn.rnd}")
            )
        return self.send(messages)

    def send(self, messages: list[Message]) -> list[Reply]:
        """Send ``messages``; the replies until ``--client-timeout`` (a node's error is its failure)."""
        by_node = {node: k for k, node in self.nodes.items()}
        replies = []
        for message in send_and_receive(self.grid, messages, self.config.client_timeout):
            k = by_node.get(message.metadata.src_node_id)
            if k is None:  # the driver counts it as a reply it did not ask for
                log.warning(
                    "a reply from node %d, which holds no partition of this run", message.metadata.src_node_id
                )
                replies.append(Reply.failed(-1, "reply from an unknown node"))
                continue
            if message.has_error():
                self.check_disk(str(message.error.reason))
                reason = one_line(str(message.error.reason))
                if UNKNOWN_ACTION in reason:  # a ClientApp without the handler: an older fedsp on the node
                    reason = (
                        f"node {message.metadata.src_node_id} runs a fedsp without split learning "
                        f"(train.split; install this version there): {reason}"
                    )
                replies.append(Reply.failed(k, reason))
            else:
                replies.append(payload.parse_reply(k, message.content))
        return replies

    def check_disk(self, reason: str) -> None:
        """A node that failed writing into this run's results folder (a simulation keeps its clients'
        states there) failed for the server's disk, not for itself: the run stops (WriteError)."""
        found = DISK_ERROR.search(reason)
        if found and Path(found.group(3)).resolve().is_relative_to(self.out_dir):
            raise WriteError(int(found.group(1)), found.group(2), found.group(3))


DISK_ERROR = re.compile(r"\[Errno (\d+)\] ([^:'\n]+): '([^'\n]+)'")  # how an OSError names its file


def serve(grid: Grid, session: Session, wait_s: float = 120.0, context: Context | None = None) -> None:
    """Rounds ``session.first_round..rounds`` over ``grid``, driven by the one round driver."""
    RoundDriver(session, FlowerEngine(grid, session, wait_s, context)).run()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point (``flwr run``): run keys from the file named by run config ``config``."""
    settings = context.run_config
    if "config" not in settings:
        raise FedSPError("run config needs config=PATH (a fedsp TOML/JSON file of run keys) on the server")
    values = load_config_file(str(settings["config"]))
    if settings.get("out"):
        values["out"] = str(settings["out"])
    values["engine"] = "flower"  # a deployed run is a Flower run (what --secure-aggregation checks)
    config = RunConfig.from_dict({**values, "progress": False}, source=str(settings["config"]))
    resume = Path(str(settings["resume"])) if settings.get("resume") else None
    wait_s = float(settings.get("wait-seconds", 120))
    outcome = run_course(config, resume, lambda session: serve(grid, session, wait_s=wait_s, context=context))
    log.warning("fedsp: done: final %s, results in %s", describe(outcome.results["final"]), outcome.out_dir)
