"""What each run option means and which values it takes, declared once on its :class:`RunConfig` field.

Every field the command line offers carries its help text in ``metadata["help"]``; every numeric field
carries its range in ``metadata["bounds"]`` (:class:`Bounds`). :meth:`RunConfig.__post_init__` checks
every bounded field before anything else, so the command line, config files and ``RunConfig(...)`` in
Python refuse the same values with the same line: NaN, infinities, booleans where a number is meant,
numbers of absurd size (a 20-digit ``--rounds`` would overflow tqdm, a 22-digit ``--seed``
``torch.manual_seed``). No torch here: a ClientApp imports the configuration first.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
from dataclasses import dataclass
from typing import Any

from fedsp.errors import FedSPError

MAX_SEED = 2**53 - 1  # every seed is exact in a JSON number and leaves room for the per-client seeds
MAX_STEPS = 1_000_000  # steps a phase, rounds, tokens: far beyond any run, far below any overflow
MAX_BATCH = 65_536
SHOWN_CHARS = 60  # a value quoted in an error line is cut to this (a config file may hold megabytes)


@dataclass(frozen=True)
class Bounds:
    """The values of one numeric option: ``integer`` ones in [low, high]; real ones finite, between
    ``low`` and ``high``, either end open (excluded) when its flag says so."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.integer:
            return f"an integer in [{self.low}, {self.high}]"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"

    def admits(self, value: Any) -> bool:
        """``value`` is of the option's kind (never a bool) and in range."""
        if isinstance(value, bool):
            return False
        if self.integer:
            return isinstance(value, numbers.Integral) and self.low <= int(value) <= self.high
        if not isinstance(value, numbers.Real):
            return False
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            return False
        above = number > self.low if self.low_open else number >= self.low
        below = number < self.high if self.high_open else number <= self.high
        return math.isfinite(number) and above and below

    def check(self, name: str, value: Any) -> int | float:
        """``value`` as the option's type (int or float), or a one-line error naming ``--name``."""
        if not self.admits(value):
            raise FedSPError(f"{flag(name)} must be {self}, got {shown(value)}")
        return int(value) if self.integer else float(value)


def option(default: Any, help: str | None = None, *, compare: bool = True) -> Any:
    """A non-numeric field: its default and its help text (None: not a command-line option)."""
    metadata = {"help": help} if help is not None else {}
    return dataclasses.field(default=default, metadata=metadata, compare=compare)


def count(default: int | None, help: str, low: int, high: int, *, zero_unsets: bool = False) -> Any:
    """An integer field in [low, high] (None stays allowed where it is the default's kind).
    ``zero_unsets``: 0 given on the command line or in a file means None (``--eval-limit 0``: all)."""
    bounds = Bounds(low, high, integer=True)
    metadata = {"help": help, "bounds": bounds, "zero_unsets": zero_unsets}
    return dataclasses.field(default=default, metadata=metadata)


def real(
    default: float | None,
    help: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A real field, finite and within (or [) low, high ] (or ))."""
    bounds = Bounds(low, high, low_open=low_open, high_open=high_open)
    return dataclasses.field(default=default, metadata={"help": help, "bounds": bounds})


def check_bounds(config: Any) -> None:
    """Check (and normalise to int or float) every bounded field of the dataclass ``config``."""
    for spec in dataclasses.fields(config):
        bounds = spec.metadata.get("bounds")
        value = getattr(config, spec.name)
        if bounds is not None and value is not None:
            object.__setattr__(config, spec.name, bounds.check(spec.name, value))


def flag(name: str) -> str:
    """The command-line spelling of a field: ``local_steps`` -> ``--local-steps``."""
    return "--" + name.replace("_", "-")


def shown(value: Any) -> str:
    """``value`` as an error line quotes it: short, whatever its size (an integer of 10,000 digits is
    described, not printed: printing it would take longer than the run's whole check)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}an integer of about {digits} digits"
    text = _SHORT.repr(value) if isinstance(value, (str, list, tuple, dict)) else str(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()  # a bounded repr: a nested config value is never printed whole
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 3, 6, 6, 4
    short.maxstring, short.maxother = SHOWN_CHARS, 30
    return short


_SHORT = _short_repr()
