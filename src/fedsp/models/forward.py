"""Forward passes with a prefix: answer-token loss, hidden states, continuation log-probabilities.

One code path serves the global model and the auxiliary model. The prefix is
handed to the model as ``past_key_values``; the attention mask gets P leading
ones; real tokens take positions P..P+T-1 (:func:`real_positions` counts only
real, non-padding tokens), PEFT's convention for a prefix: the prefix reads as
P tokens of text at positions 0..P-1 just before the input, and a prefix
trained here is a PEFT prefix-tuning adapter as it is (:mod:`fedsp.models.export`). Logits are
computed only where they are used: at the positions that predict a labelled
token, not over the whole vocabulary at every position.

Batches (built on the CPU) and the prefix are moved to the model's device
here, so callers never place tensors themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from fedsp.data.batching import IGNORE
from fedsp.models.adapters import model_device, weights_dtype
from fedsp.models.embedding import LowRankHead
from fedsp.models.prefix import Prefix


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
    position_ids = real_positions(attention_mask, prefix)  # (B, T)
    if prefix is None:
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state
    dtype = weights_dtype(model)
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


def real_positions(attention_mask: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
    """(B, T) mask of real tokens -> (B, T) positions P, P+1, ... over the real tokens (P = 0 without a
    prefix); padding repeats its neighbour's position (it is masked anyway)."""
    offset = prefix.config.num_tokens if prefix is not None else 0
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset


def _answer_logits(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], prefix: Prefix | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a labelled token: (n, V) float32, their targets (n,), the mask (B,
    T-1)."""
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"], prefix)  # (B, T, H)
    targets = batch["labels"][:, 1:].to(hidden.device)  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    logits = head_logits(model.get_output_embeddings(), hidden[:, :-1][keep])  # (n_answer_tokens, V)
    return logits, targets[keep], keep


def head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of the rows of ``hidden``, computed in float32 even when the model is bfloat16.

    Rounding logits of magnitude 10-30 to bfloat16 (steps of 0.06-0.125) coarsens the
    softmax that the training and validation losses are taken over; the few answer
    rows make the float32 product cheap (the weight's cast is the main cost).
    """
    if hidden.dtype == torch.float32:
        return head(hidden)
    if isinstance(head, LowRankHead):
        return head.float_logits(hidden)
    bias = getattr(head, "bias", None)
    weight = cast(torch.Tensor, head.weight)
    return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


def answer_loss(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], prefix: Prefix | None = None, bucket: bool = True
) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer) tokens of ``batch``.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (B, T),
    right-padded; labels are ``-100`` on context and padding. With ``bucket``,
    where buckets pay (:func:`buckets_pay`; ``bucket=False`` turns them off everywhere),
    the rows run in groups of similar length (:func:`length_buckets`), each
    trimmed to its own longest row, and the loss is summed over the groups
    then divided by the answer-token count: the same mean over the same batch,
    with fewer padding tokens through the model. (A training-mode prefix draws
    its dropout mask once per group instead of once per batch.)
    """
    bucket = bucket and buckets_pay(model)
    groups = length_buckets(batch["attention_mask"].sum(-1).tolist()) if bucket else [None]
    total: torch.Tensor | None = None
    count = 0
    for rows in groups:
        logits, targets, _ = _answer_logits(model, _rows(batch, rows), prefix)
        part = F.cross_entropy(logits, targets, reduction="sum")
        total = part if total is None else total + part
        count += targets.numel()
    assert total is not None
    return total / count


def buckets_pay(model: PreTrainedModel) -> bool:
    """Whether a training batch runs faster in length buckets on ``model``: float32 on a CPU only.

    They made float32 steps on the CPU 1.14-1.22x faster; bfloat16 steps on an AMX CPU 12-16% slower
    (AMX matmuls want many tokens per call); float32 steps on an idle H200 about 2x slower (median
    0.13-0.16 s against 0.064-0.082 s at batch 8: a launch-bound GPU pays for each extra forward, not
    for padding).
    docs/performance.md, sections 7 and "The CUDA path".
    """
    return weights_dtype(model) == torch.float32 and model_device(model).type == "cpu"


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
    the tokens of its choice c. The contexts run as one right-padded batch;
    then each question's choices, packed one after another in a single row,
    continue from its cached prefix + context at positions P + len(context)...
    (:func:`_packed_choice_logprobs`), questions in groups of similar packed
    length (:func:`length_buckets`). Same numbers as scoring each context +
    choice sequence in full, for about a third of the tokens.
    """
    device = model_device(model)
    ctx_ids, ctx_mask = (t.to(device) for t in _pad_right(contexts, pad_id))  # (Q, Tc)
    num_q = len(contexts)
    P = prefix.config.num_tokens if prefix is not None else 0
    cache = (
        prefix.follow(model).cache(num_q, dtype=weights_dtype(model))
        if prefix is not None
        else DynamicCache()
    )
    prior_mask = torch.cat([ctx_mask.new_ones(num_q, P), ctx_mask], dim=1)  # (Q, P+Tc)
    out = model.base_model(
        input_ids=ctx_ids,
        attention_mask=prior_mask,
        position_ids=real_positions(ctx_mask, prefix),
        past_key_values=cache,
        use_cache=True,
    )
    ctx_len = ctx_mask.sum(-1)  # (Q,)
    ctx_last = out.last_hidden_state[
        torch.arange(num_q, device=device), ctx_len - 1
    ]  # (Q, H): predicts each choice's first token
    scores: list[list[float]] = [[] for _ in choices]
    packed = [sum(len(c) for c in options) for options in choices]
    for group in length_buckets(packed):
        rows = _packed_choice_logprobs(
            model, out.past_key_values, ctx_last, ctx_len + P, prior_mask, group, choices, pad_id
        )
        for q, row in zip(group, rows, strict=True):
            scores[q] = row
    return scores


