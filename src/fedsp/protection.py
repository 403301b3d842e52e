"""The data owners' protections and the attacks used to test them, as data: parsed once, read everywhere.

Pure data (no torch): the configuration parses these options with it, the
server's aggregation (:mod:`fedsp.methods.aggregation`), the privacy accountant
(:mod:`fedsp.runtime.privacy`) and the client half of a round
(:mod:`fedsp.runtime.attacks`) read the parsed forms.

- ``--aggregation``: ``mean`` (FedAvg, weights N_k / N), ``median``
  (coordinate-wise), ``trimmed-mean:F`` (drop the F largest and F smallest
  values of each coordinate), ``clipped-mean:C`` (each update's distance from
  the broadcast clipped to L2 norm C, then FedAvg);
- ``--attack``: ``sign-flip``, ``scale:S``, ``gaussian:SIGMA``,
  ``same-value[:V]``, sent by the partitions named in ``--attackers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsp.errors import FedSPError
from fedsp.options import shown

MEAN, MEDIAN, TRIMMED, CLIPPED = "mean", "median", "trimmed-mean", "clipped-mean"
RULES = (MEAN, MEDIAN, TRIMMED, CLIPPED)
RULE_FORMS = "mean, median, trimmed-mean:F (F a whole number >= 1) or clipped-mean:C (C > 0)"

SIGN_FLIP, SCALE, GAUSSIAN, SAME_VALUE = "sign-flip", "scale", "gaussian", "same-value"
ATTACKS = (SIGN_FLIP, SCALE, GAUSSIAN, SAME_VALUE)
ATTACK_FORMS = "sign-flip, scale:S, gaussian:SIGMA (SIGMA > 0) or same-value[:V]"
SAME_VALUE_DEFAULT = 1.0  # same-value's update sets every coordinate 1.0 away from the broadcast

# SecAgg+ needs enough clients a round to share secrets among (Flower's workflow needs at least 3 shares
# and a reconstruction threshold of at least 2; fewer clients than that cannot be masked).
SECAGG_MIN_CLIENTS = 3
SECAGG_RANGE = 8.0  # the values SecAgg+ quantises lie in [-8, 8] (fedsp.runtime.flower.secagg)


@dataclass(frozen=True)
class Rule:
    """An aggregation rule: its name and its parameter (F for trimmed-mean, C for clipped-mean)."""

    name: str
    value: float = 0.0

    def __str__(self) -> str:
        if self.name == TRIMMED:
            return f"{TRIMMED}:{int(self.value)}"
        if self.name == CLIPPED:
            return f"{CLIPPED}:{self.value:g}"
        return self.name

    @property
    def trim(self) -> int:
        return int(self.value) if self.name == TRIMMED else 0


def parse_rule(text: str) -> Rule:
    """``mean``, ``median``, ``trimmed-mean:F`` or ``clipped-mean:C``; a one-line error for anything else."""
    name, _, arg = str(text).strip().partition(":")
    if name in (MEAN, MEDIAN) and not arg:
        return Rule(name)
    value = _number(arg)
    if name == TRIMMED and value is not None and value.is_integer() and value >= 1:
        return Rule(name, value)
    if name == CLIPPED and value is not None and value > 0:
        return Rule(name, value)
    raise FedSPError(f"--aggregation {text!r} is not valid; use {RULE_FORMS}")


@dataclass(frozen=True)
class Attack:
    """What an attacking partition sends instead of its real update (see :mod:`fedsp.runtime.attacks`)."""

    kind: str
    value: float = 0.0

    def __str__(self) -> str:
        return self.kind if self.kind == SIGN_FLIP else f"{self.kind}:{self.value:g}"


def parse_attack(text: str) -> Attack:
    """``sign-flip``, ``scale:S``, ``gaussian:SIGMA`` or ``same-value[:V]``; a one-line error otherwise."""
    kind, _, arg = str(text).strip().partition(":")
    value = _number(arg)
    if kind == SIGN_FLIP and not arg:
        return Attack(kind)
    if kind == SAME_VALUE and (not arg or value is not None):
        return Attack(kind, SAME_VALUE_DEFAULT if not arg else float(value or 0.0))
    if kind == SCALE and value is not None:
        return Attack(kind, value)
    if kind == GAUSSIAN and value is not None and value > 0:
        return Attack(kind, value)
    raise FedSPError(f"--attack {text!r} is not valid; use {ATTACK_FORMS}")


def parse_partitions(text: str | int | list | tuple) -> tuple[int, ...]:
    """``--attackers 1,4`` (or a list in a config file) as sorted partition ids; a one-line error else."""
    parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        ids = []
        for part in parts:
            if isinstance(part, bool) or (isinstance(part, float) and not part.is_integer()):
                raise ValueError(part)
            ids.append(int(str(part).strip()) if isinstance(part, str) else int(part))
    except (TypeError, ValueError, OverflowError):
        raise FedSPError(f"--attackers {shown(text)} must be partition ids like 1,4") from None
    return tuple(sorted(set(ids)))


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many partitions a round samples: ``max(1, round(fraction * K))``, at most K."""
    return max(1, min(num_clients, round(fraction * num_clients)))


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
