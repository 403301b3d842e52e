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


def test_bfloat16_phase_keeps_float32_masters_so_small_updates_accumulate():
    # Prepare: one bfloat16 weight of 1.0 and a float32 twin; AdamW's first steps move it by ~lr each,
    # far below bfloat16's resolution at 1.0 (2**-7): rounded each step, the weight would never move
    from fedsp.methods.optim import OptimConfig, Phase

    config = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0)
    low = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    high = torch.nn.Parameter(torch.ones(4))
    phases = [Phase([low], config, 100), Phase([high], config, 100)]
    # Execute: 20 steps of the same gradient direction
    for _ in range(20):
        for phase, p in zip(phases, (low, high), strict=True):
            phase.step((p.float() * torch.tensor([1.0, -1.0, 2.0, 0.5])).sum())
    # Assert: the parameter stays bfloat16 and holds the float32 run's value, rounded to bfloat16
    assert low.dtype == torch.bfloat16 and low.grad is None
    assert not torch.equal(low.float(), torch.ones(4))
    assert torch.equal(low, high.detach().to(torch.bfloat16))
    assert phases[0].state_dict()["masters"][0] == pytest.approx(high.detach(), abs=1e-6)


def test_bfloat16_phase_master_follows_a_parameter_written_from_outside():
    # Prepare: a bfloat16 weight stepped once, then overwritten (a loaded state, a received aggregate)
    from fedsp.methods.optim import OptimConfig, Phase

    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    phase = Phase([p], OptimConfig(lr=1e-2, weight_decay=0.0, warmup_ratio=0.0), 10)
    phase.step(p.float().sum())
    with torch.no_grad():
        p.copy_(torch.full((3,), 5.0))
    # Execute
    phase.step(p.float().sum())
    # Assert: the step started from 5.0, not from the stale master near 0
    assert torch.all((p.float() - 5.0).abs() < 0.05)


def test_bfloat16_phase_state_round_trips_its_masters():
    from fedsp.methods.optim import OptimConfig, Phase

    config = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0)
    a = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    phase = Phase([a], config, 10)
    for _ in range(3):
        phase.step(a.float().sum())
    state = phase.state_dict()
    # Execute: a fresh parameter and phase (a client rebuilt from its saved state)
    b = torch.nn.Parameter(a.detach().clone())
    restored = Phase([b], config, 10)
    restored.load_state_dict(state)
    phase.step(a.float().sum())
    restored.step(b.float().sum())
    # Assert: both continue identically, masters included
    assert torch.equal(a, b)
    assert torch.equal(phase.state_dict()["masters"][0], restored.state_dict()["masters"][0])


def test_float32_phase_state_has_no_masters():
    from fedsp.methods.optim import OptimConfig, Phase

    p = torch.nn.Parameter(torch.ones(2))
    phase = Phase([p], OptimConfig(lr=1e-3), 10)
    phase.step(p.sum())
    assert "masters" not in phase.state_dict()


def test_auto_dtype_is_bfloat16_only_with_native_bfloat16(monkeypatch, tmp_path):
    from fedsp.models import precision

    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags : fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    assert precision.native_bfloat16("cpu", precision.cpu_flags(str(amx)))
    assert not precision.native_bfloat16("cpu", precision.cpu_flags(str(avx2)))
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()
    # resolve_dtype: explicit choices pass through; auto asks the CPU when no GPU is used
    assert precision.resolve_dtype("float32", "cpu") == "float32"
    assert precision.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert precision.resolve_dtype("auto", "cpu") == "float32"
    assert RunConfig(device="cpu", dtype="auto").dtype == "float32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert precision.resolve_dtype("auto", "cpu") == "bfloat16"
    # the configuration records what was resolved, never "auto"; the default stays float32
    assert RunConfig(device="cpu", dtype="auto").dtype == "bfloat16"
    assert RunConfig(device="cpu", dtype="auto").to_dict()["dtype"] == "bfloat16"
    assert RunConfig(device="cpu").dtype == "float32"


def test_bfloat16_fedsp_client_trains_its_auxiliary_model_through_masters():
    # Prepare: a bfloat16 tiny model, its auxiliary model, one FedSP client round
    from fedsp.methods.fedsp import FedSPClient, LocalConfig
    from fedsp.methods.optim import OptimConfig

    loaded = load_global_model("tiny-llama", "bfloat16", device="cpu")
    tok = loaded.tokenizer
    rows = [encode_pair(tok, c, a, 256) for c, a in PAIRS]
    aux = build_auxiliary_model(loaded.model, [0])
    before = {k: v.detach().clone() for k, v in aux.named_parameters()}
    prefix = prefix_for(loaded.model, 4)
    config = LocalConfig(steps=2, batch_size=3, align=OptimConfig(lr=1e-2), prompt=OptimConfig(lr=1e-2))
    client = FedSPClient(aux, prefix.config, rows, config, total_rounds=2, pad_id=tok.pad_token_id, seed=0)
    # Execute
    update = client.fit(prefix.wire_state())
    # Assert: weights stay bfloat16 and moved; the prefix sent is float32; the saved state holds masters
    assert all(p.dtype == torch.bfloat16 for p in aux.parameters())
    assert any(not torch.equal(before[k], v) for k, v in aux.named_parameters())
    assert all(t.dtype == torch.float32 for t in update.state.values())
    assert "masters" in client.state_dict()["align"]


