"""The centralised baselines: prefix-tuning and full fine-tuning on the union of all shards, no clients.

- prefix-tuning: FedSP's server (:class:`~fedsp.methods.fedsp.FedSPServer`)
  with no clients, tuning the prefix on every shard;
- server-only: FedSP's server alone on its own shard, the same steps a round as
  in FedSP (the control: what the model owner reaches without any data owner);
- fine-tuning (the paper's FINETUNE upper bound, :class:`FinetuneServer`):
  every weight of the global model trained, no prefix. The best weights (by
  validation loss) are kept in memory and restored for the final evaluation.
Budget of both: (K + 1) * T steps per round, the batches the whole federation
trains on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from transformers import PreTrainedModel

from fedsp.config import RunConfig
from fedsp.data.batching import BatchStream, Encoded, fixed_batches
from fedsp.data.shards import RunData
from fedsp.methods.base import BestKept, ClientUpdate, Course
from fedsp.methods.fedsp import prefix_server
from fedsp.methods.optim import OptimConfig, Phase, set_trainable
from fedsp.models.forward import answer_loss, mean_answer_loss
from fedsp.models.loading import LoadedModel
from fedsp.models.prefix import Prefix


class FinetuneServer:
    def __init__(
        self,
        model: PreTrainedModel,
        rows: Sequence[Encoded],
        val_rows: Sequence[Encoded],
        steps: int,
        batch_size: int,
        optim: OptimConfig,
        total_rounds: int,
        pad_id: int,
        seed: int,
        eval_batch_size: int = 128,
    ) -> None:
        self.model = model
        self.steps = steps
        self.phase = Phase(model.parameters(), optim, total_rounds * steps)
        self.stream = BatchStream(rows, batch_size, pad_id, seed)
        self.val_batches = fixed_batches(val_rows, eval_batch_size, pad_id)
        self.best = BestKept(self._copy, self.model.load_state_dict, from_start=False)

    def _copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def broadcast(self) -> dict[str, torch.Tensor]:
        return {}

    def aggregate(self, state: dict[str, torch.Tensor] | None, updates: Sequence[ClientUpdate]) -> None:
        if updates or state:
            raise RuntimeError("centralised fine-tuning has no clients")

    def tune(self) -> float:
        """``steps`` steps of full fine-tuning; mean training loss."""
        self.model.train()
        set_trainable(self.model, True)
        losses = [self.phase.step(answer_loss(self.model, next(self.stream))) for _ in range(self.steps)]
        set_trainable(self.model, False)
        self.model.eval()
        return sum(losses) / len(losses) if losses else float("nan")

    @torch.no_grad()
    def validation_loss(self, track: bool = True) -> float:
        self.model.eval()
        loss = mean_answer_loss(self.model, self.val_batches, None)
        if track:
            self.best.offer(loss)
        return loss

    def use_best(self) -> None:
        self.best.restore()

    def evaluation_target(self) -> tuple[PreTrainedModel, Prefix | None]:
        return self.model, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self._copy(),
            "phase": self.phase.state_dict(),
            "stream": self.stream.state_dict(),
            **self.best.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.phase.load_state_dict(state["phase"])
        self.stream.load_state_dict(state["stream"])
        self.best.load_state_dict(state)


def _all_rows(data: RunData) -> list[Encoded]:
    return data.server_rows + [row for shard in data.client_rows for row in shard]


def _budget(config: RunConfig, data: RunData) -> int:
    return (len(data.client_rows) + 1) * config.local_steps


def _no_clients(k: int) -> NoReturn:
    raise RuntimeError("a centralised method has no clients")


def prefix_tuning_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """Prefix-tuning of the frozen global model on all shards."""
    server = prefix_server(config, loaded, data, _all_rows(data), _budget(config, data))
    return Course(server, _no_clients, 0, None)


def server_only_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """The model owner alone: FedSP's server with its round-0 prefix, tuning its own shard the server
    steps a round that FedSP's server takes, and no clients (the control of every federated result)."""
    server = prefix_server(config, loaded, data, data.server_rows, config.effective_server_steps)
    return Course(server, _no_clients, 0, None)


def finetune_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """Full fine-tuning of the global model on all shards (learning rate: ``--align-lr``)."""
    optim = OptimConfig(
        config.align_lr, config.weight_decay, config.warmup_ratio, grad_clip=config.max_grad_norm
    )
    server = FinetuneServer(
        loaded.model,
        _all_rows(data),
        data.val_rows,
        _budget(config, data),
        config.batch_size,
        optim,
        config.rounds,
        loaded.tokenizer.pad_token_id,
        config.seed,
        config.eval_batch_size,
    )
    return Course(server, _no_clients, 0, None)
