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
from fedsp.methods.base import ClientUpdate, Request
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


CONTRIBUTIONS = ("val_loss_sent", "val_loss_aggregate", "clients_gain", "server_gain")


def _contributions(out) -> list[float]:
    """Every round's four contribution fields, in order (each round must have all four)."""
    rounds = [m for m in _metrics(out) if m["round"] > 0]
    assert rounds and all(set(CONTRIBUTIONS) <= set(m) for m in rounds)
    return [float(m[key]) for m in rounds for key in CONTRIBUTIONS]


def test_fedprompt_through_the_flower_handlers_records_the_same_contributions(tmp_path):
    # Prepare: FedPrompt as the authors ran it (its server trains), in one process and over the
    # ClientApp's handlers on a local grid
    config = replace(TINY, method="fedprompt")
    # Execute
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    session = Session.start(replace(config, out=str(tmp_path / "handlers")))
    server_app.serve(LocalGrid(3, tmp_path), session, wait_s=30)
    there = session.finish()
    # Assert: each round's four figures agree, and they add up: sent - aggregate - server step = val_loss
    assert _contributions(session.out_dir) == pytest.approx(_contributions(here.out_dir), abs=1e-6)
    for m in _metrics(here.out_dir)[1:]:
        assert m["val_loss_sent"] - m["clients_gain"] - m["server_gain"] == pytest.approx(m["val_loss"])
    assert there["server_steps"] == 4 and there["contributions"] == pytest.approx(
        here.results["contributions"]
    )


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


def _node(node_id: int, partition: int, state_dir) -> Context:
    """The context a SuperNode gives its ClientApp: its partition and state folder."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition, "state-dir": str(state_dir)},
        state=RecordDict(),
        run_config={},
    )


class LocalGrid:
    """A Grid whose nodes are the real ClientApp handlers, called here (node id = partition + 100);
    ``tamper(k, reply)`` may change a node's reply on its way back."""

    HANDLERS = {"query": client_app.query, "train": client_app.train, "train.split": client_app.split}

    def __init__(self, num_clients: int, tmp_path, fail=lambda rnd, k: False, tamper=lambda k, reply: reply):
        self.contexts = {k + 100: _node(k + 100, k, tmp_path / "state") for k in range(num_clients)}
        self.fail, self.tamper = fail, tamper
        self.sent: list[str] = []  # message types, in order

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            context = self.contexts[msg.metadata.dst_node_id]
            k = int(context.node_config["partition-id"])
            handler = self.HANDLERS[msg.metadata.message_type]
            self.sent.append(msg.metadata.message_type)
            try:
                if msg.metadata.message_type == "train":
                    rnd = int(msg.content[payload.META]["round"])
                    if self.fail(rnd, k):
                        raise RuntimeError("client crashed")
                reply = self.tamper(k, handler(msg, context))
                if reply is not None:  # None: the node missed the deadline (no reply at all)
                    replies.append(reply)
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
    context = _node(5, 1, tmp_path / "s")

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


