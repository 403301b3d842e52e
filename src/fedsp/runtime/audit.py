"""Model-privacy audit: every tensor sent to clients, checked against the global model's weights.

FedSP's promise is that clients never receive the global model: only the
auxiliary model (the decoder layers selected by ``--aux-layers`` /
``--aux-layer-choice``, and the embeddings, final norm and head it shares)
and prefixes. With ``--audit true`` a run fingerprints (SHA-256 of dtype,
shape and bytes) every tensor it sends, and at the end compares them with
every weight of the global model outside those layers: any match is a
violation, written to ``audit.json`` and summarised in ``results.json``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedsp.config import RunConfig
from fedsp.models.adapters import decoder_layers
from fedsp.models.auxiliary import select_layers
from fedsp.runtime import results


def fingerprint(tensor: torch.Tensor) -> str:
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def private_weights(model: PreTrainedModel, config: RunConfig) -> dict[str, str]:
    """Fingerprints of the global weights clients must never receive: decoder layers the aux model is not built from."""
    layers = decoder_layers(model)
    allowed = set(select_layers(len(layers), config.aux_layers, config.aux_layer_choice))
    private, shared = {}, set()
    for index, layer in enumerate(layers):
        for name, param in layer.named_parameters():
            if index in allowed:
                shared.add(fingerprint(param))
            else:
                private[fingerprint(param)] = f"layer {index}: {name}"
    layer_params = {id(p) for layer in layers for p in layer.parameters()}
    shared |= {
        fingerprint(p) for p in model.parameters() if id(p) not in layer_params
    }  # embeddings, norm, head
    # a private weight whose values are also those of a weight clients may hold (e.g. norms still all ones) is
    # no secret: only the others are checked
    return {digest: where for digest, where in private.items() if digest not in shared}


class Audit:
    """Collects what was sent; :meth:`report` checks it against the private weights."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._seen: set[str] = set()

    def record(self, rnd: int, kind: str, tensors: dict[str, torch.Tensor], partitions: list[int]) -> None:
        for name, tensor in tensors.items():
            digest = fingerprint(tensor)
            self.sent.append({"round": rnd, "kind": kind, "name": name, "shape": list(tensor.shape),
                              "dtype": str(tensor.dtype), "sha256": digest, "to": partitions})  # fmt: skip
            self._seen.add(digest)

    def report(self, model: PreTrainedModel, config: RunConfig, path: Path) -> dict[str, Any]:
        private = private_weights(model, config)
        violations = [{**entry, "equals": private[entry["sha256"]]} for entry in self.sent
                      if entry["sha256"] in private]  # fmt: skip
        summary = {"passed": not violations, "tensors_sent": len(self.sent), "violations": len(violations),
                   "private_weights_checked": len(private)}  # fmt: skip
        results.write_json(path, {**summary, "violation_list": violations, "sent": self.sent})
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {"sent": self.sent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sent = list(state["sent"])
        self._seen = {entry["sha256"] for entry in self.sent}
