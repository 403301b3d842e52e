"""A smaller client model by a pruned vocabulary: the client's embedding and head keep V of the rows.

``--aux-embedding pruned:V``: the server keeps V token ids of the global vocabulary for the
auxiliary model. It chooses them once, from what it holds (:func:`choose_vocabulary`):

- every byte token of a byte-level BPE tokenizer (those of ``ByteLevel``'s 256 it has) and every
  added (special) token: with the bytes kept, every text the global tokenizer writes stays written;
- then the tokens of its own shard, most frequent first (ties by id);
- then the tokenizer's own most frequent tokens: BPE learns its merges in order of frequency in its
  training corpus, so the tokens of the earliest merges, in merge order.

A client's text is tokenised by the global tokenizer as always; a token outside the kept ids is then
written as the two tokens its BPE merge joined, again and again, down to bytes if need be
(:meth:`PrunedVocabulary.pieces`). The pieces' bytes are the token's bytes, so the client's ids
decode to the same string (tested over random, emoji, code and hand-picked strings). How many of a
client's tokens were rewritten (its out-of-vocabulary rate) is computed on the client and reported
as a number only (the ``oov_rate`` metric of its rounds).

The client model's embedding is the kept rows of the global one (:func:`prune_embedding`, position
i holding global id ``kept[i]``), and the LM head the same rows (the same matrix when tied, the
head's own rows when untied); the distillation (KD) then tunes them with the rest of the auxiliary
model, on each of the server's rows up to its first token that is not kept (so that the teacher's
and the student's positions hold the same tokens). The global model, the answer scoring and the
prefix (keys and values of the global model's shape) are unchanged. A node receives the kept ids
with the client model (:func:`vocabulary_buffers`) and rewrites its own rows with the public
tokenizer's merges.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsp.data.batching import Encoded
from fedsp.errors import FedSPError
from fedsp.spellings import PRUNED


class PrunedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` of the kept rows; ``kept_ids`` (a buffer, shipped with the weights) says
    which global token id each row is."""

    def __init__(self, kept: torch.Tensor, width: int, dtype: torch.dtype | None = None) -> None:
        super().__init__(kept.numel(), width, dtype=dtype)
        self.register_buffer("kept_ids", kept.to(torch.int64).clone())


