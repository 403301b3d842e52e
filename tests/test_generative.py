"""Generative evaluation: the metrics against hand-computed values, greedy decoding against fedsp's own full
forward on every tiny family (with and without a prefix, prompts of different lengths), stop strings, eos,
and the evaluation's numbers."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from fedsp.data.batching import encode_pair, fixed_batches
from fedsp.data.tasks import GenExample
from fedsp.evaluation.generative import GenResult, evaluate_generative, generate, score_generations
from fedsp.models.forward import hidden_states, mean_answer_loss
from fedsp.models.loading import TINY_MODELS, LoadedModel, load_global_model
from fedsp.models.prefix import Prefix, prefix_for

PROMPTS = ["Question: where is the sun?\nAnswer:", "Q: 2+2?", "x", "Hello there, how are you today"]


# ------------------------------------------------------------------------------------------ metrics


def test_exact_match_ignores_case_punctuation_articles_and_spaces():
    # Prepare
    predictions = ["The Cat!", "  an   apple. ", "cats", "Paris"]
    references = [["cat"], ["Apple"], ["cat"], ["paris, france"]]
    # Execute
    per_example = [
        score_generations([p], [r])["exact_match"] for p, r in zip(predictions, references, strict=True)
    ]
    # Assert
    assert per_example == [1.0, 1.0, 0.0, 0.0]
    assert score_generations(predictions, references)["exact_match"] == pytest.approx(0.5)


def test_token_f1_of_a_partial_overlap():
    # Prepare: tokens [quick, brown, fox] vs [quick, red, fox, jumps]: 2 shared, P = 2/3, R = 2/4
    scores = score_generations(["The quick brown fox."], [["a quick red fox jumps"]])
    # Assert: F1 = 2PR / (P + R) = 4/7
    assert scores["f1"] == pytest.approx(4 / 7)
    assert scores["exact_match"] == 0.0


def test_rouge_l_of_a_known_longest_common_subsequence():
    # Prepare: LCS (red, green, black) = 3 words; 4 predicted, 6 referenced; articles count in ROUGE
    scores = score_generations(["Red green blue black"], [["red white green yellow black pink"]])
    # Assert: P = 3/4, R = 3/6, F = 2PR / (P + R) = 0.6
    assert scores["rouge_l"] == pytest.approx(0.6)
    same_length = score_generations(["the cat sat on the mat"], [["the cat lay on a mat"]])
    assert same_length["rouge_l"] == pytest.approx(4 / 6)  # LCS: the cat on mat


def test_scores_take_the_best_reference():
    # Prepare: "york": P = 1/3, R = 1, F1 = 0.5; "new york": P = 2/3, R = 1, F1 = 0.8
    scores = score_generations(["new york city"], [["york", "New York", "boston"]])
    # Assert
    assert scores == pytest.approx({"exact_match": 0.0, "f1": 0.8, "rouge_l": 0.8})
    assert score_generations(["paris"], [["london", "Paris."]]) == pytest.approx(
        {"exact_match": 1.0, "f1": 1.0, "rouge_l": 1.0}
    )


def test_an_empty_prediction_scores_zero_and_counts_in_the_mean():
    # Execute
    empty = score_generations([""], [["a cat"]])
    mixed = score_generations(["", "cat"], [["a cat"], ["the cat"]])
    # Assert
    assert empty == {"exact_match": 0.0, "f1": 0.0, "rouge_l": 0.0}
    assert mixed == pytest.approx({"exact_match": 0.5, "f1": 0.5, "rouge_l": 0.5 * 2 / 3})


def test_scoring_needs_no_nltk(monkeypatch):
    # Prepare: make ``import nltk`` fail (ROUGE-Lsum and stemming would import it and download data)
    monkeypatch.setitem(sys.modules, "nltk", None)
    # Execute / Assert
    assert score_generations(["a b"], [["a b"]])["rouge_l"] == 1.0


def test_bad_references_get_a_clear_error():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        score_generations(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        score_generations(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        score_generations(["a"], ["a"])


# ---------------------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny(request) -> LoadedModel:
    """A tiny model with weights of std 0.2: at the default 0.02 every family repeats one token whatever
    its input, so a wrong position or a pad token seen would go unnoticed."""
    loaded = load_global_model(request.param, seed=0)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=rng) * 0.2)
    return loaded


def _prefix(loaded: LoadedModel) -> Prefix:
    torch.manual_seed(0)
    prefix = prefix_for(loaded.model, 4)
    with torch.no_grad():
        prefix.table.normal_(0.0, 1.0)
    return prefix.eval()


def _ids(loaded: LoadedModel, texts=PROMPTS) -> list[list[int]]:
    return [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def _full_forward_greedy(loaded: LoadedModel, prompt: list[int], prefix, steps: int, eos: int) -> list[int]:
    """The reference: one unpadded row, the whole sequence through ``hidden_states`` at every step."""
    ids, new = list(prompt), []
    for _ in range(steps):
        row = torch.tensor([ids])
        hidden = hidden_states(loaded.model, row, torch.ones_like(row), prefix)  # (1, T, H)
        token = int(loaded.model.get_output_embeddings()(hidden[0, -1]).argmax())
        if token == eos:
            break
        new.append(token)
        ids.append(token)
    return new


@pytest.mark.parametrize("with_prefix", [False, True])
def test_greedy_tokens_equal_the_full_forward_argmax(tiny, with_prefix):
    # Prepare: prompts of 1 to 37 tokens in one batch, so the short ones are padded
    prefix = _prefix(tiny) if with_prefix else None
    prompts = _ids(tiny)
    eos = tiny.tokenizer.eos_token_id
    # Execute
    generations = generate(tiny.model, tiny.tokenizer, prompts, prefix, max_new_tokens=10, batch_size=4)
    # Assert: token by token, and never more than max_new_tokens
    for prompt, generation in zip(prompts, generations, strict=True):
        expected = _full_forward_greedy(tiny, prompt, prefix, 10, eos)
        assert list(generation.token_ids) == expected
        assert generation.text == tiny.tokenizer.decode(expected)
    assert all(len(g.token_ids) == 10 for g in generations)  # none of these rows meets eos


def test_batching_and_order_do_not_change_the_tokens(tiny):
    # Prepare
    prefix = _prefix(tiny)
    prompts = _ids(tiny)
    # Execute: all in one batch, one at a time, and in reverse order two by two
    together = generate(tiny.model, tiny.tokenizer, prompts, prefix, max_new_tokens=6, batch_size=16)
    alone = generate(tiny.model, tiny.tokenizer, prompts, prefix, max_new_tokens=6, batch_size=1)
    reverse = generate(tiny.model, tiny.tokenizer, prompts[::-1], prefix, max_new_tokens=6, batch_size=2)
    # Assert
    assert together == alone == reverse[::-1]


def test_a_stop_string_cuts_the_text_and_stops_the_row(tiny):
    # Prepare: a character of the free-running text, after its first few tokens
    prompts = _ids(tiny)[:2]
    free = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=12)
    text = free[0].text
    stop = next(ch for ch in text[3:] if ch.isprintable() and ch != "\ufffd")
    cut = text.index(stop)
    # Execute
    stopped = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=12, stop=["never", stop])
    # Assert: the text ends before the stop string; the tokens end at the one that completed it
    assert stopped[0].text == text[:cut]
    needed = next(n for n in range(1, 13) if stop in tiny.tokenizer.decode(free[0].token_ids[:n]))
    assert stopped[0].token_ids == free[0].token_ids[:needed]
    # the other row is cut at its own first stop string, if any
    other = free[1].text
    hits = [i for i in (other.find(s) for s in ("never", stop)) if i >= 0]
    assert stopped[1].text == (other[: min(hits)] if hits else other)


class _EosAt:
    """The tiny tokenizer with another token id standing for eos."""

    def __init__(self, tokenizer, eos: int) -> None:
        self.tokenizer, self.eos_token_id, self.pad_token_id = tokenizer, eos, tokenizer.pad_token_id

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)


def test_eos_stops_a_row_and_is_not_returned(tiny):
    # Prepare: the 4th token of the first row's free-running continuation plays eos
    prompts = _ids(tiny)
    free = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=8)
    eos = free[0].token_ids[3]
    # Execute
    stopped = generate(tiny.model, _EosAt(tiny.tokenizer, eos), prompts, max_new_tokens=8)
    # Assert: every row ends just before its first eos
    for before, after in zip(free, stopped, strict=True):
        ids = list(before.token_ids)
        assert list(after.token_ids) == (ids[: ids.index(eos)] if eos in ids else ids)


def test_generation_leaves_the_prefix_mode_and_checks_its_input(tiny):
    # Prepare
    prefix = _prefix(tiny).train()
    # Execute
    generate(tiny.model, tiny.tokenizer, _ids(tiny)[:1], prefix, max_new_tokens=2)
    # Assert
    assert prefix.training
    assert generate(tiny.model, tiny.tokenizer, _ids(tiny), max_new_tokens=0)[0].token_ids == ()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(tiny.model, tiny.tokenizer, [[1, 2], []])


def test_bfloat16_generation_runs():
    # Prepare
    loaded = load_global_model("tiny-llama", "bfloat16", seed=0)
    prefix = _prefix(loaded)
    prompts = _ids(loaded)
    # Execute
    generations = generate(loaded.model, loaded.tokenizer, prompts, prefix, max_new_tokens=5)
    # Assert
    assert [list(g.token_ids) for g in generations] == [
        _full_forward_greedy(loaded, p, prefix, 5, loaded.tokenizer.eos_token_id) for p in prompts
    ]


# -------------------------------------------------------------------------------------- evaluation


def test_evaluation_numbers_are_consistent(tiny):
    # Prepare: a training-mode prefix with dropout: evaluation must switch it off
    prefix = _prefix(tiny)
    examples = [
        GenExample(f"toy/{i}", prompt, " blue sky", ("blue sky", "blue")) for i, prompt in enumerate(PROMPTS)
    ]
    prefix.train()
    # Execute
    result = evaluate_generative(
        tiny.model, tiny.tokenizer, examples, prefix, max_new_tokens=6, stop=("\n",), progress=False
    )
    # Assert
    assert isinstance(result, GenResult) and result.n == 4 and prefix.training
    prefix.eval()
    generations = generate(tiny.model, tiny.tokenizer, _ids(tiny), prefix, max_new_tokens=6, stop=("\n",))
    assert result.predictions == tuple(g.text.strip() for g in generations)
    scores = score_generations(result.predictions, [ex.references for ex in examples])
    assert (result.exact_match, result.f1, result.rouge_l) == (
        scores["exact_match"],
        scores["f1"],
        scores["rouge_l"],
    )
    rows = [encode_pair(tiny.tokenizer, ex.prompt, ex.completion, 512) for ex in examples]
    loss = mean_answer_loss(tiny.model, fixed_batches(rows, 16, tiny.tokenizer.pad_token_id), prefix)
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    assert set(result.summary()) == {"exact_match", "f1", "rouge_l", "loss", "perplexity", "n"}


def test_evaluation_left_truncates_long_prompts(tiny):
    # Prepare: a prompt of 200 bytes, 50 tokens of room with max_length 60 and 10 new tokens
    long_prompt = "".join(chr(ord("a") + i % 26) for i in range(200))
    example = GenExample("long", long_prompt, " z", ("z",))
    # Execute
    result = evaluate_generative(
        tiny.model, tiny.tokenizer, [example], max_new_tokens=10, max_length=60, stop=(), progress=False
    )
    # Assert: the same text as generating from the last 50 prompt tokens
    tail = _ids(tiny, [long_prompt])[0][-50:]
    assert result.predictions == (
        generate(tiny.model, tiny.tokenizer, [tail], max_new_tokens=10)[0].text.strip(),
    )
    with pytest.raises(ValueError, match="no references"):
        evaluate_generative(tiny.model, tiny.tokenizer, [GenExample("x", "a", " b", ())], progress=False)
