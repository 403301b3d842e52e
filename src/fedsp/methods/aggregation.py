"""How client states become the round's aggregate: FedAvg (FedSP eq. 1), robust rules, clipped sums.

Every rule works on what each client sent, ``state_k``, against what the server
broadcast, ``sent``; an update is ``delta_k = state_k - sent``. All arithmetic is
in float64; the result has the broadcast's dtypes.
  - ``mean``: sum_k N_k / N * state_k (FedAvg; :func:`weighted_average`);
  - ``median``: the coordinate-wise median of the states (the mean of the two
    middle values for an even count), unweighted;
  - ``trimmed-mean:F``: per coordinate, the F largest and F smallest values
    dropped, the rest averaged, unweighted;
  - ``clipped-mean:C``: ``sent + sum_k N_k / N * clip(delta_k, C)``, where
    :func:`clip` scales an update down to L2 norm C (over all its tensors).
Differential privacy's clipped sum (:func:`clipped_sum`) is the same clip,
uniform weights; its noise and accounting are the runtime's
(:mod:`fedsp.runtime.privacy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedsp.errors import FedSPError
from fedsp.protection import CLIPPED, MEAN, MEDIAN, TRIMMED, Rule

Tensors = dict[str, torch.Tensor]


def weighted_average(updates: Sequence[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Average ``(state, num_examples)`` pairs with weights N_k / N, in float64, returned as float32."""
    if not updates:
        raise FedSPError("cannot aggregate: no client returned an update this round")
    total = sum(n for _, n in updates)
    if total <= 0:
        raise FedSPError(f"cannot aggregate: clients reported {total} examples in total")
    names = _names([state for state, _ in updates])
    averaged = {}
    for name in names:
        acc = torch.zeros_like(updates[0][0][name], dtype=torch.float64)
        for state, n in updates:
            acc += state[name].to(torch.float64) * (n / total)
        averaged[name] = acc.to(updates[0][0][name].dtype)
    return averaged


def combine(rule: Rule, sent: Tensors, updates: Sequence[tuple[Tensors, int]]) -> Tensors:
    """The aggregate of ``(state, num_examples)`` pairs under ``rule``."""
    if not updates:
        raise FedSPError("cannot aggregate: no client returned an update this round")
    if rule.name == MEAN:
        return weighted_average(updates)
    states = [state for state, _ in updates]
    names = _names(states)
    if rule.name == CLIPPED:
        clipped = [(clip(delta(sent, state), rule.value)[0], n) for state, n in updates]
        moved = weighted_average([({k: v.double() for k, v in d.items()}, n) for d, n in clipped])
        return {k: (sent[k].double() + moved[k]).to(sent[k].dtype) for k in names}
    if rule.name == MEDIAN:
        # numpy's median: the mean of the two middle values when the count is even (torch's gives the lower)
        return {
            k: torch.from_numpy(np.median(_stacked(states, k).numpy(), axis=0)).to(sent[k].dtype)
            for k in names
        }
    if rule.name == TRIMMED:
        if 2 * rule.trim >= len(states):
            raise FedSPError(
                f"--aggregation {rule} leaves no value of {len(states)} updates "
                f"(F must be below {len(states) / 2:g})"
            )
        out = {}
        for k in names:
            ordered = _stacked(states, k).sort(dim=0).values
            out[k] = ordered[rule.trim : len(states) - rule.trim].mean(dim=0).to(sent[k].dtype)
        return out
    raise FedSPError(f"unknown aggregation rule {rule}")


def delta(sent: Tensors, state: Tensors) -> Tensors:
    """``state - sent`` in float64."""
    return {k: state[k].double() - sent[k].double() for k in sent}


def norm(update: Tensors) -> float:
    """L2 norm of an update over all its tensors."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip(update: Tensors, max_norm: float) -> tuple[Tensors, float]:
    """``update`` scaled down to L2 norm ``max_norm`` when longer; and its norm before clipping.

    A zero update stays zero (Flower's ``clip_inputs_inplace`` divides by the norm and fails on it).
    """
    length = norm(update)
    scale = min(1.0, max_norm / length) if length > 0 else 1.0
    return {k: t * scale for k, t in update.items()}, length


def clipped_sum(sent: Tensors, states: Sequence[Tensors], max_norm: float) -> tuple[Tensors, list[float]]:
    """``sum_k clip(state_k - sent, max_norm)`` in float64, and each update's norm before clipping."""
    total = {k: torch.zeros_like(t, dtype=torch.float64) for k, t in sent.items()}
    norms = []
    for state in states:
        clipped, length = clip(delta(sent, state), max_norm)
        norms.append(length)
        for k in total:
            total[k] += clipped[k]
    return total, norms


def _names(states: Sequence[Tensors]) -> list[str]:
    names = sorted(states[0])
    for state in states:
        if sorted(state) != names:
            raise FedSPError(f"client update has keys {sorted(state)}, expected {names}")
    return names


def _stacked(states: Sequence[Tensors], name: str) -> torch.Tensor:
    return torch.stack([state[name].double() for state in states])
