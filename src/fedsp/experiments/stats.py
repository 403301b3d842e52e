"""Paired comparisons of two methods scored on the same questions.

Two runs evaluated on the same questions are compared question by question:
the difference of their mean scores, with a 95% interval from a paired
bootstrap over the questions (:func:`scipy.stats.bootstrap`, ``paired=True``,
BCa). A method run with several seeds enters with each question's mean score
over its seeds (:func:`seed_means`), so the interval is over the questions, the
noise that remains after averaging the seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsp.errors import FedSPError

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` over the same questions, with its paired bootstrap interval."""

    mean: float
    low: float
    high: float
    questions: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def percent(self) -> str:
        """``+2.4 [+0.6, +4.2]`` in points (scores in [0, 1] shown x 100)."""
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Difference:
    """The mean of ``a[i] - b[i]`` and its ``confidence`` interval from ``resamples`` paired bootstrap
    resamples of the questions (BCa); a seeded, reproducible draw."""
    from scipy.stats import bootstrap  # scipy costs a second to import: only comparisons pay it

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise FedSPError(
            f"a paired comparison needs two score lists of one length, got {x.shape} and {y.shape}"
        )
    if len(x) < 2:
        raise FedSPError(f"a paired comparison needs at least 2 questions, got {len(x)}")
    diffs = x - y
    mean = float(diffs.mean())
    if float(np.ptp(diffs)) == 0.0:  # every question differs alike: no spread to resample
        return Difference(mean, mean, mean, len(x))

    def mean_difference(first: np.ndarray, second: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(first - second, axis=axis)

    result = bootstrap(
        (x, y),
        mean_difference,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return Difference(mean, float(low), float(high), len(x))


def seed_means(per_seed: Sequence[Sequence[float]]) -> list[float]:
    """Each question's mean score over the seeds' runs (all scored on the same questions)."""
    if not per_seed:
        raise FedSPError("no runs to average")
    lengths = {len(scores) for scores in per_seed}
    if len(lengths) != 1:
        raise FedSPError(f"runs scored on different numbers of questions: {sorted(lengths)}")
    return [float(v) for v in np.mean(np.asarray(per_seed, dtype=float), axis=0)]
