"""How well the clients' model stands in for the global model, measured once, after KD.

A client tunes the prefix by gradients through its auxiliary model; those
steps help the global model only as far as the two models agree on the
prefix's gradient. :func:`emulator_fidelity` measures that on the server's
own rows, with the round-0 prefix, before round 1:

* ``grad_cosine``: per batch, the cosine between the prefix gradient of the
  answer loss through the auxiliary model and through the global model (the
  same prefix, the same batch, both in eval mode: no dropout); their mean and
  each batch's value;
* ``val_loss_global`` / ``val_loss_aux``: the validation loss of the round-0
  prefix on each model (how far the emulator's answers are from the model's).

It needs a client prefix of the server's shape (auxiliary layers shared
across the whole depth, as in FedSP) and the server's token ids; a client that
maps the prefix to fewer layers, or reads a pruned vocabulary, is reported as
not measured, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from fedsp.data.batching import Encoded, fixed_batches
from fedsp.models.forward import answer_loss, mean_answer_loss
from fedsp.models.prefix import Prefix, eval_mode
from fedsp.models.vocabulary import pruned_embedding

FIDELITY = "emulator_fidelity"  # the course note, and results.json's key
FIDELITY_BATCHES = 4  # batches of the server's rows the gradients are compared on


def emulator_fidelity(
    global_model: PreTrainedModel,
    aux_model: PreTrainedModel,
    prefix: Prefix,
    rows: Sequence[Encoded],
    val_batches: Sequence[dict[str, torch.Tensor]],
    batch_size: int,
    pad_id: int,
    batches: int = FIDELITY_BATCHES,
    global_loss: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """The fidelity figures of the module docstring (``rows``: the server's shard). ``global_loss``: how
    the server measures the prefix's validation loss on the global model (its round-0 validation, which
    the run then records rather than measuring again); None: measured here."""
    if pruned_embedding(aux_model) is not None:
        return {
            "measured": False,
            "why": "the client model reads a pruned vocabulary (--aux-embedding pruned:V): the server's rows "
            "would have to be rewritten into its kept ids first",
        }
    if aux_model.config.num_hidden_layers != global_model.config.num_hidden_layers:
        return {
            "measured": False,
            "why": "the client's prefix spans fewer layers than the server's (layers not shared across "
            "the depth): the two gradients live in different spaces",
        }
    chosen = fixed_batches(list(rows)[: batches * batch_size], batch_size, pad_id)[:batches]
    params: list[torch.Tensor] = [p for _, p in prefix.named_parameters()]
    was = [p.requires_grad for p in params]
    cosines = []
    try:
        for p in params:
            p.requires_grad_(True)
        with eval_mode(prefix):
            for batch in chosen:
                through_global = _prefix_grad(global_model, batch, prefix, params)
                through_aux = _prefix_grad(aux_model, batch, prefix, params)
                cosines.append(
                    float(torch.nn.functional.cosine_similarity(through_global, through_aux, dim=0))
                )
            with torch.no_grad():
                loss_global = (
                    global_loss() if global_loss else mean_answer_loss(global_model, val_batches, prefix)
                )
                loss_aux = mean_answer_loss(aux_model, val_batches, prefix)
    finally:
        for p, flag in zip(params, was, strict=True):
            p.requires_grad_(flag)
    return {
        "measured": True,
        "grad_cosine": sum(cosines) / len(cosines) if cosines else None,
        "grad_cosine_per_batch": cosines,
        "batches": len(cosines),
        "val_loss_global": loss_global,
        "val_loss_aux": loss_aux,
    }


def describe_fidelity(fidelity: dict[str, Any]) -> str:
    """One line for the run's output."""
    if not fidelity.get("measured"):
        return f"emulator fidelity not measured: {fidelity.get('why')}"
    return (
        f"emulator fidelity: prefix-gradient cosine {fidelity['grad_cosine']:.3f} (aux vs global, "
        f"{fidelity['batches']} server batches); round-0 validation loss {fidelity['val_loss_aux']:.3f} "
        f"on the auxiliary model, {fidelity['val_loss_global']:.3f} on the global model"
    )


def _prefix_grad(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], prefix: Prefix, params: list[torch.Tensor]
) -> torch.Tensor:
    """The gradient of ``model``'s answer loss with the prefix, flattened; the models' weights untouched."""
    model.eval()
    loss = answer_loss(model, batch, prefix)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    pairs = zip(grads, params, strict=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in pairs])