@functools.lru_cache(maxsize=4)
def byte_level_bpe(tokenizer: PreTrainedTokenizerBase, what: str) -> tuple[dict[str, int], list[list[str]]]:
    """The vocabulary and merges of a byte-level BPE tokenizer (GPT-2, SmolLM2, Llama 3, Qwen, OPT);
    any other tokenizer is refused in one line (a byte-fallback one cannot rewrite its tokens).
    Parsed once per tokenizer (the server's choice and each client built read it; not to be modified)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec: dict[str, Any] = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}

    def byte_level(part: Mapping[str, Any] | None) -> bool:
        if not part:
            return False
        if part.get("type") == "ByteLevel":
            return True
        return any(byte_level(p) for p in part.get("pretokenizers", part.get("decoders", [])) or [])

    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or not byte_level(spec.get("pre_tokenizer"))
        or not byte_level(spec.get("decoder"))
    ):
        raise FedSPError(
            f"{what} needs a byte-level BPE tokenizer (GPT-2, SmolLM2, Llama 3, Qwen style); this model's "
            f"is {model.get('type', type(tokenizer).__name__)}; use --aux-embedding full or lowrank:R"
        )
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    return vocab, merges


@functools.lru_cache(maxsize=4)
def merge_parts(tokenizer: PreTrainedTokenizerBase, what: str) -> dict[int, tuple[int, int]]:
    """Token id -> the ids of the two tokens its BPE merge joined (the first merge that makes a token is
    its own). Read once per tokenizer: every client built in a process (each round) asks again."""
    vocab, merges = byte_level_bpe(tokenizer, what)
    parts: dict[int, tuple[int, int]] = {}
    for left, right in merges:
        joined = vocab.get(left + right)
        if joined is not None and joined not in parts and left in vocab and right in vocab:
            parts[joined] = (vocab[left], vocab[right])
    return parts


class PrunedVocabulary:
    """The kept global ids (sorted; row i of the client's embedding is ``kept[i]``) and how any
    other token is written in them (its BPE merge's two parts, recursively)."""

    def __init__(self, kept: Iterable[int], parts: Mapping[int, tuple[int, int]]) -> None:
        self.kept = tuple(sorted(set(kept)))
        self.position = {token: i for i, token in enumerate(self.kept)}
        self.parts = parts
        self._pieces: dict[int, tuple[int, ...]] = {}

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, kept: Iterable[int], what: str) -> PrunedVocabulary:
        """The vocabulary of ``kept`` ids, rewriting others with ``tokenizer``'s merges."""
        return cls(kept, merge_parts(tokenizer, what))

    def __len__(self) -> int:
        return len(self.kept)

    def pieces(self, token: int) -> tuple[int, ...]:
        """``token`` in client ids: itself when kept, else its merge's parts' pieces, left to right."""
        found = self._pieces.get(token)
        if found is not None:
            return found
        if token in self.position:
            found = (self.position[token],)
        elif token in self.parts:
            left, right = self.parts[token]
            found = self.pieces(left) + self.pieces(right)
        else:
            raise FedSPError(
                f"token id {token} is neither kept nor the merge of two tokens: the pruned vocabulary "
                "cannot write it"
            )
        self._pieces[token] = found
        return found

    def client_ids(self, ids: Sequence[int]) -> list[int]:
        return [piece for token in ids for piece in self.pieces(token)]

    def encode_row(self, row: Encoded) -> Encoded:
        """``row`` in client ids: a rewritten token's pieces are answer (scored) tokens where it was."""
        ids: list[int] = []
        scored: list[bool] = []
        flags = row.scored or tuple(i >= len(row.ids) - row.num_answer for i in range(len(row.ids)))
        answer = 0
        for i, (token, flag) in enumerate(zip(row.ids, flags, strict=True)):
            pieces = self.pieces(token)
            ids.extend(pieces)
            scored.extend([flag] * len(pieces))
            if i >= len(row.ids) - row.num_answer:
                answer += len(pieces)
        return replace(row, ids=tuple(ids), num_answer=answer, scored=tuple(scored) if row.scored else ())

    def out_of_vocabulary(self, rows: Iterable[Encoded]) -> float:
        """The fraction of the tokens of ``rows`` (global ids) that are not kept."""
        counts = Counter(token in self.position for row in rows for token in row.ids)
        total = counts[True] + counts[False]
        return counts[False] / total if total else 0.0

    def lookup(self, vocab_size: int) -> torch.Tensor:
        """Global id -> client id (-1 where not kept), for ids that need no rewriting."""
        table = torch.full((vocab_size,), -1, dtype=torch.int64)
        table[torch.tensor(self.kept, dtype=torch.int64)] = torch.arange(len(self.kept))
        return table


def byte_ids(vocab: Mapping[str, int]) -> set[int]:
    """The tokenizer's byte tokens (of ``ByteLevel``'s 256; a tokenizer may lack bytes that never occur
    in UTF-8 text or in its training data, such as 0xF5-0xFF: its global model cannot write them either)."""
    from tokenizers import pre_tokenizers

    return {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}


def base_ids(tokenizer: PreTrainedTokenizerBase, vocab: Mapping[str, int]) -> set[int]:
    """The ids every pruned vocabulary keeps: the byte tokens and the added (special) tokens."""
    base = byte_ids(vocab)
    base |= {int(i) for i in tokenizer.added_tokens_decoder}
    base |= {int(i) for i in tokenizer.all_special_ids}
    return base


def choose_vocabulary(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Encoded], size: int, model_vocab: int
) -> PrunedVocabulary:
    """The ``size`` ids the server keeps: bytes and special tokens, its rows' most frequent tokens, then
    the tokenizer's earliest merges. A size below the bytes and special tokens or above the model's
    vocabulary is refused in one line."""
    what = f"--aux-embedding {PRUNED}:{size}"
    vocab, merges = byte_level_bpe(tokenizer, what)
    base = {i for i in base_ids(tokenizer, vocab) if i < model_vocab}
    if not len(base) <= size <= model_vocab:
        count = len(byte_ids(vocab))
        raise FedSPError(
            f"{what}: the vocabulary size must be between {len(base)} (the tokenizer's {count} byte tokens "
            f"and {len(base) - count} special tokens) and the model's vocabulary, {model_vocab}"
        )
    counts = Counter(token for row in rows for token in row.ids if token not in base)
    kept = set(base)
    for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(kept) >= size:
            break
        kept.add(token)
    for left, right in merges:
        if len(kept) >= size:
            break
        merged = vocab.get(left + right)
        if merged is not None and merged < model_vocab:
            kept.add(merged)
    return PrunedVocabulary.of(tokenizer, kept, what)


def prune_embedding(
    model: PreTrainedModel, kept: Sequence[int] | torch.Tensor, initialise: bool = True
) -> PreTrainedModel:
    """Keep only the rows ``kept`` (global ids, sorted) of ``model``'s embedding and LM head, in place.

    ``initialise=False`` builds the structure only (a Flower node loads the shipped rows and ids).
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    what = f"--aux-embedding {PRUNED}:{len(kept)}"
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        raise FedSPError(
            f"{what}: this model's input embedding ({type(embedding).__name__}) is not a plain lookup "
            "table; use --aux-embedding full"
        )
    if head is not None and (type(head) is not nn.Linear or head.bias is not None):
        raise FedSPError(f"{what}: this model's LM head is not a plain product; use --aux-embedding full")
    weight = embedding.weight
    ids = torch.as_tensor(kept, dtype=torch.int64)
    pruned = PrunedEmbedding(ids, weight.shape[1], dtype=weight.dtype).to(weight.device)
    if initialise:
        with torch.no_grad():
            pruned.weight.copy_(weight[ids.to(weight.device)])
    tied = head is not None and head.weight is weight
    model.set_input_embeddings(pruned)
    if head is not None:
        new_head = nn.Linear(weight.shape[1], ids.numel(), bias=False, dtype=weight.dtype).to(weight.device)
        if tied:
            new_head.weight = pruned.weight
        elif initialise:
            with torch.no_grad():
                new_head.weight.copy_(cast(torch.Tensor, head.weight)[ids.to(weight.device)])
        model.set_output_embeddings(new_head)
    model.config.vocab_size = ids.numel()
    return model


def pruned_embedding(model: PreTrainedModel) -> PrunedEmbedding | None:
    embedding = model.get_input_embeddings()
    return embedding if isinstance(embedding, PrunedEmbedding) else None


def vocabulary_buffers(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """What a client needs besides the weights: the kept ids of a pruned embedding, by buffer name
    (empty for any other model)."""
    if pruned_embedding(model) is None:
        return {}
    return {name: buffer for name, buffer in model.named_buffers() if name.endswith(".kept_ids")}
