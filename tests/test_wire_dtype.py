"""``--wire-dtype``: each round's messages in bfloat16 or int8, updates as changes with error feedback."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedsp import wire
from fedsp.config import WIRE_DTYPES, RunConfig
from fedsp.errors import FedSPError
from fedsp.methods.table import spec_for
from fedsp.runtime import audit, inprocess
from fedsp.runtime.checkpoint import CHECKPOINT

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


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {  # values of very different magnitudes side by side, as a prefix row's layers are
        "matrix": torch.randn(6, 5, 64, generator=g) * torch.logspace(-3, 2, 5)[None, :, None],
        "vector": torch.randn(7, generator=g),
        "zeros": torch.zeros(3, 2),
        "steps": torch.arange(4),  # not floating: passes as it is
    }


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "int8"])
def test_round_trip_is_within_the_stated_error(wire_dtype):
    # Prepare
    tensors = _tensors()
    # Execute
    message = wire.compress(tensors, wire_dtype)
    back = wire.decode_broadcast(wire.encode(message), wire_dtype)
    # Assert: float32 back, integers untouched, each value within its bound
    assert set(back) == set(tensors) and all(back[k].dtype == torch.float32 for k in ("matrix", "vector"))
    assert torch.equal(back["steps"], tensors["steps"]) and torch.equal(back["zeros"], tensors["zeros"])
    for name in ("matrix", "vector"):
        x, err = tensors[name], (back[name] - tensors[name]).abs()
        if wire_dtype == "bfloat16":
            assert bool((err <= x.abs() * 2**-8).all())
        else:  # half a step of the group's scale: its 64 values' largest magnitude / 127 / 2
            flat = x.reshape(-1)
            groups = torch.nn.functional.pad(flat, (0, -flat.numel() % 64)).reshape(-1, 64)
            bound = (groups.abs().amax(dim=1) / 127 / 2).repeat_interleave(64)[: flat.numel()]
            assert bool((err.reshape(-1) <= bound * (1 + 1e-6)).all())
            assert message[name].dtype == torch.int8 and message[name].shape == x.shape
            assert message[name + wire.SCALE].shape == (groups.shape[0],)


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16", "int8"])
def test_the_client_model_shipped_once_is_what_the_server_keeps(wire_dtype):
    # Prepare: a client model's weights, the server's copy
    params = {name: t.clone() for name, t in _tensors(3).items() if t.is_floating_point()}
    original = {name: t.clone() for name, t in params.items()}
    # Act: ship it; a client decodes the message (after a trip through the bytes on the wire)
    message = wire.ship_once(params, wire_dtype)
    received = wire.decode_shipped(wire.decode(wire.encode(message)), wire_dtype)
    # Assert: the server's copy now holds exactly what the client decodes, within the dtype's error
    for name, value in params.items():
        assert torch.equal(received[name], value)
        bound = {"float32": 0.0, "bfloat16": 2**-8 * original[name].abs(), "int8": None}[wire_dtype]
        if wire_dtype == "int8":
            scale = wire.compress({"x": original[name]}, "int8")["x" + wire.SCALE]
            bound = float(scale.max()) / 2 + 1e-7
        assert bool(((value - original[name]).abs() <= bound + 1e-12).all())
    assert (wire.num_bytes(message) < wire.num_bytes(original)) == (wire_dtype != "float32")


def test_compressed_messages_are_smaller():
    # Prepare: a prefix-sized message
    prefix = {"prefix.key_values": torch.randn(4, 2 * 30 * 576)}
    # Execute
    sizes = {d: len(wire.encode_broadcast(prefix, d)) for d in WIRE_DTYPES}
    # Assert: bfloat16 about half, int8 about a quarter (plus a float32 scale per 64 values)
    assert sizes["bfloat16"] <= 0.51 * sizes["float32"]
    assert sizes["int8"] <= 0.27 * sizes["float32"]


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "int8"])
def test_error_feedback_makes_ten_rounds_of_updates_sum_to_the_true_changes(wire_dtype):
    # Prepare: 10 rounds of small changes to a prefix the server broadcasts as it is
    g = torch.Generator().manual_seed(1)
    sent = {"p": torch.randn(8, 64, generator=g)}
    changes = [torch.randn(8, 64, generator=g) * 1e-2 for _ in range(10)]
    # Execute: with and without the residual carried from round to round
    summed: dict[bool, torch.Tensor] = {}
    last_scale = torch.zeros(8)  # 64 values a row: one group each
    for feedback in (True, False):
        residual, total = None, torch.zeros(8, 64)
        for change in changes:
            payload, left = wire.encode_update({"p": sent["p"] + change}, sent, wire_dtype, residual)
            total += wire.decode_update(payload, sent, wire_dtype)["p"] - sent["p"]
            residual = left if feedback else None
            if wire_dtype == "int8":
                last_scale = wire.decode(payload)["p" + wire.SCALE]
        summed[feedback] = total
    true = torch.stack(changes).sum(0)
    # Assert: with feedback the server's sum misses only the last round's rounding (its residual)
    error = (summed[True] - true).abs()
    bound = last_scale[:, None] / 2 * (1 + 1e-5) + 1e-6 if wire_dtype == "int8" else true.abs() * 0 + 2e-4
    assert bool((error <= bound).all())
    assert float(error.max()) < float((summed[False] - true).abs().max())


def test_malformed_compressed_messages_are_refused():
    # Prepare
    good = wire.compress({"p": torch.randn(3, 4)}, "int8")
    sent = {"p": torch.zeros(3, 4)}
    cases = {
        "without its scale": ({"p": good["p"]}, "need a float32 scale"),
        "a scale of the wrong shape": ({"p": good["p"], "p::scale": torch.ones(2)}, "shape \\(1,\\)"),
        "a lone scale": ({"p::scale": torch.ones(1)}, "without its tensor"),
    }
    # Execute / Assert
    for message, match in cases.values():
        with pytest.raises(FedSPError, match=match):
            wire.decode_update(wire.encode(message), sent, "int8")
    with pytest.raises(FedSPError, match=r"update has keys \['q'\]"):
        wire.decode_update(wire.encode(wire.compress({"q": torch.ones(3, 4)}, "int8")), sent, "int8")
    with pytest.raises(FedSPError, match="has shape"):
        wire.decode_update(wire.encode(wire.compress({"p": torch.ones(4, 3)}, "int8")), sent, "int8")


def test_bad_options_get_one_line_errors():
    with pytest.raises(FedSPError, match=r"wire_dtype 'int4' is not valid; choose one of: float32"):
        RunConfig(wire_dtype="int4")
    with pytest.raises(FedSPError, match=r"wire_dtype int8 cannot be combined with it"):
        RunConfig(engine="flower", secure_aggregation=True, wire_dtype="int8")
    # a method that sends nothing says it ignores the option
    assert "wire_dtype" in spec_for("zero-shot").ignored_options(
        RunConfig(method="zero-shot", wire_dtype="int8")
    )
    assert "wire_dtype" not in spec_for("sfprompt").ignored_options(
        RunConfig(method="sfprompt", wire_dtype="int8")
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny run at each wire dtype (audit on)."""
    root = tmp_path_factory.mktemp("wire")
    return {d: inprocess.run(replace(TINY, wire_dtype=d, audit=True, out=str(root / d))) for d in WIRE_DTYPES}


