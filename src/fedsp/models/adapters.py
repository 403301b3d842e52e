"""The one place where model families differ: one table, :data:`ADAPTERS`.

FedSP needs three facts about a causal LM: where its decoder layers live (to
build the auxiliary model), how many key/value heads and what head size its
attention has (to shape the prefix), and that its base model accepts
``past_key_values`` + ``position_ids`` (all families below do in transformers 5).
Split learning (SFPrompt, :mod:`fedsp.models.split`) also needs where the
modules around the decoder stack live: the final norm, OPT's projections, the
absolute position table. Everything else (embeddings, tied LM head) is handled
generically through ``model.base_model`` and ``model.get_output_embeddings()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from fedsp.errors import FedSPError


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a model family keeps its decoder stack and the modules around it (paths from its LM class)."""

    layers_path: str  # attribute path from the *ForCausalLM object to its ModuleList of layers
    base: str  # the decoder module that owns embeddings, positions and the final norm
    norm: str | None  # final norm, relative to ``base`` (trained in SFPrompt's tail)
    after_norm: str | None = None  # frozen projection after the norm (OPT's project_out)
    positions: str | None = None  # absolute position table added before layer 0
    input_proj: str | None = None  # projection of the token embeddings before layer 0 (OPT's project_in)


_LLAMA = FamilyAdapter("model.layers", base="model", norm="norm")
# model_type (config.model_type) -> adapter. Llama-like families share the layout.
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": FamilyAdapter("transformer.h", base="transformer", norm="ln_f", positions="wpe"),
    "opt": FamilyAdapter(
        "model.decoder.layers",
        base="model.decoder",
        norm="final_layer_norm",
        after_norm="project_out",
        positions="embed_positions",
        input_proj="project_in",
    ),
}


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one layer's attention cache: what a prefix must provide."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise FedSPError(
            f"model family {model_type!r} is not supported; supported families: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def kv_geometry(config: PretrainedConfig) -> KVGeometry:
    adapter_for(config)  # unknown families fail here, with the list of known ones
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVGeometry(config.num_hidden_layers, kv_heads, head_dim, config.hidden_size)


def _resolve(root: nn.Module, path: str) -> nn.Module:
    obj: nn.Module = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ModuleList of decoder layers of ``model``."""
    layers = _resolve(model, adapter_for(model.config).layers_path)
    assert isinstance(layers, nn.ModuleList)
    return layers


def set_decoder_layers(model: PreTrainedModel, layers: nn.ModuleList) -> None:
    path = adapter_for(model.config).layers_path
    parent_path, _, name = path.rpartition(".")
    setattr(_resolve(model, parent_path), name, layers)


def embedding_weight(model: nn.Module) -> torch.Tensor:
    """The input embedding matrix (V, E) of a causal LM (or of a view of one)."""
    return cast(torch.Tensor, cast(PreTrainedModel, model).get_input_embeddings().weight)


def output_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's matrix (V, E); the embedding matrix itself when they are tied."""
    return cast(torch.Tensor, cast(PreTrainedModel, model).get_output_embeddings().weight)


def _embedding_tensor(model: nn.Module) -> torch.Tensor:
    """A tensor of the input embedding (its matrix, or a factor of a low-rank one)."""
    return next(cast(PreTrainedModel, model).get_input_embeddings().parameters())


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (batches and prefixes follow it)."""
    return _embedding_tensor(model).device


def weights_dtype(model: nn.Module) -> torch.dtype:
    return _embedding_tensor(model).dtype


def check_lengths(config: PretrainedConfig, prefix_len: int, max_length: int) -> None:
    """Refuse a prefix or a sequence longer than the model can place (before any work is done).

    A prefix is computed at positions 0..P-1 and real tokens sit at P..P+T-1 (PEFT's convention);
    SFPrompt's prompts are input tokens at positions 0..P-1 in the same way.
    """
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit:
        return
    family = getattr(config, "model_type", "model")
    if prefix_len + max_length > limit:
        raise FedSPError(
            f"--prefix-len {prefix_len} + --max-length {max_length} needs {prefix_len + max_length} "
            f"positions; this {family} model has {limit}"
        )
