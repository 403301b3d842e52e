"""SFPrompt on tiny models: the exact split, EL2N pruning, gradients across the cut, training, bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fedsp.config import RunConfig
from fedsp.data.batching import collate, encode_gold, encode_pair
from fedsp.data.shards import RunData
from fedsp.errors import FedSPError
from fedsp.methods.aggregation import weighted_average
from fedsp.methods.base import ClientUpdate, Request
from fedsp.methods.sfprompt import answer_positions, el2n, prune_hardest, sfprompt_course
from fedsp.methods.split_traffic import MESSAGE_OF, SPLIT_KEYS
from fedsp.methods.table import METHOD_SPECS
from fedsp.models.forward import continuation_logprobs, score_choices
from fedsp.models.loading import load_global_model, use_attention
from fedsp.models.split import Head, PromptedModel, ServerBody, Tail, split_layout
from fedsp.runtime.audit import Audit, private_weights, promised_layers


def _batch(tokenizer, toy_examples, n: int = 3) -> dict[str, torch.Tensor]:
    return collate([encode_gold(tokenizer, ex, 64) for ex in toy_examples(n)], tokenizer.pad_token_id)


def _fit(client, server, partition: int, state) -> ClientUpdate:
    """A client's whole round with the server answering its split messages in this process."""
    out = client.fit(state)
    while isinstance(out, Request):
        out = client.answer(server.respond(partition, out))
    return out


