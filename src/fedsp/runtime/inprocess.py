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
shared with the Flower runtime; this module only moves payloads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.methods.base import ClientUpdate
from fedsp.runtime.session import Session


@dataclass
class RunOutcome:
    out_dir: Path
    results: dict[str, Any]


def run(config: RunConfig) -> RunOutcome:
    session = Session.start(config)  # steps 1-3
    course = session.course
    if course is not None:
        clients = [course.make_client(k) for k in range(course.num_clients)]  # step 4
        for rnd in tqdm(
            range(1, config.rounds + 1), desc="rounds", unit="round", disable=not config.progress
        ):
            t0 = time.perf_counter()
            sent = course.server.broadcast()
            down = wire.encode(sent)
            updates, ups = [], []
            for client in tqdm(clients, desc=f"round {rnd} clients", unit="client", leave=False,
                               disable=not config.progress):  # fmt: skip
                update = client.fit(wire.decode(down))
                payload = wire.encode(update.state)
                ups.append(len(payload))
                updates.append(ClientUpdate(wire.decode(payload), update.num_examples, update.metrics))
            session.finish_round(rnd, sent, len(down) * len(clients), ups, updates, time.perf_counter() - t0)
    summary = session.finish()  # steps 6-7
    return RunOutcome(session.out_dir, summary)
