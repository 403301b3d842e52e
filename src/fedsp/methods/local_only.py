"""The local-only baseline: every data owner tunes a prefix of the global model on its own shard, alone.

No prefix is averaged and nothing crosses a wire: what a data owner would get
without the federation (and with the model, like FedPrompt's clients). Owner k
tunes on client shard k, from a prefix initialised from its own rows, T steps a
round (the prompt steps a FedPrompt client takes), keeps its prefix of lowest
validation loss (on the run's validation rows, the same for every owner), and
is scored on the evaluation examples. ``results.json`` gives every owner's
figures, their mean (``final``) and spread (``local_only``). Round curves
(``--eval-every-round``) follow owner 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

from transformers import PreTrainedModel

from fedsp.config import RunConfig
from fedsp.data.shards import RunData
from fedsp.methods.base import ClientUpdate, Course, mean_or_nan
from fedsp.methods.fedsp import FedSPServer, client_seed, prefix_server
from fedsp.models.loading import LoadedModel
from fedsp.models.prefix import Prefix


class LocalOnly:
    """K data owners, each a prefix-tuning party on its own shard; the round driver sees no clients."""

    def __init__(self, owners: Sequence[FedSPServer]) -> None:
        if not owners:
            raise ValueError("the local-only baseline needs at least one data owner")
        self.owners = list(owners)

    def broadcast(self) -> dict:
        return {}

    def aggregate(self, state: dict | None, updates: Sequence[ClientUpdate]) -> None:
        if updates or state:
            raise RuntimeError("local-only owners share nothing: there is nothing to aggregate")

    def tune(self) -> float:
        """T steps for every owner; their mean training loss."""
        return mean_or_nan([owner.tune() for owner in self.owners])

    def validation_loss(self, track: bool = True) -> float:
        """Every owner's validation loss (each keeps its own best prefix); their mean."""
        return mean_or_nan([owner.validation_loss(track) for owner in self.owners])

    def use_best(self) -> None:
        for owner in self.owners:
            owner.use_best()

    def evaluation_target(self) -> tuple[PreTrainedModel, Prefix | None]:
        return self.owners[0].evaluation_target()

    def evaluation_targets(self) -> list[tuple[PreTrainedModel, Prefix]]:
        return [(owner.global_model, owner.prefix) for owner in self.owners]

    def state_dict(self) -> dict[str, Any]:
        return {"owners": [owner.state_dict() for owner in self.owners]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for owner, saved in zip(self.owners, state["owners"], strict=True):
            owner.load_state_dict(saved)


def _no_clients(k: int) -> NoReturn:
    raise RuntimeError("local-only owners are not clients of a federation")


def local_only_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """One prefix-tuning owner per client shard, T steps a round each."""
    owners = [
        prefix_server(config, loaded, data, rows, config.local_steps, seed=client_seed(config, k))
        for k, rows in enumerate(data.client_rows)
    ]
    return Course(LocalOnly(owners), _no_clients, 0, None)
