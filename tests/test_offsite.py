"""Offsite-Tuning: the emulator's layers, what a client trains, the plug-in, both engines, protection, audit;
and the emulator accuracy every model-private method reports."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedsp import wire
from fedsp.cli import main
from fedsp.config import RunConfig
from fedsp.data.shards import prepare_data
from fedsp.errors import FedSPError
from fedsp.methods.builders import build_course
from fedsp.methods.offsite import emulator_plan
from fedsp.methods.table import METHOD_SPECS
from fedsp.models.adapters import decoder_layers
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import collapse_layers
from fedsp.runtime import audit, inprocess
from fedsp.runtime.checkpoint import CHECKPOINT
from fedsp.runtime.participation import client_rng_seed
from fedsp.runtime.session import Session

pytest.importorskip("flwr.app")
from test_flower import LocalGrid, task_identity  # noqa: E402, F401  (the grid's messages need a run id)

# tiny-llama has 4 layers: adapter layers 0 and 3, middle 1 and 2, of which the layer drop keeps 1 (0.5 * 2)
TINY = RunConfig(
    method="offsite-tuning",
    model="tiny-llama",
    clients=3,
    rounds=2,
    local_steps=2,
    kd_steps=3,
    eval_limit=8,
    val_limit=8,
    max_length=96,
    progress=False,
    ot_adapter_layers=1,
    ot_keep_ratio=0.5,
)


def _adapter(out) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT, weights_only=False)["server"]["adapter"]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _course(config: RunConfig):
    loaded = load_global_model(config.model, seed=0)
    data = prepare_data(config, loaded.tokenizer)
    return loaded, data, build_course(config, loaded, data)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process run the other engine is compared with (audit on)."""
    out = tmp_path_factory.mktemp("ref") / "inprocess"
    return inprocess.run(replace(TINY, out=str(out), audit=True))


def test_the_layer_drop_keeps_evenly_spaced_middle_layers_and_refuses_an_empty_middle():
    # OPT-1.3B, the paper's 2 + 2 adapter layers and 8 of the 20 middle layers
    opt = emulator_plan(24, 2, 0.4)
    assert opt.kept == (2, 5, 7, 10, 13, 16, 18, 21) and opt.adapters == (0, 1, 22, 23)
    assert opt.layers == (0, 1, 2, 5, 7, 10, 13, 16, 18, 21, 22, 23) and len(opt.dropped) == 12
    # SmolLM2-135M: 10 of its 26 middle layers; keep-ratio 1: nothing dropped; a tiny ratio keeps one
    assert len(emulator_plan(30, 2, 0.4).kept) == 10
    assert emulator_plan(8, 2, 1.0).dropped == () and emulator_plan(8, 2, 1.0).kept == (2, 3, 4, 5)
    assert emulator_plan(8, 1, 0.01).kept == (3,)
    with pytest.raises(FedSPError) as err:
        emulator_plan(4, 2, 0.4)
    assert str(err.value) == (
        "ot_adapter_layers 2 leaves no middle layer to compress in the model's 4 layers (2 bottom + 2 "
        "top); use at most 1"
    )
    with pytest.raises(FedSPError, match=r"(--ot-keep-ratio|ot_keep_ratio) must be in \(0, 1\], got 0.0"):
        replace(TINY, ot_keep_ratio=0.0)


def test_a_client_tunes_only_the_adapter_and_the_server_plugs_the_aggregate_into_the_global_model():
    # Prepare
    loaded, data, course = _course(TINY)
    client = course.make_client(0)
    sent = course.server.broadcast()
    frozen = {n: p.detach().clone() for n, p in client.emulator.named_parameters() if "layers.1." in n}
    global_before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    # Execute
    update = client.fit(sent)
    course.server.aggregate(update.state, [update])
    # Assert: the emulator is layers 0, 1, 3 (2 dropped); the update holds exactly layers 0 and 3, changed
    layers = decoder_layers(loaded.model)
    assert course.client_model.global_layers == (0, 1, 3) and len(decoder_layers(client.emulator)) == 3
    assert set(update.state) == set(sent) and {n.split(".")[1] for n in sent} == {"0", "3"}
    assert all(not torch.equal(update.state[n], sent[n]) for n in sent if n.endswith("q_proj.weight"))
    assert all(torch.equal(p, frozen[n]) for n, p in client.emulator.named_parameters() if n in frozen)
    assert {n.split(".")[2] for n in course.shipped_once if n.startswith("model.layers.")} == {"1"}
    # the plug-in: global layers 0 and 3 now hold the client's weights; every other weight is unchanged
    assert torch.equal(layers[3].self_attn.q_proj.weight, update.state["layers.3.self_attn.q_proj.weight"])
    for name, param in loaded.model.named_parameters():
        if not name.startswith(("model.layers.0.", "model.layers.3.")):
            assert torch.equal(param, global_before[name]), name


