"""Algorithm side: aggregation, KD, client/server updates, evaluation, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from fedsp.data.batching import collate, encode_gold, encode_pair, fixed_batches
from fedsp.data.tasks import MCExample
from fedsp.errors import FedSPError
from fedsp.evaluation.multiple_choice import evaluate_multiple_choice
from fedsp.methods import kd
from fedsp.methods.aggregation import weighted_average
from fedsp.methods.fedsp import FedSPClient, FedSPServer, LocalConfig
from fedsp.methods.optim import OptimConfig
from fedsp.models.auxiliary import build_auxiliary_model
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import init_prefix_from_tokens, prefix_for


def test_weighted_average_equals_hand_computed_mean():
    # Prepare: three clients with unequal shard sizes 1, 2, 7
    a = {"table": torch.tensor([[1.0, 2.0]])}
    b = {"table": torch.tensor([[3.0, -2.0]])}
    c = {"table": torch.tensor([[0.5, 10.0]])}
    # Execute
    avg = weighted_average([(a, 1), (b, 2), (c, 7)])
    # Assert: (1*[1,2] + 2*[3,-2] + 7*[0.5,10]) / 10 = [1.05, 6.8]
    assert torch.allclose(avg["table"], torch.tensor([[1.05, 6.8]]), atol=1e-7)


def test_weighted_average_rejects_empty_and_mismatched_updates():
    with pytest.raises(FedSPError, match="no client"):
        weighted_average([])
    with pytest.raises(FedSPError, match="keys"):
        weighted_average([({"a": torch.zeros(1)}, 1), ({"b": torch.zeros(1)}, 1)])


def test_kd_lowers_hidden_state_mse(tiny, toy_examples):
    # Prepare
    rows = [encode_gold(tiny.tokenizer, ex, 64) for ex in toy_examples(24)]
    student = build_auxiliary_model(tiny.model, [0])
    batches = fixed_batches(rows, 8, tiny.tokenizer.pad_token_id)
    before = kd.mean_kd_loss(tiny.model, student, batches)
    # Execute
    losses = kd.distill(
        tiny.model,
        student,
        rows,
        kd.KDConfig(steps=25, lr=3e-3, batch_size=8),
        tiny.tokenizer.pad_token_id,
        seed=0,
        progress=False,
    )
    after = kd.mean_kd_loss(tiny.model, student, batches)
    # Assert
    assert len(losses) == 25
    assert after < 0.7 * before


def _mean_kl(tiny, student, batches):
    from fedsp.models.forward import hidden_states

    total = 0.0
    with torch.no_grad():
        for batch in batches:
            t = hidden_states(tiny.model, batch["input_ids"], batch["attention_mask"])
            s = hidden_states(student, batch["input_ids"], batch["attention_mask"])
            head_s, head_t = student.get_output_embeddings(), tiny.model.get_output_embeddings()
            total += float(kd.masked_kl(head_s, head_t, s, t, batch["attention_mask"]))
    return total / len(batches)


@pytest.mark.parametrize("objective", ["logits", "both"])
def test_kd_on_the_logits_lowers_the_kl_to_the_teacher(tiny, toy_examples, objective):
    # Prepare
    rows = [encode_gold(tiny.tokenizer, ex, 64) for ex in toy_examples(24)]
    student = build_auxiliary_model(tiny.model, [0])
    batches = fixed_batches(rows, 8, tiny.tokenizer.pad_token_id)
    before = _mean_kl(tiny, student, batches)
    # Execute
    config = kd.KDConfig(steps=25, lr=3e-3, batch_size=8, objective=objective)
    losses = kd.distill(
        tiny.model, student, rows, config, tiny.tokenizer.pad_token_id, seed=0, progress=False
    )
    # Assert: the student's next-token distributions moved towards the teacher's
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert _mean_kl(tiny, student, batches) < 0.7 * before


def test_kd_kl_is_zero_against_itself_ignores_padding_and_reads_kept_columns():
    # Prepare: a 4-word head; the student's head keeps words 1 and 3
    head = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]]))
    kept = torch.tensor([1, 3])
    student_head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(head.weight[kept])
    states = torch.tensor([[[0.3, -0.2], [1.0, 2.0], [50.0, -50.0]]])
    mask = torch.tensor([[1, 1, 0]])
    head.requires_grad_(False)
    student_head.requires_grad_(False)
    # Execute / Assert: the same model is at KL 0, the padded position (huge values) counts for nothing
    assert float(kd.masked_kl(head, head, states, states, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd.masked_kl(student_head, head, states, states, mask, kept)) == pytest.approx(0.0, abs=1e-6)
    # a different student: KL(p || q) over the two real tokens, by hand
    shifted = states + torch.tensor([0.5, 0.0])
    p = torch.softmax(head(states[0, :2]), -1)
    q = torch.log_softmax(head(shifted[0, :2]), -1)
    expected = float((p * (p.log() - q)).sum(-1).mean())
    assert float(kd.masked_kl(head, head, shifted, states, mask)) == pytest.approx(expected, rel=1e-5)


def test_the_kd_objective_is_in_the_cache_key_only_when_not_the_hidden_states():
    hidden, logits = kd.KDConfig(steps=5), kd.KDConfig(steps=5, objective="logits")
    assert "objective" not in hidden.fingerprint() and logits.fingerprint()["objective"] == "logits"
    keys = {
        kd.cache_key("m", {}, [0], None, c, [], 0) for c in (hidden, logits, kd.KDConfig(5, objective="both"))
    }
    assert len(keys) == 3


def test_an_unknown_kd_objective_is_refused_naming_the_choices():
    from fedsp.config import RunConfig

    with pytest.raises(FedSPError, match="kd.objective.*cosine.*hidden, logits, both"):
        RunConfig(kd_objective="cosine")


def test_kd_masked_mse_ignores_padding():
    student = torch.zeros(1, 3, 2)
    teacher = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert float(kd.masked_mse(student, teacher, mask)) == pytest.approx(1.0)


def _parties(tiny, toy_examples, steps=3, clients=2):
    pad = tiny.tokenizer.pad_token_id
    train = [encode_gold(tiny.tokenizer, ex, 64) for ex in toy_examples(60)]
    val = [encode_gold(tiny.tokenizer, ex, 64) for ex in toy_examples(16, seed=9)]
    prefix = prefix_for(tiny.model, 4)
    init_prefix_from_tokens(prefix, tiny.model, torch.tensor(train[0].ids[:4]))
    local = LocalConfig(steps, 8, OptimConfig(1e-3), OptimConfig(5e-2, warmup_ratio=0.0))
    shards = [train[20 * k : 20 * (k + 1)] for k in range(clients + 1)]
    aux = build_auxiliary_model(tiny.model, [0])
    parties = [
        FedSPClient(
            build_auxiliary_model(tiny.model, [0]) if k else aux,
            prefix.config,
            shards[k + 1],
            local,
            total_rounds=5,
            pad_id=pad,
            seed=k,
        )
        for k in range(clients)
    ]
    server = FedSPServer(tiny.model, prefix, shards[0], val, local, total_rounds=5, pad_id=pad, seed=0)
    return server, parties


def test_client_update_alternates_aux_then_prefix(tiny, toy_examples):
    # Prepare
    server, (client, _) = _parties(tiny, toy_examples, steps=2)
    sent = server.broadcast()
    aux_before = {k: v.clone() for k, v in client.aux_model.state_dict().items()}
    # Execute
    update = client.fit(sent)
    # Assert: both the auxiliary model and the prefix changed; the update carries the shard size
    assert any(not torch.equal(v, client.aux_model.state_dict()[k]) for k, v in aux_before.items())
    assert not torch.equal(update.state["table"], sent["table"])
    assert update.num_examples == 20
    assert math.isfinite(update.metrics["align_loss"]) and math.isfinite(update.metrics["prompt_loss"])


def test_each_phase_of_fit_trains_only_its_own_part(tiny, toy_examples):
    # Prepare: watch every optimiser step of a real client round (2 alignment steps, then 2 prompt steps)
    server, (client, _) = _parties(tiny, toy_examples, steps=2)
    steps = []

    def watched(phase_name, phase):
        step = phase.step

        def step_and_record(loss):
            aux_before = {k: v.clone() for k, v in client.aux_model.state_dict().items()}
            prefix_before = {k: v.clone() for k, v in client.prefix.state_dict().items()}
            out = step(loss)
            aux_moved = any(
                not torch.equal(v, client.aux_model.state_dict()[k]) for k, v in aux_before.items()
            )
            prefix_moved = any(
                not torch.equal(v, client.prefix.state_dict()[k]) for k, v in prefix_before.items()
            )
            steps.append((phase_name, aux_moved, prefix_moved))
            return out

        phase.step = step_and_record

    watched("align", client.align)
    watched("prompt", client.prompt)
    # Execute: the client's own round
    client.fit(server.broadcast())
    # Assert: alignment moves the auxiliary model and never the prefix; prompt tuning the reverse
    assert steps == [("align", True, False)] * 2 + [("prompt", False, True)] * 2


def test_answer_loss_falls_over_rounds_and_global_model_is_bit_identical(tiny, toy_examples):
    # Prepare
    snapshot = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    server, clients = _parties(tiny, toy_examples, steps=4)
    first = server.validation_loss()
    # Execute: five FedSP rounds
    for _ in range(5):
        sent = server.broadcast()
        updates = [c.fit({k: v.clone() for k, v in sent.items()}) for c in clients]
        server.aggregate(weighted_average([(u.state, u.num_examples) for u in updates]), updates)
        server.tune()
        last = server.validation_loss()
    # Assert
    assert last < first - 0.1
    assert server.best.loss <= last
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in snapshot.items())


def test_evaluation_scores_a_hand_built_example(tiny):
    # Prepare: one example; compute each choice's log-likelihood the plain way
    example = MCExample("hand/0", "Question: pick one\nAnswer:", ("alpha", "be", "gamma ray"), 1)
    sums = []
    for choice in example.choices:
        row = encode_pair(tiny.tokenizer, example.context, " " + choice, 128)
        batch = collate([row], tiny.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = tiny.model(input_ids=batch["input_ids"].to(tiny.model.device)).logits[0].log_softmax(-1)
        n = len(row.ids)
        sums.append(sum(float(logits[t - 1, row.ids[t]]) for t in range(n - row.num_answer, n)))
    best = max(range(3), key=sums.__getitem__)
    best_norm = max(range(3), key=lambda c: sums[c] / len(example.choices[c]))
    # Execute
    result = evaluate_multiple_choice(tiny.model, tiny.tokenizer, [example], progress=False)
    # Assert
    assert result.predictions == (best,)
    assert result.acc == float(best == 1)
    assert result.acc_norm == float(best_norm == 1)
    assert result.n == 1


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_context_once_scoring_equals_full_sequence_scoring(family, with_prefix, toy_examples):
    # Prepare: examples with contexts of different lengths and choices of 1..4 words
    loaded = load_global_model(family, seed=3)
    examples = toy_examples(10) + [
        MCExample("x/1", "A much longer context about the sky.\nAnswer:", ("blue", "not sure at all"), 0)
    ]
    prefix = None
    if with_prefix:
        prefix = prefix_for(loaded.model, 3).eval()  # no dropout
        torch.manual_seed(0)
        with torch.no_grad():
            prefix.table.normal_()
    # Execute
    from fedsp.evaluation import multiple_choice as mc

    cached = mc._score_cached(loaded.model, loaded.tokenizer, examples, prefix, 8, 256, "", False)
    full = mc._score_full(loaded.model, loaded.tokenizer, examples, prefix, 8, 256, "", False)
    # Assert: the same log-likelihoods, so the same rankings
    for a, b in zip(cached, full, strict=True):
        assert a == pytest.approx(b, abs=1e-3)
        assert max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)


def test_distilled_auxiliary_model_is_cached_and_reused(tiny, tmp_path, monkeypatch, toy_examples):
    # Prepare
    from fedsp.config import RunConfig
    from fedsp.methods.kd import distilled_auxiliary_model

    monkeypatch.setenv("FEDSP_CACHE_DIR", str(tmp_path))
    rows = [encode_gold(tiny.tokenizer, ex, 64) for ex in toy_examples(12)]
    config = RunConfig(model="tiny-llama", kd_steps=3, kd_batch_size=4, progress=False)
    # Execute
    first, layers, losses = distilled_auxiliary_model(config, tiny, rows)
    again, _, losses_again = distilled_auxiliary_model(config, tiny, rows)
    other, _, losses_other = distilled_auxiliary_model(
        RunConfig(model="tiny-llama", kd_steps=4, kd_batch_size=4, progress=False), tiny, rows
    )
    # Assert: trained once, reloaded bit-identical with its KD losses; different KD settings train anew
    assert layers == [0] and len(losses) == 3 and losses_again == losses and len(losses_other) == 4
    assert len(list((tmp_path / "aux").glob("*.safetensors"))) == 2
    for (name, a), b in zip(first.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_best_state_is_kept_restored_and_checkpointed_the_same_way_for_every_server():
    from fedsp.methods.base import BestKept

    # Prepare: a "server" whose state is one tensor
    held = {"w": torch.tensor([1.0])}

    def snapshot():
        return {"w": held["w"].clone()}

    def restore(state):
        held["w"] = state["w"].clone()

    best = BestKept(snapshot, restore)
    # Execute: the state before round 1, then a better round, then a worse one
    best.offer(2.0)
    held["w"] = torch.tensor([2.0])
    best.offer(1.5)
    held["w"] = torch.tensor([3.0])
    best.offer(1.7)
    best.restore()
    # Assert: the round with loss 1.5 is back, and a checkpoint holds the keys older versions wrote
    assert held["w"].item() == 2.0 and best.loss == 1.5
    saved = best.state_dict()
    assert set(saved) == {"best_val_loss", "best_state"}
    again = BestKept(snapshot, restore)
    again.load_state_dict(saved)
    assert again.loss == 1.5 and torch.equal(again.state["w"], torch.tensor([2.0]))
    # without a state from the start, restoring before any round changes nothing
    lazy = BestKept(snapshot, restore, from_start=False)
    held["w"] = torch.tensor([9.0])
    lazy.restore()
    assert held["w"].item() == 9.0 and lazy.state == {}
