"""FedSP on Flower: handlers with hand-built messages, failures, corrupt updates, equivalence, resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedsp import wire
from fedsp.cli import main
from fedsp.config import RunConfig
from fedsp.errors import FedSPError
from fedsp.methods.base import ClientUpdate
from fedsp.runtime import inprocess, participation, rounds
from fedsp.runtime.checkpoint import CHECKPOINT, ClientStore
from fedsp.runtime.session import Session

flwr_app = pytest.importorskip("flwr.app")
from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedsp.runtime.flower import client_app, payload, server_app  # noqa: E402

# float32, where the equivalence is stated to 1e-6 (test_bfloat16_engines_agree covers bfloat16)
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


def _prefix(out) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT, weights_only=False)["server"]["prefix"]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process run every Flower run is compared with (audit on)."""
    out = tmp_path_factory.mktemp("ref") / "inprocess"
    return inprocess.run(replace(TINY, out=str(out), audit=True))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a Flower runtime need a run and node id."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class LocalGrid:
    """A Grid whose nodes are the real ClientApp handlers, called here (node id = partition + 100)."""

    def __init__(self, num_clients: int, tmp_path, fail=lambda rnd, k: False):
        self.contexts = {
            k + 100: Context(
                run_id=1,
                node_id=k + 100,
                node_config={"partition-id": k, "state-dir": str(tmp_path / "state")},
                state=RecordDict(),
                run_config={},
            )
            for k in range(num_clients)
        }
        self.fail = fail

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            context = self.contexts[msg.metadata.dst_node_id]
            handler = client_app.query if msg.metadata.message_type == "query" else client_app.train
            try:
                if msg.metadata.message_type == "train":
                    rnd = int(msg.content[payload.META]["round"])
                    if self.fail(rnd, int(context.node_config["partition-id"])):
                        raise RuntimeError("client crashed")
                replies.append(handler(msg, context))
            except Exception as err:
                replies.append(Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg))
        return replies


def test_sampling_is_seeded_sorted_and_sized():
    # Execute
    first = participation.sample_clients(100, 0.1, seed=3, rnd=1)
    again = participation.sample_clients(100, 0.1, seed=3, rnd=1)
    other = participation.sample_clients(100, 0.1, seed=3, rnd=2)
    # Assert
    assert first == again == sorted(first) and len(first) == 10 and first != other
    assert participation.sample_clients(5, 1.0, 0, 1) == [0, 1, 2, 3, 4]
    assert participation.sample_clients(5, 0.01, 0, 1).__len__() == 1


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "dtype", "names", "norm"])
def test_each_corrupt_update_kind_is_rejected(kind):
    # Prepare: five honest updates near the sent prefix, the last one corrupted
    sent = {"table": torch.zeros(4, 8)}
    gen = torch.Generator().manual_seed(0)
    updates = [(k, ClientUpdate({"table": 0.01 * torch.randn(4, 8, generator=gen)}, 10)) for k in range(5)]
    bad = updates[4][1].state["table"].clone()
    corrupt = {
        "nan": {"table": bad.index_fill(0, torch.tensor([1]), float("nan"))},
        "inf": {"table": bad.index_fill(0, torch.tensor([2]), float("inf"))},
        "shape": {"table": torch.zeros(4, 9)},
        "dtype": {"table": bad.double()},
        "names": {"other": bad},
        "norm": {"table": bad + 100.0},
    }[kind]
    updates[4] = (4, ClientUpdate(corrupt, 10))
    # Execute
    accepted, rejected = participation.check_updates(sent, updates)
    # Assert
    assert [k for k, _ in accepted] == [0, 1, 2, 3]
    assert [r.partition for r in rejected] == [4] and rejected[0].reason


def test_client_handler_keeps_state_on_disk_and_reports_a_lost_state(reference, tmp_path):
    # Prepare: the course's shipped auxiliary model and an order for partition 1, as the server builds them
    session = Session.start(replace(TINY, out=str(tmp_path / "run")))
    orders = server_app.OrderMaker(session)
    prefix = payload.to_record(wire.encode(session.course.server.broadcast()))
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 1, "state-dir": str(tmp_path / "s")},
        state=RecordDict(),
        run_config={},
    )

    def order(rnd, expects, aux=False):
        content = RecordDict(
            {payload.PREFIX: prefix, payload.META: orders.order(rnd, 1, expects).to_record()}
        )
        if aux:
            content[payload.AUX] = payload.to_record(wire.encode(session.course.shipped_once))
        return Message(content, dst_node_id=5, message_type="train", group_id="t")

    # Execute
    never_shipped = client_app.train(order(1, False), context)
    first = client_app.train(order(1, False, aux=True), context)
    second = client_app.train(order(2, True), context)
    store = ClientStore(tmp_path / "s" / orders.run_key / "partition-1")
    rounds_on_disk = store.rounds()
    store.reset()
    lost = client_app.train(order(3, True), context)
    # Assert
    assert never_shipped.content[payload.META]["status"] == payload.NEED_AUX
    assert first.content[payload.META]["status"] == second.content[payload.META]["status"] == payload.OK
    update, size = payload.from_record(second.content[payload.UPDATE])
    assert set(update) == set(session.course.server.broadcast()) and size > 0
    assert rounds_on_disk == [1, 2] and store.has_aux()
    assert lost.content[payload.META]["status"] == payload.LOST_STATE