def test_flower_simulation_equals_the_inprocess_run(reference, tmp_path):
    # Prepare
    from fedsp.runtime.flower import simulation

    # Execute
    outcome = simulation.run(replace(TINY, out=str(tmp_path / "flower"), engine="flower", audit=True))
    # Assert: the same adapter (to 1e-6), accuracy of the plug-in and of the emulator, losses and bytes
    ours, theirs = _adapter(outcome.out_dir), _adapter(reference.out_dir)
    assert set(ours) == set(theirs)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0) for k in theirs)
    for key in ("final", "emulator", "comm", "client_model"):
        assert outcome.results[key] == reference.results[key], key
    assert [m["val_loss"] for m in _metrics(outcome.out_dir)] == pytest.approx(
        [m["val_loss"] for m in _metrics(reference.out_dir)], abs=1e-6
    )
    assert outcome.results["audit"]["passed"] and reference.results["audit"]["passed"]


def test_int8_messages_and_the_median_through_the_client_handlers_equal_the_inprocess_run(tmp_path):
    # Prepare: the emulator shipped as int8, int8 adapter changes with error feedback, median aggregation
    from fedsp.runtime.flower import server_app

    config = replace(TINY, wire_dtype="int8", aggregation="median", audit=True)
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    session = Session.start(replace(config, out=str(tmp_path / "handlers")))
    # Execute
    server_app.serve(LocalGrid(3, tmp_path), session, wait_s=5)
    summary = session.finish()
    # Assert: bit for bit, the same bytes (int8: about a quarter of float32's) and the audit passes
    ours, theirs = _adapter(session.out_dir), _adapter(here.out_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert summary["comm"] == here.results["comm"] and summary["emulator"] == here.results["emulator"]
    float32 = wire.num_bytes(session.course.server.broadcast())
    assert summary["comm"]["bytes_up_per_round"] < 0.3 * float32
    assert summary["protection"]["aggregation"] == "median" and summary["audit"]["passed"]


def test_dp_without_noise_plugs_in_the_clipped_mean_of_the_clients_adapters(tmp_path):
    # Prepare: client-level DP with noise 0: the aggregate is exactly the clipped uniform mean
    clip = 0.02
    config = replace(
        TINY,
        rounds=1,
        dp_noise_multiplier=0.0,
        dp_clip=clip,
        eval_every_round=False,
        out=str(tmp_path / "dp"),
    )
    _, _, course = _course(config)
    sent = course.server.broadcast()
    changes, norms = [], []
    for k in range(3):  # each client's round as the driver runs it (same rows, same seed)
        torch.manual_seed(client_rng_seed(config.seed, 1, k))
        state = course.make_client(k).fit({n: t.clone() for n, t in sent.items()}).state
        change = {n: state[n].double() - sent[n].double() for n in sent}
        norm = float(torch.sqrt(sum((c**2).sum() for c in change.values())))
        norms.append(norm)
        changes.append({n: c * min(1.0, clip / norm) for n, c in change.items()})
    # Execute
    outcome = inprocess.run(config)
    # Assert: the clip bound each client's change (each moved further than it)
    assert min(norms) > clip
    plugged = _adapter(outcome.out_dir)
    for name in sent:
        expected = sent[name].double() + sum(c[name] for c in changes) / 3
        assert torch.allclose(plugged[name].double(), expected, atol=1e-6), name
    assert outcome.results["privacy"]["noise_multiplier"] == 0.0


def test_the_audit_checks_the_dropped_layer_and_with_distillation_every_middle_layer(reference, tmp_path):
    # Prepare: what the reference run sent, held to the promise of a distilled emulator
    loaded = load_global_model("tiny-llama", seed=0)
    record = json.loads((reference.out_dir / "audit.json").read_text())
    strict = audit.private_weights(loaded.model, replace(TINY, ot_distill=True))
    # Execute: a distilled run, its kept middle layer distilled, so private too
    distilled = inprocess.run(replace(TINY, rounds=1, ot_distill=True, audit=True, out=str(tmp_path / "kd")))
    # Assert: layer 2 (dropped) was checked and never sent; layer 1 (kept) was sent once, as it is
    assert reference.results["audit"]["private_layers"] == [2] and record["passed"]
    caught = {strict[e["sha256"]].split(":")[0] for e in record["sent"] if e["sha256"] in strict}
    assert caught == {"layer 1"}
    assert {e["kind"] for e in record["sent"] if e["sha256"] in strict} == {"shipped_once"}
    assert distilled.results["audit"] == {
        **distilled.results["audit"],
        "passed": True,
        "violations": 0,
        "private_layers": [1, 2],
    }
    assert reference.results["audit"]["clients_hold"].startswith("partial: adapter layers [0, 3]")
    assert distilled.results["method_notes"]["emulator"]["distilled"] is True
    assert "distilled (not the global weights)" in distilled.results["client_model"]["privacy"]
    first = _metrics(distilled.out_dir)[0]
    assert first["kd_last_loss"] < first["kd_first_loss"]


def test_a_run_killed_in_round_2_resumes_to_the_identical_adapter(reference, interrupted_run, tmp_path):
    # Prepare: the reference's course, stopped as round 2 starts its clients
    folder = interrupted_run(replace(TINY, out=str(tmp_path / "killed"), audit=True), 2)
    # Execute
    code = main(["run", "--resume", str(folder), "--quiet"])
    # Assert: the clients' optimiser states and the server's adapter came back exactly
    ours, theirs = _adapter(folder), _adapter(reference.out_dir)
    assert code == 0 and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [m["round"] for m in _metrics(folder)] == [0, 1, 2]
    assert json.loads((folder / "results.json").read_text())["emulator"] == reference.results["emulator"]


def test_secure_aggregation_with_dp_gives_the_inprocess_adapter_within_the_quantisation_bound(tmp_path):
    from fedsp.runtime.flower import secagg, simulation

    config = replace(TINY, rounds=1, clients=3, dp_noise_multiplier=0.5, dp_clip=0.05, dp_noise_seed=3)
    # Execute
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    there = simulation.run(
        replace(config, out=str(tmp_path / "secure"), engine="flower", secure_aggregation=True)
    )
    # Assert: the same noisy clipped mean within SecAgg+'s error of the sum over n (and float32's 1e-6)
    bound = 2 * secagg.CLIPPING_RANGE / secagg.QUANTIZATION + 1e-6
    ours, theirs = _adapter(there.out_dir), _adapter(here.out_dir)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) < bound
    assert _metrics(there.out_dir)[1]["secure_aggregation"] is True
    assert there.results["privacy"]["epsilon"] == here.results["privacy"]["epsilon"]


