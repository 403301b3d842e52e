"""The in-process engine: server and clients in one process, clients in turn.

A course, top to bottom (FedSP; other methods skip what they do not have):
  - before the rounds: load the global model and the task; cut the train split into K+1 shards;
    zero-shot accuracy on the fixed evaluation examples; the server's round-0 prefix and the
    auxiliary model distilled on its shard (KD);
  - the rounds (:class:`~fedsp.runtime.rounds.RoundDriver`), each in the glossary's six steps
    (docs/architecture.md): 1 broadcast, 2 clients train (align + tune), 3 updates back (checked),
    4 aggregate, 5 server tunes, 6 validate;
  - after them: accuracy of the best prefix (lowest validation loss) on the same examples; the results
    folder: config.json, metrics.jsonl, results.json, curves.png.
What comes before and after the rounds lives in :class:`~fedsp.runtime.session.Session`, the rounds in
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
    """The course in :func:`~fedsp.runtime.session.run_course`, its rounds over the in-process engine."""
    outcome = run_course(config, resume, lambda session: RoundDriver(session, InProcessEngine(session)).run())
    # Client states are kept on disk only so that an interrupted run can resume; a finished run drops them.
    shutil.rmtree(clients_folder(outcome.out_dir), ignore_errors=True)
    return outcome
