"""A causal LM cut in three for split learning (SFPrompt): head, body, tail; and what crosses the cut.

- **head** (client): token embeddings (+ absolute positions) and decoder layers
  0..c-1, frozen, with P trainable prompt vectors prepended to the input
  embeddings (prompt tuning, Lester et al. 2021). Prompts sit at positions
  0..P-1 and the real tokens at P.., as if the prompts were text before the input.
- **body** (server): decoder layers c..L-1, frozen.
- **tail** (client): the final norm (trained; a per-client copy) then, frozen,
  the OPT output projection and the LM head. With tied embeddings the LM head
  *is* the client's input embedding matrix, so it stays tied and frozen: the
  client holds it anyway for the head, and a trainable untied copy (V x H,
  28 M parameters on SmolLM2) would dominate every upload.

Every part runs the family's own Hugging Face base-model forward on a *view*
of the global model: a structural copy that shares every weight, holds a range
of the layers, and has the modules outside that range replaced (final norm ->
identity in head and body; position table -> nothing and input projection ->
identity in the body). So head -> body -> tail computes exactly what the full
model computes, bit for bit; where a family keeps those modules is its entry
in :data:`fedsp.models.adapters.ADAPTERS`, the one table of model families.

The body is driven by messages, each a flat dict of tensors (what would cross
the wire): ``body_forward({"activations", "attention_mask", "position_ids",
"wanted"}) -> {"outputs"}`` and ``body_backward({"grad_outputs"}) ->
{"grad_inputs"}``. The server returns the body's output only at the positions
the client's loss reads (``wanted``: those predicting an answer token), as a
ViT split returns only the class token; the gradient coming back is then also
only at those positions, and the gradient of the activations is the full
(B, P+T, H).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from fedsp.errors import FedSPError
from fedsp.models.adapters import FamilyAdapter, adapter_for, decoder_layers, model_device, set_decoder_layers
from fedsp.models.forward import head_logits


def split_layout(model: PreTrainedModel) -> FamilyAdapter:
    """The family's entry in the one table of model families (its modules around the decoder stack)."""
    return adapter_for(model.config)


def check_split_layer(split_layer: int, num_layers: int) -> None:
    if not 1 <= split_layer <= num_layers - 1:
        raise FedSPError(
            f"--split-layer {split_layer} is outside 1..{num_layers - 1}: the model has {num_layers} "
            "layers and client and server must each hold at least one"
        )