def test_bfloat16_casts_weights_but_keeps_float32_buffers():
    # rotary inv_freq rounded to bfloat16 would shift every position's angle (and make a rebuilt client
    # differ)
    from transformers import AutoModelForCausalLM

    loaded = load_global_model("tiny-llama", "bfloat16", device="cpu")
    skeleton = AutoModelForCausalLM.from_config(loaded.model.config, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    buffers = dict(loaded.model.named_buffers())
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    assert {n: b.dtype for n, b in skeleton.named_buffers()} == {n: b.dtype for n, b in buffers.items()}


@pytest.mark.parametrize("spec", list(TINY_MODELS))
def test_packed_choices_score_as_full_sequences_with_the_eager_kernel(spec):
    # Prepare: the eager attention kernel (what bfloat16 on a CPU uses) takes the packed rows' 4D mask
    # additively; a boolean mask there would let every choice see the others
    loaded = load_global_model(spec, "float32", device="cpu", attention="eager")
    assert loaded.model.config._attn_implementation == "eager"
    prefix = _random_prefix(loaded.model, seed=7)
    # Execute
    scores, full = _packed_and_full_scores(loaded, prefix)
    # Assert
    for got, want in zip(scores, full, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_attention_kernel_follows_dtype_and_device():
    from fedsp.models.precision import pick_attention

    assert pick_attention("auto", "bfloat16", "cpu") == "eager"
    assert pick_attention("auto", "float32", "cpu") == "sdpa"
    assert pick_attention("auto", "bfloat16", "cuda") == "sdpa"
    assert pick_attention("sdpa", "bfloat16", "cpu") == "sdpa"
    assert (
        load_global_model("tiny-llama", "bfloat16", device="cpu").model.config._attn_implementation == "eager"
    )
    with pytest.raises(FedSPError, match="attention"):
        load_global_model("tiny-llama", attention="flash")


def test_bfloat16_logits_are_taken_in_float32():
    # the loss's softmax sees float32 logits of the bfloat16 hidden states and weights, not rounded ones
    from fedsp.models.forward import head_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    hidden = (torch.randn(3, 16) * 4).to(torch.bfloat16)
    logits = head_logits(head, hidden)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, hidden.float() @ head.weight.float().T, atol=1e-5)
    assert not torch.equal(logits, head(hidden).float())  # the bfloat16 product is rounded
    head32 = torch.nn.Linear(16, 50)
    assert torch.equal(head_logits(head32, hidden.float()), head32(hidden.float()))


def test_bfloat16_loss_runs_the_whole_batch_in_one_forward(monkeypatch):
    # length buckets pay in float32 only; in bfloat16 the batch goes through the model once
    import fedsp.models.forward as forward

    calls = {"float32": 0, "bfloat16": 0}
    original = forward._answer_logits
    for dtype in calls:
        loaded = load_global_model("tiny-llama", dtype, device="cpu")

        def counting(model, batch, prefix, dtype=dtype):
            calls[dtype] += 1
            return original(model, batch, prefix)

        monkeypatch.setattr(forward, "_answer_logits", counting)
        forward.answer_loss(loaded.model, _batch(loaded.tokenizer))
    assert calls["float32"] > 1 and calls["bfloat16"] == 1


def test_bfloat16_phases_over_the_same_parameter_share_its_master():
    # SFPrompt's two phases step the same prompts and tail: alternating them must not round through bfloat16
    from fedsp.methods.optim import OptimConfig, Phase

    config = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0)
    low = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    high = torch.nn.Parameter(torch.ones(3))
    low_phases = [Phase([low], config, 100), Phase([low], config, 100)]
    high_phases = [Phase([high], config, 100), Phase([high], config, 100)]
    for step in range(10):
        low_phases[step % 2].step(low.float().sum())
        high_phases[step % 2].step(high.sum())
    assert torch.equal(low, high.detach().to(torch.bfloat16))
    assert low_phases[0].state_dict()["masters"][0] == pytest.approx(high.detach(), abs=1e-6)