def test_runs_send_fewer_bytes_and_pass_the_audit(runs):
    # Assert: bytes each way per round about 2x (bfloat16) and 4x (int8) smaller, counted from what was
    # sent (tiny-llama's prefix is 4 kB: safetensors' header is a larger share than for a real prefix)
    comm = {d: run.results["comm"] for d, run in runs.items()}
    for d, factor in (("bfloat16", 0.55), ("int8", 0.3)):
        assert comm[d]["bytes_down_per_round"] <= factor * comm["float32"]["bytes_down_per_round"]
        assert comm[d]["bytes_up_per_round"] <= factor * comm["float32"]["bytes_up_per_round"]
        # the audit saw the compressed tensors, and checked the private weights in their compressed form too
        sent = json.loads((runs[d].out_dir / "audit.json").read_text())["sent"]
        prefixes = [entry for entry in sent if entry["kind"] == "prefix"]
        assert prefixes and {e["dtype"] for e in prefixes} == {f"torch.{d}", "torch.float32"} - (
            {"torch.float32"} if d == "bfloat16" else set()
        )
        assert runs[d].results["audit"]["passed"]
    # Assert: the auxiliary model shipped once is compressed too, and the audit saw it compressed
    for d, factor in (("bfloat16", 0.55), ("int8", 0.3)):
        assert comm[d]["model_bytes_once"] <= factor * comm["float32"]["model_bytes_once"]
        sent = json.loads((runs[d].out_dir / "audit.json").read_text())["sent"]
        shipped = {e["dtype"] for e in sent if e["kind"] == "shipped_once"}
        assert f"torch.{d}" in shipped
    # Assert: training still moved the prefix, and close to where float32 took it
    prefixes = {
        d: torch.load(run.out_dir / CHECKPOINT, weights_only=False)["server"]["prefix"]
        for d, run in runs.items()
    }
    for d in ("bfloat16", "int8"):
        for name, value in prefixes["float32"].items():
            assert not torch.equal(value, prefixes[d][name])
            assert float((value - prefixes[d][name]).abs().max()) < 0.05 * float(value.abs().max())


