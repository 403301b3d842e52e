"""Splitting a training set into shards: shard 0 is the server's, 1..K the clients'.

Both partitions return ``num_shards`` sorted lists of indices that are disjoint
and together cover ``0..n-1``; the same seed gives the same shards (NumPy's
``default_rng``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np

from fedsp.errors import FedSPError

DIRICHLET_TRIES = 1000


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise FedSPError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise FedSPError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_counts(n: int, num_shards: int) -> None:
    _int("num_shards", num_shards, 1)
    if n < num_shards:
        raise FedSPError(
            f"cannot cut {n} examples into num_shards={num_shards} shards: "
            "need at least one example per shard"
        )


def partition_iid(n: int, num_shards: int, seed: int) -> list[list[int]]:
    """Shuffle ``0..n-1`` with ``seed`` and cut it into ``num_shards`` contiguous parts
    whose sizes differ by at most one (the first ``n % num_shards`` get the extra one)."""
    n = _int("n", n, 0)
    _check_counts(n, num_shards)
    seed = _int("seed", seed, 0)
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_shards)]


def partition_dirichlet(
    labels: Sequence[int], num_shards: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Label-skewed (non-IID) shards: for every label, its examples are shuffled and
    dealt out in proportions drawn from ``Dirichlet(alpha, ..., alpha)``; smaller
    ``alpha`` means more skew. Draws are repeated (at most ``DIRICHLET_TRIES``
    times, continuing the seeded stream) until every shard has at least
    ``min_size`` examples."""
    labels = list(labels)
    n = len(labels)
    _check_counts(n, num_shards)
    seed = _int("seed", seed, 0)
    min_size = _int("min_size", min_size, 0)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise FedSPError(f"alpha must be a finite number > 0, got {alpha!r}")
    if n < num_shards * min_size:
        raise FedSPError(
            f"cannot give num_shards={num_shards} shards min_size={min_size} examples each from {n} examples"
        )
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, Integral):
            raise FedSPError(f"labels[{i}] must be an integer, got {label!r}")

    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(i)
    groups = [np.asarray(by_label[label]) for label in sorted(by_label)]
    rng = np.random.default_rng(seed)
    concentration = np.full(num_shards, float(alpha))
    for _ in range(DIRICHLET_TRIES):
        shards: list[list[int]] = [[] for _ in range(num_shards)]
        for group in groups:
            members = rng.permutation(group)
            shares = rng.dirichlet(concentration)
            if not np.all(np.isfinite(shares)):
                break
            cuts = np.clip((np.cumsum(shares)[:-1] * len(members)).astype(int), 0, len(members))
            for shard, part in zip(shards, np.split(members, cuts), strict=True):
                shard.extend(int(i) for i in part)
        else:
            if min(len(shard) for shard in shards) >= min_size:
                return [sorted(shard) for shard in shards]
    raise FedSPError(
        f"no Dirichlet draw with alpha={alpha} gave all {num_shards} shards at least min_size={min_size} "
        f"examples in {DIRICHLET_TRIES} tries; raise alpha or lower num_shards / min_size"
    )