def test_fedprompt_single_is_scored_on_its_one_layer_model_with_the_collapsed_prefix():
    # Prepare
    config = RunConfig(**{**TINY.to_dict(), "method": "fedprompt-single", "prefix_len": 4})
    loaded, _, course = _course(config)
    # Execute
    model, prefix = course.server.emulator_target()
    # Assert: the client's model (layer 0 alone) and the server's prefix as a client receives it
    assert len(decoder_layers(model)) == 1 and model is not loaded.model
    expected = collapse_layers(course.server.prefix.wire_state(), [0, 0, 0, 0])["table"]
    assert torch.equal(prefix.table.detach().cpu(), expected)


MODEL_PRIVATE = ["fedsp", "fedsp-no-kd", "fedsp-no-cs", "fedsp-no-at", "fedprompt-single", "offsite-tuning"]


@pytest.mark.parametrize("method", [*MODEL_PRIVATE, "fedprompt"])
def test_results_hold_the_emulator_accuracy_of_every_model_private_method(method, tmp_path, capsys):
    # Prepare
    out = tmp_path / method
    args = ["run", "--method", method, "--model", "tiny-llama", "--clients", "2", "--rounds", "1"]
    args += ["--local-steps", "1", "--eval-limit", "8", "--val-limit", "8", "--max-length", "96"]
    args += ["--out", str(out), "--quiet"]
    args += ["--ot-adapter-layers", "1"] if method == "offsite-tuning" else ["--kd-steps", "2"]
    args += [] if method == "offsite-tuning" else ["--prefix-len", "4"]
    # Execute
    code = main(args)
    # Assert: beside final, scored on the same examples; FedPrompt's clients hold the global model: none
    res = json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().out
    assert code == 0 and res["client_model"]["model_private"] == (method != "fedprompt")
    if method == "fedprompt":
        assert "emulator" not in res and "emulator (clients model)" not in printed
    else:
        assert res["emulator"]["n"] == res["final"]["n"] == 8 and 0 <= res["emulator"]["acc"] <= 1
        assert "emulator (clients model)" in printed
    assert METHOD_SPECS[method].federated


