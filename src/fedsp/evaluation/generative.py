"""Generative evaluation: greedy decoding with the prefix in the KV cache, then SQuAD / ROUGE-L scores.

:func:`generate` decodes greedily, batch by batch (prompts sorted by length,
left-padded). The prefix sits in the cache as P tokens at positions 0..P-1 and
every row's real tokens take positions P, P+1, ... whatever its padding, as
:func:`fedsp.models.forward.real_positions` places them in training; each new
token is the argmax of the float32 logits of the last position
(:func:`fedsp.models.forward.head_logits`). The loop is written here rather than
calling ``model.generate``, whose positions under a prefix cache differ.

:func:`score_generations` scores texts against their accepted answers with
torchmetrics: exact match and token F1 with SQuAD's normalisation (lower case,
no punctuation, no articles a/an/the, whitespace collapsed) and ROUGE-L
F-measure (lower-cased ASCII words and digits; other characters are dropped, as
in Google's ``rouge-score``), each the best over an example's references.
Neither needs a download (ROUGE-Lsum and stemming, which would use nltk, are
not computed).

:func:`evaluate_generative` runs both on :class:`~fedsp.data.tasks.GenExample`
rows and adds the completion tokens' cross-entropy (and its perplexity) under
teacher forcing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from fedsp.data.batching import encode_pair, fixed_batches, text_ids
from fedsp.data.tasks import GenExample
from fedsp.models.adapters import check_lengths, model_device, weights_dtype
from fedsp.models.forward import head_logits, mean_answer_loss, real_positions
from fedsp.models.prefix import Prefix, eval_mode


@dataclass(frozen=True)
class Generation:
    """What was generated for one prompt: the new token ids (eos excluded) and their text, cut before the
    first stop string (the ids run up to the token that completed it)."""

    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class GenResult:
    exact_match: float  # fractions in [0, 1], means over the examples
    f1: float
    rouge_l: float
    loss: float  # mean cross-entropy per completion token (nats)
    perplexity: float  # exp(loss)
    n: int
    predictions: tuple[str, ...]  # generated text per example, stripped

    def summary(self) -> dict[str, float | int]:
        return {
            "exact_match": self.exact_match,
            "f1": self.f1,
            "rouge_l": self.rouge_l,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "n": self.n,
        }


def score_generations(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``exact_match``, ``f1`` and ``rouge_l`` of ``predictions[i]`` against ``references[i]`` (the best
    reference per example), means over the examples, in [0, 1]."""
    # torchmetrics costs 0.8 s to import: only code that scores pays it
    from torchmetrics.functional.text import rouge_score, squad

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("scoring needs at least one prediction")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")
    # ids are positions: torchmetrics keys predictions by id, and example ids may repeat
    squad_scores = squad(
        [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)],
        [{"answers": {"text": list(refs)}, "id": str(i)} for i, refs in enumerate(references)],
    )
    rouge = rouge_score(
        list(predictions), [list(refs) for refs in references], accumulate="best", rouge_keys="rougeL"
    )
    return {
        "exact_match": float(squad_scores["exact_match"]) / 100,  # torchmetrics gives percentages
        "f1": float(squad_scores["f1"]) / 100,
        "rouge_l": float(rouge["rougeL_fmeasure"]),
    }


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    prefix: Prefix | None = None,
    max_new_tokens: int = 32,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generate",
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (token ids, each non-empty), in the order given.

    A row stops at the tokenizer's eos, when its new text contains a string of
    ``stop``, or after ``max_new_tokens`` tokens; a batch stops when all its rows
    have. The prefix runs in eval mode (no dropout) and gets its mode back after.
    """
    if max_new_tokens < 0 or batch_size < 1:
        raise ValueError(f"need max_new_tokens >= 0 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to continue")
    P = prefix.config.num_tokens if prefix is not None else 0
    if prompts:
        check_lengths(model.config, P, max(len(p) for p in prompts) + max_new_tokens)
    if prefix is not None:
        prefix.follow(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    with eval_mode(prefix):
        for start in tqdm(
            range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False
        ):
            chunk = order[start : start + batch_size]
            batch = _generate_batch(
                model, tokenizer, [prompts[i] for i in chunk], prefix, max_new_tokens, tuple(stop)
            )
            for i, generation in zip(chunk, batch, strict=True):
                results[i] = generation
    return [g for g in results if g is not None]


def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    prefix: Prefix | None,
    max_new_tokens: int,
    stop: tuple[str, ...],
) -> list[Generation]:
    """Greedy decoding of one batch: 1. prefill the left-padded prompts after the prefix's cache;
    2. one token per step for every row until all rows have stopped."""
    device = model_device(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    rows = len(prompts)
    new: list[list[int]] = [[] for _ in range(rows)]
    texts = [""] * rows
    done = [False] * rows
    if max_new_tokens == 0:
        return [Generation((), "") for _ in range(rows)]
    # 1. prefill: left padding, so the last column is every row's last real token
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    real = torch.zeros((rows, width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt) :] = torch.tensor(list(prompt))
        real[r, width - len(prompt) :] = 1
    ids, real = ids.to(device), real.to(device)
    P = prefix.config.num_tokens if prefix is not None else 0
    cache = prefix.cache(rows, dtype=weights_dtype(model)) if prefix is not None else DynamicCache()
    mask = torch.cat([real.new_ones(rows, P), real], dim=1)  # (B, P+W): prefix, prompt
    positions = real_positions(real, prefix)  # (B, W): P..P+len-1 on the real tokens
    next_position = positions[:, -1:] + 1  # (B, 1)
    inputs = ids
    head = model.get_output_embeddings()
    for _step in range(max_new_tokens):
        out = model.base_model(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = head_logits(head, out.last_hidden_state[:, -1])  # (B, V) float32
        chosen = logits.argmax(-1)  # (B,)
        # 2. bookkeeping on the CPU: eos, stop strings
        for r, token in enumerate(chosen.tolist()):
            if done[r]:
                continue
            if token == eos:
                done[r] = True
                continue
            new[r].append(token)
            text = cast(str, tokenizer.decode(new[r], skip_special_tokens=True))  # one row: one string
            texts[r], done[r] = _cut(text, stop)
            done[r] = done[r] or len(new[r]) == max_new_tokens
        if all(done):
            break
        inputs = chosen.masked_fill(torch.tensor(done, device=device), pad).unsqueeze(1)  # (B, 1)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions, next_position = next_position, next_position + 1
    return [Generation(tuple(tokens), text) for tokens, text in zip(new, texts, strict=True)]


def _cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@torch.inference_mode()
def evaluate_generative(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[GenExample],
    prefix: Prefix | None = None,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
    desc: str = "eval",
) -> GenResult:
    """Generate an answer to every example's prompt and score it against its references; the loss is the
    cross-entropy of the completion tokens of ``prompt + completion`` (at most ``max_length`` tokens)."""
    if not examples:
        raise ValueError("evaluation needs at least one example")
    if max_new_tokens >= max_length:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {max_length}")
    for ex in examples:
        if not ex.references:
            raise ValueError(f"example {ex.id} has no references to score against")
    check_lengths(model.config, prefix.config.num_tokens if prefix is not None else 0, max_length)
    room = max_length - max_new_tokens
    prompts = [text_ids(tokenizer, ex.prompt)[-room:] or [tokenizer.eos_token_id] for ex in examples]
    generations = generate(
        model, tokenizer, prompts, prefix, max_new_tokens, stop, batch_size, progress, desc
    )
    predictions = tuple(g.text.strip() for g in generations)
    scores = score_generations(predictions, [ex.references for ex in examples])
    loss = _completion_loss(model, tokenizer, examples, prefix, batch_size, max_length)
    return GenResult(
        scores["exact_match"],
        scores["f1"],
        scores["rouge_l"],
        loss,
        math.exp(loss) if math.isfinite(loss) else math.nan,
        len(examples),
        predictions,
    )


def _completion_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[GenExample],
    prefix: Prefix | None,
    batch_size: int,
    max_length: int,
) -> float:
    """Mean cross-entropy per completion token, the prefix in eval mode; NaN when no completion has one."""
    rows = [encode_pair(tokenizer, ex.prompt, ex.completion, max_length) for ex in examples]
    rows = [row for row in rows if row.num_answer > 0]
    if not rows:
        return math.nan
    with eval_mode(prefix):
        return mean_answer_loss(model, fixed_batches(rows, batch_size, tokenizer.pad_token_id), prefix)
