"""The in-process runner: server and clients in one process, clients in turn.

A course, top to bottom (FedSP; other methods skip what they do not have):
  1. load the global model and the task; cut the train split into K+1 shards;
  2. zero-shot accuracy on the fixed evaluation examples;
  3. server: round-0 prefix, auxiliary model distilled on its shard (KD);
  4. send the auxiliary model once; each client keeps its own copy;
  5. rounds: prefix down -> clients align + tune -> prefix up -> average -> server tunes;
  6. accuracy of the best prefix (lowest validation loss) on the same examples;
  7. results folder: config.json, metrics.jsonl, results.json, curves.png.
Steps 1-3, the server half of 5, and 6-7 live in :class:`~fedsp.runtime.session.Session`,
shared with the Flower runtime; this module only moves payloads. Client sampling,
per-client seeding and update checks come from :mod:`fedsp.runtime.participation`
(the same rules as the Flower runtime); each client's state is written to
``clients/partition-K`` in the results folder after every round, so
``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.methods.base import Client, ClientUpdate
from fedsp.runtime import participation
from fedsp.runtime.checkpoint import ClientStore
from fedsp.runtime.session import Session

log = logging.getLogger("fedsp.inprocess")


@dataclass
class RunOutcome:
    out_dir: Path
    results: dict[str, Any]


def run(config: RunConfig, resume: Path | None = None) -> RunOutcome:
    session = Session.start(config, resume=resume)  # steps 1-3
    course = session.course
    if course is not None:
        clients = [_client(session, k) for k in range(course.num_clients)]  # step 4
        if session.first_round == 1:
            session.record_sent(0, "shipped_once", course.shipped_once, list(range(course.num_clients)))
        for rnd in tqdm(range(session.first_round, config.rounds + 1), desc="rounds", unit="round",
                        disable=not config.progress):  # fmt: skip
            t0 = time.perf_counter()
            sampled = participation.sample_clients(course.num_clients, config.fraction_fit, config.seed, rnd)
            sent = course.server.broadcast()
            session.record_sent(rnd, "prefix", sent, sampled)
            down = wire.encode(sent)
            replies, ups, failed = [], {}, []
            for k in tqdm(sampled, desc=f"round {rnd} clients", unit="client", leave=False,
                          disable=not config.progress):  # fmt: skip
                try:
                    update = fit_client(clients[k], down, config.seed, rnd, k)
                except Exception as err:  # one client's failure never stops the round
                    log.warning("client %d failed in round %d: %s", k, rnd, err)
                    failed.append(k)
                    continue
                _store(session, k).save(rnd, clients[k].state_dict())
                payload = wire.encode(update.state)
                ups[k] = len(payload)
                replies.append((k, ClientUpdate(wire.decode(payload), update.num_examples, update.metrics)))
            accepted, rejected = participation.check_updates(sent, replies)
            needed = participation.required_replies(config.min_replies, len(sampled))
            if sampled:
                participation.check_enough(len(accepted), needed, rnd,
                                           [f"client {k} failed" for k in failed] + [r.reason for r in rejected])  # fmt: skip
            session.finish_round(rnd, sent, len(down) * len(sampled), [ups[k] for k, _ in accepted],
                                 [u for _, u in accepted], time.perf_counter() - t0,
                                 extra=round_extra(sampled, failed, rejected))  # fmt: skip
    summary = session.finish()  # steps 6-7
    # Client states are kept on disk only so that an interrupted run can resume; a finished run drops them.
    shutil.rmtree(session.out_dir / "clients", ignore_errors=True)
    return RunOutcome(session.out_dir, summary)


def fit_client(client: Client, down: bytes, seed: int, rnd: int, partition: int) -> ClientUpdate:
    """One client's round under its own torch seed (the same in every runtime), the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(participation.client_rng_seed(seed, rnd, partition))
        return client.fit(wire.decode(down))


def round_extra(
    sampled: list[int], failed: list[int], rejected: list[participation.Rejection]
) -> dict[str, Any]:
    """What metrics.jsonl records about participation: who was asked, who failed, whose update was rejected."""
    return {
        "sampled_clients": sampled,
        "failed_clients": failed,
        "rejected_updates": len(rejected),
        "rejections": [{"client": r.partition, "reason": r.reason} for r in rejected],
    }


def _store(session: Session, partition: int) -> ClientStore:
    return ClientStore(session.out_dir / "clients" / f"partition-{partition}")


def _client(session: Session, partition: int) -> Client:
    """Client ``partition`` as the method builds it; after a resume, with its state from the last round."""
    assert session.course is not None
    with torch.random.fork_rng(devices=[]):  # building clients must not move the server's RNG
        client = session.course.make_client(partition)
    saved = _store(session, partition).load_before(session.first_round)
    if saved is not None:
        client.load_state_dict(saved[1])
    return client
