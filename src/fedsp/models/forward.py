"""Forward passes with a prefix: answer-token loss, hidden states, continuation log-probabilities.

One code path serves the global model and the auxiliary model. The prefix is
handed to the model as ``past_key_values``; the attention mask gets P leading
ones; real tokens keep positions 0..T-1 (``position_ids`` counts only real,
non-padding tokens), so the prefix does not shift positions. Logits are
computed only where they are used: at the positions that predict a labelled
token, not over the whole vocabulary at every position.

Batches (built on the CPU) and the prefix are moved to the model's device
here, so callers never place tensors themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from fedsp.models.prefix import Prefix

IGNORE = -100


def model_device(model: PreTrainedModel) -> torch.device:
    return model.get_input_embeddings().weight.device


def hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: Prefix | None = None,
) -> torch.Tensor:
    """Last hidden states (after the final norm), (B, T, H), on the model's device."""
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): 0..T-1 over real tokens
    if prefix is None:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state
    dtype = model.get_input_embeddings().weight.dtype
    cache = prefix.follow(model).cache(batch, dtype=dtype)
    prefix_mask = attention_mask.new_ones(batch, prefix.config.num_tokens)
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=torch.cat([prefix_mask, attention_mask], dim=1),  # (B, P+T)
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    return out.last_hidden_state


def _answer_logits(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], prefix: Prefix | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a labelled token: (n, V) float32, their targets (n,), the mask (B, T-1)."""
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"], prefix)  # (B, T, H)
    targets = batch["labels"][:, 1:].to(hidden.device)  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (n_answer_tokens, V)
    return logits, targets[keep], keep


def answer_loss(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], prefix: Prefix | None = None, bucket: bool = True
) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer) tokens of ``batch``.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (B, T),
    right-padded; labels are ``-100`` on context and padding. With ``bucket``
    the rows run in groups of similar length (:func:`length_buckets`), each
    trimmed to its own longest row, and the loss is summed over the groups
    then divided by the answer-token count: the same mean over the same batch,
    with fewer padding tokens through the model. (A training-mode prefix draws
    its dropout mask once per group instead of once per batch.)
    """
    groups = length_buckets(batch["attention_mask"].sum(-1).tolist()) if bucket else [None]
    total, count = None, 0
    for rows in groups:
        logits, targets, _ = _answer_logits(model, _rows(batch, rows), prefix)
        part = F.cross_entropy(logits, targets, reduction="sum")
        total = part if total is None else total + part
        count += targets.numel()
    return total / count


# Fixed cost of one extra forward (Python, kernel launches, per-call weight traffic), in padded tokens.
BUCKET_OVERHEAD_TOKENS = 64


def length_buckets(lengths: list[int], overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split rows into groups of similar length, minimising padded tokens + ``overhead`` per group.

    Rows sorted by length; a group of sorted rows i..j-1 costs (j - i) * lengths[j-1]
    + overhead; dynamic programming over the split points (B is small).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(sizes)  # best[j]: cheapest split of the first j sorted rows
    cut = [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sizes[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(sizes)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _rows(batch: dict[str, torch.Tensor], rows: list[int] | None) -> dict[str, torch.Tensor]:
    """The batch restricted to ``rows`` and trimmed to their longest row (right padding); all rows if None."""
    if rows is None:
        return batch
    index = torch.tensor(rows)
    width = int(batch["attention_mask"][index].sum(-1).max())
    return {name: t[index, :width] for name, t in batch.items()}


def continuation_logprobs(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], prefix: Prefix | None = None
) -> torch.Tensor:
    """Sum of log-probabilities of each row's labelled tokens, (B,)."""
    logits, targets, keep = _answer_logits(model, batch, prefix)
    token_lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)
    rows = keep.shape[0]
    owner = torch.arange(rows, device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    return torch.zeros(rows, device=keep.device).index_add_(0, owner, token_lp)


def _pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def score_choices(
    model: PreTrainedModel,
    contexts: list[list[int]],
    choices: list[list[list[int]]],
    pad_id: int,
    prefix: Prefix | None = None,
) -> list[list[float]]:
    """Sum of log-probabilities of each choice given its context, running every context once.

    ``contexts[q]`` are question q's context tokens (non-empty); ``choices[q][c]``
    the tokens of its choice c. The contexts run as one right-padded batch
    whose cache (prefix + context) is then repeated once per choice; the choices
    continue from it at positions len(context)... Same numbers as scoring each
    context + choice sequence in full, for about a third of the tokens.
    """
    device = model_device(model)
    ctx_ids, ctx_mask = (t.to(device) for t in _pad_right(contexts, pad_id))  # (Q, Tc)
    num_q = len(contexts)
    P = prefix.config.num_tokens if prefix is not None else 0
    cache = (
        prefix.follow(model).cache(num_q, dtype=model.get_input_embeddings().weight.dtype)
        if prefix is not None
        else DynamicCache()
    )
    out = model.base_model(
        input_ids=ctx_ids,
        attention_mask=torch.cat([ctx_mask.new_ones(num_q, P), ctx_mask], dim=1),
        position_ids=(ctx_mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=cache,
        use_cache=True,
    )
    ctx_len = ctx_mask.sum(-1)  # (Q,)
    ctx_last = out.last_hidden_state[
        torch.arange(num_q, device=device), ctx_len - 1
    ]  # (Q, H): predicts each choice's first token
    owner = torch.tensor(
        [q for q, options in enumerate(choices) for _ in options], device=device
    )  # (N,) question of each choice
    flat = [c for options in choices for c in options]
    ch_ids, ch_mask = (t.to(device) for t in _pad_right(flat, pad_id))  # (N, Tk)
    expanded = DynamicCache()
    for layer in range(len(out.past_key_values.layers)):
        kv = out.past_key_values.layers[layer]
        expanded.update(kv.keys.index_select(0, owner), kv.values.index_select(0, owner), layer)
    prior_mask = torch.cat([ctx_mask.new_ones(num_q, P), ctx_mask], dim=1).index_select(0, owner)  # (N, P+Tc)
    hidden = model.base_model(
        input_ids=ch_ids,
        attention_mask=torch.cat([prior_mask, ch_mask], dim=1),
        position_ids=ctx_len.index_select(0, owner).unsqueeze(1)
        + torch.arange(ch_ids.shape[1], device=device),
        past_key_values=expanded,
        use_cache=True,
    ).last_hidden_state  # (N, Tk, H)
    predictors = torch.cat(
        [ctx_last.index_select(0, owner).unsqueeze(1), hidden[:, :-1]], dim=1
    )  # (N, Tk, H)
    keep = ch_mask.bool()
    logits = model.get_output_embeddings()(predictors[keep]).float()  # (n_choice_tokens, V)
    token_lp = logits.log_softmax(-1).gather(-1, ch_ids[keep].unsqueeze(-1)).squeeze(-1)
    row = torch.arange(len(flat), device=device).unsqueeze(1).expand_as(ch_ids)[keep]
    sums = torch.zeros(len(flat), device=device).index_add_(0, row, token_lp).tolist()
    scores, k = [], 0
    for options in choices:
        scores.append(sums[k : k + len(options)])
        k += len(options)
    return scores
