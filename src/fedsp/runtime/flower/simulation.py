"""``fedsp run --engine flower``: the course as a Flower simulation on one machine.

The round driver over the Flower engine (:func:`~fedsp.runtime.flower.server_app.serve`)
drives a :class:`~fedsp.runtime.session.Session` started here, so the results folder
is the in-process runner's; the ClientApp runs in a pool of Ray actors (one per
core, at most 2 on this machine's 2 cores), one virtual SuperNode per client.
Client states go to ``<results folder>/clients`` (one directory per partition).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from fedsp.config import RunConfig
from fedsp.runtime.flower import configure_environment
from fedsp.runtime.rounds import clients_folder
from fedsp.runtime.session import RunOutcome, Session, run_course


def discovery_seconds(num_clients: int) -> float:
    """How long the server waits for every virtual node to say its partition: Ray's start (about 25 s
    here) plus the nodes' answers, which Ray's actors give in turn (measured on 2 cores with another
    run sharing them: 200 nodes answered in 52 s), with a wide margin."""
    return 120.0 + 0.5 * num_clients


def run(config: RunConfig, resume: Path | None = None, actors: int | None = None) -> RunOutcome:
    configure_environment()
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedsp.runtime.flower.client_app import app as client_app
    from fedsp.runtime.flower.server_app import serve

    def drive(session: Session) -> None:
        assert session.course is not None
        course = session.course
        failure: list[BaseException] = []
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                serve(grid, session, wait_s=discovery_seconds(course.num_clients), context=context)
            except BaseException as err:  # re-raised in this thread, after the simulation stops
                failure.append(err)

        os.environ["FEDSP_FLOWER_STATE_DIR"] = str(clients_folder(session.out_dir.resolve()))
        flwr_log = logging.getLogger("flwr")
        flwr_log.setLevel(logging.WARNING if not config.progress else logging.INFO)
        one_line = ClientErrorsInOneLine()
        flwr_log.addFilter(one_line)
        try:
            run_simulation(
                server_app,
                client_app,
                num_supernodes=session.course.num_clients,
                backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": workers}},
            )
        finally:
            flwr_log.removeFilter(one_line)
        if failure:
            raise failure[0]
        stopped = session.aggregator is not None and session.aggregator.stopped_at is not None
        if len(session.history) - 1 < config.rounds and not stopped:  # a DP budget may end it early
            raise RuntimeError(f"the Flower simulation stopped after round {len(session.history) - 1}")

    workers = actors or max(1, min(2, os.cpu_count() or 1))
    return run_course(config, resume, drive)


class ClientErrorsInOneLine(logging.Filter):
    """Flower logs a ClientApp's exception twice, each with Ray's and its own traceback; one that is a
    :class:`~fedsp.errors.FedSPError` (a client refusing its round, say) or a
    :class:`~fedsp.files.WriteError` (a disk error, which stops the run) is said once, as its one line."""

    FEDSP = re.compile(r"(?:FedSPError|WriteError): (.+)")

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.FEDSP.findall(record.getMessage())
        if not found:
            return True
        line = found[-1].strip()
        if line in self.said:
            return False
        self.said.add(line)
        record.msg, record.args, record.exc_info = f"a client stopped: {line}", (), None
        return True
