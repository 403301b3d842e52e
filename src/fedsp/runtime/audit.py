"""Model-privacy audit: every tensor sent to clients, checked against the global model's weights.

FedSP's promise is that clients never receive the global model: only the
auxiliary model (the decoder layers selected by ``--aux-layers`` /
``--aux-layer-choice``, and the embeddings, final norm and head it shares)
and prefixes. SFPrompt's is narrower: clients hold the head (embeddings and
layers 0..c-1, c = ``--split-layer``) and the tail (final norm, LM head), and
never the body, layers c..L-1, which stays on the server (what a method's
clients hold is its entry in :mod:`fedsp.methods.table`);
the activations and gradients of split training are not weights and are not
recorded. Offsite-Tuning's clients hold an emulator: the adapter layers (whole
global layers, sent every round), the middle layers its layer drop keeps (as they
are, or distilled with ``--ot-distill true``) and the embeddings, norm and head; its
promise is that the dropped layers, and with distillation every middle layer, are
never sent as they are (:func:`fedsp.methods.offsite.promised_layers`).
With ``--audit true`` a run fingerprints (SHA-256 of dtype, shape and bytes)
every tensor it sends, and at the end compares them with every weight of the
global model outside the promised layers: any match is a violation, written to
``audit.json`` and summarised in ``results.json``. FedPrompt promises nothing
(its clients hold the whole model); it is held to FedSP's promise, which it
fails, as it should.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.methods import builders
from fedsp.models.adapters import decoder_layers
from fedsp.runtime import results


def fingerprint(tensor: torch.Tensor) -> str:
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def promised_layers(config: RunConfig, num_layers: int) -> set[int]:
    """The decoder layers the method's table entry lets clients hold (its ``promise``); the others are
    private. SFPrompt's clients hold the head, layers 0..c-1; Offsite-Tuning's the emulator's layers
    sent as they are; a fixed layer set (FedPrompt-Single's layer 0) is that set; every other method is
    held to FedSP's promise, the layers ``--aux-layers`` / ``--aux-layer-choice`` select (FedPrompt, whose
    clients get the whole model, fails it, as it should).
    """
    return builders.promised_layers(config, num_layers)


def private_weights(model: PreTrainedModel, config: RunConfig) -> dict[str, str]:
    """Fingerprints of the global weights clients must never receive: decoder layers outside the promised
    ones."""
    layers = decoder_layers(model)
    allowed = promised_layers(config, len(layers))
    private, shared = {}, set()
    for index, layer in enumerate(layers):
        for name, param in layer.named_parameters():
            for form in _forms(param, config.wire_dtype):
                if index in allowed:
                    shared.add(fingerprint(form))
                else:
                    private[fingerprint(form)] = f"layer {index}: {name}"
    layer_params = {id(p) for layer in layers for p in layer.parameters()}
    shared |= {
        fingerprint(form)
        for p in model.parameters()
        if id(p) not in layer_params
        for form in _forms(p, config.wire_dtype)
    }  # embeddings, norm, head
    # a private weight whose values are also those of a weight clients may hold (e.g. norms still all ones) is
    # no secret: only the others are checked
    return {digest: where for digest, where in private.items() if digest not in shared}


def _forms(param: torch.Tensor, wire_dtype: str) -> list[torch.Tensor]:
    """A weight as it is and as ``--wire-dtype`` would carry it (bfloat16 values, or int8 codes)."""
    compressed = wire.compress({"w": param.detach()}, wire_dtype)["w"]
    return [param] if compressed is param or wire_dtype == wire.FLOAT32 else [param, compressed]


class Audit:
    """Collects what was sent; :meth:`report` checks it against the private weights (``private``: their
    fingerprints, :func:`private_weights`, as the run started)."""

    def __init__(self, private: dict[str, str] | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        # the private weights' fingerprints, taken before training (Offsite-Tuning's server tunes the
        # global model's adapter layers in place); None: taken from the model at the report
        self.private = private

    def record(self, rnd: int, kind: str, tensors: dict[str, torch.Tensor], partitions: list[int]) -> None:
        for name, tensor in tensors.items():
            digest = fingerprint(tensor)
            self.sent.append(
                {
                    "round": rnd,
                    "kind": kind,
                    "name": name,
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype),
                    "sha256": digest,
                    "to": partitions,
                }
            )
            self._seen.add(digest)

    def report(
        self, model: PreTrainedModel, config: RunConfig, path: Path, holds: str = ""
    ) -> dict[str, Any]:
        """Check what was sent, write ``audit.json``; the summary for results.json (``holds``: what the
        method says its clients hold of the global model, quoted beside what was checked)."""
        private = self.private if self.private is not None else private_weights(model, config)
        violations = [
            {**entry, "equals": private[entry["sha256"]]} for entry in self.sent if entry["sha256"] in private
        ]
        num_layers = len(decoder_layers(model))
        allowed = promised_layers(config, num_layers)
        summary = {
            "passed": not violations,
            "tensors_sent": len(self.sent),
            "violations": len(violations),
            "private_weights_checked": len(private),
            # what was checked: no tensor sent equals a weight of these layers, as it is or at --wire-dtype
            "private_layers": [i for i in range(num_layers) if i not in allowed],
        }
        if holds:
            summary["clients_hold"] = holds
        results.write_json(path, {**summary, "violation_list": violations, "sent": self.sent})
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {"sent": self.sent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sent = list(state["sent"])
        self._seen = {entry["sha256"] for entry in self.sent}
