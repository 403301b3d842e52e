"""The round's aggregation on the server, the same for every engine: which updates count, with what
weight, and their aggregate by the aggregation rule or client-level DP, accounted.

:meth:`Aggregator.aggregate_train` is what the round driver
(:class:`fedsp.runtime.rounds.RoundDriver`) calls once a round, with the
round's replies (or, under secure aggregation, with their sum), in the manner
of a Flower strategy's ``aggregate_train``:
  - check: an update must carry the tensors sent, finite, with a positive
    example count, and (without DP) not be an outlier by norm
    (:func:`fedsp.runtime.participation.check_updates`); weights capped at
    ``--max-client-weight``; too few accepted updates end the run
    (``--min-replies``, or what a trimmed rule needs); none of this can be
    checked under secure aggregation, where the server sees only the sum;
  - combine:
  - without DP: ``--aggregation`` (:func:`fedsp.methods.aggregation.combine`);
  - with DP (``--dp-noise-multiplier Z`` / ``--dp-epsilon E``, ``--dp-clip C``):
    each update ``state_k - sent`` clipped to L2 norm C, the clipped updates
    summed, Gaussian noise of standard deviation Z * C added to the sum, the
    sum divided by the n updates (so the mean's noise is Z * C / n) and added
    to the broadcast: central DP at the level of a client's whole
    contribution. With ``--dp-clip-quantile`` the clip adapts each round
    towards that fraction of unclipped updates (Andrew et al. 2021): the
    unclipped count is noised too, and the update noise is raised so that
    both releases together cost what noise multiplier Z alone would
    (Flower's ``compute_adaptive_noise_params``).
  - noise is drawn from a generator seeded by (seed, round): both engines, and
    a resumed run, add the same noise.
Privacy is accounted by Flower's accountant (``flwr.serverapp.RdpAccountant``
over Google's ``dp-accounting``): one sampled Gaussian release per round, the
round's clients drawn without replacement from the K partitions (replace-one
neighbours), so epsilon at ``--dp-delta`` is known after every round; when
``--dp-epsilon`` is given with Z, a round that would exceed it is not started.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsp.config import MAX_NOISE_MULTIPLIER, RunConfig
from fedsp.errors import FedSPError
from fedsp.methods.aggregation import Tensors, clipped_sum, combine, delta, norm
from fedsp.methods.base import ClientUpdate
from fedsp.protection import clients_per_round, parse_rule
from fedsp.runtime import participation
from fedsp.runtime.participation import Rejection

if TYPE_CHECKING:  # Flower's accountant is imported when a run uses DP
    from flwr.serverapp import GaussianPrivacyEvent, RdpAccountant

log = logging.getLogger("fedsp.privacy")
# Replacing one client's update moves the clipped sum by up to 2 C (C each way): the accountant's noise
# multiplier (noise standard deviation over the sum's sensitivity, under replace-one neighbours) is Z / 2.
SENSITIVITY_IN_CLIPS = 2.0

NOISE_STREAM, COUNT_STREAM = 1, 2  # the two random streams a round draws from (update noise, count noise)


@dataclass(frozen=True)
class Summed:
    """What secure aggregation shows the server: the sum of the updates, how many, their total weight.

    With DP: the sum of the clients' clipped updates, ``weight`` unused; without: the sum of
    N_k * update_k and ``weight`` the sum of the N_k.
    """

    total: Tensors  # float64
    count: int
    weight: float
    bytes_down: int = 0  # what the secure round sent, all its stages (counted by the engine)
    bytes_up: int = 0


@dataclass(frozen=True)
class RoundAggregate:
    """What one round's aggregation decided."""

    state: Tensors | None  # the aggregate the server takes (None: no update counted)
    accepted: list[tuple[int, ClientUpdate]]  # (partition, update) of the updates that counted
    rejected: list[Rejection]
    capped: list[dict[str, int]]  # weights cut to --max-client-weight, as metrics.jsonl records them
    record: dict[str, Any]  # what metrics.jsonl records of the combine (update norms, or the DP figures)

    @property
    def updates(self) -> list[ClientUpdate]:
        return [update for _, update in self.accepted]


