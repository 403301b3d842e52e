"""The auxiliary (client) model: a few layers of the global model, shared across its depth.

FedSP sends clients the global model's embeddings, final norm and tied LM
head, plus N of its L decoder layers; the auxiliary model applies them L times
with shared weights (cross-layer sharing, as in ALBERT), so the L-layer prefix
plugs in unchanged. Which of the N layers runs at each depth is the layer order
(``--aux-layer-order``): ``cyclic``, the reference code's, runs them in turn
(depth d runs layer d mod N: 0, 1, .., N-1, 0, 1, ..); ``blocks`` gives layer j
the contiguous depths [j*L/N, (j+1)*L/N). With N = 1 both are the same.

Each depth is a distinct module whose parameters are the same tensors as its
source layer's, and whose ``layer_idx`` is its own depth. A single module
reused L times would read layer 0's prefix slice L times, since attention
reads ``past_key_values[layer_idx]``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel

from fedsp.errors import FedSPError
from fedsp.models.adapters import decoder_layers, set_decoder_layers
from fedsp.spellings import LAYER_ORDERS

LAYER_CHOICES = ("bottom", "middle", "top")


def select_layers(num_layers: int, count: int, choice: str | Sequence[int]) -> list[int]:
    """Indices of the global layers the auxiliary model is built from.

    ``choice`` is ``bottom`` (0..N-1), ``middle`` (N layers centred on the middle
    of the stack: indices (L-N)//2.., so the paper's 12th of GPT2-XL's 24 layers, index 11,
    for N = 1), ``top`` (L-N..L-1) or an explicit list of indices (then ``count`` must match).
    """
    if count < 1 or count > num_layers:
        raise FedSPError(f"aux-layers must be between 1 and the model's {num_layers} layers, got {count}")
    if isinstance(choice, str):
        if choice == "bottom":
            return list(range(count))
        if choice == "top":
            return list(range(num_layers - count, num_layers))
        if choice == "middle":
            start = (num_layers - count) // 2
            return list(range(start, start + count))
        raise FedSPError(
            f"aux-layer-choice {choice!r} is not one of {', '.join(LAYER_CHOICES)} or a list of indices"
        )
    indices = [int(i) for i in choice]
    if len(indices) != count:
        raise FedSPError(f"aux-layer-choice lists {len(indices)} layers but aux-layers is {count}")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise FedSPError(f"aux-layer-choice has indices {bad} outside 0..{num_layers - 1}")
    if len(set(indices)) != len(indices):
        raise FedSPError(f"aux-layer-choice has repeated indices: {indices}")
    return indices


def depth_plan(num_layers: int, num_selected: int, order: str = "cyclic") -> list[int]:
    """For each depth 0..L-1, which of the N selected layers (0..N-1) it runs, in ``order``."""
    if order == "cyclic":
        return [depth % num_selected for depth in range(num_layers)]
    if order == "blocks":
        return [depth * num_selected // num_layers for depth in range(num_layers)]
    raise FedSPError(f"aux-layer-order {order!r} is not one of {', '.join(LAYER_ORDERS)}")


def build_auxiliary_model(
    global_model: PreTrainedModel, selected: Sequence[int], share: bool = True, order: str = "cyclic"
) -> PreTrainedModel:
    """A trainable copy of ``global_model`` whose decoder stack is ``selected`` layers, shared across depth.

    With ``share=False`` the model has only the selected layers, each applied once
    (the "w/o CS" ablation and FedPrompt-Single's client model); ``order`` is the
    layer order of :func:`depth_plan` (shared layers only).
    The global model is not modified.
    """
    layers = decoder_layers(global_model)
    num_layers = len(layers)
    # Copy everything except the decoder stack (embeddings, norm, tied head, rotary tables...).
    set_decoder_layers(global_model, nn.ModuleList())
    try:
        aux = copy.deepcopy(global_model)
    finally:
        set_decoder_layers(global_model, layers)
    sources = [copy.deepcopy(layers[i]) for i in selected]  # the unique, trainable layer weights
    if share:
        plan = depth_plan(num_layers, len(sources), order)
        stack = [_tied_view(sources[plan[depth]], depth) for depth in range(num_layers)]
    else:
        stack = [_tied_view(src, depth) for depth, src in enumerate(sources)]
        aux.config.num_hidden_layers = len(sources)
        if getattr(aux.config, "layer_types", None) is not None:
            aux.config.layer_types = [aux.config.layer_types[i] for i in selected]
    set_decoder_layers(aux, nn.ModuleList(stack))
    aux.requires_grad_(True)
    return aux


def _tied_view(source: nn.Module, depth: int) -> nn.Module:
    """A copy of ``source`` sharing all its parameters and buffers, with ``layer_idx`` set to ``depth``."""
    shared = {id(t): t for t in (*source.parameters(), *source.buffers())}
    view = copy.deepcopy(source, memo=shared)
    for module in view.modules():
        if hasattr(module, "layer_idx"):
            setattr(module, "layer_idx", depth)  # noqa: B010  (not every module declares it)
    return view


def unique_parameter_count(model: nn.Module) -> int:
    """Parameters counted once however often they are shared (tied head, shared layers)."""
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates shared tensors
