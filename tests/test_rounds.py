"""The one round driver, driven by a fake engine: what it aggregates, records, re-ships and refuses."""

from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
import torch

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.errors import FedSPError
from fedsp.runtime import inprocess
from fedsp.runtime.messages import LOST_STATE, OK, Order, Reply
from fedsp.runtime.rounds import InProcessEngine, RoundDriver
from fedsp.runtime.session import Session

# server_steps 0: the server does not tune, so its prefix after a round is exactly the aggregate
TINY = RunConfig(
    model="tiny-llama",
    clients=4,
    rounds=2,
    local_steps=1,
    server_steps=0,
    kd_steps=0,
    eval_limit=4,
    val_limit=4,
    prefix_len=4,
    max_length=96,
    progress=False,
    zero_shot_eval=False,
    eval_every_round=False,
    dtype="float32",
)


class FakeEngine:
    """Hand-built replies: ``script[(round, partition)]`` maps the broadcast tensors to a reply."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def exchange(self, orders, prefix):
        self.calls.append(list(orders))
        sent = wire.decode(prefix)
        return [
            self.script[(o.rnd, o.partition)](o, sent) for o in orders if (o.rnd, o.partition) in self.script
        ]


def _update(shift: float, examples: int):
    def reply(order: Order, sent: dict[str, torch.Tensor]) -> Reply:
        state = {name: t + shift for name, t in sent.items()}
        return Reply(order.partition, OK, wire.encode(state), examples, {"prompt_loss": shift})

    return reply


def _corrupt(order: Order, sent: dict[str, torch.Tensor]) -> Reply:
    state = {name: torch.full_like(t, float("nan")) for name, t in sent.items()}
    return Reply(order.partition, OK, wire.encode(state), 10)


def _crash(order: Order, sent: dict[str, torch.Tensor]) -> Reply:
    return Reply.failed(order.partition, "RuntimeError: client crashed")


def test_driver_aggregates_the_accepted_updates_and_records_the_others(tmp_path, read_metrics):
    # Prepare: four clients; 0 and 1 honest (10 and 30 examples), 2 fails, 3 sends NaN
    session = Session.start(replace(TINY, out=str(tmp_path / "run")))
    sent = session.course.server.broadcast()
    engine = FakeEngine(
        {(1, 0): _update(0.01, 10), (1, 1): _update(0.03, 30), (1, 2): _crash, (1, 3): _corrupt}
    )
    # Execute
    record = RoundDriver(session, engine).play(1)
    # Assert: the example-weighted mean of the two accepted updates, 0.01 * 10/40 + 0.03 * 30/40 = 0.025
    got = session.course.server.broadcast()
    assert all(torch.allclose(got[k], sent[k] + 0.025, atol=1e-6, rtol=0) for k in sent)
    assert [o.partition for o in engine.calls[0]] == [0, 1, 2, 3] and all(o.ship for o in engine.calls[0])
    assert record["sampled_clients"] == [0, 1, 2, 3] and record["failed_clients"] == [2]
    assert record["num_clients"] == 2 and record["client_losses"] == [0.01, 0.03]
    assert record["rejected_updates"] == 1 and record["rejections"][0]["client"] == 3
    assert "NaN" in record["rejections"][0]["reason"]
    down = len(wire.encode(sent))
    assert record["bytes_down"] == 4 * down and record["bytes_up"] == 2 * len(wire.encode(sent))
    assert read_metrics(session.out_dir)[-1]["round"] == 1
    assert session.runtime_state == {"shipped": [0, 1, 3], "trained": [0, 1, 3]}


def test_driver_ships_the_client_model_again_once_to_a_client_that_lost_its_state(tmp_path):
    # Prepare: round 1 all fine; in round 2 client 0 says it lost its state, then trains on the new model
    session = Session.start(replace(TINY, clients=2, out=str(tmp_path / "run"), audit=True))
    lost = {"first": True}

    def forgetful(order, sent):
        if not order.ship and lost.pop("first", False):
            return Reply(order.partition, LOST_STATE)
        return _update(0.02, 10)(order, sent)

    engine = FakeEngine(
        {(1, 0): _update(0.02, 10), (1, 1): _update(0.02, 10), (2, 0): forgetful, (2, 1): _update(0.02, 10)}
    )
    driver = RoundDriver(session, engine)
    # Execute
    driver.play(1)
    record = driver.play(2)
    # Assert: round 2 asked both (no shipping), then shipped to client 0 alone; both updates count
    assert [(o.partition, o.ship, o.expects_state) for o in engine.calls[1]] == [
        (0, False, True),
        (1, False, True),
    ]
    assert [(o.partition, o.ship, o.expects_state) for o in engine.calls[2]] == [(0, True, False)]
    assert record["num_clients"] == 2 and record["failed_clients"] == []
    shipped = {(e["round"], tuple(e["to"])) for e in session.audit.sent if e["kind"] == "shipped_once"}
    assert shipped == {(1, (0, 1)), (2, (0,))}


def test_driver_stops_when_fewer_updates_than_min_replies_are_accepted(tmp_path):
    # Prepare: of two clients, one crashes and one sends NaN
    session = Session.start(replace(TINY, clients=2, min_replies=1, out=str(tmp_path / "run")))
    engine = FakeEngine({(1, 0): _crash, (1, 1): _corrupt})
    # Execute / Assert: the error names the round and each client's reason
    with pytest.raises(FedSPError, match=r"round 1: only 0 usable client updates.*client 0: RuntimeError"):
        RoundDriver(session, engine).play(1)


def test_a_client_that_does_not_answer_is_left_out(tmp_path):
    # Prepare: client 1 never replies
    session = Session.start(replace(TINY, clients=2, out=str(tmp_path / "run")))
    engine = FakeEngine({(1, 0): _update(0.01, 10)})
    # Execute
    record = RoundDriver(session, engine).play(1)
    # Assert
    assert record["failed_clients"] == [1] and record["num_clients"] == 1


def test_inprocess_engine_keeps_one_client_at_a_time_and_its_state_on_disk(tmp_path, monkeypatch):
    # Prepare: count the clients alive while each one trains
    config = replace(TINY, clients=3, out=str(tmp_path / "run"))
    session = Session.start(config)
    engine = InProcessEngine(session)
    built, alive, refs = [], [], []
    make = session.course.make_client

    def counted(k):
        client = make(k)
        built.append(k)
        refs.append(weakref.ref(client))
        fit = client.fit

        def fit_and_count(state):
            alive.append(sum(1 for ref in refs if ref() is not None))  # this engine's clients still alive
            return fit(state)

        client.fit = fit_and_count
        return client

    monkeypatch.setattr(session.course, "make_client", counted)
    driver = RoundDriver(session, engine)
    # Execute
    driver.run()
    # Assert: built afresh every round, never more than one alive, each state on disk (last two rounds)
    assert built == [0, 1, 2, 0, 1, 2] and max(alive) == 1
    assert [engine.store(k).rounds() for k in range(3)] == [[1, 2]] * 3


def test_finished_inprocess_run_removes_the_client_states(tmp_path):
    outcome = inprocess.run(replace(TINY, clients=2, rounds=1, out=str(tmp_path / "run")))
    assert outcome.results["rounds"] == 1 and not (outcome.out_dir / "clients").exists()