def test_bfloat16_engines_agree(tmp_path):
    # Prepare: the same course in bfloat16 (frozen weights bfloat16, float32 masters for what is trained)
    from fedsp.runtime.flower import simulation

    config = replace(TINY, dtype="bfloat16")
    # Execute
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    there = simulation.run(replace(config, out=str(tmp_path / "flower"), engine="flower"))
    # Assert: the rebuilt Flower clients compute exactly what the in-process ones do, and the run says
    # bfloat16
    ours, theirs = _prefix(there.out_dir), _prefix(here.out_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert there.results["final"] == here.results["final"]
    assert json.loads((here.out_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_flower_simulation_equals_the_inprocess_run(reference, tmp_path):
    # Prepare
    from fedsp.runtime.flower import simulation

    # Execute
    outcome = simulation.run(replace(TINY, out=str(tmp_path / "flower"), engine="flower", audit=True))
    # Assert: same prefix (to 1e-6), same accuracy, same per-round losses
    ours, theirs = _prefix(outcome.out_dir), _prefix(reference.out_dir)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0) for k in theirs)
    assert outcome.results["final"] == reference.results["final"]
    assert [m["val_loss"] for m in _metrics(outcome.out_dir)] == pytest.approx(
        [m["val_loss"] for m in _metrics(reference.out_dir)], abs=1e-6
    )
    assert (
        outcome.results["audit"]["passed"]
        and len(list((outcome.out_dir / "clients").glob("*/partition-*"))) == 3
    )


def test_thirty_percent_of_clients_failing_each_round_completes(tmp_path):
    # Prepare: 10 clients, 3 of them (a different three each round) crash
    config = replace(
        TINY,
        clients=10,
        out=str(tmp_path / "run"),
        min_replies=5,
        eval_every_round=False,
        zero_shot_eval=False,
    )
    session = Session.start(config)
    failing = {rnd: participation.sample_clients(10, 0.3, 99, rnd) for rnd in (1, 2)}
    grid = LocalGrid(10, tmp_path, fail=lambda rnd, k: k in failing[rnd])
    # Execute
    server_app.serve(grid, session, wait_s=5)
    summary = session.finish()
    # Assert
    rounds = _metrics(session.out_dir)[1:]
    assert [m["failed_clients"] for m in rounds] == [failing[1], failing[2]]
    assert [m["num_clients"] for m in rounds] == [7, 7] and summary["rounds"] == 2


def test_too_few_replies_stop_the_run_with_a_clear_message(tmp_path):
    # Prepare: every client crashes
    session = Session.start(replace(TINY, out=str(tmp_path / "run"), min_replies=2))
    grid = LocalGrid(3, tmp_path, fail=lambda rnd, k: True)
    # Execute / Assert
    with pytest.raises(
        FedSPError, match=r"round 1: only 0 usable client updates, fewer than --min-replies 2"
    ):
        server_app.serve(grid, session, wait_s=5)


def test_kill_and_resume_gives_the_identical_final_prefix(tmp_path, monkeypatch, reference):
    # Prepare: a run killed in the middle of round 2 (client 0 has already saved its round-2 state)
    config = replace(TINY, out=str(tmp_path / "killed"), audit=True)
    fit = rounds.client_round

    def killing_fit(order, *args, **kwargs):
        if order.rnd == 2 and order.partition == 1:
            raise KeyboardInterrupt
        return fit(order, *args, **kwargs)

    monkeypatch.setattr(rounds, "client_round", killing_fit)
    with pytest.raises(KeyboardInterrupt):
        inprocess.run(config)
    monkeypatch.setattr(rounds, "client_round", fit)
    # Execute
    code = main(["run", "--resume", str(tmp_path / "killed"), "--quiet"])
    # Assert
    ours, theirs = _prefix(tmp_path / "killed"), _prefix(reference.out_dir)
    assert code == 0 and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [m["round"] for m in _metrics(tmp_path / "killed")] == [0, 1, 2]


def test_resume_with_another_configuration_is_refused(reference, capsys):
    # Execute
    code = main(["run", "--resume", str(reference.out_dir), "--rounds", "5", "--quiet"])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "different configuration (rounds: 2 then, 5 now)" in err


def test_privacy_audit_passes_for_fedsp_and_fails_for_fedprompt(reference, tmp_path):
    # Execute
    fedprompt = inprocess.run(
        replace(TINY, method="fedprompt", rounds=1, out=str(tmp_path / "fp"), audit=True)
    )
    # Assert
    assert reference.results["audit"]["passed"] and reference.results["audit"]["private_weights_checked"] > 0
    audit = json.loads((fedprompt.out_dir / "audit.json").read_text())
    assert not audit["passed"] and audit["violations"] >= 1
    assert {v["equals"].split(":")[0] for v in audit["violation_list"]} == {"layer 1", "layer 2", "layer 3"}