def test_int8_messages_through_the_client_handlers_equal_the_inprocess_run(tmp_path):
    # Prepare: int8 messages with error feedback (each node keeps its residual in its state folder)
    config = replace(TINY, wire_dtype="int8", rounds=3)
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    session = Session.start(replace(config, out=str(tmp_path / "handlers")))
    # Execute
    server_app.serve(LocalGrid(3, tmp_path), session, wait_s=5)
    summary = session.finish()
    # Assert: the same prefix, bit for bit, and the same bytes: what crossed the wire was int8
    ours, theirs = _prefix(session.out_dir), _prefix(here.out_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert summary["comm"] == here.results["comm"]
    float32_bytes = len(wire.encode(session.course.server.broadcast()))
    assert summary["comm"]["bytes_up_per_round"] < 0.3 * float32_bytes  # per client


def test_a_low_rank_client_model_rebuilt_on_a_node_equals_the_inprocess_run(tmp_path):
    # Prepare: the client model's embedding as rank-8 factors; a node builds the structure from the global
    # architecture and loads the shipped factors into it
    config = replace(TINY, aux_embedding="lowrank:8")
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    session = Session.start(replace(config, out=str(tmp_path / "handlers")))
    # Execute
    server_app.serve(LocalGrid(3, tmp_path), session, wait_s=5)
    summary = session.finish()
    # Assert: the same prefix, bit for bit, and the smaller model was what was shipped
    ours, theirs = _prefix(session.out_dir), _prefix(here.out_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert summary["comm"] == here.results["comm"]
    assert any(name.endswith("embed_tokens.down") for name in session.course.shipped_once)


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
    assert _contributions(outcome.out_dir) == pytest.approx(_contributions(reference.out_dir), abs=1e-6)
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
    with pytest.raises(FedSPError, match=r"round 1: only 0 usable client updates, fewer than min_replies 2"):
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


# -- SFPrompt: split training as Flower messages

SPLIT = replace(TINY, method="sfprompt", local_steps=2, local_loss_steps=1, split_layer=2, audit=True)


def _split_state(out) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT, weights_only=False)["server"]["state"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sfprompt_on_flower_equals_sfprompt_in_process(dtype, tmp_path):
    # Prepare
    from fedsp.runtime.flower import simulation

    config = replace(SPLIT, dtype=dtype)
    # Execute: the same run in one process and with split steps as messages: float32 as a Flower
    # simulation, bfloat16 through the ClientApp's handlers on a local grid (the same messages and
    # handlers without Ray's start-up: bfloat16 matmuls are slow on most CPUs)
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    if dtype == "float32":
        there = simulation.run(replace(config, out=str(tmp_path / "flower"), engine="flower"))
        there_dir, there_results = there.out_dir, there.results
    else:
        session = Session.start(replace(config, out=str(tmp_path / "handlers")))
        server_app.serve(LocalGrid(3, tmp_path), session, wait_s=30)
        there_dir, there_results = session.out_dir, session.finish()
    # Assert: the same prompts and tail (to 1e-6), accuracy, losses and split traffic; audit passed
    ours, theirs = _split_state(there_dir), _split_state(here.out_dir)
    assert set(ours) == {"prompts", "tail.norm.weight"}
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0) for k in theirs)
    assert there_results["final"] == here.results["final"]
    assert [m["val_loss"] for m in _metrics(there_dir)] == pytest.approx(
        [m["val_loss"] for m in _metrics(here.out_dir)], abs=1e-6
    )
    assert _contributions(there_dir) == pytest.approx(_contributions(here.out_dir), abs=1e-6)
    comm = there_results["comm"]
    assert comm == here.results["comm"] and comm["split_bytes_total"] > 0
    assert there_results["audit"]["passed"] and here.results["audit"]["passed"]


def test_sfprompt_client_failing_in_the_middle_of_split_steps_is_dropped_from_the_round(
    tmp_path, monkeypatch, caplog
):
    # Prepare: client 1 crashes on the server's third split message of round 1 (its second step's outputs)
    monkeypatch.setenv(
        "FEDSP_FAULTS", json.dumps([{"client": 1, "round": 1, "kind": "fail-split", "value": 3}])
    )
    session = Session.start(replace(SPLIT, out=str(tmp_path / "run"), audit=False))
    grid = LocalGrid(3, tmp_path)
    # Execute
    with caplog.at_level("WARNING", logger="fedsp.rounds"):
        server_app.serve(grid, session, wait_s=5)
    summary = session.finish()
    # Assert: round 1 went on with clients 0 and 2; client 1 was back in round 2; the body holds nothing
    rounds_ = _metrics(session.out_dir)[1:]
    assert [m["failed_clients"] for m in rounds_] == [[1], []]
    assert [m["num_clients"] for m in rounds_] == [2, 3] and summary["rounds"] == 2
    assert session.course.server.body.pending == {}
    assert "injected failure of client 1 at split message 3 of round 1" in caplog.text
    assert "train.split" in grid.sent


def test_sfprompt_activations_of_the_wrong_shape_are_rejected_with_a_logged_reason(tmp_path, caplog):
    # Prepare: client 0's first split message loses its last hidden unit on the way to the server
    def tamper(k, reply):
        meta = reply.content[payload.META]
        if k != 0 or meta.get("status") != "step" or meta["step"] != "activations":
            return reply
        tensors, _ = payload.from_record(reply.content[payload.UPDATE])
        tensors["activations"] = tensors["activations"][..., :-1]
        reply.content[payload.UPDATE] = payload.to_record(wire.encode(tensors))
        return reply

    session = Session.start(replace(SPLIT, rounds=1, out=str(tmp_path / "run"), audit=False))
    # Execute
    with caplog.at_level("WARNING", logger="fedsp.rounds"):
        server_app.serve(LocalGrid(3, tmp_path, tamper=tamper), session, wait_s=5)
    # Assert: client 0 is out of the round, with the step and the problem named; the others count
    last = _metrics(session.out_dir)[-1]
    assert last["failed_clients"] == [0] and last["num_clients"] == 2
    assert "client 0 failed in round 1: split message 1 (activations): activations of shape (" in caplog.text
    assert ", 63) and dtype torch.float32, expected (" in caplog.text
    assert session.course.server.body.pending == {}


