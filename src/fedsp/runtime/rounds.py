"""One round driver for every engine: the server's half of a round, written once, and the in-process engine.

Server side, round ``r`` (:class:`RoundDriver`), in the six steps every docstring numbers a round by
(the glossary's "round", docs/architecture.md):
  1. broadcast: sample the partitions taking part (:func:`~fedsp.runtime.participation.sample_clients`,
     seeded by (seed, r)); ``server.broadcast()``, encoded once (:mod:`fedsp.wire`) for every sampled
     client; the audit records it;
  2. clients train: the engine delivers one :class:`Order` per sampled partition; the client model
     goes along the first time (or again, once, to a client that says it lost it);
  3. updates back: the engine returns their :class:`Reply`; the driver counts the bytes that came up;
  4. aggregate: the run's :class:`~fedsp.runtime.privacy.Aggregator`, called once
     (``aggregate_train``): it checks the updates (NaN/Inf, names, shapes, dtypes, outlier norm), caps
     their weights, stops the run when fewer than ``--min-replies`` count, and combines them by the
     aggregation rule or DP;
  5. server tunes, 6. validate: ``Session.finish_round``, which takes the aggregate, then evaluates,
     checkpoints and writes the round's metrics.
Which partitions hold the client model and a trained state (``shipped``,
``trained``) is checkpointed with the server, so a resumed run knows it too.

The client's half, the same in every engine, is
:func:`fedsp.runtime.clients.client_round`.

An engine (:class:`Engine`) supplies only the exchange: in one process
(:class:`InProcessEngine`: clients called in turn, each built when its order
comes and dropped after it, its state on disk, so memory does not grow with
the number of clients) or over Flower messages
(:class:`fedsp.runtime.flower.server_app.FlowerEngine`).
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsp import wire
from fedsp.errors import FedSPError
from fedsp.files import WriteError
from fedsp.methods.base import ClientUpdate, Request, SplitServer
from fedsp.runtime import participation
from fedsp.runtime.attacks import attack_for
from fedsp.runtime.checkpoint import ClientStore
from fedsp.runtime.clients import client_round, client_turn
from fedsp.runtime.messages import FAILED, OK, STEP, Engine, Order, Reply, Turn
from fedsp.runtime.privacy import Summed
from fedsp.runtime.session import Session

log = logging.getLogger("fedsp.rounds")


class RoundDriver:
    """Rounds ``session.first_round..rounds`` of a session over one engine."""

    def __init__(self, session: Session, engine: Engine) -> None:
        if session.course is None:
            raise RuntimeError("a method that trains nothing has no rounds")
        self.session, self.engine = session, engine
        self.shipped = set(session.runtime_state.get("shipped", []))  # partitions holding the client model
        self.trained = set(session.runtime_state.get("trained", []))  # partitions holding a trained state
        self.ignored_replies = 0  # replies not asked for, or second replies, in the current round
        self.bytes_shipped = 0  # bytes of the client model sent in the current round (first time, or again)
        self.split_bytes = 0  # bytes of the current round's split messages, both ways, every client
        self.summed: Summed | None = None  # the current round's sum, under secure aggregation
        if "shipped" not in session.runtime_state and session.first_round > 1:
            # a checkpoint of an older version (in-process, every client built at the start): every
            # client holds the model; one that never trained finds no state and is sent it again
            everyone = range(session.course.num_clients)
            self.shipped, self.trained = set(everyone), set(everyone)

    def run(self) -> None:
        config = self.session.config
        for rnd in tqdm(
            range(self.session.first_round, config.rounds + 1),
            desc="rounds",
            unit="round",
            disable=not config.progress,
        ):
            aggregator = self.session.aggregator
            if aggregator is not None and not aggregator.fits(rnd):
                print(
                    f"fedsp: note: round {rnd} would spend more than --dp-epsilon {config.dp_epsilon:g} "
                    f"(epsilon {aggregator.epsilon():.3g} at delta {config.dp_delta:g} after round "
                    f"{rnd - 1}); stopping here, results are written",
                    file=sys.stderr,
                )
                break
            self.play(rnd)

    def play(self, rnd: int) -> dict[str, Any]:
        """One round, steps 1-6 (5-6 in ``Session.finish_round``); the record appended to metrics.jsonl."""
        t0 = time.perf_counter()
        self.ignored_replies = self.bytes_shipped = self.split_bytes = 0
        session, config = self.session, self.session.config
        assert session.course is not None
        # 1-2) who takes part, and what they all receive
        seed = session.aggregator.sampling_seed if session.aggregator is not None else config.seed
        sampled = participation.sample_clients(session.course.num_clients, config.fraction_fit, seed, rnd)
        sent = session.course.server.broadcast()
        session.record_sent(rnd, "prefix", wire.compress(sent, config.wire_dtype), sampled)
        down = wire.encode_broadcast(sent, config.wire_dtype)
        # 3) the exchange
        replies, failed, bytes_up = self.exchange(rnd, sampled, down, sent)
        summed, self.summed = self.summed, None
        # 4) the aggregation: which updates count, with what weight, combined (under secure aggregation
        # the server sees no update, so it can check none: it gets their sum)
        assert session.aggregator is not None
        aggregated = session.aggregator.aggregate_train(rnd, sent, sampled, replies, failed, summed)
        # 5) the server's half
        session.runtime_state = {"shipped": sorted(self.shipped), "trained": sorted(self.trained)}
        extra = round_extra(sampled, sorted(failed), aggregated.rejected)
        extra.update(
            capped_weights=aggregated.capped,
            ignored_replies=self.ignored_replies,
            bytes_shipped=self.bytes_shipped,
        )
        if self.split_bytes:  # every split message of the round, dropped clients' included
            extra["split_bytes"] = self.split_bytes
        if config.attack is not None:  # an attacked run never passes for a clean one
            extra.update(
                attack=config.attack, attackers_sampled=[k for k in sampled if k in config.attackers]
            )
        if summed is not None:  # every message of the secure round, counted by the engine
            extra["secure_aggregation"] = True
            # (the client model, when shipped, travelled in them and is counted in bytes_shipped)
            bytes_down, up = max(0, summed.bytes_down - self.bytes_shipped), [summed.bytes_up]
        else:
            bytes_down, up = len(down) * len(sampled), [bytes_up[k] for k, _ in aggregated.accepted]
        return session.finish_round(rnd, sent, bytes_down, up, aggregated, time.perf_counter() - t0, extra)

    def deliver(self, orders: list[Order], down: bytes) -> list[Reply]:
        """The engine's exchange; under secure aggregation its summed one (the sum kept in ``summed``)."""
        if not self.session.config.secure_aggregation:
            return self.engine.exchange(orders, down)
        replies, self.summed = self.engine.exchange_summed(orders, down)
        return replies

    def exchange(
        self, rnd: int, sampled: list[int], down: bytes, sent: dict[str, torch.Tensor]
    ) -> tuple[list[tuple[int, ClientUpdate]], dict[int, str], dict[int, int]]:
        """Orders out, replies in: (partition, update) by partition, failures, bytes up per partition.

        ``down`` is the encoded broadcast, ``sent`` the broadcast as the server keeps it (a compressed
        update is a change from it)."""
        session = self.session
        assert session.course is not None
        updates: dict[int, ClientUpdate] = {}
        failed: dict[int, str] = {}
        bytes_up: dict[int, int] = {}
        pending = {k: k not in self.shipped for k in sampled}  # partition -> the client model goes along
        split_bytes: dict[int, Counter[str]] = {}  # partition -> bytes of each split message it sent/got
        for attempt in range(2):
            shipping = sorted(k for k, ship in pending.items() if ship)
            if shipping:
                session.record_sent(rnd, "shipped_once", session.course.shipped_once, shipping)
                self.bytes_shipped += session.once_bytes * len(shipping)
            orders = [Order(rnd, k, ship, k in self.trained and not ship) for k, ship in pending.items()]
            replies = self.collect(rnd, pending, self.deliver(orders, down))
            replies = self.converse(rnd, replies, split_bytes)
            retry: dict[int, bool] = {}
            for k, ship in pending.items():
                reply = replies.get(k)
                if reply is None:
                    failed[k] = "no reply within --client-timeout"
                elif reply.status == FAILED:
                    failed[k] = reply.reason or "unknown error"
                    log.warning("client %d failed in round %d: %s", k, rnd, failed[k])
                elif reply.status != OK:  # it lacks the client model or its state: sent again, once
                    self.shipped.discard(k)
                    self.trained.discard(k)
                    if self.summed is not None:  # a secure round is not repeated for one client
                        failed[k] = f"said {reply.status}; the client model goes with its next order"
                    elif attempt == 0:
                        retry[k] = True
                    else:
                        failed[k] = f"said {reply.status} after the client model was sent again"
                elif self.summed is not None:  # its update is in the sum, nowhere else
                    if ship:
                        self.shipped.add(k)
                    self.trained.add(k)
                    updates[k] = ClientUpdate({}, reply.num_examples, dict(reply.metrics))
                    bytes_up[k] = 0
                else:
                    try:
                        state = wire.decode_update(reply.payload, sent, session.config.wire_dtype)
                    except FedSPError as err:  # as a reply Flower cannot parse: a failure, sent again
                        failed[k] = f"malformed reply ({err})"
                        continue
                    if ship:
                        self.shipped.add(k)
                    self.trained.add(k)
                    metrics = {**reply.metrics, **split_bytes.get(k, {})}  # split messages, when any
                    updates[k] = ClientUpdate(state, reply.num_examples, metrics)
                    bytes_up[k] = len(reply.payload)
            pending = retry
            if not pending:
                break
        self.split_bytes = int(sum(sum(counts.values()) for counts in split_bytes.values()))
        return sorted(updates.items()), dict(sorted(failed.items())), bytes_up

    def collect(self, rnd: int, asked: Collection[int], answers: Sequence[Reply]) -> dict[int, Reply]:
        """The first reply of each client asked; others are counted and ignored."""
        replies: dict[int, Reply] = {}
        for answer in answers:
            if answer.partition not in asked or answer.partition in replies:  # not asked, or again
                what = "a second reply" if answer.partition in replies else "a reply it was not asked for"
                log.warning("round %d: client %s sent %s; ignored", rnd, answer.partition, what)
                self.ignored_replies += 1
                continue
            replies[answer.partition] = answer
        return replies

    def converse(
        self, rnd: int, replies: dict[int, Reply], split_bytes: dict[int, Counter[str]]
    ) -> dict[int, Reply]:
        """Split learning: answer every ``step`` reply with the server's part and send it back, until each
        client has sent its update or failed. Returns the final replies; counts the bytes of every split
        message, by name, in ``split_bytes``. A message that does not fit, or that the server cannot
        answer, drops its client from the round (its partial work with it); the others go on.

        An engine that reaches clients one at a time (``concurrent = False``: in-process) has each
        client's conversation finished before the next starts, so the server holds one client's step at
        a time; on Flower every client's step goes out at once."""
        talking = {k: r for k, r in replies.items() if r.status == STEP}
        if not talking:
            return replies
        replies = dict(replies)
        groups = [talking] if self.engine.concurrent else [{k: r} for k, r in talking.items()]
        for group in groups:
            replies.update(self._talk(rnd, group, split_bytes))
        return replies

    def _talk(
        self, rnd: int, talking: dict[int, Reply], split_bytes: dict[int, Counter[str]]
    ) -> dict[int, Reply]:
        """``converse`` for one group of clients, in lockstep: their final replies."""
        server = self._split_server()
        final: dict[int, Reply] = {}
        sent: dict[int, int] = {}  # partition -> split messages received so far this round
        while talking:
            turns: list[Turn] = []
            for k, reply in talking.items():
                sent[k] = sent.get(k, 0) + 1
                counts = split_bytes.setdefault(k, Counter())
                counts[f"bytes_{reply.step}"] += len(reply.payload)
                where = f"split message {sent[k]} ({reply.step or 'unnamed'})"
                try:
                    if server is None:
                        raise FedSPError("this method's server takes no split messages")
                    answer = server.respond(k, Request(reply.step, wire.decode(reply.payload)))
                except Exception as err:  # whatever one client's message does, never the server's failure
                    what = str(err) if isinstance(err, FedSPError) else f"{type(err).__name__}: {err}"
                    final[k] = self.drop(rnd, k, one_line(f"{where}: {what}"))
                    continue
                payload = wire.encode(answer.tensors)
                counts[f"bytes_{answer.step}"] += len(payload)
                turns.append(Turn(rnd, k, answer.step, payload))
            answered = self.collect(
                rnd, [t.partition for t in turns], self.engine.converse(turns) if turns else []
            )
            talking = {}
            for turn in turns:
                k, got = turn.partition, answered.get(turn.partition)
                if got is None:
                    final[k] = self.drop(
                        rnd, k, f"no reply to split message {turn.step} within --client-timeout"
                    )
                elif got.status == STEP:
                    talking[k] = got
                elif got.status == FAILED:
                    final[k] = self.drop(rnd, k, f"after split message {turn.step}: {got.reason}")
                else:
                    final[k] = got
                    if server is not None:
                        server.forget(k)
        return final

    def _split_server(self) -> SplitServer | None:
        """The course's server when it takes part in its clients' rounds (split learning), else None."""
        server = self.session.course.server if self.session.course is not None else None
        return server if isinstance(server, SplitServer) else None

    def drop(self, rnd: int, partition: int, reason: str) -> Reply:
        """A client left out of the rest of a split round: the server forgets its step in progress."""
        server = self._split_server()
        if server is not None:
            server.forget(partition)
        return Reply.failed(partition, reason)


