"""Prefix soft prompts (prefix-tuning, Li & Liang 2021): the messengers of FedSP.

A prefix holds P virtual tokens with one key and one value vector per layer:
a table of shape (P, L * 2 * kv_dim), laid out like PEFT's prefix-tuning
(row p = [layer0 key, layer0 value, layer1 key, ...], each kv_dim =
n_kv_heads * head_dim wide). With ``projection=True`` the table is produced
by Embedding(P, H) -> Linear(H, 512) -> Tanh -> Linear(512, L*2*kv_dim).

What crosses the wire is the prefix's trainable parameters
(:meth:`Prefix.wire_state`), never the projected output, so a round trip
reproduces the effective prompt exactly.

Default initialisation: the global model's own keys/values of P real tokens
(:func:`init_prefix_from_tokens`): whole training examples of the server's
shard, computed at positions 0..P-1, as text just before the input.
``bench/prefix_init.py`` on SmolLM2 (first 100 ARC-Easy test questions,
P = 40): zero-shot 49%, this default 52%, the first P tokens of the shard's
text 48%, a random N(0, 1) prefix 27%.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from fedsp import wire
from fedsp.data.batching import Encoded, demonstration_tokens
from fedsp.errors import FedSPError
from fedsp.models.adapters import KVGeometry, kv_geometry, model_device


@dataclass(frozen=True)
class PrefixConfig:
    num_tokens: int
    geometry: KVGeometry
    projection: bool = False
    projection_hidden: int = 512
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise FedSPError(f"prefix length must be at least 1, got {self.num_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise FedSPError(f"prefix dropout must be in [0, 1), got {self.dropout}")

    @property
    def width(self) -> int:
        """Columns of the prefix table: L * 2 * kv_dim."""
        return self.geometry.num_layers * 2 * self.geometry.kv_dim


class Prefix(nn.Module):
    """Trainable prefix; :meth:`cache` turns it into a ``DynamicCache`` any supported model accepts."""

    def __init__(self, config: PrefixConfig) -> None:
        super().__init__()
        self.config = config
        P, H = config.num_tokens, config.geometry.hidden_size
        if config.projection:
            self.embedding = nn.Parameter(torch.randn(P, H) * 0.02)
            self.mlp = nn.Sequential(
                nn.Linear(H, config.projection_hidden),
                nn.Tanh(),
                nn.Linear(config.projection_hidden, config.width),
            )
        else:
            self.table = nn.Parameter(torch.zeros(P, config.width))
        self.dropout = nn.Dropout(config.dropout)

    def values(self) -> torch.Tensor:
        """The effective prefix table (P, L*2*kv_dim), before dropout."""
        if self.config.projection:
            return self.mlp(self.embedding)
        return self.table

    def key_values(
        self, batch_size: int, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each (B, n_kv_heads, P, head_dim).

        In training mode dropout draws its own mask for each example of the batch, as the reference code
        does (it expands the prefix to the batch before dropout); in eval mode the batch shares one table.
        """
        g = self.config.geometry
        P = self.config.num_tokens
        table = self.values()  # (P, L*2*kv_dim)
        if self.training and self.dropout.p > 0:
            table = self.dropout(table.unsqueeze(0).expand(batch_size, -1, -1))  # (B, P, L*2*kv_dim)
        else:
            table = table.unsqueeze(0).expand(batch_size, -1, -1)
        if dtype is not None:
            table = table.to(dtype)
        kv = table.view(batch_size, P, g.num_layers * 2, g.num_kv_heads, g.head_dim).permute(
            2, 0, 3, 1, 4
        )  # (L*2, B, n_kv, P, hd)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(g.num_layers)]

    def cache(self, batch_size: int, dtype: torch.dtype | None = None) -> DynamicCache:
        """A fresh cache holding the prefix; the model appends the real tokens' keys/values to it."""
        cache = DynamicCache()
        for layer, (key, value) in enumerate(self.key_values(batch_size, dtype)):
            cache.update(key, value, layer)
        return cache

    def follow(self, model: PreTrainedModel) -> Prefix:
        """Move the parameters to ``model``'s device, in place: the same ``Parameter`` objects, so an
        optimiser built on them keeps working (its state is created on first step, on the new device)."""
        device = model_device(model)
        if next(self.parameters()).device != device:
            self.to(device)
        return self

    def wire_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, detached, contiguous and on the CPU: what is sent."""
        return wire.snapshot(self.named_parameters())

    def load_wire_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load parameters received over the wire, checking names, shapes and finiteness."""
        wire.load_snapshot(self.named_parameters(), state, "prefix")


@contextmanager
def eval_mode(prefix: Prefix | None) -> Iterator[None]:
    """``prefix`` in eval mode (no dropout) inside the block, its own mode back after; None: nothing."""
    if prefix is None:
        yield
        return
    was_training = prefix.training
    prefix.eval()
    try:
        yield
    finally:
        prefix.train(was_training)