def _course(loaded, toy_examples, rounds: int = 4, **overrides):
    rows = [encode_gold(loaded.tokenizer, ex, 64) for ex in toy_examples(40)]
    data = RunData(rows[:8], [rows[8:20], rows[20:32]], rows[32:], toy_examples(4), "validation")
    options = dict(
        method="sfprompt",
        model="tiny-llama",
        rounds=rounds,
        prefix_len=4,
        split_layer=2,
        lr=3e-2,
        local_steps=3,
        local_loss_steps=2,
        batch_size=6,
        warmup_ratio=0.0,
        prefix_init="random",
    )
    return sfprompt_course(RunConfig(**{**options, **overrides}), loaded, data)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_head_body_tail_equals_the_full_model_exactly(family, toy_examples):
    # Prepare: random prompts, a tail norm moved away from the global one, right padding in the batch
    loaded = load_global_model(family, seed=0)
    model = loaded.model
    torch.manual_seed(0)
    prompts = torch.nn.Parameter(torch.randn(5, model.get_input_embeddings().embedding_dim))
    tail = Tail(model)
    with torch.no_grad():
        tail.norm.weight.mul_(1.3)
    head, body, full = Head(model, 2), ServerBody(model, 2), PromptedModel(model, prompts, tail)
    batch = _batch(loaded.tokenizer, toy_examples)
    wanted, _ = answer_positions(batch["labels"], 5)  # (B, 5+T)
    # Execute: head -> body (through its message API) -> tail, and the full model in one stack
    with torch.no_grad():
        cut = head(prompts, batch["input_ids"], batch["attention_mask"])
        outputs = body.body_forward(0, {**cut, "wanted": wanted})["outputs"]  # (n, H)
        split_logits = tail(outputs)  # (n, V)
        full_logits = full(batch["input_ids"], batch["attention_mask"])[wanted[:, 5:]]  # (n, V)
    # Assert: bit-identical, in the model's dtype
    assert split_logits.shape == full_logits.shape and split_logits.shape[0] == int(wanted.sum())
    assert torch.equal(split_logits, full_logits)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_prompts_of_token_embeddings_equal_the_plain_model_reading_those_tokens(family, toy_examples):
    # Prepare: prompts = the input embeddings of P real tokens; the tail is the global model's own norm
    loaded = load_global_model(family, seed=0)
    model = loaded.model
    tokens = torch.tensor(loaded.tokenizer("Hint: ", add_special_tokens=False)["input_ids"])  # (P,)
    with torch.no_grad():
        prompts = torch.nn.Parameter(model.get_input_embeddings()(tokens))
    full = PromptedModel(model, prompts, Tail(model))
    batch = _batch(loaded.tokenizer, toy_examples, 2)
    ids = torch.cat([tokens.expand(2, -1), batch["input_ids"]], dim=1)  # (B, P+T)
    mask = torch.cat([torch.ones(2, len(tokens), dtype=torch.long), batch["attention_mask"]], dim=1)
    # Execute
    with torch.no_grad():
        prompted = full(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
        plain = model(input_ids=ids, attention_mask=mask).logits[:, len(tokens) :].float()
    # Assert: the same numbers on real tokens
    real = batch["attention_mask"].bool()
    assert torch.allclose(prompted[real], plain[real], atol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_cached_choice_scoring_of_the_prompted_model_equals_full_sequences(family, kernel, toy_examples):
    # Prepare: the evaluation code's two paths, on the wrapper with non-trivial prompts; under eager
    # attention the packed choices carry an additive mask (0 = visible), which the prompts must extend
    loaded = load_global_model(family, seed=0)
    use_attention(loaded.model, kernel)
    torch.manual_seed(1)
    prompts = torch.nn.Parameter(torch.randn(3, loaded.model.get_input_embeddings().embedding_dim) * 0.1)
    full = PromptedModel(loaded.model, prompts, Tail(loaded.model))
    tok = loaded.tokenizer
    examples = toy_examples(3)
    contexts = [list(tok(ex.context, add_special_tokens=False)["input_ids"]) for ex in examples]
    choices = [
        [list(tok(" " + c, add_special_tokens=False)["input_ids"]) for c in ex.choices] for ex in examples
    ]
    pairs = [encode_pair(tok, ex.context, " " + c, 512) for ex in examples for c in ex.choices]
    # Execute
    with torch.no_grad():
        cached = [s for row in score_choices(full, contexts, choices, tok.pad_token_id) for s in row]
        plain = continuation_logprobs(full, collate(pairs, tok.pad_token_id)).tolist()
    # Assert
    assert cached == pytest.approx(plain, abs=1e-4)


def test_el2n_matches_hand_computed_values():
    # Prepare: uniform over 2 classes -> || (0.5, 0.5) - (1, 0) || = sqrt(0.5); certain and right -> 0
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    targets = torch.tensor([0, 0, 0])
    # Execute
    scores = el2n(logits, targets)
    # Assert: certain and wrong -> sqrt(2)
    assert torch.allclose(scores, torch.tensor([math.sqrt(0.5), 0.0, math.sqrt(2.0)]), atol=1e-6)


@pytest.mark.parametrize(
    ("gamma", "expected"), [(0.3, [1, 4, 7]), (0.25, [1, 4, 7]), (0.01, [4]), (1.0, list(range(10)))]
)
def test_pruning_keeps_exactly_the_ceil_gamma_n_highest_scores(gamma, expected):
    # Prepare: 10 scores; 0.9 at 1 and 7 tie below 0.95 at 4
    scores = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.95, 0.5, 0.4, 0.9, 0.0, 0.6])
    # Execute
    kept = prune_hardest(scores, gamma)
    # Assert: ceil(gamma * 10) indices, the highest ones
    assert kept == expected and len(kept) == math.ceil(gamma * 10)


def test_client_prunes_by_its_own_shortcut_model_scores(tiny, toy_examples):
    # Prepare
    course = _course(tiny, toy_examples, prune_gamma=0.25)
    client = course.make_client(0)
    _fit(client, course.server, 0, course.server.broadcast())  # loads the state
    # Execute
    scores = client.el2n_scores()
    update = _fit(client, course.server, 0, course.server.broadcast())  # the kept count is in its metrics
    # Assert: 12 rows -> ceil(0.25 * 12) = 3 kept, scores one per row
    assert scores.shape == (12,) and update.metrics["kept_rows"] == 3.0


