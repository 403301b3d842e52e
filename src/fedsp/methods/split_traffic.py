"""SFPrompt's split-training wire and its accounting: what crosses the cut, what it costs the client.

- :class:`SplitLink`: the in-process wire between one client and the server
  body; every message is encoded with :mod:`fedsp.wire`, counted and decoded,
  so the byte counts are those of real messages.
- :class:`FlopModel`: the client's compute estimate.
- :func:`new_report` / :func:`add_round`: the run's split-traffic report, which
  goes to ``results.json`` as ``method_notes.split_traffic`` (activations and
  gradients of split training, client FLOPs). The runtime counts the federated
  payloads itself (head + tail weights once, prompts + tail each round) and adds
  ``split_bytes_total`` from this report to ``comm.total_bytes``, so that total
  counts everything that crossed the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from fedsp import wire
from fedsp.methods.base import ClientUpdate
from fedsp.models.adapters import decoder_layers, output_weight
from fedsp.models.split import ServerBody

# Bytes per client and round, by direction: activations up, body outputs down, their gradient up,
# the gradient of the activations down.
SPLIT_KEYS = ("act_bytes_up", "act_bytes_down", "grad_bytes_up", "grad_bytes_down")
UP_KEYS = ("act_bytes_up", "grad_bytes_up")
DOWN_KEYS = ("act_bytes_down", "grad_bytes_down")


@dataclass(frozen=True)
class FlopModel:
    """Forward FLOPs: 2 per weight per token, plus 4*S*H per token per layer for attention scores and mixing.

    Training through frozen weights needs only input gradients, about one more
    forward's worth: a training step counts 2x its forward.
    """

    layer_weights: int  # matmul weights of one decoder layer
    hidden: int
    lm_head: int  # V * E

    @classmethod
    def of(cls, model: PreTrainedModel) -> FlopModel:
        layer = decoder_layers(model)[0]
        weights = sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
        return cls(weights, int(model.config.hidden_size), output_weight(model).numel())

    def layers(self, num_layers: int, batch: int, seq: int) -> int:
        return num_layers * batch * seq * (2 * self.layer_weights + 4 * seq * self.hidden)

    def head_logits(self, tokens: int) -> int:
        return 2 * tokens * self.lm_head


class SplitLink:
    """The in-process wire between one client and the server body: every message encoded, counted, decoded."""

    def __init__(self, body: ServerBody, client: int) -> None:
        self.body, self.client = body, client
        self.bytes = dict.fromkeys(SPLIT_KEYS, 0)

    def _carry(self, message: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
        payload = wire.encode(message)
        self.bytes[key] += len(payload)
        return wire.decode(payload)

    def forward(self, message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reply = self.body.body_forward(self.client, self._carry(message, "act_bytes_up"))
        return self._carry(reply, "act_bytes_down")

    def backward(self, message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reply = self.body.body_backward(self.client, self._carry(message, "grad_bytes_up"))
        return self._carry(reply, "grad_bytes_down")


def new_report() -> dict[str, Any]:
    """The report before round 1: no split message yet."""
    return {
        "per": "per_round figures: mean per client over the last round's clients; "
        "totals: all rounds and clients",
        "split_bytes_total": 0,
    }


def add_round(report: dict[str, Any], updates: Sequence[ClientUpdate]) -> None:
    """Add one round's accepted updates: their split traffic and compute (from their metrics)."""
    if not updates:
        return

    def per_client(keys: Sequence[str]) -> float:  # the mean over the round's clients of a sum of metrics
        return _mean([sum(u.metrics[k] for k in keys) for u in updates])

    keys = ["client_flops", *(f"split_{k}" for k in SPLIT_KEYS)]
    report["last_round_mean_per_client"] = {k: per_client([k]) for k in keys}
    report["split_bytes_up_per_round"] = per_client([f"split_{k}" for k in UP_KEYS])
    report["split_bytes_down_per_round"] = per_client([f"split_{k}" for k in DOWN_KEYS])
    report["client_flops_per_round"] = per_client(["client_flops"])
    report["split_bytes_total"] += int(sum(u.metrics[f"split_{k}"] for u in updates for k in SPLIT_KEYS))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