def prefix_for(
    model: PreTrainedModel, num_tokens: int, projection: bool = False, dropout: float = 0.1
) -> Prefix:
    """A zero prefix shaped for ``model`` (use :func:`init_prefix_from_tokens` to give it real values)."""
    config = PrefixConfig(num_tokens, kv_geometry(model.config), projection=projection, dropout=dropout)
    return Prefix(config).follow(model)


def initial_prefix(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    server_rows: Sequence[Encoded],
    num_tokens: int,
    projection: bool = False,
    dropout: float = 0.1,
    init: str = "tokens",
) -> Prefix:
    """The round-0 prefix the server makes from its global model: ``tokens`` (the model's own keys/values of
    whole examples of its shard, see :func:`init_prefix_from_tokens`) or ``random`` (N(0, 1))."""
    prefix = prefix_for(model, num_tokens, projection, dropout)
    if init == "random":
        with torch.no_grad():
            (prefix.embedding if projection else prefix.table).normal_(0.0, 1.0)
        return prefix
    tokens = demonstration_tokens(server_rows, num_tokens, tokenizer)
    init_prefix_from_tokens(prefix, model, torch.tensor(tokens))
    return prefix


@torch.no_grad()
def init_prefix_from_tokens(prefix: Prefix, model: PreTrainedModel, token_ids: torch.Tensor) -> None:
    """Set the prefix to ``model``'s own keys/values of ``token_ids`` (shape (P,)).

    They are computed at positions 0..P-1, so the prefix reads as text that came
    just before the input (whose positions start at P, see
    :func:`fedsp.models.forward.real_positions`). With ``projection=True`` only the
    embedding can be set (to the tokens' input embeddings); the MLP keeps its
    random initialisation.
    """
    P = prefix.config.num_tokens
    if token_ids.numel() != P:
        raise FedSPError(f"prefix initialisation needs exactly {P} token ids, got {token_ids.numel()}")
    ids = token_ids.view(1, P).to(model.device)
    if prefix.config.projection:
        embeddings = model.get_input_embeddings()(ids)[0]
        prefix.embedding.copy_(embeddings.float())
        return
    positions = torch.arange(P, device=ids.device).view(1, P)
    out = model.base_model(input_ids=ids, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    g = prefix.config.geometry
    columns = []
    for layer in range(g.num_layers):
        key, value = cache.layers[layer].keys, cache.layers[layer].values  # (1, n_kv, P, hd)
        for t in (key, value):
            columns.append(t[0].permute(1, 0, 2).reshape(P, g.kv_dim))  # (P, kv_dim)
    prefix.table.copy_(torch.cat(columns, dim=1).float())  # (P, L*2*kv_dim)


def collapse_layers(state: dict[str, torch.Tensor], plan: Sequence[int]) -> dict[str, torch.Tensor]:
    """An L-layer prefix table averaged down to the N layers of an unshared client model.

    ``plan[depth]`` is the client layer (0..N-1) standing for server depth
    ``depth``; each client layer gets the mean of its depths:
    (P, L*2*kv) -> (P, N*2*kv). What a one-layer client receives from an
    L-layer server in the FedPrompt-Single reference. Only plain tables can be collapsed.
    """
    _check_table_state(state)
    table = state["table"]  # (P, L*2*kv_dim)
    P, width = table.shape
    L = len(plan)
    if width % L:
        raise FedSPError(f"prefix width {width} is not a multiple of {L} layers")
    layers = table.view(P, L, width // L)  # (P, L, 2*kv_dim)
    owner = torch.tensor(list(plan))
    blocks = [layers[:, owner == j].mean(dim=1) for j in range(max(plan) + 1)]  # N x (P, 2*kv_dim)
    return {"table": torch.cat(blocks, dim=1).contiguous()}


def expand_layers(state: dict[str, torch.Tensor], plan: Sequence[int]) -> dict[str, torch.Tensor]:
    """A client's N-layer prefix table repeated to the server's L layers: (P, N*2*kv) -> (P, L*2*kv).

    Inverse of :func:`collapse_layers` on tables whose depths within a block are equal.
    """
    _check_table_state(state)
    table = state["table"]  # (P, N*2*kv_dim)
    P, width = table.shape
    N = max(plan) + 1
    layers = table.view(P, N, width // N)
    return {"table": layers[:, list(plan)].reshape(P, -1).contiguous()}


def _check_table_state(state: dict[str, torch.Tensor]) -> None:
    if set(state) != {"table"}:
        raise FedSPError(
            "one-layer clients need a plain prefix table (--prefix-projection false); "
            f"got prefix tensors {sorted(state)}"
        )