def _custom_mask(model: PreTrainedModel, allowed: torch.Tensor) -> torch.Tensor:
    """A 4D attention mask as the model's kernel takes it: boolean for sdpa, additive (0 / dtype min) for
    eager, which adds a custom 4D mask to the scores as it is (a boolean one would mask nothing)."""
    if model.config._attn_implementation != "eager":
        return allowed
    dtype = weights_dtype(model)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _packed_choice_logprobs(
    model: PreTrainedModel,
    context_cache: DynamicCache,
    ctx_last: torch.Tensor,
    choice_start: torch.Tensor,
    prior_mask: torch.Tensor,
    questions: list[int],
    choices: list[list[list[int]]],
    pad_id: int,
) -> list[list[float]]:
    """Summed log-probability of every choice of ``questions``, one packed row per question.

    A question's choices follow each other in one row after its cached
    context; a block mask lets each choice token see the prefix, the context
    and the earlier tokens of its own choice only, and every choice's positions
    restart at ``choice_start`` (P + len(context)). The context cache is read once per question,
    never copied per choice.
    """
    device = ctx_last.device
    rows = [[t for c in choices[q] for t in c] for q in questions]
    ids, real = (t.to(device) for t in _pad_right(rows, pad_id))  # (G, L)
    width = ids.shape[1]
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # which choice each token belongs to
    offset = torch.zeros((len(rows), width), dtype=torch.long)  # position of the token within its choice
    for g, q in enumerate(questions):
        start = 0
        for c, tokens in enumerate(choices[q]):
            segment[g, start : start + len(tokens)] = c
            offset[g, start : start + len(tokens)] = torch.arange(len(tokens))
            start += len(tokens)
    segment, offset = segment.to(device), offset.to(device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    own = (segment.unsqueeze(2) == segment.unsqueeze(1)) & causal  # (G, L, L): same choice, not later
    own |= torch.eye(width, dtype=torch.bool, device=device)  # padding rows see themselves (never all masked)
    index = torch.tensor(questions, device=device)
    prior = prior_mask.index_select(0, index).bool().unsqueeze(1).expand(-1, width, -1)  # (G, L, P+Tc)
    cache = DynamicCache()
    for layer in range(len(context_cache.layers)):
        kv = cast(Any, context_cache.layers[layer])  # a full-attention layer: keys and values
        cache.update(kv.keys.index_select(0, index), kv.values.index_select(0, index), layer)
    hidden = model.base_model(
        input_ids=ids,
        attention_mask=_custom_mask(model, torch.cat([prior, own], dim=2).unsqueeze(1)),  # (G, 1, L, P+Tc+L)
        position_ids=choice_start.index_select(0, index).unsqueeze(1) + offset,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (G, L, H)
    previous = torch.cat([hidden.new_zeros(len(rows), 1, hidden.shape[2]), hidden[:, :-1]], dim=1)
    first = ctx_last.index_select(0, index).unsqueeze(1).expand_as(previous)
    predictors = torch.where((offset == 0).unsqueeze(-1), first, previous)  # (G, L, H)
    keep = real.bool()
    logits = model.get_output_embeddings()(predictors[keep]).float()  # (n_choice_tokens, V)
    token_lp = logits.log_softmax(-1).gather(-1, ids[keep].unsqueeze(-1)).squeeze(-1)
    num_choices = max(len(choices[q]) for q in questions)
    slot = (torch.arange(len(rows), device=device).unsqueeze(1) * num_choices + segment)[keep]
    sums = torch.zeros(len(rows) * num_choices, device=device).index_add_(0, slot, token_lp).tolist()
    return [sums[g * num_choices : g * num_choices + len(choices[q])] for g, q in enumerate(questions)]


@torch.no_grad()
def mean_answer_loss(
    model: PreTrainedModel, batches: Sequence[dict[str, torch.Tensor]], prefix: Prefix | None
) -> float:
    """Answer-token cross-entropy over ``batches``, weighted by token count (the servers' validation loss)."""
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(answer_loss(model, batch, prefix)) * n
        count += n
    return total / max(1, count)