def test_sfprompt_node_missing_a_split_steps_deadline_is_left_out_of_the_round(tmp_path, caplog):
    # Prepare: node 2 never answers the body's outputs of its first split step in round 1
    def late(k, reply):
        meta = reply.content[payload.META]
        late_step = k == 2 and meta.get("status") == "step" and meta.get("step") == "grad_outputs"
        return None if late_step and grid.sent.count("train") <= 3 else reply  # round 1 only

    grid = LocalGrid(3, tmp_path, tamper=late)
    session = Session.start(replace(SPLIT, out=str(tmp_path / "run"), audit=False))
    # Execute
    with caplog.at_level("WARNING", logger="fedsp.rounds"):
        server_app.serve(grid, session, wait_s=5)
    # Assert: round 1 without client 2, with the step named; round 2 with everyone
    rounds_ = _metrics(session.out_dir)[1:]
    assert [m["failed_clients"] for m in rounds_] == [[2], []]
    assert (
        "client 2 failed in round 1: no reply to split message outputs within --client-timeout" in caplog.text
    )
    assert session.course.server.body.pending == {}


def test_sfprompt_server_refuses_messages_of_the_wrong_kind_dtype_or_order(tiny, toy_examples):
    # Prepare: a course and one client's first activations message
    from fedsp.data.batching import encode_gold
    from fedsp.data.shards import RunData
    from fedsp.methods.base import Request
    from fedsp.methods.sfprompt import sfprompt_course

    rows = [encode_gold(tiny.tokenizer, ex, 64) for ex in toy_examples(24)]
    data = RunData(rows[:4], [rows[4:12], rows[12:20]], rows[20:], toy_examples(2), "validation")
    course = sfprompt_course(replace(SPLIT, prefix_init="random"), tiny, data)
    server, client = course.server, course.make_client(0)
    first = client.fit(server.broadcast())
    acts = first.tensors
    # Execute / Assert
    with pytest.raises(FedSPError, match="grad_outputs came before this round's activations"):
        server.respond(0, Request("grad_outputs", {"grad_outputs": torch.zeros(3, 64)}))
    with pytest.raises(FedSPError, match=r"activations of shape .* and dtype torch.bfloat16, expected"):
        server.respond(0, Request("activations", {**acts, "activations": acts["activations"].bfloat16()}))
    with pytest.raises(FedSPError, match="wanted of shape"):
        server.respond(0, Request("activations", {**acts, "wanted": acts["wanted"][:, 1:]}))
    with pytest.raises(FedSPError, match="unknown split step 'weights'"):
        server.respond(0, Request("weights", acts))
    with pytest.raises(FedSPError, match="the message has no 'attention_mask' tensor"):
        server.respond(0, Request("activations", {k: v for k, v in acts.items() if k != "attention_mask"}))
    wide = acts["activations"].new_zeros(1, SPLIT.prefix_len + SPLIT.max_length + 1, 64)
    with pytest.raises(FedSPError, match=r"the run allows at most .* rows \(batch_size\) of 100 positions"):
        server.respond(0, Request("activations", {**acts, "activations": wide}))
    outputs = server.respond(0, Request("activations", acts))
    with pytest.raises(FedSPError, match="grad_outputs holds NaN or Inf"):
        server.respond(
            0, Request("grad_outputs", {"grad_outputs": outputs.tensors["outputs"] * float("nan")})
        )
    with pytest.raises(FedSPError, match="expected 'outputs'"):  # the client checks the order too
        client.answer(Request("grad_inputs", {"grad_inputs": acts["activations"]}))


