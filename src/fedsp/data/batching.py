"""From examples to token batches.

One leading-space convention for training and evaluation, as lm-eval-harness
scores: the continuation is ``" " + choice``, the pair is tokenised whole, and
the continuation's tokens are what follows the context's own tokens. (The
reference code trained on answers without the space and evaluated with it.)
A generative example trains on ``prompt + completion`` the same way; a
conversation with several assistant turns is tokenised whole and its scored
pieces marked token by token (:func:`encode_segments`).

Special tokens follow lm-eval-harness, which keeps the tokenizer's default: a
tokenizer that starts every text with a beginning-of-sequence token (Llama,
OPT) gets it before the context, never before the continuation; one that adds
none (SmolLM2, GPT-2) gets none (:func:`text_ids`).
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from fedsp.data.tasks import Example, MCExample

IGNORE = -100  # label of a token that is not scored (context, padding)
_LEADING: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, ...]] = weakref.WeakKeyDictionary()


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special tokens ``tokenizer`` puts before a text by default (its BOS; often none)."""
    if tokenizer not in _LEADING:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        start = next((k for k in range(len(full)) if full[k : k + len(plain)] == plain), 0)
        _LEADING[tokenizer] = tuple(full[:start])
    return _LEADING[tokenizer]


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids of a text that starts a sequence: the tokenizer's leading special tokens, then the text's
    (not twice: a text that already starts with them, such as a rendered chat template, keeps its own)."""
    leading = leading_special_ids(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) if tuple(ids[: len(leading)]) == leading else [*leading, *ids]


@dataclass(frozen=True)
class Encoded:
    """Token ids of context + continuation; the last ``num_answer`` ids are the continuation."""

    ids: tuple[int, ...]
    num_answer: int
    context_cut: int = field(default=0, compare=False)  # context tokens dropped on the left to fit
    answer_cut: int = field(default=0, compare=False)  # continuation tokens that did not fit
    scored: tuple[bool, ...] = ()  # when set: exactly which tokens are labelled (several answer pieces)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, max_length: int
) -> Encoded:
    """Tokenise ``context + continuation`` as lm-eval does; truncate the context from the left to fit."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:  # a trailing space belongs to the continuation
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = text_ids(tokenizer, context + continuation)
    head = text_ids(tokenizer, context)
    answer = whole[len(head) :]
    if not answer:  # the tokenizer merged across the boundary: score the continuation alone
        answer = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = (head + answer)[-max_length:]
    num_answer = min(len(answer), len(ids) - 1)
    cut = max(0, len(head) + len(answer) - max_length)
    return Encoded(
        tuple(ids), num_answer, context_cut=min(cut, len(head)), answer_cut=len(answer) - num_answer
    )


def encode_gold(tokenizer: PreTrainedTokenizerBase, example: MCExample, max_length: int) -> Encoded:
    """The training sequence of an example: context + " " + gold answer."""
    return encode_pair(tokenizer, example.context, " " + example.choices[example.gold], max_length)


def encode_segments(
    tokenizer: PreTrainedTokenizerBase, segments: Sequence[tuple[str, bool]], max_length: int
) -> Encoded:
    """The text of ``(text, scored)`` pieces tokenised whole, each token labelled when it starts inside a
    scored piece (slow tokenizers: the pieces tokenised one by one); left-truncated to ``max_length``."""
    ids: list[int] = []
    marks: list[bool] = []
    if getattr(tokenizer, "is_fast", False):
        text = "".join(t for t, _ in segments)
        spans, start = [], 0
        for piece, scored in segments:
            if scored:
                spans.append((start, start + len(piece)))
            start += len(piece)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        marks = [any(a <= begin < b for a, b in spans) for begin, _ in encoded["offset_mapping"]]
    else:
        for piece, scored in segments:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            marks += [scored] * len(piece_ids)
    leading = leading_special_ids(tokenizer)
    if tuple(ids[: len(leading)]) != leading:
        ids, marks = [*leading, *ids], [False] * len(leading) + marks
    dropped = max(0, len(ids) - max_length)
    kept = marks[dropped:]
    answer_cut = sum(marks[:dropped])
    first = kept.index(True) if True in kept else len(kept)
    return Encoded(
        tuple(ids[dropped:]),
        num_answer=len(kept) - first,
        context_cut=dropped - answer_cut,
        answer_cut=answer_cut,
        scored=tuple(kept),
    )


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> Encoded:
    """The training sequence of any example: context + " " + gold choice, prompt + completion, or a chat."""
    if isinstance(example, MCExample):
        return encode_gold(tokenizer, example, max_length)
    if example.segments:
        return encode_segments(tokenizer, example.segments, max_length)
    return encode_pair(tokenizer, example.prompt, example.completion, max_length)


def collate(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the continuation tokens only (dynamic padding)."""
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.ids)
        input_ids[i, :n] = torch.tensor(row.ids)
        attention_mask[i, :n] = 1
        if row.scored:
            labels[i, :n] = input_ids[i, :n].masked_fill(~torch.tensor(row.scored), IGNORE)
        else:
            labels[i, n - row.num_answer : n] = input_ids[i, n - row.num_answer : n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchStream:
    """Endless seeded mini-batches over a fixed set of encoded rows: reshuffled every epoch.

    Its position (epoch order and cursor) is part of a client's state, so a
    client resumes exactly where it stopped in the previous round.
    """

    def __init__(self, rows: Sequence[Encoded], batch_size: int, pad_id: int, seed: int) -> None:
        if not rows:
            raise ValueError("BatchStream needs at least one row")
        self.rows = list(rows)
        self.batch_size = min(batch_size, len(rows))
        self.pad_id = pad_id
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def next_rows(self) -> list[Encoded]:
        if len(self.order) < self.batch_size:
            fresh = list(range(len(self.rows)))
            self.rng.shuffle(fresh)
            self.order.extend(fresh)
        picked, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return [self.rows[i] for i in picked]

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate(self.next_rows(), self.pad_id)

    def state_dict(self) -> dict:
        """The stream's position: the shuffling generator's state and the rows left in this epoch."""
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        rng = state["rng"]  # a JSON round trip turns the generator state's tuples into lists
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.order = [int(i) for i in state["order"]]


def fixed_batches(rows: Sequence[Encoded], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Deterministic batches for evaluation losses, grouped by length to limit padding."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    return [
        collate([rows[i] for i in order[s : s + batch_size]], pad_id)
        for s in range(0, len(order), batch_size)
    ]


def demonstration_tokens(
    rows: Sequence[Encoded], length: int, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Exactly ``length`` tokens of whole training examples (context + answer), each followed by a blank line.

    Examples are taken in shard order while they fit; the rest is left-filled
    with newline tokens. If not even the first example fits, its last ``length`` tokens.
    What the prefix (FedSP) and the input prompts (SFPrompt) start from by default.
    """
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    filler = tokenizer("\n", add_special_tokens=False)["input_ids"] or separator
    leading = leading_special_ids(tokenizer)

    def text(row: Encoded) -> list[int]:  # the example without its leading special tokens
        ids = list(row.ids)
        return ids[len(leading) :] if leading and tuple(ids[: len(leading)]) == leading else ids

    tokens: list[int] = []
    for row in rows:
        if len(tokens) + len(text(row)) + len(separator) > length:
            break
        tokens += text(row) + separator
    if not tokens:
        first = text(rows[0])
        return first[-length:] if len(first) >= length else (filler * length + first)[-length:]
    return (filler * length + tokens)[-length:]
