"""A smaller client model: the auxiliary model's embedding (and tied LM head) as a low-rank product.

A modern small LLM's embedding is most of what FedSP ships to a client: SmolLM2's tied
49,152 x 576 matrix is 28.3 M of the auxiliary model's 31.9 M parameters. ``--aux-embedding
lowrank:R`` replaces the client's V x E matrix W by two factors, ``down`` (V x R) and ``up``
(R x E), initialised from W's truncated SVD (``down = U_R S_R^1/2``, ``up = S_R^1/2 V_R^T``,
the best rank-R approximation of W in Frobenius norm), then distilled with the rest of the
auxiliary model by the usual KD step (which matches last hidden states: it tunes the factors through
the input side; the head reuses them as they come out, and is never distilled on its own):

- a token's embedding is row ``down[token] @ up``: the tokenisation is exactly the global
  model's, no token is lost;
- the LM head computes ``(h @ up^T) @ down^T``: with tied embeddings (SmolLM2, GPT-2, OPT,
  tiny models) the head shares the factors, as the original head shares W; an untied head
  is factorised the same way, with its own factors (from its own SVD, not distilled);
- only a plain ``nn.Embedding`` and a bias-free ``nn.Linear`` head are factorised (a scaled
  embedding such as Gemma's is refused); the padding row gets gradients like any other;
- the global model is unchanged: the prefix a client trains has the global model's key/value
  shape whatever R is, and plugs into the global model as it is.

At full rank (R = E) the factors reproduce W to float rounding (tested). What a client then
holds and is sent once is ``(V + E) R`` numbers per factorised matrix instead of ``V E``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from fedsp.errors import FedSPError
from fedsp.spellings import LOWRANK


class LowRankEmbedding(nn.Module):
    """Token ids -> ``down[ids] @ up``: an embedding of V rows of width E held as V x R and R x E."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor) -> None:
        super().__init__()
        self.down = nn.Parameter(down)  # (V, R)
        self.up = nn.Parameter(up)  # (R, E)

    @property
    def num_embeddings(self) -> int:
        return self.down.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.up.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.down) @ self.up

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.down.shape[1]}"


class LowRankHead(nn.Module):
    """Hidden states -> logits ``(h @ up^T) @ down^T`` through the factors of a :class:`LowRankEmbedding`
    (the same parameters when the head is tied to the embedding)."""

    def __init__(self, factors: LowRankEmbedding) -> None:
        super().__init__()
        self.factors = factors

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(hidden, self.factors.up), self.factors.down)

    def float_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits computed in float32 whatever the factors' dtype (what the answer loss takes)."""
        up, down = self.factors.up.float(), self.factors.down.float()
        return F.linear(F.linear(hidden.float(), up), down)


def _factors(weight: torch.Tensor, rank: int, initialise: bool) -> LowRankEmbedding:
    """The rank-``rank`` factors of ``weight`` (V, E) by truncated SVD; uninitialised (for weights
    that will be loaded) unless ``initialise``."""
    vocab, width = weight.shape
    if not initialise:
        down = torch.empty(vocab, rank, dtype=weight.dtype, device=weight.device)
        return LowRankEmbedding(down, torch.empty(rank, width, dtype=weight.dtype, device=weight.device))
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    down = (u[:, :rank] * root).to(weight.dtype)
    up = (root[:, None] * vh[:rank]).to(weight.dtype)
    return LowRankEmbedding(down.contiguous(), up.contiguous())


def factorise_embedding(model: PreTrainedModel, rank: int, initialise: bool = True) -> PreTrainedModel:
    """Replace ``model``'s input embedding and LM head by rank-``rank`` factors, in place; ``model``.

    ``initialise=False`` builds the structure only (a Flower node loads the shipped factors into it).
    A rank above the embedding width E (there is nothing to gain) is refused in one line.
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    # only a plain lookup and a plain product are factorised: a scaled embedding (Gemma's) or a head with
    # a bias would lose what they add
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        raise FedSPError(
            f"--aux-embedding {LOWRANK}:{rank}: this model's input embedding "
            f"({type(embedding).__name__}) is not a plain lookup table; use --aux-embedding full"
        )
    if head is not None and (type(head) is not nn.Linear or head.bias is not None):
        raise FedSPError(
            f"--aux-embedding {LOWRANK}:{rank}: this model's LM head ({type(head).__name__}"
            f"{', with a bias' if getattr(head, 'bias', None) is not None else ''}) is not a plain product; "
            "use --aux-embedding full"
        )
    weight = embedding.weight
    width = weight.shape[1]
    if not 1 <= rank <= width:
        raise FedSPError(
            f"--aux-embedding {LOWRANK}:{rank}: the rank must be between 1 and the embedding width {width}"
        )
    tied = head is not None and head.weight is weight
    factors = _factors(weight, rank, initialise)
    model.set_input_embeddings(factors)
    if head is not None:
        head_factors = factors if tied else _factors(cast(torch.Tensor, head.weight), rank, initialise)
        model.set_output_embeddings(LowRankHead(head_factors))
    return model