def _resolve(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _replace(root: nn.Module, path: str | None, module: nn.Module) -> None:
    """Swap ``root.<path>`` for ``module`` when the family has that module (OPT's may be None)."""
    if path is None:
        return
    parent, _, name = path.rpartition(".")
    owner = _resolve(root, parent) if parent else root
    if getattr(owner, name) is not None:
        setattr(owner, name, module)


class _NoPositions(nn.Module):
    """Stands in for the position table in the body: the head already added positions; adds an exact 0."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(())


def _view(model: PreTrainedModel, start: int, stop: int) -> PreTrainedModel:
    """A copy of ``model``'s structure sharing all its weights, holding decoder layers start..stop-1."""
    layers = decoder_layers(model)
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    set_decoder_layers(model, nn.ModuleList())
    try:
        view = copy.deepcopy(model, memo=shared)
    finally:
        set_decoder_layers(model, layers)
    set_decoder_layers(view, nn.ModuleList(layers[start:stop]))  # the global model's own layer modules
    return view


class Tail(nn.Module):
    """Final norm (a trainable copy), frozen output projection (OPT) and the frozen, shared LM head."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        layout = split_layout(model)
        base = _resolve(model, layout.base)
        norm = _resolve(base, layout.norm) if layout.norm else None
        self.norm = copy.deepcopy(norm).requires_grad_(True) if norm is not None else nn.Identity()
        after = _resolve(base, layout.after_norm) if layout.after_norm else None
        self._frozen = [after or nn.Identity(), model.get_output_embeddings()]  # not registered: not trained

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., E): what the base model returns as its last hidden state."""
        return self._frozen[0](self.norm(hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) -> logits (n, V) in float32."""
        return head_logits(self._frozen[1], self.normed(hidden))


def prompt_positions(attention_mask: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """(B, T) mask -> (B, P+T) positions: 0..P-1 for the prompts, then P + 0..T-1 over real tokens."""
    real = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + num_prompts  # (B, T)
    prompts = torch.arange(num_prompts, device=real.device).expand(real.shape[0], -1)  # (B, P)
    return torch.cat([prompts, real], dim=1)


def prompt_mask(attention_mask: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """(B, K) or (B, 1, T, K) mask -> the same with P leading "visible" entries on the key axis: every
    token sees the prompts. Visible is 1 / True in a keep-mask, and 0 in the additive 4D float mask the
    eager kernel takes (a 1 there would add 1.0 to the prompts' attention scores)."""
    additive = attention_mask.dim() == 4 and attention_mask.is_floating_point()
    shape = (*attention_mask.shape[:-1], num_prompts)
    visible = attention_mask.new_zeros(shape) if additive else attention_mask.new_ones(shape)
    return torch.cat([visible, attention_mask], dim=-1)


def with_prompts(model: PreTrainedModel, prompts: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the prompts in front: (P, E) + (B, T) ids -> (B, P+T, E)."""
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, E)
    front = prompts.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (B, P, E)
    return torch.cat([front, embeds], dim=1)


class Head(nn.Module):
    """Client half before the cut: embeddings + layers 0..c-1, frozen, with the prompts on the input."""

    def __init__(self, model: PreTrainedModel, split_layer: int) -> None:
        super().__init__()
        check_split_layer(split_layer, len(decoder_layers(model)))
        layout = split_layout(model)
        self.view = _view(model, 0, split_layer)
        base = _resolve(self.view, layout.base)
        _replace(base, layout.norm, nn.Identity())
        _replace(base, layout.after_norm, nn.Identity())

    def forward(
        self, prompts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Activations at the cut and how to read them: (B, P+T, H), mask (B, P+T), positions (B, P+T)."""
        device = model_device(self.view)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        P = prompts.shape[0]
        mask, positions = prompt_mask(attention_mask, P), prompt_positions(attention_mask, P)
        out = self.view.base_model(
            inputs_embeds=with_prompts(self.view, prompts, input_ids),
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
        )
        return {"activations": out.last_hidden_state, "attention_mask": mask, "position_ids": positions}


class ServerBody:
    """Server half: decoder layers c..L-1, frozen, driven by messages; one step in flight per client."""

    def __init__(self, model: PreTrainedModel, split_layer: int) -> None:
        check_split_layer(split_layer, len(decoder_layers(model)))
        layout = split_layout(model)
        self.view = _view(model, split_layer, len(decoder_layers(model)))
        base = _resolve(self.view, layout.base)
        for path in (layout.norm, layout.after_norm, layout.input_proj):
            _replace(base, path, nn.Identity())
        _replace(base, layout.positions, _NoPositions())
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # client -> (activations, outputs)

    def run(self, activations: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """(B, S, H) activations at the cut -> (B, S, H) output of the last layer, before the final norm."""
        device = model_device(self.view)
        out = self.view.base_model(
            inputs_embeds=activations.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
        )
        return out.last_hidden_state

    def body_forward(self, client: int, message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"activations" (B,S,H), "attention_mask", "position_ids" (B,S), "wanted" (B,S) bool} -> {"outputs"
        (n,H)}."""
        with torch.enable_grad():
            activations = message["activations"].detach().requires_grad_(True)
            hidden = self.run(activations, message["attention_mask"], message["position_ids"])  # (B, S, H)
            outputs = hidden[message["wanted"].to(hidden.device)]  # (n, H), row-major order
        self.pending[client] = (activations, outputs)
        return {"outputs": outputs.detach()}

    def body_backward(self, client: int, message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"grad_outputs" (n, H)} -> {"grad_inputs" (B, S, H)}: the gradient of the client's activations."""
        activations, outputs = self.pending.pop(client)
        grad_inputs = torch.autograd.grad(outputs, activations, message["grad_outputs"].to(outputs.device))[0]
        return {"grad_inputs": grad_inputs}


class PromptedModel(nn.Module):
    """The full model (head -> body -> tail, in one stack) with input prompts, for unchanged evaluation code.

    Quacks like a causal LM to :mod:`fedsp.models.forward`: ``base_model(...)``
    puts the prompts in front on a call with no cached tokens, prepends P ones
    to every attention mask and shifts the given positions by P, and strips the
    prompt positions from the output; ``get_output_embeddings`` is the LM head.
    Its final norm is ``tail``'s, so it follows the trained (aggregated) tail.
    """

    def __init__(self, model: PreTrainedModel, prompts: nn.Parameter, tail: Tail) -> None:
        super().__init__()
        layout = split_layout(model)
        self.view = _view(model, 0, len(decoder_layers(model)))
        _replace(_resolve(self.view, layout.base), layout.norm, tail.norm)
        self.prompts = prompts  # (P, E), shared with the server's aggregate
        self.config = model.config
        self.base_model = _PromptedBase(self)

    def get_input_embeddings(self) -> nn.Module:
        return self.view.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.view.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of the real tokens, float32."""
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.get_output_embeddings()(hidden).float()


class _PromptedBase(nn.Module):
    def __init__(self, owner: PromptedModel) -> None:
        super().__init__()
        self._owner = [owner]  # not a submodule: avoids a module cycle

    def forward(
        self, input_ids, attention_mask, position_ids=None, past_key_values=None, use_cache=None, **kwargs
    ):
        owner = self._owner[0]
        P = owner.prompts.shape[0]
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        position_ids = position_ids + P
        mask = prompt_mask(attention_mask, P)  # (B, P + cached + T), or (B, 1, T, P + cached + T)
        base = owner.view.base_model
        if cached:  # the prompts are in the cache already
            return base(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        front = torch.arange(P, device=position_ids.device).expand(position_ids.shape[0], -1)  # (B, P)
        out = base(
            inputs_embeds=with_prompts(owner.view, owner.prompts, input_ids),
            attention_mask=mask,
            position_ids=torch.cat([front, position_ids], dim=1),
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return BaseModelOutputWithPast(
            last_hidden_state=out.last_hidden_state[:, P:], past_key_values=out.past_key_values
        )


def client_modules(model: PreTrainedModel, split_layer: int) -> list[nn.Module]:
    """What a client holds of the global model: embeddings, positions, layers 0..c-1, norm, head."""
    layout = split_layout(model)
    base = _resolve(model, layout.base)
    held = [model.get_input_embeddings(), *decoder_layers(model)[:split_layer], model.get_output_embeddings()]
    for path in (layout.positions, layout.input_proj, layout.norm, layout.after_norm):
        module = _resolve(base, path) if path else None
        if module is not None:
            held.append(module)
    return held


def unique_params(modules: list[nn.Module]) -> int:
    """Parameters of ``modules``, each tensor counted once (a tied LM head is the embedding matrix)."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())
