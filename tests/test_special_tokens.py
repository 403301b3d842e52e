"""Special tokens as lm-eval-harness has them: the tokenizer's own beginning-of-sequence token before the
context (never before the continuation), none for a tokenizer that adds none (SmolLM2, GPT-2)."""

from __future__ import annotations

import copy

import pytest
from tokenizers.processors import TemplateProcessing

from fedsp.data.batching import (
    demonstration_tokens,
    encode_pair,
    encode_segments,
    leading_special_ids,
    text_ids,
)
from fedsp.models.loading import load_global_model


@pytest.fixture(scope="module")
def plain():
    return load_global_model("tiny-llama", seed=0).tokenizer


@pytest.fixture(scope="module")
def with_bos(plain):
    # A tokenizer that starts every text with a BOS token, like Llama's and OPT's (OPT's is its EOS)
    tokenizer = copy.deepcopy(plain)
    bos, bos_id = plain.eos_token, plain.eos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
    )
    assert tokenizer("hi")["input_ids"] == [bos_id, *plain("hi")["input_ids"]]
    return tokenizer


def test_a_tokenizer_without_bos_gets_none(plain):
    assert leading_special_ids(plain) == ()
    pair = encode_pair(plain, "Question: 2+2?\nAnswer:", " four", 64)
    assert list(pair.ids) == plain("Question: 2+2?\nAnswer: four", add_special_tokens=False)["input_ids"]


def test_the_bos_token_starts_the_context_and_never_the_continuation(plain, with_bos):
    bos = with_bos.eos_token_id
    context, continuation = "Question: 2+2?\nAnswer:", " four"
    # Execute
    ours = encode_pair(with_bos, context, continuation, 64)
    without = encode_pair(plain, context, continuation, 64)
    # Assert: as lm-eval encodes it (tokenizer default on the context and on the whole), BOS first
    whole = with_bos(context + continuation)["input_ids"]
    head = with_bos(context)["input_ids"]
    assert list(ours.ids) == whole and ours.ids[0] == bos
    assert ours.num_answer == len(whole) - len(head) == without.num_answer
    assert list(ours.ids[1:]) == list(without.ids)
    # a left cut takes the BOS token first, and it counts as context
    cut = encode_pair(with_bos, context, continuation, len(whole) - 1)
    assert cut.ids == ours.ids[1:] and cut.context_cut == 1


def test_every_sequence_kind_starts_once_with_bos(plain, with_bos):
    bos = with_bos.eos_token_id
    chat = encode_segments(with_bos, [("User: hi\nAssistant:", False), (" hello", True)], 64)
    assert chat.ids[0] == bos and chat.ids[1] != bos and chat.scored[0] is False
    assert (
        chat.num_answer
        == encode_segments(plain, [("User: hi\nAssistant:", False), (" hello", True)], 64).num_answer
    )
    assert text_ids(with_bos, "Tell me") == with_bos("Tell me")["input_ids"]
    # a text that already starts with it (a rendered chat template) keeps its own, not a second one
    assert text_ids(with_bos, f"{with_bos.eos_token}Tell me") == with_bos("Tell me")["input_ids"]


def test_prompt_initialisation_leaves_the_bos_tokens_out(plain, with_bos):
    rows = [encode_pair(with_bos, "Q: a\nA:", " b", 64), encode_pair(with_bos, "Q: c\nA:", " d", 64)]
    plain_rows = [encode_pair(plain, "Q: a\nA:", " b", 64), encode_pair(plain, "Q: c\nA:", " d", 64)]
    assert demonstration_tokens(rows, 30, with_bos) == demonstration_tokens(plain_rows, 30, plain)