class Aggregator:
    """The round's aggregation: check, cap, the rule or DP mechanism, its adaptive clip and its privacy
    accountant (checkpointed)."""

    def __init__(self, config: RunConfig, num_clients: int) -> None:
        self.config, self.num_clients = config, num_clients
        self.rule = parse_rule(config.aggregation)
        self.per_round = clients_per_round(num_clients, config.fraction_fit) if num_clients else 0
        self.clip = config.dp_clip
        # the seed of the round's noise (and, under DP, of the sampling): secret unless --dp-noise-seed
        # is given, kept in the checkpoint only; a seed anyone can read lets them subtract the noise
        self.noise_seed = config.dp_noise_seed if config.dp_noise_seed is not None else secrets.randbits(62)
        self.accountant: RdpAccountant | None = None
        self.noise_multiplier = 0.0  # Z: what the accountant charges for
        self.update_noise = 0.0  # the multiplier the updates' sum gets (Z, or more with an adaptive clip)
        self.count_stddev = 0.0
        self.stopped_at: int | None = None  # the round that was not started because of the budget
        if not config.dp or num_clients == 0:
            return
        z = config.dp_noise_multiplier
        if z is None:
            assert config.dp_epsilon is not None
            z = noise_for_budget(
                config.dp_epsilon, config.dp_delta, config.rounds, self.per_round, num_clients
            )
        self.noise_multiplier = z
        self.update_noise = z
        if config.dp_clip_quantile is not None:
            from flwr.supercore.differential_privacy import compute_adaptive_noise_params

            try:
                self.count_stddev, self.update_noise = compute_adaptive_noise_params(z, self.per_round, None)
            except ValueError:
                raise FedSPError(
                    f"--dp-clip-quantile with noise multiplier {z:.3g} needs more than {10 * z:.0f} clients "
                    f"a round (the unclipped count is noised with standard deviation clients/20, which "
                    f"must exceed Z/2); this run has {self.per_round}; use a fixed --dp-clip"
                ) from None
        if z > 0:
            self.accountant = new_accountant(config.dp_delta, num_clients, config.dp_epsilon)

    @property
    def dp(self) -> bool:
        return self.config.dp and self.num_clients > 0

    @property
    def sampling_seed(self) -> int:
        """The seed the round's clients are drawn with: secret under DP (the accounting's amplification
        by sampling needs a sample no one can predict), the run's seed otherwise."""
        return self.noise_seed if self.dp else self.config.seed

    def event(self) -> GaussianPrivacyEvent:
        return gaussian_event(self.noise_multiplier, self.per_round, self.num_clients)

    def fits(self, rnd: int) -> bool:
        """Whether round ``rnd`` fits in ``--dp-epsilon`` (always, without a budget); said once if not."""
        budget = self.config.dp_epsilon
        if self.accountant is None or budget is None:
            return True
        if self.accountant.would_exceed(self.event(), budget):
            self.stopped_at = rnd
            return False
        return True

    def epsilon(self) -> float | None:
        """Epsilon at ``--dp-delta`` spent so far (None without DP; inf with DP but no noise)."""
        if not self.dp:
            return None
        if self.accountant is None:
            return math.inf
        if self.accountant.num_releases == 0:
            return 0.0
        return self.accountant.get_epsilon(self.config.dp_delta)

    def aggregate_train(
        self,
        rnd: int,
        sent: Tensors,
        sampled: Sequence[int],
        replies: Sequence[tuple[int, ClientUpdate]],
        failed: dict[int, str],
        summed: Summed | None = None,
    ) -> RoundAggregate:
        """Round ``rnd``'s aggregation from the clients' ``replies`` to ``sent`` (``failed``: partition ->
        why it gave none; ``summed``: under secure aggregation, the sum the server sees instead)."""
        accepted = list(replies)
        rejected: list[Rejection] = []
        capped: list[dict[str, int]] = []
        if summed is None:
            # under DP every update is clipped: none is too long, and dropping one by the others' norms
            # would make who counts depend on the other clients' data
            accepted, rejected = participation.check_updates(
                sent, replies, math.inf if self.config.dp else participation.NORM_FACTOR
            )
            accepted, capped = participation.cap_weights(accepted, self.config.max_client_weight)
        if sampled:
            why = [f"client {k}: {reason}" for k, reason in failed.items()] + [r.reason for r in rejected]
            needed = participation.required_replies(self.config.min_replies, len(sampled))
            if self.rule.trim and 2 * self.rule.trim + 1 > needed:  # it drops 2F values of each coordinate
                needed = 2 * self.rule.trim + 1
                what = f"--aggregation {self.rule} needs {needed}"
            else:
                what = f"--min-replies {needed}"
            participation.check_enough(len(accepted), needed, rnd, why, what)
        state: Tensors | None = None
        record: dict[str, Any] = {}
        if summed is not None:
            state, record = self.combine_sum(rnd, sent, summed.total, summed.count, summed.weight)
        elif accepted:
            state, record = self.combine(rnd, sent, [u for _, u in accepted])
        return RoundAggregate(state, accepted, rejected, capped, record)

    def combine(self, rnd: int, sent: Tensors, updates: Sequence[ClientUpdate]) -> tuple[Tensors, dict]:
        """The aggregate of the round's accepted ``updates``, and what metrics.jsonl records of it."""
        if not self.dp:
            state = combine(self.rule, sent, [(u.state, u.num_examples) for u in updates])
            return state, {"update_norms": [norm(delta(sent, u.state)) for u in updates]}
        assert self.clip is not None  # under DP no norm is written: it is a per-client value, un-noised
        total, norms = clipped_sum(sent, [u.state for u in updates], self.clip)
        return self._release(rnd, sent, total, len(updates), sum(1 for n in norms if n <= self.clip))

    def combine_sum(
        self, rnd: int, sent: Tensors, total: Tensors, count: int, weight: float
    ) -> tuple[Tensors, dict]:
        """The aggregate from the sum of the updates alone (secure aggregation).

        With DP ``total`` is the sum of the clients' clipped updates (clipped on the clients) and
        ``count`` their number; without, the sum of N_k * update_k and ``weight`` the sum of the N_k.
        """
        if self.dp:
            return self._release(rnd, sent, total, count, None)
        if not weight > 0:
            raise FedSPError(f"cannot aggregate: clients reported {weight} examples in total")
        return {k: (sent[k].double() + total[k] / weight).to(sent[k].dtype) for k in sent}, {}

    def _release(
        self, rnd: int, sent: Tensors, total: Tensors, count: int, unclipped: int | None
    ) -> tuple[Tensors, dict]:
        """Noise on the clipped sum, divided by the count, added to the broadcast; the clip adapted."""
        assert self.clip is not None
        if count == 0:
            raise FedSPError("cannot aggregate: no client returned an update this round")
        clip_used = self.clip
        std = self.update_noise * clip_used  # on the sum; the mean's is std / count
        generator = torch.Generator().manual_seed(round_seed(self.noise_seed, rnd, NOISE_STREAM))
        state = {}
        for name in sorted(sent):
            noise = torch.normal(0.0, 1.0, tuple(sent[name].shape), generator=generator, dtype=torch.float64)
            moved = (total[name] + std * noise) / count
            state[name] = (sent[name].double() + moved).to(sent[name].dtype)
        record: dict[str, Any] = {"dp_clip": clip_used, "dp_noise_std": std / count}
        if self.config.dp_clip_quantile is not None and unclipped is not None:
            rng = np.random.default_rng(round_seed(self.noise_seed, rnd, COUNT_STREAM))
            fraction = (
                float(rng.normal(unclipped, self.count_stddev)) / count
            )  # only this noised value is used
            self.clip = clip_used * math.exp(
                -self.config.dp_clip_lr * (fraction - self.config.dp_clip_quantile)
            )
            record["dp_unclipped_fraction_noised"] = fraction
        if self.accountant is not None:
            self.accountant.compose(self.event())
        record["epsilon"] = self.epsilon()
        return state, record

    def summary(self, rounds_done: int) -> dict[str, Any] | None:
        """The ``privacy`` block of results.json (None without DP)."""
        if not self.dp:
            return None
        config = self.config
        out: dict[str, Any] = {
            "epsilon": self.epsilon(),
            "delta": config.dp_delta,
            "noise_multiplier": self.noise_multiplier,
            "noise_multiplier_on_updates": self.update_noise,
            "clip": config.dp_clip,
            "adaptive_clip_quantile": config.dp_clip_quantile,
            "final_clip": self.clip,
            "rounds_accounted": rounds_done,
            "clients_per_round": self.per_round,
            "population": self.num_clients,
            "accountant": "Flower RdpAccountant (dp-accounting RDP), clients sampled without "
            "replacement, replace-one neighbours (sensitivity 2 C: accounted noise multiplier Z / 2)",
            "noise_seed": "given (--dp-noise-seed: public, no guarantee)"
            if config.dp_noise_seed is not None
            else "secret (in checkpoint.pt only)",
            "budget_epsilon": config.dp_epsilon,
            "protects": "each client's whole contribution (its updates in every round)",
        }
        if self.stopped_at is not None:
            out["stopped_before_round"] = self.stopped_at
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_seed": self.noise_seed,
            "clip": self.clip,
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise_seed = int(state.get("noise_seed", self.noise_seed))
        self.clip = state["clip"]
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])


