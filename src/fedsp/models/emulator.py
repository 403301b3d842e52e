"""Offsite-Tuning's emulator: the global model's adapter layers around a layer-dropped middle.

:func:`emulator_plan` says which global decoder layers the emulator holds (a
adapter layers at each end, the middle thinned by uniform layer drop);
:func:`build_emulator` makes it from the global model (or from a Flower node's
uninitialised skeleton of it) with the auxiliary model's builder, each layer
applied once. :func:`adapter_named` names what the clients train by *global*
layer index (``layers.<g>.<name>``), so the server's global model and every
emulator agree on the wire whatever their stack positions. With a LoRA rank
(:func:`add_lora`, PEFT) the trained tensors are the LoRA factors of the adapter
layers' linear maps, and their base weights become part of the frozen emulator.
The method that uses it is :mod:`fedsp.methods.offsite`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedsp.errors import FedSPError
from fedsp.models.adapters import decoder_layers
from fedsp.models.auxiliary import build_auxiliary_model

Named = list[tuple[str, nn.Parameter]]
LORA = "lora_"  # in the names of PEFT's LoRA factors (lora_A, lora_B)


@dataclass(frozen=True)
class EmulatorPlan:
    """Which global decoder layers the emulator holds, and as what."""

    num_layers: int  # L, the global model's
    bottom: tuple[int, ...]  # adapter layers 0..a-1
    top: tuple[int, ...]  # adapter layers L-a..L-1
    kept: tuple[int, ...]  # middle layers kept by the layer drop
    dropped: tuple[int, ...]  # middle layers that never leave the server

    @property
    def adapters(self) -> tuple[int, ...]:
        return self.bottom + self.top

    @property
    def layers(self) -> tuple[int, ...]:
        """The emulator's decoder stack, in order: its layer j is global layer ``layers[j]``."""
        return self.bottom + self.kept + self.top

    def describe(self, distilled: bool, lora: bool = False) -> str:
        """What a client holds of the global model, in words (results.json, the audit, the summary)."""
        sent = "once, tuned by them through LoRA factors" if lora else "every round, tuned by them"
        middle = "distilled (not the global weights)" if distilled else "as they are (the global weights)"
        dropped = (
            f"dropped layers {list(self.dropped)} never leave the server"
            if self.dropped
            else "no layer is dropped (--ot-keep-ratio 1)"
        )
        return (
            f"partial: adapter layers {list(self.adapters)} are whole global layers, sent to every client "
            f"{sent}; kept middle layers {list(self.kept)} are sent once, {middle}; {dropped}"
        )


def emulator_plan(num_layers: int, adapter_layers: int, keep_ratio: float) -> EmulatorPlan:
    """The layers of the emulator of an L-layer model: a adapter layers at each end, and of the M middle
    ones the k = max(1, round(keep_ratio * M)) at indices round(i * (M - 1) / (k - 1)), i = 0..k-1
    (k = 1: the middle one)."""
    a = adapter_layers
    middle = list(range(a, num_layers - a))
    if not middle:
        raise FedSPError(
            f"--ot-adapter-layers {a} leaves no middle layer to compress in the model's {num_layers} "
            f"layers ({a} bottom + {a} top); use at most {(num_layers - 1) // 2}"
        )
    count = max(1, round(keep_ratio * len(middle)))
    if count == 1:
        kept = [middle[(len(middle) - 1) // 2]]
    else:
        kept = [middle[round(i * (len(middle) - 1) / (count - 1))] for i in range(count)]
    return EmulatorPlan(
        num_layers,
        tuple(range(a)),
        tuple(range(num_layers - a, num_layers)),
        tuple(kept),
        tuple(i for i in middle if i not in kept),
    )


def build_emulator(global_model: PreTrainedModel, plan: EmulatorPlan) -> PreTrainedModel:
    """A frozen copy of ``global_model`` whose decoder stack is ``plan.layers``, each applied once (the global
    model is not modified; from a node's uninitialised skeleton it is the structure to load weights into)."""
    return build_auxiliary_model(global_model, plan.layers, share=False).requires_grad_(False)


def adapter_named(
    model: PreTrainedModel, held: Sequence[int], adapters: Sequence[int], lora: bool = False
) -> Named:
    """What clients train of ``model``, by wire name ``layers.<global index>.<name>``: the adapter layers'
    parameters (``lora``: their LoRA factors only). ``model``'s decoder layer j is global layer ``held[j]``
    (the global model: ``held`` = 0..L-1)."""
    layers = decoder_layers(model)
    if len(layers) != len(held):
        raise ValueError(f"a model of {len(layers)} layers cannot hold the global layers {list(held)}")
    return [
        (f"layers.{g}.{name}", param)
        for j, g in enumerate(held)
        if g in adapters
        for name, param in layers[j].named_parameters()
        if not lora or LORA in name
    ]


def frozen_named(emulator: PreTrainedModel, plan: EmulatorPlan, lora: bool = False) -> Named:
    """The emulator's parameters the clients do not train: what is shipped once."""
    trained = {id(p) for _, p in adapter_named(emulator, plan.layers, plan.adapters, lora)}
    return [(name, p) for name, p in emulator.named_parameters() if id(p) not in trained]


def add_lora(
    model: PreTrainedModel, held: Sequence[int], adapters: Sequence[int], rank: int, seed: int
) -> None:
    """LoRA factors of rank ``rank`` on every linear map of ``model``'s adapter layers, in place (PEFT's
    ``inject_adapter_in_model``; alpha = 2 x rank, no dropout, B = 0 so the model is unchanged; A drawn
    under ``seed``). The base weights stay as they are; :func:`adapter_named` with ``lora`` names the
    factors."""
    from peft import LoraConfig, inject_adapter_in_model  # 1.8 s to import: only a LoRA run pays it

    layers = decoder_layers(model)
    wanted = {id(layers[j]) for j, g in enumerate(held) if g in adapters}
    owners = {name: module for name, module in model.named_modules() if id(module) in wanted}
    targets = [
        f"{owner}.{name}"
        for owner, layer in owners.items()
        for name, module in layer.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    ]
    conv = any(isinstance(module, Conv1D) for layer in owners.values() for module in layer.modules())
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=conv
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    model.requires_grad_(False)
