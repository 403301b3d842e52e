"""Client-level DP, robust aggregation, attacks and secure aggregation: each does what it says."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.errors import FedSPError
from fedsp.methods.aggregation import combine
from fedsp.methods.base import ClientUpdate
from fedsp.protection import parse_attack, parse_rule
from fedsp.runtime import inprocess
from fedsp.runtime.attacks import attacked
from fedsp.runtime.checkpoint import CHECKPOINT
from fedsp.runtime.messages import OK, Order, Reply
from fedsp.runtime.privacy import Aggregator, epsilon_after, noise_for_budget
from fedsp.runtime.rounds import RoundDriver
from fedsp.runtime.session import Session

# server_steps 0: the server does not tune, so its prefix after a round is exactly the aggregate
TINY = RunConfig(
    model="tiny-llama",
    clients=3,
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


def _dp(**options) -> RunConfig:
    return RunConfig(**{"clients": 4, "dp_clip": 0.5, "dp_noise_multiplier": 0.0, **options})


def _sent(size: int = 6) -> dict[str, torch.Tensor]:
    return {"a": torch.linspace(-1, 1, size).reshape(2, size // 2), "b": torch.ones(3)}


def _moved(sent: dict[str, torch.Tensor], step: torch.Tensor, examples: int = 10) -> ClientUpdate:
    """An update whose distance from ``sent`` is the flat vector ``step``."""
    state = wire.unflatten(wire.flatten(sent) + step, sent)
    return ClientUpdate({k: v.float() for k, v in state.items()}, examples)


def _prefix(out) -> dict[str, torch.Tensor]:
    return torch.load(out / CHECKPOINT, weights_only=False)["server"]["prefix"]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- client-level DP -------------------------------------------------------------------------------


def test_clipping_bounds_every_clients_contribution():
    # Prepare: one update 10 C long, one zero update; no noise
    clip, sent = 0.5, _sent()
    size = wire.flatten(sent).numel()
    long = torch.zeros(size, dtype=torch.float64)
    long[0], long[3] = 3.0, 4.0  # norm 5 = 10 C
    aggregator = Aggregator(_dp(dp_clip=clip), num_clients=4)
    # Execute
    alone, _ = aggregator.combine(1, sent, [_moved(sent, long)])
    pair, _ = aggregator.combine(2, sent, [_moved(sent, long), _moved(sent, torch.zeros(size))])
    # Assert: alone it moves the aggregate by exactly C; beside a zero update by C / 2
    moved = (wire.flatten(alone) - wire.flatten(sent)).norm().item()
    assert moved == pytest.approx(clip, abs=1e-6)
    assert (wire.flatten(pair) - wire.flatten(sent)).norm().item() == pytest.approx(clip / 2, abs=1e-6)


def test_dp_without_noise_is_exactly_the_clipped_uniform_mean():
    # Prepare: three updates of different lengths and example counts (weights must not matter)
    clip, sent = 0.5, _sent()
    size = wire.flatten(sent).numel()
    steps = [torch.full((size,), v, dtype=torch.float64) for v in (0.01, 0.3, -2.0)]
    updates = [_moved(sent, s, examples) for s, examples in zip(steps, (1, 50, 900), strict=True)]
    aggregator = Aggregator(_dp(dp_clip=clip), num_clients=4)
    # Execute
    state, record = aggregator.combine(1, sent, updates)
    # Assert: sent + (sum of the clipped updates) / 3, computed here by hand
    deltas = [wire.flatten(u.state) - wire.flatten(sent) for u in updates]
    clipped = [d * min(1.0, clip / d.norm().item()) for d in deltas]
    expected = wire.unflatten(wire.flatten(sent) + (clipped[0] + clipped[1] + clipped[2]) / 3, sent)
    assert all(torch.equal(state[k], expected[k].float()) for k in sent)
    assert record["epsilon"] == math.inf  # no noise: no guarantee, and it says so


def test_noise_on_the_mean_has_standard_deviation_z_c_over_n():
    # Prepare: four clients that do not move, Z = 1.3, C = 0.7; 60 rounds of 2,006 values each
    z, clip, n = 1.3, 0.7, 4
    sent = {"a": torch.zeros(2000), "b": torch.zeros(6)}
    aggregator = Aggregator(_dp(dp_clip=clip, dp_noise_multiplier=z, rounds=60), num_clients=n)
    samples = []
    # Execute
    for rnd in range(1, 61):
        state, record = aggregator.combine(rnd, sent, [_moved(sent, torch.zeros(2006)) for _ in range(n)])
        samples.append(wire.flatten(state))
    values = torch.cat(samples)
    # Assert: the empirical standard deviation is Z C / n within 5 %, centred on the broadcast
    assert values.std().item() == pytest.approx(z * clip / n, rel=0.05)
    assert abs(values.mean().item()) < 0.01 * z * clip / n * 10
    assert record["dp_noise_std"] == pytest.approx(z * clip / n)


def test_the_noise_seed_is_secret_unless_given_and_survives_a_resume():
    sent, n = {"a": torch.zeros(50)}, 3
    updates = [_moved(sent, torch.zeros(50)) for _ in range(n)]
    # a given seed: the same noise (tests, reproduction); the run's public seed plays no part
    first = Aggregator(_dp(dp_noise_multiplier=1.0, dp_noise_seed=7, seed=1), num_clients=n)
    second = Aggregator(_dp(dp_noise_multiplier=1.0, dp_noise_seed=7, seed=2), num_clients=n)
    assert torch.equal(first.combine(3, sent, updates)[0]["a"], second.combine(3, sent, updates)[0]["a"])
    # no seed: each run draws a secret one, kept in the checkpoint's aggregator state
    secret = Aggregator(_dp(dp_noise_multiplier=1.0), num_clients=n)
    other = Aggregator(_dp(dp_noise_multiplier=1.0), num_clients=n)
    resumed = Aggregator(_dp(dp_noise_multiplier=1.0), num_clients=n)
    resumed.load_state_dict(secret.state_dict())
    noise = secret.combine(3, sent, updates)[0]["a"]
    assert torch.equal(noise, resumed.combine(3, sent, updates)[0]["a"])
    assert not torch.equal(noise, other.combine(3, sent, updates)[0]["a"])
    assert secret.sampling_seed == secret.noise_seed != secret.config.seed
    assert secret.summary(1)["noise_seed"].startswith("secret")


def test_accountant_epsilon_matches_dp_accounting_called_directly():
    # Prepare: 20 partitions, 5 a round, Z = 1.1, 4 rounds. Replacing one client moves the clipped sum by
    # up to 2 C, so dp-accounting's noise multiplier (noise over sensitivity) is Z / 2
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    config = _dp(clients=20, fraction_fit=0.25, dp_noise_multiplier=1.1, rounds=4)
    aggregator = Aggregator(config, num_clients=20)
    sent = {"a": torch.zeros(4)}
    # Execute
    for rnd in range(1, 5):
        aggregator.combine(rnd, sent, [_moved(sent, torch.zeros(4)) for _ in range(5)])
    direct = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_event.SampledWithoutReplacementDpEvent(20, 5, dp_event.GaussianDpEvent(0.55)), 4)
    everyone = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    everyone.compose(dp_event.GaussianDpEvent(0.55), 3)  # all clients every round: no amplification
    # Assert
    assert aggregator.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert aggregator.summary(4)["epsilon"] == aggregator.epsilon()
    assert epsilon_after(1.1, 3, 20, 20, 1e-5) == pytest.approx(everyone.get_epsilon(1e-5), rel=1e-9)


def test_a_budget_picks_the_smallest_noise_that_fits():
    z = noise_for_budget(8.0, 1e-5, rounds=3, per_round=10, population=10)
    assert epsilon_after(z, 3, 10, 10, 1e-5) <= 8.0
    assert epsilon_after(z * 0.99, 3, 10, 10, 1e-5) > 8.0
    aggregator = Aggregator(_dp(clients=10, dp_noise_multiplier=None, dp_epsilon=8.0, rounds=3), 10)
    assert aggregator.noise_multiplier == z


def test_adaptive_clip_grows_when_every_update_is_clipped_and_shrinks_when_none_is():
    # Prepare: 20 clients a round, Z = 0.5 (the count noise needs more than 10 Z clients)
    sent = {"a": torch.zeros(10)}
    config = _dp(clients=20, dp_noise_multiplier=0.5, dp_clip=1.0, dp_clip_quantile=0.5, rounds=3)
    growing, shrinking = Aggregator(config, 20), Aggregator(config, 20)
    # Execute: updates 100x the clip, then updates 1/100 of it
    growing.combine(1, sent, [_moved(sent, torch.full((10,), 100.0)) for _ in range(20)])
    shrinking.combine(1, sent, [_moved(sent, torch.full((10,), 0.001)) for _ in range(20)])
    # Assert: the geometric update of Andrew et al. (2021): exp(-lr (unclipped fraction - quantile))
    assert growing.clip is not None and shrinking.clip is not None
    assert growing.clip > 1.0 > shrinking.clip
    assert growing.clip == pytest.approx(math.exp(0.2 * 0.5), rel=0.05)
    # the update noise is raised so that both releases together cost noise multiplier Z
    assert growing.update_noise > growing.noise_multiplier == 0.5


def test_a_run_that_would_exceed_its_epsilon_stops_and_still_writes_results(tmp_path, capsys):
    # Prepare: Z = 1.5 for 4 clients, budget epsilon 8: one round fits (6.6), the second would not (10.0)
    dp = dict(dp_noise_multiplier=1.5, dp_clip=0.5, dp_epsilon=8.0)
    config = replace(TINY, clients=4, rounds=3, out=str(tmp_path / "r"), **dp)
    # Execute
    outcome = inprocess.run(config)
    # Assert
    metrics = _metrics(outcome.out_dir)
    privacy = outcome.results["privacy"]
    assert [m["round"] for m in metrics] == [0, 1] and outcome.results["rounds_completed"] == 1
    assert 0 < metrics[1]["epsilon"] <= 8.0 and privacy["epsilon"] == metrics[1]["epsilon"]
    assert privacy["stopped_before_round"] == 2 and privacy["noise_multiplier"] == 1.5
    assert "round 2 would spend more than --dp-epsilon 8" in capsys.readouterr().err


def test_dp_run_resumes_to_the_uninterrupted_prefix(tmp_path, interrupted_run):
    # Prepare: an adaptive clip and noise, both carried across the resume
    dp = dict(dp_noise_multiplier=0.1, dp_clip=0.05, dp_clip_quantile=0.5, dp_noise_seed=5)
    config = replace(TINY, rounds=3, **dp)
    whole = inprocess.run(replace(config, out=str(tmp_path / "whole")))
    # Execute
    folder = interrupted_run(replace(config, out=str(tmp_path / "cut")), 2)
    resumed = inprocess.run(replace(config, out=str(folder)), resume=folder)
    # Assert: the same prefix, clip and epsilon as the run that was never stopped
    ours, theirs = _prefix(resumed.out_dir), _prefix(whole.out_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert resumed.results["privacy"] == whole.results["privacy"]


def test_the_engines_agree_under_dp_with_the_same_seed(tmp_path):
    # Prepare: noise and an adaptive clip
    from fedsp.runtime.flower import simulation

    config = replace(TINY, dp_noise_multiplier=0.1, dp_clip=0.05, dp_clip_quantile=0.5, dp_noise_seed=5)
    # Execute
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    there = simulation.run(replace(config, out=str(tmp_path / "flower"), engine="flower"))
    # Assert: the same prefix (float32 engines agree to 1e-6), clip and epsilon after every round
    ours, theirs = _prefix(there.out_dir), _prefix(here.out_dir)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0) for k in theirs)
    keys = ("dp_clip", "epsilon", "dp_noise_std")
    assert [m[k] for m in _metrics(there.out_dir)[1:] for k in keys] == pytest.approx(
        [m[k] for m in _metrics(here.out_dir)[1:] for k in keys]
    )


# --- robust aggregation and attacks ------------------------------------------------------------------


def test_median_and_trimmed_mean_equal_hand_computed_values():
    sent = {"w": torch.zeros(2)}
    odd = [({"w": torch.tensor([1.0, 10.0])}, 1), ({"w": torch.tensor([2.0, -4.0])}, 1)]
    odd += [({"w": torch.tensor([100.0, 0.0])}, 1), ({"w": torch.tensor([3.0, 7.0])}, 1)]
    odd += [({"w": torch.tensor([-50.0, 5.0])}, 1000)]
    even = odd[:4]
    assert combine(parse_rule("median"), sent, odd)["w"].tolist() == [2.0, 5.0]
    assert combine(parse_rule("median"), sent, even)["w"].tolist() == [2.5, 3.5]  # middle two averaged
    # trimmed-mean:1 drops 100 and -50 (first value), 10 and -4 (second): means of the three left
    assert combine(parse_rule("trimmed-mean:1"), sent, odd)["w"].tolist() == pytest.approx([2.0, 4.0])
    assert combine(parse_rule("trimmed-mean:2"), sent, odd)["w"].tolist() == pytest.approx([2.0, 5.0])
    with pytest.raises(FedSPError, match="F must be below 2.5"):
        combine(parse_rule("trimmed-mean:3"), sent, odd)


def test_clipped_mean_clips_each_update_then_takes_the_weighted_mean():
    sent = {"w": torch.tensor([1.0, 1.0])}
    updates = [({"w": torch.tensor([4.0, 5.0])}, 3), ({"w": torch.tensor([1.0, 1.5])}, 1)]  # moves 5, 0.5
    out = combine(parse_rule("clipped-mean:1"), sent, updates)["w"]
    # (3/4) * (0.6, 0.8) + (1/4) * (0, 0.5) from the broadcast
    assert out.tolist() == pytest.approx([1.0 + 0.45, 1.0 + 0.6 + 0.125])


def test_each_attack_transforms_an_update_as_stated():
    sent = {"w": torch.tensor([1.0, 2.0, 3.0])}
    honest = {"w": torch.tensor([2.0, 2.0, 1.0])}  # moves (1, 0, -2)
    assert attacked(parse_attack("sign-flip"), sent, honest)["w"].tolist() == [0.0, 2.0, 5.0]
    assert attacked(parse_attack("scale:3"), sent, honest)["w"].tolist() == [4.0, 2.0, -3.0]
    assert attacked(parse_attack("same-value"), sent, honest)["w"].tolist() == [2.0, 3.0, 4.0]
    assert attacked(parse_attack("same-value:-0.5"), sent, honest)["w"].tolist() == [0.5, 1.5, 2.5]
    big = {"w": torch.zeros(20000)}
    noise = attacked(
        parse_attack("gaussian:0.5"), big, {"w": torch.ones(20000)}, torch.Generator().manual_seed(0)
    )
    assert noise["w"].std().item() == pytest.approx(0.5, rel=0.03) and abs(noise["w"].mean().item()) < 0.02


class _Engine:
    """Honest clients move the prefix by +0.1; attackers are made by the client half (real attack code)."""

    def __init__(self, attack: str, attackers: tuple[int, ...]):
        self.attack, self.attackers = parse_attack(attack), attackers

    def exchange(self, orders, prefix):
        sent = wire.decode(prefix)
        replies = []
        for order in orders:
            state = {k: v + 0.1 for k, v in sent.items()}
            if order.partition in self.attackers:
                state = attacked(self.attack, sent, state)
            replies.append(Reply(order.partition, OK, wire.encode(state), 10))
        return replies


@pytest.mark.parametrize("rule,moves", [("mean", -0.088), ("median", 0.1), ("trimmed-mean:1", 0.1)])
def test_median_and_trimmed_mean_resist_a_scaled_attacker_that_moves_the_mean(tmp_path, rule, moves):
    # Prepare: 5 clients, one sends -8.4 times its update (the outlier-norm rule lets it through: 8.4 < 10)
    config = replace(TINY, clients=5, rounds=1, aggregation=rule, out=str(tmp_path / rule))
    session = Session.start(config)
    before = session.course.server.broadcast()
    # Execute
    RoundDriver(session, _Engine("scale:-8.4", (2,))).play(1)
    after = session.course.server.broadcast()
    session.release()
    # Assert: the mean moves by (4 * 0.1 - 0.84) / 5 (backwards); median and trimmed mean by the honest 0.1
    assert all(
        torch.allclose(after[k] - before[k], torch.full_like(before[k], moves), atol=1e-6) for k in before
    )


def test_trimmed_mean_needs_2f_plus_1_updates_and_says_so(tmp_path):
    # Prepare: 5 clients, trimmed-mean:1; 3 of them crash in round 1
    class Crashing(_Engine):
        def exchange(self, orders, prefix):
            replies = super().exchange(orders, prefix)
            return [r if r.partition < 2 else Reply.failed(r.partition, "crashed") for r in replies]

    config = replace(TINY, clients=5, rounds=1, aggregation="trimmed-mean:1", out=str(tmp_path / "r"))
    session = Session.start(config)
    # Execute / Assert: one line, before the rule meets too few values
    with pytest.raises(FedSPError, match="fewer than aggregation trimmed-mean:1 needs 3"):
        RoundDriver(session, Crashing("sign-flip", ())).play(1)
    session.release()


def test_an_attacked_run_says_so_in_metrics_and_results(tmp_path):
    config = replace(TINY, attack="sign-flip", attackers=(1,), aggregation="median", out=str(tmp_path / "r"))
    outcome = inprocess.run(config)
    metrics = _metrics(outcome.out_dir)
    assert all(m["attack"] == "sign-flip" and m["attackers_sampled"] == [1] for m in metrics[1:])
    assert outcome.results["protection"] == {
        "aggregation": "median",
        "secure_aggregation": False,
        "attack": "sign-flip",
        "attackers": [1],
    }


def test_the_attack_is_sent_but_the_attacker_keeps_its_honest_state(tmp_path):
    # Prepare: the client half of a round, as both engines run it
    from fedsp.runtime.checkpoint import ClientStore
    from fedsp.runtime.clients import client_round

    class Client:
        def fit(self, state):
            return ClientUpdate({k: v + 1.0 for k, v in state.items()}, 5)

        def state_dict(self):
            return {"kept": 1}

        def load_state_dict(self, state):
            pass

    prefix = wire.encode({"w": torch.zeros(3)})
    store = ClientStore(tmp_path / "partition-0")
    # Execute
    reply = client_round(Order(1, 0, True, False), prefix, store, Client, 0, attack=parse_attack("scale:-2"))
    # Assert
    assert wire.decode(reply.payload)["w"].tolist() == [-2.0, -2.0, -2.0]
    assert store.load_before(2)[1] == {"kept": 1}


# --- secure aggregation (Flower's SecAgg+) -------------------------------------------------------------


def test_secure_aggregation_equals_plain_aggregation_within_the_quantisation_bound(tmp_path):
    # Prepare: one round, no server tuning: the prefix is the aggregate; then the same under DP
    from fedsp.runtime.flower import secagg, simulation

    config = replace(TINY, rounds=1, engine="flower")
    # Execute
    plain = simulation.run(replace(config, out=str(tmp_path / "plain")))
    secure = simulation.run(replace(config, out=str(tmp_path / "secure"), secure_aggregation=True))
    # Assert: each coordinate within n * 2 * range / levels of the sum, over the total weight
    # (the sum of N_k / 1024 is above 1 here: about 560 examples a client)
    n = config.clients
    bound = n * 2 * secagg.CLIPPING_RANGE / secagg.QUANTIZATION
    ours, theirs = _prefix(secure.out_dir), _prefix(plain.out_dir)
    error = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert 0 < error < bound, (error, bound)
    record = _metrics(secure.out_dir)[1]
    assert record["secure_aggregation"] is True and record["num_clients"] == n and record["bytes_up"] > 0
    assert secure.results["protection"]["secure_aggregation"] is True


def test_secure_aggregation_with_dp_adds_the_same_noise_after_unmasking(tmp_path):
    from fedsp.runtime.flower import secagg, simulation

    config = replace(TINY, rounds=1, dp_noise_multiplier=0.5, dp_clip=0.05, dp_noise_seed=3)
    # Execute
    here = inprocess.run(replace(config, out=str(tmp_path / "inprocess")))
    there = simulation.run(
        replace(config, out=str(tmp_path / "secure"), engine="flower", secure_aggregation=True)
    )
    # Assert: the noisy clipped mean of the in-process run, within SecAgg+'s error of the sum over n plus
    # the two engines' float32 difference (1e-6)
    bound = 2 * secagg.CLIPPING_RANGE / secagg.QUANTIZATION + 1e-6
    ours, theirs = _prefix(there.out_dir), _prefix(here.out_dir)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) < bound
    assert there.results["privacy"]["epsilon"] == here.results["privacy"]["epsilon"]


def test_a_secure_contribution_hides_the_update_and_count_in_one_vector():
    from fedsp.runtime.flower import secagg

    sent = {"w": torch.zeros(3)}
    reply = Reply(0, OK, wire.encode({"w": torch.tensor([0.5, -1.0, 2.0])}), 512, {"prompt_loss": 1.5})
    vector, metrics = secagg.contribution(TINY, sent, reply)
    assert vector.tolist() == [0.25, -0.5, 1.0, 0.5, 1.0]  # a * update, a = 512 / 1024, then a and 1
    assert metrics == {"status": OK, "partition": 0, "prompt_loss": 1.5}
    dp = replace(TINY, dp_noise_multiplier=1.0, dp_clip=1.0)
    clipped, _ = secagg.contribution(dp, sent, reply)
    assert clipped[:3].norm().item() == pytest.approx(1.0) and clipped[3:].tolist() == [1.0, 1.0]
    huge = Reply(0, OK, wire.encode({"w": torch.tensor([0.0, 0.0, 99.0])}), 1024)
    with pytest.raises(FedSPError, match="beyond SecAgg"):
        secagg.contribution(TINY, sent, huge)
