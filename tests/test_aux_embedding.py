"""``--aux-embedding lowrank:R``: the auxiliary model's embedding and tied head as two SVD factors."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from fedsp.config import RunConfig, parse_embedding
from fedsp.errors import FedSPError
from fedsp.models.auxiliary import build_auxiliary_model, unique_parameter_count
from fedsp.models.embedding import LowRankEmbedding, LowRankHead, factorise_embedding
from fedsp.models.forward import head_logits
from fedsp.models.loading import load_global_model
from fedsp.runtime import inprocess

TINY = RunConfig(
    model="tiny-llama",
    clients=3,
    rounds=2,
    local_steps=1,
    kd_steps=2,
    eval_limit=8,
    val_limit=8,
    prefix_len=4,
    max_length=96,
    progress=False,
    dtype="float32",
)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_full_rank_factors_reproduce_the_auxiliary_models_logits(family):
    # Prepare: an auxiliary model and the same one with its embedding factorised at full rank
    model = load_global_model(family, seed=0, device="cpu").model
    aux = build_auxiliary_model(model, [0]).eval()
    width = aux.get_input_embeddings().weight.shape[1]
    small = factorise_embedding(copy.deepcopy(aux), width).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    # Execute
    with torch.no_grad():
        want, got = aux(input_ids=ids).logits, small(input_ids=ids).logits
    # Assert: the same logits to float rounding; embedding and head share one pair of factors (tied)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    head, embedding = small.get_output_embeddings(), small.get_input_embeddings()
    assert isinstance(embedding, LowRankEmbedding) and isinstance(head, LowRankHead)
    assert head.factors is embedding


def test_low_rank_factors_are_the_best_approximation_and_count_fewer_parameters():
    # Prepare
    model = load_global_model("tiny-llama", seed=0, device="cpu").model
    aux = build_auxiliary_model(model, [0])
    weight = aux.get_input_embeddings().weight.detach().clone()
    vocab, width = weight.shape
    # Execute
    small = factorise_embedding(copy.deepcopy(aux), 8)
    factors = small.get_input_embeddings()
    product = factors.down.detach() @ factors.up.detach()
    # Assert: the Eckart-Young error (the discarded singular values) and (V + E) R parameters for V E
    discarded = torch.linalg.svdvals(weight)[8:]
    assert float(torch.linalg.norm(product - weight)) == pytest.approx(float(discarded.norm()), rel=1e-4)
    assert unique_parameter_count(aux) - unique_parameter_count(small) == vocab * width - (vocab + width) * 8


def test_float_logits_of_a_bfloat16_head_are_computed_in_float32():
    # Prepare
    g = torch.Generator().manual_seed(0)
    factors = LowRankEmbedding(torch.randn(50, 4, generator=g), torch.randn(4, 16, generator=g))
    head = LowRankHead(factors)
    hidden = torch.randn(3, 16, generator=g)
    want = head(hidden)
    factors.to(torch.bfloat16)
    # Execute
    got = head_logits(head, hidden.to(torch.bfloat16))
    # Assert: float32 logits close to the float32 factors' (only the inputs were rounded)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=0.05, atol=0.1)


def test_bad_embedding_options_get_one_line_errors(tiny):
    # Assert: the form, the rank's range, and methods whose clients hold no auxiliary model
    assert parse_embedding("full") is None and parse_embedding("lowrank:12") == ("lowrank", 12)
    for text in ("lowrank:0", "lowrank", "lowrank:-3", "lowrank:x", "svd:4"):
        with pytest.raises(FedSPError, match=r"aux_embedding .* choose full, lowrank:R"):
            RunConfig(aux_embedding=text)
    for method in ("fedprompt", "fedprompt-single", "sfprompt", "prefix-tuning"):
        with pytest.raises(FedSPError, match=rf"the clients of method {method} hold none"):
            RunConfig(method=method, aux_embedding="lowrank:8")
    aux = build_auxiliary_model(tiny.model, [0])
    with pytest.raises(FedSPError, match=r"lowrank:65: the rank must be between 1 and the embedding width"):
        factorise_embedding(aux, 65)


def test_a_run_with_a_low_rank_client_model_plugs_its_prefix_into_the_global_model(tmp_path):
    # Execute: the tiny run with the full and a rank-8 auxiliary embedding
    full = inprocess.run(replace(TINY, out=str(tmp_path / "full")))
    small = inprocess.run(replace(TINY, aux_embedding="lowrank:8", out=str(tmp_path / "small")))
    # Assert: the client holds and is sent less; the prefix exchanged is the global model's shape
    a, b = full.results, small.results
    vocab, width = 257, 64
    assert a["client_model"]["params"] - b["client_model"]["params"] == vocab * width - (vocab + width) * 8
    assert b["comm"]["model_bytes_once"] < a["comm"]["model_bytes_once"]
    assert b["comm"]["params_up_per_round"] == a["comm"]["params_up_per_round"]
    assert b["rounds_completed"] == 2 and 0 <= b["final"]["acc"] <= 1
    # Assert: results.json says what each client keeps on disk: less with the smaller model
    assert a["client_state"]["clients"] == b["client_state"]["clients"] == 3
    assert 0 < b["client_state"]["bytes_per_client"] < a["client_state"]["bytes_per_client"]


def test_the_distillation_cache_tells_the_embeddings_apart():
    # Prepare
    from fedsp.methods.kd import KDConfig, cache_key

    args = ("tiny-llama", {"a": 1}, [0], [0, 0], KDConfig(2), [], 0)
    # Assert: the full embedding keeps the key it always had; a low-rank one gets its own
    assert cache_key(*args) == cache_key(*args, "full")
    assert cache_key(*args, "lowrank:8") not in (cache_key(*args), cache_key(*args, "lowrank:16"))


def test_an_untied_head_gets_its_own_factors_and_other_embeddings_are_refused():
    # Prepare: an auxiliary model whose head no longer shares the embedding's matrix
    model = load_global_model("tiny-llama", seed=0, device="cpu").model
    aux = build_auxiliary_model(model, [0]).eval()
    head = aux.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() + 0.01)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    # Execute
    small = factorise_embedding(copy.deepcopy(aux), 64).eval()
    with torch.no_grad():
        want, got = aux(input_ids=ids).logits, small(input_ids=ids).logits
    # Assert: full rank reproduces the untied model; the head's factors are its own
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert small.get_output_embeddings().factors is not small.get_input_embeddings()

    class Scaled(torch.nn.Embedding):  # an embedding that does more than a lookup (as Gemma's)
        pass

    other = copy.deepcopy(aux)
    other.set_input_embeddings(Scaled(model.config.vocab_size, 64))
    with pytest.raises(FedSPError, match=r"input embedding \(Scaled\) is not a plain lookup table"):
        factorise_embedding(other, 8)
