"""The examples a task gives: multiple-choice (:class:`MCExample`) or generative (:class:`GenExample`).

A leaf of the data layer: :mod:`fedsp.data.tasks` (the bundled tasks) and :mod:`fedsp.data.formats` (the
user's own rows) both make these, and the task loader reads the formats' rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice example: the prompt, the choice texts and the gold index."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    meta: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)  # the row's fields


@dataclass(frozen=True)
class GenExample:
    """One generative example (instruction, chat, reading comprehension...).

    ``prompt`` is the text the model continues (a chat rendered up to the last
    assistant turn's generation prompt); ``completion`` the text trained on
    right after it (exactly appended: a leading space is part of it);
    ``references`` every accepted answer, scored against what is generated.
    ``segments``, when given, is the whole training text as ``(text, scored)``
    pieces in order (a chat with several assistant turns, each scored); when
    empty the training text is ``prompt + completion`` with only the
    completion scored.
    """

    id: str
    prompt: str
    completion: str
    references: tuple[str, ...]
    segments: tuple[tuple[str, bool], ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)  # the row's fields


Example = MCExample | GenExample


def unique_id(base: str, taken: set[str]) -> str:
    """``base``, or ``base#2``, ``base#3``... whichever is not yet in ``taken`` (which it joins)."""
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}#{n}"
    taken.add(candidate)
    return candidate
