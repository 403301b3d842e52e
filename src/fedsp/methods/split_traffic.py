"""SFPrompt's split-training accounting: what crosses the cut, what it costs the client.

The split messages themselves travel through the round driver
(:mod:`fedsp.runtime.rounds`), encoded with :mod:`fedsp.wire` in every engine;
the driver adds each client's bytes per message name to its update's metrics
(``bytes_activations``, ``bytes_outputs``, ``bytes_grad_outputs``,
``bytes_grad_inputs``), so the byte counts are those of the messages sent.

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

from transformers import PreTrainedModel

from fedsp.methods.base import ClientUpdate, mean_or_nan
from fedsp.models.adapters import decoder_layers, output_weight

# Bytes per client and round, by direction: activations up, body outputs down, their gradient up,
# the gradient of the activations down; the split message each counts.
SPLIT_KEYS = ("act_bytes_up", "act_bytes_down", "grad_bytes_up", "grad_bytes_down")
MESSAGE_OF = {
    "act_bytes_up": "activations",
    "act_bytes_down": "outputs",
    "grad_bytes_up": "grad_outputs",
    "grad_bytes_down": "grad_inputs",
}
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


def new_report() -> dict[str, Any]:
    """The report before round 1: no split message yet."""
    return {
        "per": "per_round figures: mean per client over the last round's clients; "
        "totals: all rounds and clients",
        "split_bytes_total": 0,
    }


def add_round(report: dict[str, Any], updates: Sequence[ClientUpdate]) -> None:
    """Add one round's accepted updates: their split traffic (the driver's counts of the messages each
    sent and received) and compute (from their metrics)."""
    if not updates:
        return

    def value(update: ClientUpdate, key: str) -> float:
        if key in MESSAGE_OF:
            return float(update.metrics.get(f"bytes_{MESSAGE_OF[key]}", 0.0))
        return float(update.metrics[key])

    def per_client(keys: Sequence[str]) -> float:  # the mean over the round's clients of a sum of figures
        return mean_or_nan([sum(value(u, k) for k in keys) for u in updates])

    report["last_round_mean_per_client"] = {
        "client_flops": per_client(["client_flops"]),
        **{f"split_{k}": per_client([k]) for k in SPLIT_KEYS},
    }
    report["split_bytes_up_per_round"] = per_client(UP_KEYS)
    report["split_bytes_down_per_round"] = per_client(DOWN_KEYS)
    report["client_flops_per_round"] = per_client(["client_flops"])
    report["split_bytes_total"] += int(sum(value(u, k) for u in updates for k in SPLIT_KEYS))
