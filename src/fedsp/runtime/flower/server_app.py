"""The ServerApp: FedSP's round loop over Flower's Message API, driving the same Session as in-process.

Round ``r`` (the server half lives in :class:`~fedsp.runtime.session.Session`):
  1. sample partition ids with the seeded rule of :mod:`fedsp.runtime.participation`;
  2. send each sampled node a ``train`` message: the prefix, the order, and the
     auxiliary model the first time (or again, when the node says it lost it);
  3. collect replies until ``--client-timeout``; errors and late nodes are left out;
  4. check the updates (NaN/Inf, shape, dtype, outlier norm), order them by
     partition id, and hand them to ``Session.finish_round`` (aggregate, tune,
     validate, evaluate, checkpoint).
Fewer accepted updates than ``--min-replies`` stops the run with a clear error.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsp import wire
from fedsp.config import RunConfig, load_config_file
from fedsp.errors import FedSPError
from fedsp.methods.base import ClientUpdate
from fedsp.runtime import participation
from fedsp.runtime.flower import payload
from fedsp.runtime.inprocess import round_extra
from fedsp.runtime.session import Session

log = logging.getLogger("fedsp.flower.server")
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
            for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())):
                asked.add(reply.metadata.src_node_id)
                if reply.has_error():
                    log.warning("node %d did not say its partition: %s", reply.metadata.src_node_id,
                                _one_line(reply.error.reason))  # fmt: skip
                    continue
                partition = int(reply.content[payload.META]["partition"])  # type: ignore[arg-type]
                if 0 <= partition < num_clients:
                    found[partition] = reply.metadata.src_node_id
        if len(found) == num_clients:
            return found
        if time.monotonic() > deadline:
            missing = sorted(set(range(num_clients)) - set(found))
            raise FedSPError(f"only {len(found)} of {num_clients} clients connected within {wait_s:.0f} s "
                             f"(partitions missing: {missing[:10]})")  # fmt: skip
        time.sleep(0.2)


@dataclass
class Federation:
    """What the server knows about its nodes across rounds (checkpointed with the server)."""

    nodes: dict[int, int]  # partition -> node id
    shipped: set[int] = field(default_factory=set)  # partitions holding the auxiliary model
    trained: set[int] = field(default_factory=set)  # partitions that completed a round (hold a state)

    def runtime_state(self) -> dict[str, list[int]]:
        return {"shipped": sorted(self.shipped), "trained": sorted(self.trained)}


def serve(grid: Grid, session: Session, wait_s: float = 120.0) -> None:
    """Rounds ``session.first_round..rounds`` over ``grid``; the session checkpoints after each."""
    config, course = session.config, session.course
    assert course is not None and course.client_model is not None
    fed = Federation(discover(grid, course.num_clients, wait_s))
    fed.shipped = set(session.runtime_state.get("shipped", []))
    fed.trained = set(session.runtime_state.get("trained", []))
    aux_record = payload.to_record(course.shipped_once)
    orders = _OrderMaker(session)
    for rnd in range(session.first_round, config.rounds + 1):
        t0 = time.perf_counter()
        sampled = participation.sample_clients(
            course.num_clients, config.fraction_fit, config.seed, rnd
        )  # 1)
        sent = course.server.broadcast()
        session.record_sent(rnd, "prefix", sent, sampled)
        down = wire.encode(sent)
        replies, failed, ups = _exchange(grid, session, fed, orders, rnd, sampled, down, aux_record)  # 2-3)
        accepted, rejected = participation.check_updates(sent, replies)  # 4)
        reasons = [f"client {k}: {why}" for k, why in failed.items()] + [r.reason for r in rejected]
        participation.check_enough(len(accepted), participation.required_replies(config.min_replies,
                                                                                 len(sampled)), rnd, reasons)  # fmt: skip
        session.runtime_state = fed.runtime_state()
        session.finish_round(rnd, sent, len(down) * len(sampled), [ups[k] for k, _ in accepted],
                             [u for _, u in accepted], time.perf_counter() - t0,
                             extra=round_extra(sampled, sorted(failed), rejected))  # fmt: skip


class _OrderMaker:
    def __init__(self, session: Session) -> None:
        assert session.course is not None and session.course.client_model is not None
        self.config = session.config
        self.run_key = hashlib.sha256(str(session.out_dir.resolve()).encode()).hexdigest()[:16]
        self.model_config = session.loaded.model.config.to_json_string(use_diff=False)
        self.layers = session.course.client_model.global_layers

    def order(self, rnd: int, partition: int, expects_state: bool) -> payload.TrainOrder:
        return payload.TrainOrder(self.config, self.run_key, rnd, partition, expects_state, self.model_config,
                                  self.layers)  # fmt: skip


def _exchange(grid, session, fed, orders, rnd, sampled, down, aux_record):  # noqa: ANN001  (internal)
    """Send the round's messages, re-ship the auxiliary model once to nodes that lost it; sorted replies."""
    prefix_record = payload.bytes_record(down)
    by_node = {node: k for k, node in fed.nodes.items()}
    updates: dict[int, ClientUpdate] = {}
    failed: dict[int, str] = {}
    ups: dict[int, int] = {}
    pending = {k: k not in fed.shipped for k in sampled}  # partition -> ship the auxiliary model
    for attempt in range(2):
        messages = []
        for k, ship in pending.items():
            content = RecordDict({payload.PREFIX: prefix_record,
                                  payload.META: orders.order(rnd, k, k in fed.trained and not ship).to_record()})  # fmt: skip
            if ship:
                content[payload.AUX] = aux_record
            messages.append(
                Message(content, dst_node_id=fed.nodes[k], message_type="train", group_id=f"round-{rnd}")
            )
        if any(pending.values()):
            session.record_sent(
                rnd, "shipped_once", session.course.shipped_once, sorted(k for k, s in pending.items() if s)
            )
        answered, retry = set(), {}
        for reply in grid.send_and_receive(messages, timeout=session.config.client_timeout):
            k = by_node.get(reply.metadata.src_node_id)
            if k is None or k not in pending:
                continue
            answered.add(k)
            if reply.has_error():
                failed[k] = _one_line(reply.error.reason)
                log.warning("client %d failed in round %d: %s", k, rnd, failed[k])
                continue
            meta = reply.content[payload.META]
            if meta["status"] != payload.OK:
                if attempt == 0:
                    fed.shipped.discard(k)
                    fed.trained.discard(k)
                    retry[k] = True
                else:
                    failed[k] = f"said {meta['status']} after the auxiliary model was sent again"
                continue
            if pending[k]:
                fed.shipped.add(k)
            fed.trained.add(k)
            try:
                state, size = payload.from_record(reply.content[payload.UPDATE])
                metrics = {name: float(v) for name, v in reply.content[payload.METRICS].items()}
                updates[k] = ClientUpdate(state, int(meta["num-examples"]), metrics)
                ups[k] = size
            except (FedSPError, KeyError, TypeError, ValueError) as err:
                failed[k] = f"malformed reply ({err})"
        for k in set(pending) - answered:
            failed[k] = "no reply within --client-timeout"
        pending = retry
        if not pending:
            break
    replies = sorted(updates.items())  # aggregation order = partition order, as in-process
    return replies, dict(sorted(failed.items())), ups


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "error" in line] or lines or ["unknown error"]
    return useful[-1][:300]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point (``flwr run``): run keys from the file named by run config ``config``."""
    settings = context.run_config
    if "config" not in settings:
        raise FedSPError("run config needs config=PATH (a fedsp TOML/JSON file of run keys) on the server")
    values = load_config_file(str(settings["config"]))
    if settings.get("out"):
        values["out"] = str(settings["out"])
    config = RunConfig.from_dict({**values, "progress": False}, source=str(settings["config"]))
    resume = Path(str(settings["resume"])) if settings.get("resume") else None
    session = Session.start(config, resume=resume)
    if session.course is not None:
        serve(grid, session, wait_s=float(settings.get("wait-seconds", 120)))
    summary = session.finish()
    log.warning("fedsp: done: final acc %.3f, results in %s", summary["final"]["acc"], session.out_dir)
