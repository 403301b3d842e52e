"""Splitting a training set into shards: shard 0 is the server's, 1..K the clients'.

Every partition returns ``num_shards`` sorted lists of indices that are disjoint
and together cover ``0..n-1``; the same seed gives the same shards (NumPy's
``default_rng``).

* ``iid``: a seeded shuffle cut into near-equal parts.
* ``dirichlet``: label skew, each gold label dealt out in Dirichlet(``alpha``) proportions.
* ``by:FIELD``: a natural non-IID split by a metadata field of the rows (HellaSwag's
  ``activity_label``, MedMCQA's ``subject_name``). Shard 0, the model owner's own data, is an IID
  sample of ``n // num_shards`` rows; the rows left are grouped by the field's value and every client
  gets whole groups: the groups, largest first (equal sizes in a seeded order), each go to the client
  with the fewest rows so far (the lowest-numbered among equals). So no value is shared by two
  clients, and client sizes are as even as whole groups allow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral

import numpy as np

from fedsp.errors import FedSPError

DIRICHLET_TRIES = 1000
GROUP_PREFIX = "by:"  # --partition by:FIELD


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


def group_field(partition: str) -> str | None:
    """The field of a ``by:FIELD`` partition, or None for the others."""
    return partition[len(GROUP_PREFIX) :] if partition.startswith(GROUP_PREFIX) else None


def group_values(metas: Sequence[Mapping[str, str]], field: str, ids: Sequence[str] = ()) -> list[str]:
    """Each row's value of its metadata field ``field``; an error naming the fields every row has when
    some row lacks it (``ids``, when given, name the first such row)."""
    missing = [i for i, meta in enumerate(metas) if field not in meta]
    if not missing:
        return [meta[field] for meta in metas]
    common = set(metas[0]).intersection(*metas[1:]) if metas else set()
    available = ", ".join(sorted(common)) or "none (these rows carry no metadata fields)"
    if len(missing) == len(metas):
        raise FedSPError(
            f"--partition {GROUP_PREFIX}{field}: the training rows have no field {field!r}; "
            f"fields they all have: {available}"
        )
    first = ids[missing[0]] if ids else f"row {missing[0]}"
    raise FedSPError(
        f"--partition {GROUP_PREFIX}{field}: {len(missing)} of {len(metas)} training rows have no field "
        f"{field!r} (first: {first}); fields they all have: {available}"
    )


def partition_by_group(
    groups: Sequence[str], num_shards: int, seed: int, field: str = "FIELD"
) -> list[list[int]]:
    """Shard 0 an IID sample of ``n // num_shards`` rows; shards 1.. whole groups of equal ``groups``
    values, the largest group first to the client with the fewest rows (see the module docstring).
    ``field`` names the grouping in errors."""
    groups = list(groups)
    n = len(groups)
    _check_counts(n, num_shards)
    seed = _int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    server, rest = order[: n // num_shards], sorted(int(i) for i in order[n // num_shards :])
    members: dict[str, list[int]] = {}
    for i in rest:
        members.setdefault(groups[i], []).append(i)
    clients = num_shards - 1
    if len(members) < clients:
        raise FedSPError(
            f"--partition {GROUP_PREFIX}{field}: the clients' rows hold {len(members)} distinct {field} "
            f"values, fewer than the {clients} clients (each client gets whole groups); lower --clients "
            "or choose another field"
        )
    names = sorted(members)
    tie_break = rng.permutation(len(names))
    ranked = sorted(range(len(names)), key=lambda j: (-len(members[names[j]]), tie_break[j]))
    shards: list[list[int]] = [[] for _ in range(clients)]
    for j in ranked:
        smallest = min(range(clients), key=lambda k: (len(shards[k]), k))
        shards[smallest].extend(members[names[j]])
    return [sorted(int(i) for i in server), *(sorted(shard) for shard in shards)]
