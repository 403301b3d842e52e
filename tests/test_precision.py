"""Precision and devices: bfloat16 weights with float32 masters and logits, --dtype auto, the attention
kernel, device selection, and tensors that follow the model's device."""

from __future__ import annotations

import pytest
import torch

from fedsp.config import RunConfig
from fedsp.data.batching import encode_pair
from fedsp.errors import FedSPError
from fedsp.models.auxiliary import build_auxiliary_model
from fedsp.models.forward import answer_loss
from fedsp.models.loading import load_global_model, resolve_device
from fedsp.models.prefix import Prefix, prefix_for


def test_bfloat16_weights_train_a_float32_prefix_close_to_float32(qa_batch, random_prefix):
    # Prepare: the same tiny model in both dtypes, the same float32 prefix values
    fp32 = load_global_model("tiny-llama", "float32", device="cpu")
    bf16 = load_global_model("tiny-llama", "bfloat16", device="cpu")
    batch = qa_batch(fp32.tokenizer)
    losses, grads = [], []
    for loaded in (fp32, bf16):
        prefix = random_prefix(loaded.model)
        # Execute
        loss = answer_loss(loaded.model, batch, prefix)
        loss.backward()
        losses.append(loss.item())
        grads.append(prefix.table.grad)
    # Assert: the prefix stays float32 and gets a float32 gradient; the loss moves by bfloat16 rounding only
    assert grads[1].dtype == torch.float32
    assert abs(losses[0] - losses[1]) < 0.02 * losses[0]


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
    with pytest.raises(FedSPError, match="device 'gpu' is not valid"):
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
def test_prefix_moves_to_cuda_in_place_so_its_optimiser_keeps_working(qa_batch):
    # Prepare
    cpu_model = load_global_model("tiny-llama", device="cpu").model
    cuda_model = load_global_model("tiny-llama", device="cuda").model
    prefix = Prefix(prefix_for(cpu_model, 3).config)
    param = prefix.table
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=0.1)
    batch = qa_batch(load_global_model("tiny-llama", device="cpu").tokenizer)
    # Execute: the forward moves the prefix; the optimiser steps the same Parameter
    answer_loss(cuda_model, batch, prefix).backward()
    optimizer.step()
    # Assert
    assert prefix.table is param and param.device.type == "cuda"
    assert param.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["fedsp", "fedprompt", "sfprompt", "local-only"])
def test_a_course_on_cuda_matches_the_same_course_on_the_cpu(tmp_path, read_metrics, method):
    # Prepare: two rounds, so that round 2 loads each client's saved optimiser state before its first step
    from fedsp.cli import main

    common = ["run", "--model", "tiny-llama", "--method", method, "--clients", "2", "--rounds", "2"]
    common += ["--local-steps", "2", "--kd-steps", "2", "--eval-limit", "8", "--val-limit", "8"]
    common += ["--prefix-len", "4", "--max-length", "96", "--quiet"]
    # Execute
    for device in ("cpu", "cuda"):
        assert main([*common, "--device", device, "--out", str(tmp_path / device)]) == 0
    # Assert: every round ran on both, to the same validation losses (float32 on both)
    cpu, cuda = read_metrics(tmp_path / "cpu"), read_metrics(tmp_path / "cuda")
    assert [r["round"] for r in cuda] == [r["round"] for r in cpu] == [0, 1, 2]
    for on_cpu, on_cuda in zip(cpu, cuda, strict=True):
        assert on_cuda["val_loss"] == pytest.approx(on_cpu["val_loss"], rel=1e-4)


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


def test_bfloat16_fedsp_client_trains_its_auxiliary_model_through_masters(qa_pairs):
    # Prepare: a bfloat16 tiny model, its auxiliary model, one FedSP client round
    from fedsp.methods.fedsp import FedSPClient, LocalConfig
    from fedsp.methods.optim import OptimConfig

    loaded = load_global_model("tiny-llama", "bfloat16", device="cpu")
    tok = loaded.tokenizer
    rows = [encode_pair(tok, c, a, 256) for c, a in qa_pairs]
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


def test_bfloat16_loss_runs_the_whole_batch_in_one_forward(monkeypatch, qa_batch):
    # length buckets pay in float32 on a CPU only; in bfloat16 the batch goes through the model once
    import fedsp.models.forward as forward

    calls = {"float32": 0, "bfloat16": 0}
    original = forward._answer_logits
    for dtype in calls:
        loaded = load_global_model("tiny-llama", dtype, device="cpu")

        def counting(model, batch, prefix, dtype=dtype):
            calls[dtype] += 1
            return original(model, batch, prefix)

        monkeypatch.setattr(forward, "_answer_logits", counting)
        forward.answer_loss(loaded.model, qa_batch(loaded.tokenizer))
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