def test_gradient_reaches_the_prompts_through_the_body_and_body_weights_stay(tiny, toy_examples):
    # Prepare: one client; snapshot of the body's weights
    course = _course(tiny, toy_examples)
    client = course.make_client(0)
    client.prompts.data.normal_(0.0, 0.5)
    server = course.server
    body = server.body
    before = {k: v.clone() for k, v in body.view.named_parameters()}
    batch = _batch(tiny.tokenizer, toy_examples, 4)
    client.progress = {"batch": batch}  # one split step of a round in progress
    # Execute: the four messages of one split step, then the backward through the head
    outputs = server.respond(0, Request("activations", client.split_forward(batch)))
    grad_outputs = Request("grad_outputs", client.split_backward(outputs.tensors))
    loss = client.progress["loss"]
    grad_inputs = server.respond(0, grad_outputs).tensors["grad_inputs"]  # (B, P+T, H)
    cut = client.head(client.prompts, batch["input_ids"], batch["attention_mask"])
    (cut["activations"] * grad_inputs).sum().backward()
    split_grad = client.prompts.grad.clone()
    client.prompts.grad = None
    # Reference: autograd through the full model in one process
    full = PromptedModel(tiny.model, client.prompts, client.tail)
    wanted, targets = answer_positions(batch["labels"], 4)
    reference = F.cross_entropy(full(batch["input_ids"], batch["attention_mask"])[wanted[:, 4:]], targets)
    reference.backward()
    # Assert: same loss and same prompt gradient; the body kept its weights and got no gradients
    assert loss == pytest.approx(float(reference.detach()), abs=1e-6)
    assert split_grad.abs().sum() > 0
    assert torch.allclose(split_grad, client.prompts.grad, atol=1e-6)
    for name, value in body.view.named_parameters():
        assert value.grad is None and torch.equal(value, before[name]), name


def test_loss_falls_over_rounds_and_global_model_is_unchanged(tiny, toy_examples):
    # Prepare
    course = _course(tiny, toy_examples, rounds=5)
    server = course.server
    clients = [course.make_client(k) for k in range(course.num_clients)]
    weights = {k: v.clone() for k, v in tiny.model.named_parameters()}
    first = server.validation_loss()
    # Execute: five rounds of broadcast -> fit -> FedAvg
    for _ in range(5):
        state = server.broadcast()
        updates = [
            _fit(c, server, k, {n: v.clone() for n, v in state.items()}) for k, c in enumerate(clients)
        ]
        server.aggregate(weighted_average([(u.state, u.num_examples) for u in updates]), updates)
    last = server.validation_loss()
    # Assert
    assert last < first - 0.1, (first, last)
    assert all(torch.equal(v, weights[k]) for k, v in tiny.model.named_parameters())
    assert server.report["last_round_mean_per_client"]["client_flops"] > 0


def test_bad_inputs_get_clear_errors(tiny, toy_examples):
    with pytest.raises(FedSPError, match=r"split_layer 4 is outside 1\.\.3"):
        _course(tiny, toy_examples, split_layer=4)
    with pytest.raises(FedSPError, match="split_layer"):
        RunConfig(method="sfprompt", split_layer=0)
    for gamma in (0.0, 1.5):
        with pytest.raises(FedSPError, match=r"prune_gamma must be in \(0, 1\], got " + str(gamma)):
            RunConfig(method="sfprompt", prune_gamma=gamma)
    with pytest.raises(FedSPError, match="secure_aggregation is not available with method sfprompt"):
        RunConfig(method="sfprompt", engine="flower", secure_aggregation=True, clients=4)
    with pytest.raises(FedSPError, match="'falcon'.*gpt2, llama"):
        split_layout(SimpleNamespace(config=SimpleNamespace(model_type="falcon")))


def test_split_options_are_reported_as_ignored_by_other_methods():
    config = RunConfig(method="fedsp", split_layer=3, prune_gamma=0.2)
    assert METHOD_SPECS["fedsp"].ignored_options(config) == {"prune_gamma": 0.2, "split_layer": 3}
    assert METHOD_SPECS["sfprompt"].ignored_options(RunConfig(method="sfprompt", split_layer=3)) == {}


