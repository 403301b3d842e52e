"""The in-process engine: server and clients in one process, clients in turn.

A course, top to bottom (FedSP; other methods skip what they do not have):
  1. load the global model and the task; cut the train split into K+1 shards;
  2. zero-shot accuracy on the fixed evaluation examples;
  3. server: round-0 prefix, auxiliary model distilled on its shard (KD);
  4. rounds (:class:`~fedsp.runtime.rounds.RoundDriver`): prefix down -> clients
     align + tune -> prefix up -> checked -> averaged -> the server tunes;
  5. accuracy of the best prefix (lowest validation loss) on the same examples;
  6. results folder: config.json, metrics.jsonl, results.json, curves.png.
Steps 1-3 and 5-6 live in :class:`~fedsp.runtime.session.Session`, step 4 in
the round driver, both shared with the Flower engine; this module only picks
the in-process exchange (:class:`~fedsp.runtime.rounds.InProcessEngine`: each
sampled client built from the course when its order comes, its state loaded
from ``clients/partition-K`` in the results folder and written back after the
round, so ``--resume`` continues exactly where a killed run stopped).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedsp.config import RunConfig
from fedsp.runtime.rounds import InProcessEngine, RoundDriver, clients_folder
from fedsp.runtime.session import RunOutcome, run_course

__all__ = ["RunOutcome", "run"]


def run(config: RunConfig, resume: Path | None = None) -> RunOutcome:
    """Steps 1-3 and 5-6 in :func:`~fedsp.runtime.session.run_course`, step 4 by the in-process engine."""
    outcome = run_course(config, resume, lambda session: RoundDriver(session, InProcessEngine(session)).run())
    # Client states are kept on disk only so that an interrupted run can resume; a finished run drops them.
    shutil.rmtree(clients_folder(outcome.out_dir), ignore_errors=True)
    return outcome