def round_extra(
    sampled: list[int], failed: list[int], rejected: list[participation.Rejection]
) -> dict[str, Any]:
    """What metrics.jsonl records of participation: who was asked, who failed, whose update was rejected."""
    return {
        "sampled_clients": sampled,
        "failed_clients": failed,
        "rejected_updates": len(rejected),
        "rejections": [{"client": r.partition, "reason": r.reason} for r in rejected],
    }


class InProcessEngine:
    """Clients called in turn in this process, each built when its order comes and dropped after its round.

    A client's state lives in ``<results folder>/clients/partition-K`` between
    rounds (as on a Flower node), so the process holds one client at a time.
    The client model is the course's (one copy in memory, the server's): a
    client it is "shipped" to starts afresh.
    """

    concurrent = False  # one client at a time: a split round's conversations one after the other

    def __init__(self, session: Session) -> None:
        assert session.course is not None
        self.course, self.config = session.course, session.config
        self.root = clients_folder(session.out_dir)

    def store(self, partition: int) -> ClientStore:
        return ClientStore(self.root / f"partition-{partition}", self.config.state_moments)

    def exchange(self, orders: Sequence[Order], prefix: bytes) -> list[Reply]:
        return self._each(orders, partial(self._call, prefix=prefix))

    def exchange_summed(self, orders: Sequence[Order], prefix: bytes) -> tuple[list[Reply], Summed]:
        # the configuration refuses --secure-aggregation in process; a guard for this engine used directly
        raise FedSPError("this engine cannot aggregate securely (--secure-aggregation needs Flower)")

    def converse(self, turns: Sequence[Turn]) -> list[Reply]:
        return self._each(turns, self._turn)

    def _each(self, orders: Sequence[Order] | Sequence[Turn], call: Callable[[Any], Reply]) -> list[Reply]:
        replies = []
        rnd = orders[0].rnd if orders else 0
        # Each client is freed as soon as its round ends: optimisers and modules hold reference cycles,
        # which Python's collector reaches by object counts, not bytes (a few SmolLM2 clients could pile
        # up first). What lived before this round is frozen, so each collection scans only the client's
        # objects (a full collection of the ~350 k objects of a loaded model and torch takes 0.2 s).
        gc.freeze()
        try:
            for order in tqdm(
                orders,
                desc=f"round {rnd} clients",
                unit="client",
                leave=False,
                disable=not self.config.progress,
            ):
                replies.append(self._one(order, call))
                gc.collect()
        finally:
            gc.unfreeze()
        return replies

    def _one(self, order: Order | Turn, call: Callable[[Any], Reply]) -> Reply:
        if self.config.client_timeout is None:
            return _guarded(call, order)
        # With --client-timeout the client runs in a thread the round stops waiting for: a client that
        # hangs is left out, as on Flower (its thread finishes on its own; what it writes is its state).
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["reply"] = _guarded(call, order)
            except BaseException as err:  # e.g. KeyboardInterrupt: raised again in the round's thread
                outcome["error"] = err

        worker = threading.Thread(target=work, name=f"client-{order.partition}", daemon=True)
        worker.start()
        worker.join(self.config.client_timeout)
        if worker.is_alive():
            return Reply.failed(order.partition, "no reply within --client-timeout")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["reply"]

    def _call(self, order: Order, prefix: bytes) -> Reply:
        k = order.partition
        build = partial(self.course.make_client, k)
        return client_round(
            order,
            prefix,
            self.store(k),
            build,
            self.config.seed,
            attack=attack_for(self.config, k),
            wire_dtype=self.config.wire_dtype,
        )

    def _turn(self, turn: Turn) -> Reply:
        k = turn.partition
        build = partial(self.course.make_client, k)
        return client_turn(
            turn,
            self.store(k),
            build,
            self.config.seed,
            attack=attack_for(self.config, k),
            wire_dtype=self.config.wire_dtype,
        )


def _guarded(call: Callable[[Any], Reply], order: Order | Turn) -> Reply:
    """``call(order)``; one client's failure is its reply, never the round's. A disk error writing its state
    is not the client's: in this process the state lives in the results folder, and the run stops."""
    try:
        return call(order)
    except WriteError:
        raise
    except Exception as err:
        return Reply.failed(order.partition, one_line(f"{type(err).__name__}: {err}"))


def one_line(text: str) -> str:
    """The most telling line of an error text (the last one that names an error), at most 300 characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "error" in line] or lines or ["unknown error"]
    return useful[-1][:300]


def clients_folder(out_dir: Path) -> Path:
    """Where an engine keeps its clients' states for a run (a finished run removes it)."""
    return out_dir / "clients"