def test_tiny_run_end_to_end_writes_split_accounting_and_passes_the_audit(tiny, tmp_path, arc_rows):
    # Prepare: a small ARC-style data folder; clients hold layers 0 and 1 of 4
    from fedsp.runtime.inprocess import run

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(arc_rows(18))
    (data / "validation.jsonl").write_text(arc_rows(6, 100))
    (data / "test.jsonl").write_text(arc_rows(6, 200))
    config = RunConfig(
        method="sfprompt",
        model="tiny-llama",
        data_dir=str(data),
        clients=2,
        rounds=2,
        local_steps=1,
        local_loss_steps=1,
        batch_size=4,
        prefix_len=4,
        split_layer=2,
        eval_limit=6,
        val_limit=6,
        max_length=64,
        out=str(tmp_path / "run"),
        progress=False,
        audit=True,
    )
    # Execute
    outcome = run(config)
    # Assert: the client holds layers 0, 1; split traffic per client and round; prompts + tail each way
    res = json.loads((outcome.out_dir / "results.json").read_text())
    assert res["method"] == "sfprompt" and res["final"]["n"] == 6
    assert res["client_model"]["layers"] == [0, 1] and 0 < res["client_model"]["fraction_of_global"] < 1
    notes = res["method_notes"]
    assert notes["server_layers"] == [2, 3] and notes["prompt_tail_params"] == 4 * 64 + 64
    metrics = [json.loads(line) for line in (outcome.out_dir / "metrics.jsonl").read_text().splitlines()]
    per_client = metrics[-1]["client_metrics"]
    for key in (
        "bytes_activations",
        "bytes_outputs",
        "bytes_grad_outputs",
        "bytes_grad_inputs",
        "client_flops",
        "kept_rows",
    ):
        assert len(per_client[key]) == 2 and all(v > 0 for v in per_client[key]), key
    assert metrics[-1]["params_up"] == metrics[-1]["params_down"] == 4 * 64 + 64
    # Assert: the traffic report adds every split message of every round to the federated payloads
    traffic = notes["split_traffic"]
    split = sum(sum(m["client_metrics"][f"bytes_{MESSAGE_OF[k]}"]) for m in metrics[1:] for k in SPLIT_KEYS)
    federated = sum(m["bytes_down"] + m["bytes_up"] for m in metrics[1:])
    comm = res["comm"]
    assert traffic["split_bytes_total"] == comm["split_bytes_total"] == split > 0
    assert comm["total_bytes"] == 2 * comm["model_bytes_once"] + federated + split  # 2 clients, all of it
    assert comm["split_bytes_up_per_round"] == traffic["split_bytes_up_per_round"]
    up = sum(per_client["bytes_activations"]) + sum(per_client["bytes_grad_outputs"])
    assert traffic["split_bytes_up_per_round"] == pytest.approx(up / 2)
    assert traffic["client_flops_per_round"] == pytest.approx(sum(per_client["client_flops"]) / 2)
    # Assert: clients received layer 1 (head) but no weight of the body; the body's weights were checked
    audit = json.loads((outcome.out_dir / "audit.json").read_text())
    assert res["audit"]["passed"] and res["audit"]["violations"] == 0
    body = {where.split(":")[0] for where in private_weights(tiny.model, config).values()}
    assert body == {"layer 2", "layer 3"}
    assert "model.layers.1.self_attn.q_proj.weight" in {e["name"] for e in audit["sent"]}


def test_audit_holds_sfprompt_to_its_split_and_flags_a_body_weight(tiny, tmp_path, toy_examples):
    # Prepare: what the course says clients hold, and one head and one body weight sent to a client
    config = RunConfig(method="sfprompt", model="tiny-llama", split_layer=2)
    course = _course(tiny, toy_examples, split_layer=2)
    layers = tiny.model.model.layers
    audit = Audit()
    audit.record(1, "prefix", course.server.broadcast(), [0])
    audit.record(1, "shipped_once", {"head": layers[1].mlp.up_proj.weight}, [0])
    clean = audit.report(tiny.model, config, tmp_path / "clean.json")
    audit.record(2, "prefix", {"leak": layers[2].mlp.up_proj.weight.clone()}, [1])
    # Execute
    leaked = audit.report(tiny.model, config, tmp_path / "leaked.json")
    # Assert: the promise is the course's held layers; only the body weight is a violation
    assert promised_layers(config, 4) == set(course.client_model.global_layers) == {0, 1}
    assert clean["passed"] and clean["private_weights_checked"] > 0
    assert not leaked["passed"] and leaked["violations"] == 1
    report = json.loads((tmp_path / "leaked.json").read_text())
    assert report["violation_list"][0]["equals"] == "layer 2: mlp.up_proj.weight"
