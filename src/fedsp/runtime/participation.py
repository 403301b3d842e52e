"""Who takes part in a round and which updates are accepted: runtime-independent rules.

The round driver (:mod:`fedsp.runtime.rounds`) calls these for every engine,
so that with the same seed the engines sample the same clients, seed each
client's randomness the same way, and reject the same updates:
  1. :func:`sample_clients` picks ``max(1, round(fraction * K))`` partition ids
     with an RNG derived from (seed, round): no RNG state to checkpoint;
  2. :func:`client_rng_seed` is the torch seed a client's round runs under
     (prefix dropout), so a client's result does not depend on which process
     or in which order it ran;
  3. :func:`check_updates` rejects non-finite tensors, tensors whose names,
     shapes or dtypes differ from what was sent, and norms far beyond the
     median of the round's other updates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsp.errors import FedSPError
from fedsp.methods.base import ClientUpdate

log = logging.getLogger("fedsp.participation")

NORM_FACTOR = 10.0  # an update whose distance from the broadcast is > 10x the round's median is rejected


def sample_clients(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """Partition ids taking part in round ``rnd``, sorted; all of them when ``fraction`` is 1."""
    if num_clients == 0:  # centralised methods: a round has no clients
        return []
    count = max(1, min(num_clients, round(fraction * num_clients)))
    if count == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, rnd])
    return sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))


def client_rng_seed(seed: int, rnd: int, partition: int) -> int:
    """The torch seed client ``partition`` trains under in round ``rnd``."""
    return (seed * 1_000_003 + rnd * 10_007 + partition) % (2**63)


def required_replies(min_replies: int, sampled: int) -> int:
    """How many accepted updates a round needs: ``min_replies``, at most the number sampled."""
    return min(min_replies, sampled)


def check_enough(accepted: int, needed: int, rnd: int, why: Sequence[str], what: str = "") -> None:
    """A one-line error when fewer than ``needed`` updates were accepted (``what`` says who needs them)."""
    if accepted < needed:
        reasons = "; ".join(why) if why else "no reply"
        raise FedSPError(
            f"round {rnd}: only {accepted} usable client updates, "
            f"fewer than {what or f'--min-replies {needed}'} ({reasons})"
        )


@dataclass(frozen=True)
class Rejection:
    partition: int
    reason: str


def check_updates(
    sent: dict[str, torch.Tensor],
    updates: Sequence[tuple[int, ClientUpdate]],
    norm_factor: float = NORM_FACTOR,
) -> tuple[list[tuple[int, ClientUpdate]], list[Rejection]]:
    """Split ``(partition, update)`` pairs into accepted ones and rejections with a reason each.

    Every update must carry exactly the tensors that were sent (same names, shapes,
    dtypes), all finite, with a positive example count; then an update whose distance
    from ``sent`` exceeds ``norm_factor`` times the median distance of the others
    (needs 3 or more updates) is rejected as an outlier.
    """
    accepted: list[tuple[int, ClientUpdate]] = []
    rejected: list[Rejection] = []
    for partition, update in updates:
        reason = _shape_problem(sent, update)
        if reason:
            rejected.append(Rejection(partition, reason))
        else:
            accepted.append((partition, update))
    if len(accepted) >= 3:
        distances = [_distance(sent, u.state) for _, u in accepted]
        kept = []
        for i, (partition, update) in enumerate(accepted):
            others = distances[:i] + distances[i + 1 :]
            median = float(np.median(others))
            if distances[i] > norm_factor * max(median, 1e-12):
                rejected.append(
                    Rejection(
                        partition,
                        f"update norm {distances[i]:.3g} is more than "
                        f"{norm_factor:g}x the median {median:.3g}",
                    )
                )
            else:
                kept.append((partition, update))
        accepted = kept
    for r in rejected:
        log.warning("client %d: update rejected: %s", r.partition, r.reason)
    return accepted, rejected


def cap_weights(
    updates: Sequence[tuple[int, ClientUpdate]], max_weight: int | None
) -> tuple[list[tuple[int, ClientUpdate]], list[dict[str, int]]]:
    """Example counts (FedAvg weights) above ``max_weight`` cut to it; the cut ones, as metrics records them.

    A client reports its own count and the server cannot check it in a deployment:
    ``--max-client-weight`` bounds how far one client can pull the average by claiming
    more data than it has. ``None``: counts are used as reported.
    """
    if max_weight is None:
        return list(updates), []
    out, capped = [], []
    for partition, update in updates:
        if update.num_examples > max_weight:
            capped.append({"client": partition, "claimed": update.num_examples, "used": max_weight})
            log.warning(
                "client %d claimed %d examples; weighted as %d (--max-client-weight)",
                partition,
                update.num_examples,
                max_weight,
            )
            update = ClientUpdate(update.state, max_weight, update.metrics)
        out.append((partition, update))
    return out, capped


def _shape_problem(sent: dict[str, torch.Tensor], update: ClientUpdate) -> str | None:
    if set(update.state) != set(sent):
        missing, extra = sorted(set(sent) - set(update.state)), sorted(set(update.state) - set(sent))
        return f"tensor names differ from what was sent (missing {missing}, unexpected {extra})"
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int):
        return f"example count {update.num_examples!r} is not a whole number"
    if not update.num_examples > 0:
        return f"example count {update.num_examples} is not positive"
    for name, expected in sent.items():
        got = update.state[name]
        if tuple(got.shape) != tuple(expected.shape):
            return f"{name} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"{name} has dtype {got.dtype}, expected {expected.dtype}"
        if not bool(torch.isfinite(got).all()):
            return f"{name} holds NaN or Inf values"
    return None


def _distance(sent: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> float:
    total = sum(float((state[n].double() - sent[n].double()).pow(2).sum()) for n in sent)
    return math.sqrt(total)
