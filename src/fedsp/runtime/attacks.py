"""Simulated attacks for evaluating robust aggregation: what an attacking partition sends (``--attack``).

The client half of a round (:mod:`fedsp.runtime.clients`) trains as usual, then
a partition named in ``--attackers`` replaces its update ``delta = state - sent``:
  - ``sign-flip``: ``-delta`` (it pushes the prefix the other way);
  - ``scale:S``: ``S * delta``;
  - ``gaussian:SIGMA``: ``delta`` replaced by Gaussian noise of standard deviation
    SIGMA per value (drawn from the client's seeded RNG);
  - ``same-value[:V]``: every value of ``delta`` set to V (default 1.0).
The attack is part of the run's configuration (``config.json``, ``results.json``
``protection``, and ``attackers_sampled`` in each round of ``metrics.jsonl``).
"""

from __future__ import annotations

import torch

from fedsp.config import RunConfig
from fedsp.protection import GAUSSIAN, SAME_VALUE, SCALE, SIGN_FLIP, Attack, parse_attack

Tensors = dict[str, torch.Tensor]


def attack_for(config: RunConfig, partition: int) -> Attack | None:
    """The attack ``partition`` sends in this run (None: it is honest)."""
    if config.attack is None or partition not in config.attackers:
        return None
    return parse_attack(config.attack)


def attacked(
    attack: Attack, sent: Tensors, state: Tensors, generator: torch.Generator | None = None
) -> Tensors:
    """The state an attacker sends instead of ``state`` (its honest result), given the broadcast ``sent``."""
    out = {}
    for name, value in state.items():
        base = sent[name].double()
        honest = value.double() - base
        if attack.kind == SIGN_FLIP:
            moved = -honest
        elif attack.kind == SCALE:
            moved = attack.value * honest
        elif attack.kind == GAUSSIAN:
            noise = torch.randn(tuple(honest.shape), generator=generator, dtype=torch.float64)
            moved = attack.value * noise
        elif attack.kind == SAME_VALUE:
            moved = torch.full_like(honest, attack.value)
        else:
            raise ValueError(f"unknown attack {attack}")
        out[name] = (base + moved).to(value.dtype)
    return out
