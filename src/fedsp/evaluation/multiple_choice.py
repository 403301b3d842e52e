"""Multiple-choice evaluation by log-likelihood, as lm-eval-harness scores it.

For every choice: the sum of log-probabilities of ``" " + choice`` given the
context. ``acc`` picks the highest sum; ``acc_norm`` the highest sum per
character of the choice text.

Default path: each question's context runs once and its choices, packed in
one row, are scored from the cached keys/values
(:func:`fedsp.models.forward.score_choices`), questions sorted by length and
batched; ``batch_size`` counts choice sequences and changes only the speed. ``cached=False`` scores every
context + choice sequence in full (the plain path, kept for checking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsp.data.batching import collate, encode_pair
from fedsp.data.tasks import MCExample
from fedsp.models.forward import continuation_logprobs, score_choices
from fedsp.models.prefix import Prefix, eval_mode


@dataclass(frozen=True)
class MCResult:
    acc: float
    acc_norm: float
    n: int
    predictions: tuple[int, ...]  # acc's choice per example

    def summary(self) -> dict[str, float | int]:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


@torch.inference_mode()
def evaluate_multiple_choice(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MCExample],
    prefix: Prefix | None = None,
    batch_size: int = 128,
    max_length: int = 512,
    desc: str = "eval",
    progress: bool = True,
    cached: bool = True,
) -> MCResult:
    if not examples:
        raise ValueError("evaluation needs at least one example")
    with eval_mode(prefix):
        score = _score_cached if cached else _score_full
        scores = score(model, tokenizer, examples, prefix, batch_size, max_length, desc, progress)
    predictions, correct, correct_norm = [], 0, 0
    for ex, row in zip(examples, scores, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        best_norm = max(range(len(row)), key=lambda c: row[c] / max(1, len(ex.choices[c])))
        predictions.append(best)
        # by text: a duplicated gold choice scores the same as its copy, and either copy is right
        correct += ex.choices[best] == ex.choices[ex.gold]
        correct_norm += ex.choices[best_norm] == ex.choices[ex.gold]
    n = len(examples)
    return MCResult(correct / n, correct_norm / n, n, tuple(predictions))


def _score_cached(
    model, tokenizer, examples, prefix, batch_size, max_length, desc, progress
) -> list[list[float]]:
    contexts, choices = [], []
    for ex in examples:
        encoded = [encode_pair(tokenizer, ex.context, " " + c, 10**9) for c in ex.choices]
        answers = [list(e.ids[len(e.ids) - e.num_answer :]) for e in encoded]
        head = list(encoded[0].ids[: len(encoded[0].ids) - encoded[0].num_answer]) or [tokenizer.eos_token_id]
        room = max(1, max_length - max(len(a) for a in answers))
        contexts.append(head[-room:])
        choices.append(answers)
    order = sorted(range(len(examples)), key=lambda i: len(contexts[i]))
    per_batch = max(1, batch_size // max(len(ex.choices) for ex in examples))  # questions per batch
    scores: list[list[float]] = [[] for _ in examples]
    for start in tqdm(
        range(0, len(order), per_batch), desc=desc, unit="batch", disable=not progress, leave=False
    ):
        chunk = order[start : start + per_batch]
        batch_scores = score_choices(
            model, [contexts[i] for i in chunk], [choices[i] for i in chunk], tokenizer.pad_token_id, prefix
        )
        for i, row in zip(chunk, batch_scores, strict=True):
            scores[i] = row
    return scores


def _score_full(
    model, tokenizer, examples, prefix, batch_size, max_length, desc, progress
) -> list[list[float]]:
    pairs = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    encoded = [
        encode_pair(tokenizer, examples[i].context, " " + examples[i].choices[c], max_length)
        for i, c in pairs
    ]
    order = sorted(range(len(pairs)), key=lambda k: len(encoded[k].ids))
    scores = [[0.0] * len(ex.choices) for ex in examples]
    for start in tqdm(
        range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False
    ):
        chunk = order[start : start + batch_size]
        batch = collate([encoded[k] for k in chunk], tokenizer.pad_token_id)
        logprobs = continuation_logprobs(model, batch, prefix).tolist()
        for k, lp in zip(chunk, logprobs, strict=True):
            i, c = pairs[k]
            scores[i][c] = lp
    return scores