def gaussian_event(noise_multiplier: float, per_round: int, population: int) -> GaussianPrivacyEvent:
    """One round's release for the accountant: noise Z * C on a sum whose sensitivity is 2 C."""
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier / SENSITIVITY_IN_CLIPS, per_round, population)


def new_accountant(delta: float, population: int, max_epsilon: float | None = None) -> RdpAccountant:
    """Flower's RDP accountant for client-level DP with clients sampled without replacement."""
    from flwr.serverapp import PrivacyConfig, RdpAccountant
    from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
            max_epsilon=max_epsilon,
        )
    )


def epsilon_after(
    noise_multiplier: float, rounds: int, per_round: int, population: int, delta: float
) -> float:
    """Epsilon at ``delta`` after ``rounds`` releases, from a fresh accountant."""
    accountant = new_accountant(delta, population)
    accountant.compose(gaussian_event(noise_multiplier, per_round, population), rounds)
    return accountant.get_epsilon(delta)


def noise_for_budget(epsilon: float, delta: float, rounds: int, per_round: int, population: int) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``rounds`` releases stay within ``epsilon``: a
    bisection over the accountant's own answers."""
    low, high = 1e-3, 1.0
    while epsilon_after(high, rounds, per_round, population, delta) > epsilon:
        if high >= MAX_NOISE_MULTIPLIER:
            raise FedSPError(
                f"--dp-epsilon {epsilon:g} cannot be met for {rounds} rounds with any noise multiplier up to "
                f"{MAX_NOISE_MULTIPLIER:g} (at that noise, epsilon is "
                f"{epsilon_after(MAX_NOISE_MULTIPLIER, rounds, per_round, population, delta):.3g})"
            )
        low, high = high, min(high * 2, MAX_NOISE_MULTIPLIER)
    while (high - low) > 1e-3 * high:
        middle = (low + high) / 2
        if epsilon_after(middle, rounds, per_round, population, delta) > epsilon:
            low = middle
        else:
            high = middle
    log.info("noise multiplier %.4f for epsilon %g at delta %g over %d rounds", high, epsilon, delta, rounds)
    return high


def round_seed(seed: int, rnd: int, stream: int) -> int:
    """A seed for one random stream of round ``rnd`` (the same in every engine and after a resume)."""
    return int(np.random.SeedSequence([seed, rnd, stream]).generate_state(1, np.uint64)[0] % (2**63))