def test_sfprompt_handlers_with_hand_built_messages_return_what_the_in_process_client_computes(tmp_path):
    # Prepare: a session; its round-1 order for partition 1, shipped with the client's head and tail
    from fedsp.runtime.clients import client_round, client_turn
    from fedsp.runtime.messages import Order, Turn

    session = Session.start(replace(SPLIT, out=str(tmp_path / "run"), audit=False))
    course, orders = session.course, server_app.OrderMaker(session)
    broadcast = wire.encode(course.server.broadcast())
    context = _node(5, 1, tmp_path / "s")
    content = RecordDict(
        {payload.PREFIX: payload.to_record(broadcast), payload.META: orders.order(1, 1, False).to_record()}
    )
    content[payload.AUX] = payload.to_record(wire.encode(course.shipped_once))
    store = ClientStore(tmp_path / "inprocess")

    def build():
        return course.make_client(1)

    def turn_message(step, data):
        meta = orders.order(1, 1, True, step).to_record()
        body = RecordDict({payload.PREFIX: payload.to_record(data), payload.META: meta})
        return Message(body, dst_node_id=5, message_type="train.split", group_id="t")

    # Execute: the node's handlers and the in-process client half, message for message, through round 1
    node = payload.parse_reply(
        1,
        client_app.train(
            Message(content, dst_node_id=5, message_type="train", group_id="t"), context
        ).content,
    )
    here = client_round(Order(1, 1, ship=True, expects_state=False), broadcast, store, build, SPLIT.seed)
    steps = []
    while node.status == payload.STEP:
        steps.append(node.step)
        assert here.status == payload.STEP and here.step == node.step and here.payload == node.payload
        answer = course.server.respond(1, Request(node.step, wire.decode(node.payload)))
        data = wire.encode(answer.tensors)
        node = payload.parse_reply(1, client_app.split(turn_message(answer.step, data), context).content)
        here = client_turn(Turn(1, 1, answer.step, data), store, build, SPLIT.seed)
    # Assert: two split steps of two messages each, then the same update from both
    assert steps == ["activations", "grad_outputs"] * 2
    assert node.status == here.status == payload.OK and node.payload == here.payload
    assert node.metrics == here.metrics and node.num_examples == here.num_examples
    # Assert: a split message with no round in progress is a failure, not a crash
    late = client_app.split(turn_message("outputs", data), context)
    assert payload.parse_reply(1, late.content).reason == "it has no round 1 in progress to continue"


def test_sfprompt_against_nodes_without_split_learning_names_the_node_and_the_problem(tmp_path):
    # Prepare: nodes whose ClientApp knows no train.split (an older fedsp): Flower's own error for it
    class OldNodes(LocalGrid):
        HANDLERS = {**LocalGrid.HANDLERS, "train.split": _no_split_handler}

    session = Session.start(replace(SPLIT, rounds=1, out=str(tmp_path / "run"), audit=False))
    # Execute / Assert: the round stops with one line naming each client, its node and what it lacks
    with pytest.raises(FedSPError) as err:
        server_app.serve(OldNodes(3, tmp_path), session, wait_s=5)
    text = str(err.value)
    assert "\n" not in text and text.startswith("round 1: only 0 usable client updates")
    assert "client 0: after split message outputs: node 100 runs a fedsp without split learning" in text


def _no_split_handler(msg, context):
    raise ValueError("No train function registered with name 'split'")


# -- a SuperNode's warm worker


def test_warm_worker_does_a_nodes_job_as_the_handler_would_and_stops_when_asked(tmp_path):
    # Prepare: a round-1 order with the client model for partition 1, as the server builds it
    from fedsp.runtime.flower import worker

    session = Session.start(replace(TINY, out=str(tmp_path / "run")))
    orders = server_app.OrderMaker(session)
    prefix = wire.encode(session.course.server.broadcast())
    aux = wire.encode(session.course.shipped_once)
    meta = dict(orders.order(1, 1, False).to_record())

    def job(folder, **settings):
        node = {"partition-id": 1, "state-dir": str(tmp_path / folder), **settings}
        return client_app.Job("train", meta, node, prefix, aux)

    warm = job("warm", **{worker.SETTING: 30})
    try:
        # Execute: the same job here and through the node's worker (started by the first call)
        here = client_app.work(job("here"))
        there = worker.ask(warm)
        again = worker.ask(replace(warm, meta={**meta, "round": 2, "expects-state": True}, aux=None))
    finally:
        pid = worker.stop(warm.node_config)
    # Assert: the same update, byte for byte; the worker kept the node's state on its disk; it is gone
    assert there is not None and there.reply.payload == here.reply.payload and there.reply.status == "ok"
    assert again is not None and again.reply.status == "ok"
    assert ClientStore(tmp_path / "warm" / orders.run_key / "partition-1").rounds() == [1, 2]
    assert pid is not None and not worker.address(warm.node_config).exists()
    assert worker.ask(job("cold")) is None  # a node without the setting keeps no worker
    with pytest.raises(FedSPError, match="node setting worker-idle-seconds='soon': expected seconds >= 0"):
        worker.ask(job("bad", **{worker.SETTING: "soon"}))
