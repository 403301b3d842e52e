"""What a client keeps between rounds: exact in what it trains, AdamW moments in bfloat16 on request."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedsp.config import RunConfig
from fedsp.data.batching import encode_gold
from fedsp.errors import FedSPError
from fedsp.methods.fedsp import FedSPClient, LocalConfig
from fedsp.methods.optim import OptimConfig
from fedsp.models.auxiliary import build_auxiliary_model
from fedsp.models.prefix import prefix_for
from fedsp.runtime import inprocess
from fedsp.runtime.checkpoint import ClientStore, compact_state

TINY = RunConfig(
    model="tiny-llama",
    clients=3,
    rounds=2,
    local_steps=2,
    kd_steps=2,
    eval_limit=8,
    val_limit=8,
    prefix_len=4,
    max_length=96,
    progress=False,
    dtype="float32",
)


def _client(tiny, rows, seed: int = 0) -> FedSPClient:
    torch.manual_seed(seed)
    aux = build_auxiliary_model(tiny.model, [0])
    config = LocalConfig(steps=2, batch_size=2, align=OptimConfig(lr=1e-3), prompt=OptimConfig(lr=1e-2))
    return FedSPClient(aux, prefix_for(aux, 4).config, rows, config, 3, tiny.tokenizer.pad_token_id, seed=1)


@pytest.fixture
def rows(tiny, toy_examples):
    return [encode_gold(tiny.tokenizer, example, 64) for example in toy_examples(6)]


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_a_saved_state_reloads_exactly_what_the_client_trains(tmp_path, tiny, rows, moments):
    # Prepare: a client after one round of both phases, its state saved and its next round's result
    client = _client(tiny, rows)
    broadcast = client.prefix.wire_state()
    client.fit({k: v.clone() for k, v in broadcast.items()})
    store = ClientStore(tmp_path / "client", moments)
    size = store.save(1, client.state_dict())
    # Act: a fresh client loads it from disk
    saved = store.load_before(2)
    assert saved is not None and saved[0] == 1
    fresh = _client(tiny, rows, seed=7)
    fresh.load_state_dict(saved[1])
    # Assert: the trained weights, the prompt and the data position are back exactly
    for (name, want), (_, got) in zip(
        client.aux_model.named_parameters(), fresh.aux_model.named_parameters(), strict=True
    ):
        assert torch.equal(want, got), name
    assert fresh.stream.state_dict() == client.stream.state_dict()
    # Assert: the moments come back as float32, exactly or within bfloat16's rounding
    for phase in ("align", "prompt"):
        want_state = getattr(client, phase).optimizer.state_dict()["state"]
        got_state = getattr(fresh, phase).optimizer.state_dict()["state"]
        for key, entries in want_state.items():
            for name, value in entries.items():
                got = got_state[key][name]
                assert got.dtype == value.dtype
                if moments == "float32" or name == "step":
                    assert torch.equal(got, value)
                else:
                    assert torch.allclose(got, value, rtol=2**-8, atol=0)
                    assert not torch.equal(got, value) or value.abs().max() == 0
    assert size == (tmp_path / "client" / "state-1.pt").stat().st_size


def test_compact_state_halves_the_moments_and_leaves_the_rest(tiny, rows):
    # Prepare: a client's state after one round
    client = _client(tiny, rows)
    client.fit(client.prefix.wire_state())
    state = client.state_dict()
    # Act
    small = compact_state(state, "bfloat16")
    # Assert: moments in bfloat16, steps, weights and the stream untouched; float32 is the state itself
    entries = small["align"]["optimizer"]["state"][0]
    assert entries["exp_avg"].dtype == entries["exp_avg_sq"].dtype == torch.bfloat16
    assert entries["step"].dtype == torch.float32
    assert all(small["model"][k] is v for k, v in state["model"].items())
    assert small["stream"] == state["stream"]
    assert state["align"]["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32  # not modified
    assert compact_state(state, "float32") is state


def test_runs_with_bfloat16_moments_keep_less_on_disk(tmp_path):
    # Execute: the tiny run with each moment dtype
    full = inprocess.run(replace(TINY, out=str(tmp_path / "f32")))
    half = inprocess.run(replace(TINY, state_moments="bfloat16", out=str(tmp_path / "bf16")))
    a, b = full.results["client_state"], half.results["client_state"]
    # Assert: weights (float32) plus two moments: bfloat16 moments make the state about 2/3 as large
    assert 0.6 * a["bytes_per_client"] < b["bytes_per_client"] < 0.72 * a["bytes_per_client"]
    assert half.results["rounds_completed"] == 2


def test_a_bad_moment_dtype_gets_a_one_line_error():
    with pytest.raises(FedSPError, match=r"state_moments.*float16.*float32, bfloat16"):
        RunConfig(state_moments="float16")