def test_the_audit_catches_a_private_weight_sent_compressed(tiny):
    # Prepare: a FedSP run's promise (bottom layer), and a private layer's weight sent in int8
    config = replace(TINY, wire_dtype="int8")
    private = dict(tiny.model.model.layers[2].named_parameters())["self_attn.q_proj.weight"]
    leak = wire.compress({"w": private.detach()}, "int8")
    record = audit.Audit()
    record.record(1, "prefix", leak, [0])
    # Execute
    checked = audit.private_weights(tiny.model, config)
    # Assert: the int8 codes of the private weight are recognised
    assert any(where == "layer 2: self_attn.q_proj.weight" for where in checked.values())
    assert audit.fingerprint(leak["w"]) in checked


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "int8"])
def test_a_non_finite_update_is_refused_and_the_client_recovers_the_next_round(wire_dtype):
    # Prepare: a client whose training diverged in one value, then trains normally again
    sent = {"p": torch.zeros(4, 64), "q": torch.zeros(8)}
    bad = {"p": torch.ones(4, 64) * 1e-2, "q": torch.ones(8) * 1e-2}
    bad["p"][2, 5] = float("nan")
    good = {"p": torch.ones(4, 64) * 1e-2, "q": torch.ones(8) * 1e-2}
    # Execute
    payload, residual = wire.encode_update(bad, sent, wire_dtype)
    seen = wire.decode_update(payload, sent, wire_dtype)
    payload2, _ = wire.encode_update(good, sent, wire_dtype, residual)
    seen2 = wire.decode_update(payload2, sent, wire_dtype)
    # Assert: the server sees the NaN (its checks refuse the update); the residual starts again from zero,
    # so the next update arrives whole
    assert not bool(torch.isfinite(seen["p"]).all())
    assert residual is not None and all(bool((v == 0).all()) for v in residual.values())
    assert all(torch.allclose(seen2[k], good[k], rtol=1e-2, atol=1e-4) for k in good)


def test_each_client_carries_its_residual_from_one_round_to_the_next(tmp_path, monkeypatch):
    # Prepare: every update's residual in and out, in call order (3 clients, 2 rounds, in turn)
    calls: list[tuple[dict | None, dict | None]] = []
    encode = wire.encode_update

    def recording(state, received, wire_dtype, residual=None):
        payload, left = encode(state, received, wire_dtype, residual)
        calls.append((residual, left))
        return payload, left

    monkeypatch.setattr(wire, "encode_update", recording)
    # Execute
    inprocess.run(replace(TINY, wire_dtype="int8", out=str(tmp_path / "run")))
    # Assert: round 1 starts from none; round 2 gets exactly what round 1 left out, client by client
    assert len(calls) == 6 and all(residual is None for residual, _ in calls[:3])
    for (_, left), (residual, _) in zip(calls[:3], calls[3:], strict=True):
        assert left is not None and residual is not None and set(left) == set(residual)
        assert all(torch.equal(left[k], residual[k]) for k in left)
        assert any(bool(v.abs().sum() > 0) for v in left.values())  # rounding left something out
