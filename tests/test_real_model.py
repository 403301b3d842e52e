"""A few tests on the real SmolLM2-135M-Instruct and real ARC-Easy rows (marked slow)."""

from __future__ import annotations

import pytest
import torch

from fedsp.config import RunConfig
from fedsp.data.shards import prepare_data
from fedsp.data.tasks import load_task
from fedsp.evaluation.multiple_choice import evaluate_multiple_choice
from fedsp.models.auxiliary import build_auxiliary_model, unique_parameter_count
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import initial_prefix

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_global_model("smollm2")


def test_smollm2_is_the_real_model(smol):
    # Assert: architecture facts, and it knows a capital
    config = smol.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    assert unique_parameter_count(smol.model) == pytest.approx(134.5e6, rel=0.01)
    ids = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smol.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in smol.tokenizer.decode(out[0, ids.shape[1] :])


def test_client_model_and_prefix_sizes(smol):
    aux = build_auxiliary_model(smol.model, [0])
    # offline-assets.md: 31.9 M unique parameters (23.7%); a 40-token prefix over 30 layers is 460,800
    assert unique_parameter_count(aux) == pytest.approx(31.9e6, rel=0.01)
    prefix = initial_prefix(
        smol.model, smol.tokenizer, prepare_data(RunConfig(), smol.tokenizer).server_rows, 40
    )
    assert sum(p.numel() for p in prefix.parameters()) == 40 * 30 * 2 * 192 == 460_800


def test_zero_shot_and_initial_prefix_on_real_arc_rows(smol):
    # Prepare: the first 40 ARC-Easy test questions
    config = RunConfig(eval_limit=40)
    data = prepare_data(config, smol.tokenizer)
    assert data.eval_examples == load_task("arc_easy", "test")[:40]
    # Execute
    zero = evaluate_multiple_choice(smol.model, smol.tokenizer, data.eval_examples, progress=False)
    prefix = initial_prefix(smol.model, smol.tokenizer, data.server_rows, config.prefix_len)
    primed = evaluate_multiple_choice(smol.model, smol.tokenizer, data.eval_examples, prefix, progress=False)
    # Assert: well above chance (25%), and the round-0 prefix does not wreck the model
    assert zero.acc > 0.35
    assert primed.acc >= zero.acc - 0.1


def test_a_runs_peft_adapter_scores_arc_easy_as_fedsp_does(smol, tmp_path):
    # Prepare: a short real run (FedPrompt, one client, one step) and its adapter loaded by PEFT alone
    import json

    from peft import PeftModel

    from fedsp.cli import main
    from fedsp.data.batching import encode_pair

    out = tmp_path / "run"
    args = [
        "--method",
        "fedprompt",
        "--clients",
        "1",
        "--rounds",
        "1",
        "--local-steps",
        "1",
        "--kd-steps",
        "0",
    ]
    args += ["--eval-limit", "20", "--val-limit", "8", "--zero-shot-eval", "false", "--prefix-len", "10"]
    assert main(["run", *args, "--batch-size", "4", "--max-length", "128", "--out", str(out), "--quiet"]) == 0
    final = json.loads((out / "results.json").read_text())["final"]
    peft_model = PeftModel.from_pretrained(load_global_model("smollm2").model, str(out / "adapter")).eval()
    # Execute: lm-eval's scoring, every context + choice sequence in full through PEFT's forward
    correct = 0
    for ex in load_task("arc_easy", "test")[:20]:
        scores = []
        for choice in ex.choices:
            row = encode_pair(smol.tokenizer, ex.context, " " + choice, 10**9)
            ids = torch.tensor([row.ids])
            with torch.no_grad():
                logprobs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.log_softmax(
                    -1
                )
            answer = ids[0, -row.num_answer :]
            picked = logprobs[0, -row.num_answer - 1 : -1].gather(-1, answer.unsqueeze(-1))
            scores.append(float(picked.sum()))
        correct += ex.choices[max(range(len(scores)), key=scores.__getitem__)] == ex.choices[ex.gold]
    # Assert: the same accuracy on the same questions
    assert final["n"] == 20
    assert correct / 20 == final["acc"]