def test_lora_factors_travel_instead_of_the_layers_and_nodes_compute_what_in_process_clients_do(tmp_path):
    # Prepare: rank-2 LoRA on the adapter layers' linear maps; the base weights go once, with the emulator
    from fedsp.runtime.flower import server_app

    config = replace(TINY, ot_lora_rank=2, rounds=1, audit=True)
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    session = Session.start(replace(config, out=str(tmp_path / "handlers")))
    base = {n: p.detach().clone() for n, p in session.loaded.model.named_parameters() if "base_layer" in n}
    # Execute
    server_app.serve(LocalGrid(3, tmp_path), session, wait_s=5)
    summary = session.finish()
    # Assert: only factors cross each round (bit-equal on both engines); the global base weights unchanged
    ours, theirs = _adapter(session.out_dir), _adapter(here.out_dir)
    assert set(ours) == set(theirs) and all("lora_" in name for name in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ours.items() if "lora_B" in k)
    assert all(torch.equal(p, base[n]) for n, p in session.loaded.model.named_parameters() if n in base)
    assert any("base_layer" in name for name in session.course.shipped_once)
    lora_params = sum(t.numel() for t in ours.values())
    full = here.results["method_notes"]["emulator"]
    assert summary["comm"]["params_down_per_round"] == lora_params == full["adapter_params"] < 10_000
    assert summary["comm"] == here.results["comm"] and summary["audit"]["passed"]
    assert "LoRA factors of rank 2" in full["trained"]


def _eval_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_tuned_layers_are_written_under_the_models_own_names_and_fedsp_eval_reproduces_the_run(
    reference, tmp_path, capsys
):
    # Prepare
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = reference.out_dir
    exported = reference.results["export"]
    best = torch.load(out / CHECKPOINT, weights_only=False)["server"]["best_state"]
    # Assert: the best adapter layers (0 and 3), under the global model's parameter names
    assert exported["prefix"] is None and exported["layers"] == "adapter_layers.safetensors"
    weights = load_file(out / exported["layers"])
    assert {k.removeprefix("model.") for k in weights} == set(best)
    assert all(torch.equal(weights[k], best[k.removeprefix("model.")]) for k in weights)
    # ... which plain transformers puts into the saved base model with load_state_dict(strict=False)
    base = AutoModelForCausalLM.from_pretrained(exported["base_model"])
    built = load_global_model("tiny-llama", seed=0).model.state_dict()  # the base is the model as built
    assert all(torch.equal(v, built[k]) for k, v in base.state_dict().items())
    missing, unexpected = base.load_state_dict(weights, strict=False)
    assert unexpected == [] and all(torch.equal(base.state_dict()[k], v) for k, v in weights.items())
    # Execute + Assert: fedsp eval scores the run's own examples as the run's final block did
    assert main(["eval", str(out), "--quiet"]) == 0
    final = reference.results["final"]
    assert {k: v for k, v in _eval_line(capsys).items() if k in final} == final
    # Execute + Assert: export copies the file; a PEFT folder is refused, naming the format that works
    assert main(["export", str(out), "--format", "peft", "--out", str(tmp_path / "x")]) == 2
    assert "export them with --format safetensors" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "safetensors", "--out", str(tmp_path / "l.st")]) == 0
    assert (tmp_path / "l.st").read_bytes() == (out / exported["layers"]).read_bytes()


def test_lora_factors_are_written_as_a_peft_lora_adapter_that_peft_loads(tmp_path, capsys):
    # Prepare: a LoRA run
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsp.models.layer_export import load_peft_lora

    run = inprocess.run(replace(TINY, ot_lora_rank=2, rounds=1, out=str(tmp_path / "lora")))
    exported = run.results["export"]
    assert exported["prefix"] is None and exported["adapter"] == "adapter"
    # Execute: PEFT's own loader, and fedsp's
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(exported["base_model"]), str(run.out_dir / "adapter")
    ).eval()
    ours = AutoModelForCausalLM.from_pretrained(exported["base_model"]).eval()
    plain = ours(ids).logits
    load_peft_lora(run.out_dir / "adapter", ours)
    # Assert: the same tuned model either way, and not the base model (B is no longer zero)
    with torch.no_grad():
        theirs, mine = peft_model(ids).logits, ours(ids).logits
    assert torch.allclose(theirs, mine, atol=1e-6) and not torch.allclose(mine, plain, atol=1e-4)
    # Execute + Assert: fedsp eval reproduces the run's final block; export copies the adapter folder
    capsys.readouterr()
    assert main(["eval", str(run.out_dir), "--quiet"]) == 0
    final = run.results["final"]
    assert {k: v for k, v in _eval_line(capsys).items() if k in final} == final
    assert main(["export", str(run.out_dir), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "adapter_model.safetensors").read_bytes() == (
        run.out_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
