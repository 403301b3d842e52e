"""User-facing errors.

Every problem a user can fix (a bad option, a missing file, a malformed data
row) is raised as :class:`FedSPError` with a one-line message that names the
offending thing and what is allowed. The CLI prints that line and exits with
status 2; it never shows a traceback for these.

A message is written once, naming options as the command line spells them
(``--local-steps``). Read from Python (``str(err)``), a configuration option is
named as the :class:`~fedsp.config.RunConfig` field it is (``local_steps``);
inside the command line (:func:`cli_wording`) it keeps its flag.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterable, Iterator

_CLI = contextvars.ContextVar("fedsp_cli_wording", default=False)
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


@contextlib.contextmanager
def cli_wording() -> Iterator[None]:
    """Within this block errors name configuration options as flags (``--local-steps``): the CLI's."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


_FIELDS: frozenset[str] = frozenset()  # RunConfig's fields, declared by fedsp.config (which imports this)


def declare_fields(names: Iterable[str]) -> None:
    """The configuration's field names: a flag whose name is one of them is worded as that field.

    :mod:`fedsp.config` declares them once its :class:`~fedsp.config.RunConfig` exists (the package's
    ``__init__`` imports it, so they are known before any error is shown); this module, a leaf, imports
    nothing of the package."""
    global _FIELDS
    _FIELDS = frozenset(names)


def _as_field(match: re.Match[str]) -> str:
    name = match.group(1).replace("-", "_")
    return name if name in _FIELDS else match.group(0)


class FedSPError(ValueError):
    """A problem with the user's input, reported as one line.

    ``field`` is the first :class:`~fedsp.config.RunConfig` field the message names (None if none).
    """

    def __str__(self) -> str:
        text = super().__str__()
        return text if _CLI.get() else _FLAG.sub(_as_field, text)

    @property
    def field(self) -> str | None:
        for match in _FLAG.finditer(super().__str__()):
            if match.group(1).replace("-", "_") in _FIELDS:
                return match.group(1).replace("-", "_")
        return None


class RunFinished(FedSPError):
    """``--resume`` on a run that completed: nothing to do (the CLI says so and exits 0)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a run: ``folder`` is its results folder (None: removed, no round
    completed) and ``completed`` the last round it holds (0: none; ``--resume`` continues after it)."""

    def __init__(self, folder: str | None, completed: int) -> None:
        super().__init__(folder, completed)
        self.folder, self.completed = folder, completed
