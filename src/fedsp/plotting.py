"""What every figure of fedsp does so that a reader can trust it: chance lines, y-axes that do not turn a
question or two into a cliff, value labels, and a subtitle naming the model, task, clients, seeds and
questions behind the numbers. Used by a run's ``curves.png`` (:mod:`fedsp.runtime.results`) and by
``fedsp compare``'s tables and convergence figures (:mod:`fedsp.experiments`). No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

# Accuracy (%) of answering at random: 100 / the number of choices of the task's questions (ARC mostly
# has 4, a few have 3 or 5). Tasks not named here (generative, custom) have no chance line.
CHANCE = {
    "arc_easy": 25.0,
    "arc_challenge": 25.0,
    "openbookqa": 25.0,
    "piqa": 50.0,
    "sciq": 25.0,
    "hellaswag": 25.0,
    "medmcqa": 25.0,
    "race": 25.0,
}
MIN_SPAN = 20.0  # an accuracy axis spans at least this many points: 0.4 points never fill a panel
MB = 1e6


def chance(task: str) -> float | None:
    """The accuracy (%) of a random guess on ``task``'s questions, where that is one number."""
    return CHANCE.get(task)


def percent_limits(values: Iterable[float], span: float = MIN_SPAN) -> tuple[float, float]:
    """y-limits in [0, 100] around ``values`` (percentages) at least ``span`` points wide."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 100.0
    low, high = min(finite), max(finite)
    pad = max(2.0, (span - (high - low)) / 2)
    low, high = low - pad, high + pad
    if low < 0:
        low, high = 0.0, min(100.0, high - low)
    if high > 100:
        low, high = max(0.0, low - (high - 100)), 100.0
    return low, high


def label_points(ax: Any, xs: Sequence[float], ys: Sequence[float], colour: str = "black") -> None:
    """Each point's value above it (one decimal); with many points only the first and the last."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    if len(pairs) > 12:
        pairs = [pairs[0], pairs[-1]]
    for x, y in pairs:
        ax.annotate(
            f"{y:.1f}",
            (x, y),
            textcoords="offset points",
            xytext=(0, 5),
            ha="center",
            fontsize=7,
            color=colour,
        )


def setting_line(
    model: str | None = None,
    task: str | None = None,
    clients: int | None = None,
    seeds: int | None = None,
    questions: int | str | None = None,
) -> str:
    """``smollm2, arc_easy, 10 clients, 2 seeds, 200 questions``: whatever of these is known."""
    parts = [str(model) if model else "", str(task) if task else ""]
    if clients:
        parts.append(f"{clients} client{'s' if clients != 1 else ''}")
    if seeds:
        parts.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
    if questions:
        parts.append(f"{questions} questions")
    return ", ".join(p for p in parts if p)
