"""User-facing errors.

Every problem a user can fix (a bad option, a missing file, a malformed data
row) is raised as :class:`FedSPError` with a one-line message that names the
offending thing and what is allowed. The CLI prints that line and exits with
status 2; it never shows a traceback for these.
"""


class FedSPError(ValueError):
    """A problem with the user's input, reported as one line."""


class RunFinished(FedSPError):
    """``--resume`` on a run that completed: nothing to do (the CLI says so and exits 0)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``folder`` is its results folder (None: removed, no round completed) and
    ``completed`` the last round it holds (0: none; ``--resume`` continues after it)."""

    def __init__(self, folder: str | None, completed: int) -> None:
        super().__init__(folder, completed)
        self.folder, self.completed = folder, completed
