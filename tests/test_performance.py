"""Speed-ups give the plain path's results: length buckets, logits only where used, cached evaluation,
dynamic padding, device placement; on tiny models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedsp.config import RunConfig
from fedsp.data.batching import collate, encode_pair
from fedsp.data.tasks import MCExample
from fedsp.errors import FedSPError
from fedsp.evaluation.multiple_choice import evaluate_multiple_choice
from fedsp.models.auxiliary import build_auxiliary_model
from fedsp.models.forward import IGNORE, answer_loss, continuation_logprobs, length_buckets
from fedsp.models.loading import TINY_MODELS, load_global_model, resolve_device
from fedsp.models.prefix import Prefix, prefix_for

# Contexts of very different lengths, so that length buckets and padding matter.
PAIRS = [
    ("Question: What is red?\nAnswer:", " a colour"),
    (
        "Question: " + "Which of these animals lives in the sea and eats plankton? " * 3 + "\nAnswer:",
        " a whale",
    ),
    ("Q: 2+2?\nA:", " four"),
    ("Question: Where does the sun rise in the morning, every day?\nAnswer:", " in the east"),
    ("Question: " + "What do plants need to make their food from light? " * 2 + "\nAnswer:", " sunlight"),
    ("Q: ice?\nA:", " cold water"),
]


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny(request):
    return load_global_model(request.param, seed=0, device="cpu")


def _batch(tokenizer, pairs=PAIRS):
    return collate([encode_pair(tokenizer, c, a, 256) for c, a in pairs], tokenizer.pad_token_id)


def _random_prefix(model, num_tokens=4, seed=0):
    prefix = prefix_for(model, num_tokens, dropout=0.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        prefix.table.normal_(0.0, 0.5)
    return prefix


def _pad_to(batch, width, pad_id):
    extra = width - batch["input_ids"].shape[1]
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    return {k: F.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


# --- length buckets and dynamic padding -------------------------------------------------------


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
def test_bucketed_loss_and_gradients_equal_the_whole_batch(tiny, with_prefix):
    # Prepare
    batch = _batch(tiny.tokenizer)
    assert len(length_buckets(batch["attention_mask"].sum(-1).tolist())) > 1  # the test needs a split
    prefix = _random_prefix(tiny.model) if with_prefix else None
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


def test_bucketed_prefix_gradient_equals_the_whole_batch(tiny):
    # Prepare: the server's step, prefix trained on the frozen global model
    batch = _batch(tiny.tokenizer)
    prefix = _random_prefix(tiny.model)
    grads = []
    # Execute
    for bucket in (False, True):
        prefix.zero_grad()
        answer_loss(tiny.model, batch, prefix, bucket=bucket).backward()
        grads.append(prefix.table.grad.clone())
    # Assert
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_dynamic_padding_gives_the_fixed_padding_loss(tiny):
    # Prepare: the same rows padded to their longest row (collate) and to a fixed 300 columns
    batch = _batch(tiny.tokenizer)
    fixed = _pad_to(batch, 300, tiny.tokenizer.pad_token_id)
    prefix = _random_prefix(tiny.model)
    # Execute
    with torch.no_grad():
        dynamic_loss = answer_loss(tiny.model, batch, prefix, bucket=False)
        fixed_loss = answer_loss(tiny.model, fixed, prefix, bucket=False)
        bucketed_fixed = answer_loss(tiny.model, fixed, prefix, bucket=True)  # buckets trim the padding
    # Assert
    assert batch["input_ids"].shape[1] < 300
    assert abs(float(dynamic_loss) - float(fixed_loss)) < 1e-3
    assert abs(float(dynamic_loss) - float(bucketed_fixed)) < 1e-3


# --- logits only where they are used -----------------------------------------------------------


def test_answer_logits_only_equal_the_full_logits_loss_with_a_prefix(tiny):
    # Prepare: the plain path feeds the prefix the same way but computes logits at every position
    from fedsp.models.forward import hidden_states

    batch = _batch(tiny.tokenizer)
    prefix = _random_prefix(tiny.model)
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


def test_continuation_logprobs_equal_full_log_softmax(tiny):
    # Prepare
    batch = _batch(tiny.tokenizer)
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


# --- cached evaluation -----------------------------------------------------------------------

EXAMPLES = [
    MCExample("q1", "Question: What colour is the sky on a clear day?\nAnswer:", ("blue", "green", "red", "black"), 0),
    MCExample("q2", "Question: 2+2?\nAnswer:", ("four", "five", "twenty-two"), 0),
    MCExample("q3", "Q: " + "Which gas do plants take in from the air? " * 2 + "\nA:", ("carbon dioxide", "oxygen"), 0),
    MCExample("q4", "Question: What melts ice?\nAnswer:", ("heat", "cold", "more ice", "salt water", "nothing"), 0),
    MCExample("q5", "Question: Where do fish live?\nAnswer:", ("in water", "in trees", "on the moon", "in sand"), 0),
]  # fmt: skip


@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("batch_size", [4, 32])
def test_cached_evaluation_ranks_choices_as_full_scoring(tiny, with_prefix, batch_size):
    # Prepare
    prefix = _random_prefix(tiny.model, seed=3) if with_prefix else None
    kwargs = dict(prefix=prefix, batch_size=batch_size, progress=False)
    # Execute
    cached = evaluate_multiple_choice(tiny.model, tiny.tokenizer, EXAMPLES, cached=True, **kwargs)
    full = evaluate_multiple_choice(tiny.model, tiny.tokenizer, EXAMPLES, cached=False, **kwargs)
    # Assert: identical picks, hence identical accuracies
    assert cached.predictions == full.predictions
    assert (cached.acc, cached.acc_norm) == (full.acc, full.acc_norm)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_packed_choices_in_length_groups_score_as_each_full_sequence(tiny, with_prefix, monkeypatch):
    # Prepare: no per-group overhead, so questions of different packed choice lengths run in separate groups
    import fedsp.models.forward as forward

    groups_seen = []

    def eager_buckets(lengths, overhead=0):
        groups = length_buckets(lengths, overhead=0)
        groups_seen.append(len(groups))
        return groups

    monkeypatch.setattr(forward, "length_buckets", eager_buckets)
    prefix = _random_prefix(tiny.model, seed=5) if with_prefix else None
    tok = tiny.tokenizer
    contexts, choices, full = [], [], []
    for ex in EXAMPLES:
        encoded = [encode_pair(tok, ex.context, " " + c, 256) for c in ex.choices]
        contexts.append(list(encoded[0].ids[: len(encoded[0].ids) - encoded[0].num_answer]))
        choices.append([list(e.ids[len(e.ids) - e.num_answer :]) for e in encoded])
        full.append(continuation_logprobs(tiny.model, collate(encoded, tok.pad_token_id), prefix).tolist())
    # Execute
    with torch.no_grad():
        scores = forward.score_choices(tiny.model, contexts, choices, tok.pad_token_id, prefix)
    # Assert: several groups ran, and every choice's log-probability is the full sequence's
    assert groups_seen and groups_seen[0] > 1
    for got, want in zip(scores, full, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


# --- bfloat16 -------------------------------------------------------------------------------


def test_bfloat16_weights_train_a_float32_prefix_close_to_float32():
    # Prepare: the same tiny model in both dtypes, the same float32 prefix values
    fp32 = load_global_model("tiny-llama", "float32", device="cpu")
    bf16 = load_global_model("tiny-llama", "bfloat16", device="cpu")
    batch = _batch(fp32.tokenizer)
    losses, grads = [], []
    for loaded in (fp32, bf16):
        prefix = _random_prefix(loaded.model)
        # Execute
        loss = answer_loss(loaded.model, batch, prefix)
        loss.backward()
        losses.append(loss.item())
        grads.append(prefix.table.grad)
    # Assert: the prefix stays float32 and gets a float32 gradient; the loss moves by bfloat16 rounding only
    assert grads[1].dtype == torch.float32
    assert abs(losses[0] - losses[1]) < 0.02 * losses[0]


# --- device placement -----------------------------------------------------------------------


def test_device_selection(monkeypatch):
    # auto follows the GPU's presence; cpu is always there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FedSPError, match="'cuda' was asked for"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FedSPError, match="'tpu' is not supported"):
        resolve_device("tpu")


def test_run_config_validates_device():
    assert RunConfig().device == "auto"
    assert RunConfig(device="cpu").device == "cpu"
    with pytest.raises(FedSPError, match="--device 'gpu' is not valid"):
        RunConfig(device="gpu")


def test_model_is_loaded_on_the_requested_device():
    loaded = load_global_model("tiny-llama", device="cpu")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_prefix_follows_the_model_and_sends_cpu_tensors():
    # Prepare: a prefix made apart from the model (as a client makes it), and a model on another device
    loaded = load_global_model("tiny-llama", device="cpu")
    prefix = Prefix(prefix_for(loaded.model, 3).config)
    meta_model = load_global_model("tiny-llama", device="cpu").model.to("meta")  # a second device
    # Execute / Assert: it goes where the model is, and what it sends is always on the CPU
    assert prefix.follow(loaded.model).table.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in prefix.wire_state().values())
    assert prefix.follow(meta_model).table.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefix_moves_to_cuda_in_place_so_its_optimiser_keeps_working():
    # Prepare
    cpu_model = load_global_model("tiny-llama", device="cpu").model
    cuda_model = load_global_model("tiny-llama", device="cuda").model
    prefix = Prefix(prefix_for(cpu_model, 3).config)
    param = prefix.table
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=0.1)
    batch = _batch(load_global_model("tiny-llama", device="cpu").tokenizer)
    # Execute: the forward moves the prefix; the optimiser steps the same Parameter
    answer_loss(cuda_model, batch, prefix).backward()
    optimizer.step()
    # Assert
    assert prefix.table is param and param.device.type == "cuda"
    assert param.abs().sum() > 0


def test_prefix_for_is_created_on_the_model_device():
    meta_model = load_global_model("tiny-llama", device="cpu").model.to("meta")
    assert prefix_for(meta_model, 2).table.device.type == "meta"
