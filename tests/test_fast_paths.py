"""The fast paths give the plain path's numbers: length buckets, dynamic padding, answer-only logits,
context-once and packed-choice evaluation, on every tiny family."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fedsp.data.batching import IGNORE, collate, encode_pair
from fedsp.data.tasks import MCExample
from fedsp.evaluation.multiple_choice import evaluate_multiple_choice
from fedsp.models import forward
from fedsp.models.auxiliary import build_auxiliary_model
from fedsp.models.forward import answer_loss, buckets_pay, continuation_logprobs, length_buckets
from fedsp.models.loading import TINY_MODELS, load_global_model


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny(request):
    return load_global_model(request.param, seed=0, device="cpu")


def _pad_to(batch, width, pad_id):
    extra = width - batch["input_ids"].shape[1]
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    return {k: F.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def test_length_buckets_cover_every_row_once_and_group_similar_lengths():
    # Prepare: two clear length clusters
    lengths = [30, 100, 31, 98, 29, 102, 33, 97]
    # Execute
    groups = length_buckets(lengths)
    # Assert: a partition of the rows; short and long rows are not mixed
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[29, 30, 31, 33], [97, 98, 100, 102]]
    assert length_buckets([27, 27, 27]) == [[0, 1, 2]]  # equal lengths: one forward
    assert length_buckets([5, 6], overhead=10**6) == [[0, 1]]  # an expensive extra forward is not worth it


@pytest.mark.parametrize("with_prefix", [False, True])
def test_bucketed_loss_and_gradients_equal_the_whole_batch(tiny, with_prefix, qa_batch, random_prefix):
    # Prepare
    batch = qa_batch(tiny.tokenizer)
    assert len(length_buckets(batch["attention_mask"].sum(-1).tolist())) > 1  # the test needs a split
    prefix = random_prefix(tiny.model) if with_prefix else None
    aux = build_auxiliary_model(tiny.model, [0])
    grads = {}
    # Execute: the auxiliary model trained (weights get gradients), with and without buckets
    for bucket in (False, True):
        aux.zero_grad()
        loss = answer_loss(aux, batch, prefix, bucket=bucket)
        loss.backward()
        grads[bucket] = (loss.item(), torch.cat([p.grad.flatten() for p in aux.parameters()]))
    # Assert: losses within 1e-3 (float32), gradients equal up to rounding
    assert abs(grads[True][0] - grads[False][0]) < 1e-3
    assert torch.allclose(grads[True][1], grads[False][1], atol=1e-5, rtol=1e-4)


def test_buckets_are_used_for_float32_on_a_cpu_only(tiny, qa_batch, monkeypatch):
    # Prepare: the same architecture off the CPU (the meta device stands in for a GPU: nothing is computed)
    # and in bfloat16 on the CPU (own configs: the fixture's is shared); a record of the splits answer_loss
    # asks for
    with torch.device("meta"):
        elsewhere = AutoModelForCausalLM.from_config(copy.deepcopy(tiny.model.config))
    half = AutoModelForCausalLM.from_config(copy.deepcopy(tiny.model.config)).to(torch.bfloat16)
    batch = qa_batch(tiny.tokenizer)
    splits = []
    real = forward.length_buckets
    monkeypatch.setattr(forward, "length_buckets", lambda lengths: splits.append(lengths) or real(lengths))
    # Execute / Assert: float32 on the CPU only (a launch-bound GPU runs whole batches faster)
    assert buckets_pay(tiny.model)
    assert not buckets_pay(elsewhere)
    assert not buckets_pay(half)
    # Execute / Assert: answer_loss splits the batch when buckets pay, and runs it whole when not
    answer_loss(tiny.model, batch)
    assert len(splits) == 1
    monkeypatch.setattr(forward, "buckets_pay", lambda model: False)
    answer_loss(tiny.model, batch)
    assert len(splits) == 1


def test_bucketed_prefix_gradient_equals_the_whole_batch(tiny, qa_batch, random_prefix):
    # Prepare: the server's step, prefix trained on the frozen global model
    batch = qa_batch(tiny.tokenizer)
    prefix = random_prefix(tiny.model)
    grads = []
    # Execute
    for bucket in (False, True):
        prefix.zero_grad()
        answer_loss(tiny.model, batch, prefix, bucket=bucket).backward()
        grads.append(prefix.table.grad.clone())
    # Assert
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_dynamic_padding_gives_the_fixed_padding_loss(tiny, qa_batch, random_prefix):
    # Prepare: the same rows padded to their longest row (collate) and to a fixed 300 columns
    batch = qa_batch(tiny.tokenizer)
    fixed = _pad_to(batch, 300, tiny.tokenizer.pad_token_id)
    prefix = random_prefix(tiny.model)
    # Execute
    with torch.no_grad():
        dynamic_loss = answer_loss(tiny.model, batch, prefix, bucket=False)
        fixed_loss = answer_loss(tiny.model, fixed, prefix, bucket=False)
        bucketed_fixed = answer_loss(tiny.model, fixed, prefix, bucket=True)  # buckets trim the padding
    # Assert
    assert batch["input_ids"].shape[1] < 300
    assert abs(float(dynamic_loss) - float(fixed_loss)) < 1e-3
    assert abs(float(dynamic_loss) - float(bucketed_fixed)) < 1e-3


def test_answer_logits_only_equal_the_full_logits_loss_with_a_prefix(tiny, qa_batch, random_prefix):
    # Prepare: the plain path feeds the prefix the same way but computes logits at every position
    from fedsp.models.forward import hidden_states

    batch = qa_batch(tiny.tokenizer)
    prefix = random_prefix(tiny.model)
    # Execute
    with torch.no_grad():
        ours = answer_loss(tiny.model, batch, prefix)
        hidden = hidden_states(tiny.model, batch["input_ids"], batch["attention_mask"], prefix)  # (B, T, H)
        full_logits = tiny.model.get_output_embeddings()(hidden)  # (B, T, V)
        plain = F.cross_entropy(
            full_logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
        )
    # Assert
    assert abs(float(ours) - float(plain)) < 1e-3


def test_continuation_logprobs_equal_full_log_softmax(tiny, qa_batch):
    # Prepare
    batch = qa_batch(tiny.tokenizer)
    # Execute
    with torch.no_grad():
        ours = continuation_logprobs(tiny.model, batch)
        logits = tiny.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs = logits[:, :-1].log_softmax(-1)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        plain = (logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum(-1)
    # Assert
    assert torch.allclose(ours, plain, atol=1e-4)


EXAMPLES = [
    MCExample(
        "q1",
        "Question: What colour is the sky on a clear day?\nAnswer:",
        ("blue", "green", "red", "black"),
        0,
    ),
    MCExample("q2", "Question: 2+2?\nAnswer:", ("four", "five", "twenty-two"), 0),
    MCExample(
        "q3",
        "Q: " + "Which gas do plants take in from the air? " * 2 + "\nA:",
        ("carbon dioxide", "oxygen"),
        0,
    ),
    MCExample(
        "q4", "Question: What melts ice?\nAnswer:", ("heat", "cold", "more ice", "salt water", "nothing"), 0
    ),
    MCExample(
        "q5", "Question: Where do fish live?\nAnswer:", ("in water", "in trees", "on the moon", "in sand"), 0
    ),
]


@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("batch_size", [4, 32])
def test_cached_evaluation_ranks_choices_as_full_scoring(tiny, with_prefix, batch_size, random_prefix):
    # Prepare
    prefix = random_prefix(tiny.model, seed=3) if with_prefix else None
    kwargs = dict(prefix=prefix, batch_size=batch_size, progress=False)
    # Execute
    cached = evaluate_multiple_choice(tiny.model, tiny.tokenizer, EXAMPLES, cached=True, **kwargs)
    full = evaluate_multiple_choice(tiny.model, tiny.tokenizer, EXAMPLES, cached=False, **kwargs)
    # Assert: identical picks, hence identical accuracies
    assert cached.predictions == full.predictions
    assert (cached.acc, cached.acc_norm) == (full.acc, full.acc_norm)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_packed_choices_in_length_groups_score_as_each_full_sequence(
    tiny, with_prefix, monkeypatch, random_prefix
):
    # Prepare: no per-group overhead, so questions of different packed choice lengths run in separate groups
    import fedsp.models.forward as forward

    groups_seen = []

    def eager_buckets(lengths, overhead=0):
        groups = length_buckets(lengths, overhead=0)
        groups_seen.append(len(groups))
        return groups

    monkeypatch.setattr(forward, "length_buckets", eager_buckets)
    prefix = random_prefix(tiny.model, seed=5) if with_prefix else None
    # Execute
    scores, full = _packed_and_full_scores(tiny, prefix)
    # Assert: several groups ran, and every choice's log-probability is the full sequence's
    assert groups_seen and groups_seen[0] > 1
    for got, want in zip(scores, full, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def _packed_and_full_scores(loaded, prefix):
    """Every EXAMPLES choice's log-probability: packed after a cached context, and as a full sequence."""
    import fedsp.models.forward as forward

    tok = loaded.tokenizer
    contexts, choices, full = [], [], []
    for ex in EXAMPLES:
        encoded = [encode_pair(tok, ex.context, " " + c, 256) for c in ex.choices]
        contexts.append(list(encoded[0].ids[: len(encoded[0].ids) - encoded[0].num_answer]))
        choices.append([list(e.ids[len(e.ids) - e.num_answer :]) for e in encoded])
        full.append(continuation_logprobs(loaded.model, collate(encoded, tok.pad_token_id), prefix).tolist())
    with torch.no_grad():
        return forward.score_choices(loaded.model, contexts, choices, tok.pad_token_id, prefix), full


@pytest.mark.parametrize("spec", list(TINY_MODELS))
def test_packed_choices_score_as_full_sequences_with_the_eager_kernel(spec, random_prefix):
    # Prepare: the eager attention kernel (what bfloat16 on a CPU uses) takes the packed rows' 4D mask
    # additively; a boolean mask there would let every choice see the others
    loaded = load_global_model(spec, "float32", device="cpu", attention="eager")
    assert loaded.model.config._attn_implementation == "eager"
    prefix = random_prefix(loaded.model, seed=7)
    # Execute
    scores, full = _packed_and_full_scores(loaded, prefix)
    # Assert
    for got, want in zip(scores, full, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
