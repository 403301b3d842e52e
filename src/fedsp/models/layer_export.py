"""Exporting tuned layers of the global model itself (Offsite-Tuning's adapter layers), for use outside a run.

Two forms, by how the layers were tuned:

* whole layers: :func:`write_layer_weights` writes their parameters to one
  safetensors file under the global model's own parameter names
  (``model.layers.0.self_attn.q_proj.weight``...), so that
  ``model.load_state_dict(safetensors.torch.load_file(path), strict=False)``
  puts them into a freshly loaded base model; the metadata names the run
  (model, base model, method, best round) and the file's ``layers``;
* LoRA factors on the layers' linear maps: :func:`write_peft_lora` writes a
  PEFT LoRA adapter folder that ``PeftModel.from_pretrained(base_model,
  folder)`` loads without fedsp. PEFT 0.21's conventions (read in its
  sources, checked by ``tests/test_offsite.py``): ``adapter_config.json`` is
  the ``LoraConfig`` (its ``target_modules`` the full module names, which PEFT
  matches as name suffixes), and ``adapter_model.safetensors`` holds
  ``get_peft_model_state_dict``'s tensors under ``base_model.model.``, without
  the adapter's name.

:func:`load_layer_weights` and :func:`load_peft_lora` put either form back into a
model (``fedsp eval`` and ``fedsp generate`` on such a run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn
from transformers import PreTrainedModel

from fedsp.errors import FedSPError
from fedsp.files import atomic_write
from fedsp.models.export import (
    PEFT_WEIGHTS_FILE,
    canonical_safetensors,
    check_adapter_folder,
    fedsp_version,
    write_adapter_folder,
)

LAYERS_FILE = "adapter_layers.safetensors"  # whole tuned layers in a results folder
PEFT_PREFIX = "base_model.model."  # what PEFT puts before a model's own parameter names in its files
ADAPTER_NAME = "default"  # the LoRA adapter's name in the model (PEFT's default)


def write_layer_weights(
    path: Path, model: PreTrainedModel, names: list[str], metadata: dict[str, str]
) -> None:
    """Write ``model``'s parameters ``names`` (its own parameter names) to the safetensors file ``path``,
    atomically; ``metadata`` plus ``fedsp_version`` in its header."""
    own = dict(model.named_parameters())
    missing = [name for name in names if name not in own]
    if missing:
        raise FedSPError(f"the model has no parameter {missing[0]!r} to export")
    tensors = {name: own[name].detach().to("cpu", copy=True).contiguous() for name in names}
    header = {**metadata, "format": "pt", "fedsp_version": fedsp_version()}
    atomic_write(Path(path), canonical_safetensors(st_save(tensors, metadata=header)))


def load_layer_weights(path: Path, model: PreTrainedModel) -> None:
    """Put the layer weights of the file ``path`` into ``model``, in place; a file for another model is
    refused, naming the first tensor that does not fit."""
    own = dict(model.named_parameters())
    try:
        with safe_open(str(path), framework="pt") as opened:
            tensors = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118
    except Exception as err:  # a truncated or foreign file
        raise FedSPError(f"{path} cannot be read ({' '.join(str(err).split())[:200]})") from None
    for name, tensor in tensors.items():
        if name not in own or own[name].shape != tensor.shape:
            raise FedSPError(f"{path}: {name} {tuple(tensor.shape)} does not fit this model")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s modules that carry LoRA factors, by their full names."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and ADAPTER_NAME in module.lora_A
    }


def write_peft_lora(folder: Path, model: PreTrainedModel, base_model: str, overwrite: bool = False) -> None:
    """Write the LoRA factors injected into ``model`` (PEFT's ``inject_adapter_in_model``) as a PEFT LoRA
    adapter of ``base_model`` into ``folder``, atomically (an existing non-empty ``folder`` only with
    ``overwrite``)."""
    from peft import LoraConfig, get_peft_model_state_dict  # 1.8 s to import: only an export pays it

    folder = Path(folder)
    modules = _lora_modules(model)
    if not modules:
        raise FedSPError("the model carries no LoRA factors to export")
    check_adapter_folder(folder, overwrite)
    first: Any = next(iter(modules.values()))  # a PEFT LoRA layer: r and lora_alpha by adapter name
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=int(first.r[ADAPTER_NAME]),
        lora_alpha=int(first.lora_alpha[ADAPTER_NAME]),
        lora_dropout=0.0,
        target_modules=sorted(modules),
        fan_in_fan_out=bool(getattr(first, "fan_in_fan_out", False)),
        inference_mode=True,
        base_model_name_or_path=base_model,
    )
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    tensors = {PEFT_PREFIX + name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
    config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=sorted)
    weights = canonical_safetensors(st_save(tensors, metadata={"format": "pt"}))
    write_adapter_folder(folder, config_json, weights)


def load_peft_lora(folder: Path, model: PreTrainedModel) -> None:
    """Inject the PEFT LoRA adapter of ``folder`` into ``model`` (in place, frozen), as the run held it."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    folder = Path(folder)
    try:
        config = LoraConfig.from_pretrained(str(folder))
        with safe_open(str(folder / PEFT_WEIGHTS_FILE), framework="pt") as opened:
            tensors = {name.removeprefix(PEFT_PREFIX): opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118
    except Exception as err:
        raise FedSPError(f"{folder} is no PEFT LoRA adapter ({' '.join(str(err).split())[:200]})") from None
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    result = set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise FedSPError(f"{folder}: {unexpected[0]} does not fit this model")
    model.requires_grad_(False)
