"""Federated averaging of prefix states (FedSP eq. 1: w = sum_k N_k / N * w_k)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsp.errors import FedSPError


def weighted_average(updates: Sequence[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Average ``(state, num_examples)`` pairs with weights N_k / N, in float64, returned as float32."""
    if not updates:
        raise FedSPError("cannot aggregate: no client returned an update this round")
    total = sum(n for _, n in updates)
    if total <= 0:
        raise FedSPError(f"cannot aggregate: clients reported {total} examples in total")
    names = sorted(updates[0][0])
    for state, _ in updates:
        if sorted(state) != names:
            raise FedSPError(f"client update has keys {sorted(state)}, expected {names}")
    averaged = {}
    for name in names:
        acc = torch.zeros_like(updates[0][0][name], dtype=torch.float64)
        for state, n in updates:
            acc += state[name].to(torch.float64) * (n / total)
        averaged[name] = acc.to(updates[0][0][name].dtype)
    return averaged
