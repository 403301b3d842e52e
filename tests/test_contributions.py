"""Did federating help? Each round's contributions, the server-only control, the server's shard size,
partitions that follow the seed, the emulator's fidelity, and paired intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedsp.cli import build_parser, main
from fedsp.config import RunConfig
from fedsp.data.shards import prepare_data
from fedsp.errors import FedSPError
from fedsp.experiments.compare import parse_settings, plan, reference_method
from fedsp.experiments.stats import paired_difference, seed_means
from fedsp.methods.builders import build_course
from fedsp.methods.fidelity import emulator_fidelity
from fedsp.methods.table import spec_for
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import initial_prefix
from fedsp.runtime import inprocess

TINY = dict(
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
)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fedsp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fedsp") / "run"
    return inprocess.run(RunConfig(**TINY, out=str(out)))


def test_each_round_records_what_the_clients_and_the_server_each_did(fedsp_run):
    # Prepare
    history = _metrics(fedsp_run.out_dir)
    # Assert: every round starts from the previous round's state (its recorded loss), and the two gains
    # add up to the round's whole change
    for before, now in zip(history, history[1:], strict=False):
        assert now["val_loss_sent"] == before["val_loss"]
        assert now["clients_gain"] == pytest.approx(now["val_loss_sent"] - now["val_loss_aggregate"])
        assert now["server_gain"] == pytest.approx(now["val_loss_aggregate"] - now["val_loss"])
    # Assert: results.json sums them and counts the rounds the clients' aggregate lowered the loss
    gains = fedsp_run.results["contributions"]
    rounds = history[1:]
    assert gains["rounds"] == 2
    assert gains["clients_gain_total"] == pytest.approx(sum(m["clients_gain"] for m in rounds))
    assert gains["server_gain_total"] == pytest.approx(sum(m["server_gain"] for m in rounds))
    assert gains["rounds_clients_lowered_loss"] == sum(1 for m in rounds if m["clients_gain"] > 0)


def test_zeroed_client_updates_contribute_exactly_nothing(tmp_path):
    # Prepare: every client's update multiplied by 0, so the aggregate is the broadcast prefix itself
    config = RunConfig(**TINY, out=str(tmp_path / "run"), attack="scale:0", attackers=(0, 1, 2))
    # Execute
    outcome = inprocess.run(config)
    # Assert: the clients' share is 0 in every round; all the change is the server's
    for m in _metrics(outcome.out_dir)[1:]:
        assert m["clients_gain"] == pytest.approx(0.0, abs=1e-6)
        assert m["server_gain"] == pytest.approx(m["val_loss_sent"] - m["val_loss"])
    assert outcome.results["contributions"]["rounds_clients_lowered_loss"] == 0


def test_the_aggregate_is_measured_but_never_kept_as_the_best_state(fedsp_run):
    # the best round is chosen among the round-end states only (the aggregate before the server's step is
    # a measurement), so the reported best round is the one with the lowest val_loss
    history = _metrics(fedsp_run.out_dir)
    assert fedsp_run.results["best_round"] == min(history, key=lambda m: m["val_loss"])["round"]


def test_round_line_and_summary_say_what_each_half_did(tmp_path, capsys):
    # Execute
    args = ["run", "--model", "tiny-llama", "--clients", "2", "--rounds", "1", "--local-steps", "1"]
    args += ["--kd-steps", "2", "--eval-limit", "8", "--val-limit", "8", "--prefix-len", "4"]
    args += ["--max-length", "96", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    out = capsys.readouterr().out
    record = _metrics(tmp_path / "run")[1]
    # Assert
    assert f"round 1: val_loss {record['val_loss']:.4f} (clients {record['clients_gain']:+.4f}, " in out
    assert "validation loss lowered by the clients' aggregate" in out and "emulator fidelity:" in out


def test_server_only_tunes_its_own_shard_with_fedsps_server_steps():
    # Prepare
    config = RunConfig(**{**TINY, "method": "server-only"})
    loaded = load_global_model(config.model, seed=0)
    data = prepare_data(config, loaded.tokenizer)
    # Execute
    course = build_course(config, loaded, data)
    # Assert: no clients; the server's steps and rows are FedSP's server's
    assert course.num_clients == 0 and course.client_model is None
    fedsp = RunConfig(**TINY)
    assert course.server.config.steps == fedsp.effective_server_steps == config.effective_server_steps == 4
    assert len(course.server.stream.rows) == len(data.server_rows)


def test_client_lr_sets_the_clients_prefix_rate_and_leaves_the_servers(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("FEDSP_CACHE_DIR", str(tmp_path))
    config = RunConfig(**TINY, client_lr=3e-3)
    loaded = load_global_model(config.model, seed=0)
    data = prepare_data(config, loaded.tokenizer)
    # Execute
    course = build_course(config, loaded, data)
    client = course.make_client(0)
    # Assert: the client's prefix optimiser runs at --client-lr, the server's own steps at --lr
    assert client.config.prompt.lr == 3e-3
    assert [g["initial_lr"] for g in client.prompt.optimizer.param_groups] == [3e-3]
    assert course.server.config.prompt.lr == config.lr == 1e-2
    # Assert: unset, the clients take --lr; a method with no FedSP-shaped clients reports it as ignored
    plain = build_course(RunConfig(**TINY), loaded, data).make_client(0)
    assert plain.config.prompt.lr == RunConfig().lr
    server_only = RunConfig(**{**TINY, "method": "server-only"}, client_lr=3e-3)
    assert spec_for("server-only").ignored_options(server_only)["client_lr"] == 3e-3
    assert "client_lr" not in spec_for("fedprompt").ignored_options(RunConfig(**TINY, client_lr=3e-3))
    with pytest.raises(FedSPError, match=r"client_lr|--client-lr"):
        RunConfig(**TINY, client_lr=0.0)


def test_server_rows_cuts_only_the_servers_shard():
    # Prepare
    loaded = load_global_model("tiny-llama", seed=0)
    whole = prepare_data(RunConfig(**TINY), loaded.tokenizer)
    # Execute
    cut = prepare_data(RunConfig(**TINY, server_rows=5), loaded.tokenizer)
    # Assert: 5 rows drawn from the whole server shard; the clients' shards untouched
    assert len(cut.server_rows) == 5 and cut.shards["server_rows"] == 5
    whole_ids = {tuple(r.ids) for r in whole.server_rows}
    assert all(tuple(r.ids) in whole_ids for r in cut.server_rows)
    assert [[r.ids for r in shard] for shard in cut.client_rows] == [
        [r.ids for r in shard] for shard in whole.client_rows
    ]
    # Assert: more rows than the shard holds, or none, is refused by name
    with pytest.raises(
        FedSPError, match=r"(--server-rows|server_rows) 100000 is more than the server's shard of \d+ rows"
    ):
        prepare_data(RunConfig(**TINY, server_rows=100_000), loaded.tokenizer)
    with pytest.raises(FedSPError, match=r"(--server-rows|server_rows) must be an integer in \[1, "):
        RunConfig(**TINY, server_rows=0)


def test_seeds_resample_the_partition_unless_a_data_seed_is_given():
    loaded = load_global_model("tiny-llama", seed=0)

    def server_ids(**options) -> list[tuple[int, ...]]:
        return [
            tuple(r.ids) for r in prepare_data(RunConfig(**TINY, **options), loaded.tokenizer).server_rows
        ]

    assert RunConfig(seed=3).partition_seed == 3 and RunConfig(seed=3, data_seed=7).partition_seed == 7
    assert server_ids(seed=0) != server_ids(seed=1)
    assert server_ids(seed=0, data_seed=5) == server_ids(seed=1, data_seed=5)
    assert server_ids(seed=5) == server_ids(seed=0, data_seed=5)


def test_emulator_fidelity_of_the_model_with_itself_is_perfect():
    # Prepare: the "auxiliary model" is the global model itself
    config = RunConfig(**TINY)
    loaded = load_global_model(config.model, seed=0)
    data = prepare_data(config, loaded.tokenizer)
    prefix = initial_prefix(loaded.model, loaded.tokenizer, data.server_rows, 4, False, 0.1, "tokens")
    from fedsp.data.batching import fixed_batches

    val = fixed_batches(data.val_rows, 8, loaded.tokenizer.pad_token_id)
    before = {k: v.clone() for k, v in prefix.state_dict().items()}
    # Execute
    fid = emulator_fidelity(loaded.model, loaded.model, prefix, data.server_rows, val, 4, 0)
    # Assert: the same gradients, the same losses; the prefix and its flags left as they were
    assert fid["measured"] and fid["batches"] == 4
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in fid["grad_cosine_per_batch"])
    assert fid["val_loss_aux"] == pytest.approx(fid["val_loss_global"])
    assert all(torch.equal(v, prefix.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in prefix.parameters())


def test_fedsp_reports_its_emulator_fidelity_and_one_layer_clients_say_why_not(fedsp_run, tmp_path):
    fid = fedsp_run.results["emulator_fidelity"]
    assert fid["measured"] and -1 <= fid["grad_cosine"] <= 1 and math.isfinite(fid["val_loss_aux"])
    assert fid["val_loss_global"] == _metrics(fedsp_run.out_dir)[0]["val_loss"]  # the round-0 prefix
    single = inprocess.run(
        RunConfig(**{**TINY, "rounds": 1, "method": "fedprompt-single"}, out=str(tmp_path / "single"))
    )
    assert not single.results["emulator_fidelity"]["measured"]
    assert "fewer layers" in single.results["emulator_fidelity"]["why"]


@pytest.mark.parametrize("method", ["fedsp", "fedprompt-single"])
def test_the_round_0_validation_runs_once_whether_or_not_fidelity_is_measured(tmp_path, monkeypatch, method):
    # Prepare: count the server's validations on the global model
    from fedsp.methods.fedsp import FedSPServer
    from fedsp.runtime.session import Session

    calls: list[bool] = []
    measure = FedSPServer.validation_loss

    def counted(self, track=True):
        calls.append(track)
        return measure(self, track)

    monkeypatch.setattr(FedSPServer, "validation_loss", counted)
    # Execute: everything before round 1
    session = Session.start(RunConfig(**{**TINY, "method": method}, out=str(tmp_path / "run")))
    session.release()
    # Assert: one validation, kept as the best state so far, and recorded as round 0
    assert calls == [True]
    assert session.history[0]["val_loss"] == session.course.server.best.loss


def test_questions_file_scores_each_evaluated_question(fedsp_run):
    saved = json.loads((fedsp_run.out_dir / "questions.json").read_text())
    assert len(saved["ids"]) == len(saved["final"]) == len(saved["zero_shot"]) == 8
    assert set(saved["final"]) <= {0.0, 1.0}
    assert sum(saved["final"]) / 8 == pytest.approx(fedsp_run.results["final"]["acc"])
    assert sum(saved["zero_shot"]) / 8 == pytest.approx(fedsp_run.results["zero_shot"]["acc"])


def test_paired_difference_matches_a_hand_computed_case():
    # Prepare: 200 questions; a is right on 120, b on 100; they differ on 40 (30 for a, 10 for b)
    a = [1.0] * 90 + [1.0] * 30 + [0.0] * 10 + [0.0] * 70
    b = [1.0] * 90 + [0.0] * 30 + [1.0] * 10 + [0.0] * 70
    # Execute
    diff = paired_difference(a, b)
    # Assert: the mean difference is 0.1; the interval is close to the normal one, mean +- 1.96 sd / sqrt(n)
    d = np.asarray(a) - np.asarray(b)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert diff.mean == pytest.approx(0.1) and diff.questions == 200
    assert diff.low == pytest.approx(0.1 - half, abs=0.012) and diff.high == pytest.approx(
        0.1 + half, abs=0.012
    )
    assert diff.excludes_zero and diff.percent().startswith("+10.0 [")
    # Assert: reproducible; the same lists give a degenerate interval at 0; swapped lists mirror it
    assert paired_difference(a, b) == diff
    same = paired_difference(a, a)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    mirror = paired_difference(b, a)
    assert mirror.mean == pytest.approx(-0.1) and mirror.high < 0
    with pytest.raises(FedSPError, match="one length"):
        paired_difference([1.0, 0.0], [1.0])


def test_seed_means_average_each_question_over_the_seeds():
    assert seed_means([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]) == [0.5, 0.0, 1.0]
    with pytest.raises(FedSPError, match="different numbers of questions"):
        seed_means([[1.0], [1.0, 0.0]])


def test_compare_set_gives_every_cell_the_option_and_refuses_bad_ones(tmp_path):
    argv = ["compare", "--model", "tiny-llama", "--methods", "server-only,fedsp", "--seeds", "0,1"]
    argv += ["--out", str(tmp_path), "--set", "server_rows=32", "--set", "val-limit=200"]
    grid, _ = plan(build_parser().parse_args(argv))
    configs = [c.config(grid.base, grid.out) for c in grid.cells]
    assert [c.method for c in configs] == ["server-only", "server-only", "fedsp", "fedsp"]
    assert all(c.server_rows == 32 and c.val_limit == 200 for c in configs)
    assert parse_settings(["dp_clip=5"]) == {"dp_clip": 5.0}
    with pytest.raises(FedSPError, match="unknown option 'nope'"):
        parse_settings(["nope=1"])
    with pytest.raises(FedSPError, match="expected KEY=VALUE"):
        parse_settings(["server_rows"])
    with pytest.raises(FedSPError, match="seed is the grid's own"):
        parse_settings(["seed=3"])
    assert reference_method(["zero-shot", "server-only", "fedsp"], None) == "server-only"
    assert reference_method(["zero-shot", "fedsp"], None) == "zero-shot"
    with pytest.raises(FedSPError, match="--reference fedprompt: not among --methods"):
        reference_method(["zero-shot", "fedsp"], "fedprompt")
