"""FedSP: the client's alternating update and the server's aggregate-then-tune update.

Plain objects with no runtime code: the in-process runner calls them in a
loop, a Flower app can call the same methods from its handlers.

Client round (method notes, "A round", step 2):
  1. load the received prefix into the auxiliary model;
  2. global-model alignment: T steps on the auxiliary model, prefix frozen;
  3. local knowledge capturing: T steps on the prefix, auxiliary model frozen;
  4. return the prefix and the number of local examples.
Server round (step 4): weighted average of the prefixes (N_k / N), T steps of
prefix tuning on the frozen global model with its own shard, validation loss,
keep the best prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from fedsp.data.batching import BatchStream, Encoded, fixed_batches
from fedsp.methods.aggregation import weighted_average
from fedsp.methods.optim import OptimConfig, Phase, set_trainable
from fedsp.models.forward import answer_loss
from fedsp.models.prefix import Prefix, PrefixConfig


@dataclass(frozen=True)
class LocalConfig:
    """Local training of one party per round."""

    steps: int  # T: steps per phase per round
    batch_size: int
    align: OptimConfig  # auxiliary-model phase (clients)
    prompt: OptimConfig  # prefix phase (clients and server)


@dataclass(frozen=True)
class ClientUpdate:
    prefix: dict[str, torch.Tensor]
    num_examples: int
    align_loss: float
    prompt_loss: float


class FedSPClient:
    """A data owner: auxiliary model + prefix + private rows; stateful across rounds."""

    def __init__(
        self,
        aux_model: PreTrainedModel,
        prefix_config: PrefixConfig,
        rows: Sequence[Encoded],
        config: LocalConfig,
        total_rounds: int,
        pad_id: int,
        seed: int,
    ) -> None:
        self.aux_model = aux_model
        self.prefix = Prefix(prefix_config)
        self.rows = list(rows)
        self.config = config
        total = total_rounds * config.steps
        self.align = Phase(aux_model.parameters(), config.align, total)
        # Like the reference code, clients never update a reparametrisation MLP: only its input.
        prompt_params = (
            [self.prefix.embedding] if prefix_config.projection else list(self.prefix.parameters())
        )
        self.prompt = Phase(prompt_params, config.prompt, total)
        self.stream = BatchStream(self.rows, config.batch_size, pad_id, seed)

    def fit(self, prefix_state: dict[str, torch.Tensor]) -> ClientUpdate:
        self.prefix.load_wire_state(prefix_state)
        self.aux_model.train()
        self.prefix.train()
        # 1) global-model alignment: auxiliary model trained, prefix frozen
        set_trainable(self.prefix, False)
        set_trainable(self.aux_model, True)
        align_losses = [self.align.step(answer_loss(self.aux_model, next(self.stream), self.prefix))
                        for _ in range(self.config.steps)]  # fmt: skip
        # 2) local knowledge capturing: prefix trained, auxiliary model frozen
        set_trainable(self.aux_model, False)
        for p in self.prompt.params:
            p.requires_grad_(True)
        prompt_losses = [self.prompt.step(answer_loss(self.aux_model, next(self.stream), self.prefix))
                         for _ in range(self.config.steps)]  # fmt: skip
        set_trainable(self.prefix, False)
        self.aux_model.eval()
        return ClientUpdate(
            self.prefix.wire_state(), len(self.rows), _mean(align_losses), _mean(prompt_losses)
        )


class FedSPServer:
    """The model owner: frozen global model + prefix + its own shard and the validation rows."""

    def __init__(
        self,
        global_model: PreTrainedModel,
        prefix: Prefix,
        rows: Sequence[Encoded],
        val_rows: Sequence[Encoded],
        config: LocalConfig,
        total_rounds: int,
        pad_id: int,
        seed: int,
        eval_batch_size: int = 32,
    ) -> None:
        self.global_model = global_model
        self.prefix = prefix
        self.config = config
        self.phase = Phase(prefix.parameters(), config.prompt, total_rounds * config.steps)
        self.stream = BatchStream(rows, config.batch_size, pad_id, seed) if rows else None
        self.val_batches = fixed_batches(val_rows, eval_batch_size, pad_id)
        self.best_val_loss = float("inf")
        self.best_state = prefix.wire_state()

    def broadcast(self) -> dict[str, torch.Tensor]:
        """The prefix sent to clients this round."""
        return self.prefix.wire_state()

    def aggregate(self, updates: Sequence[ClientUpdate]) -> None:
        self.prefix.load_wire_state(weighted_average([(u.prefix, u.num_examples) for u in updates]))

    def tune(self) -> float:
        """T steps of prefix tuning on the frozen global model; mean training loss (nan without a shard)."""
        if self.stream is None or self.config.steps == 0:
            return float("nan")
        self.prefix.train()
        set_trainable(self.prefix, True)
        losses = [self.phase.step(answer_loss(self.global_model, next(self.stream), self.prefix))
                  for _ in range(self.config.steps)]  # fmt: skip
        set_trainable(self.prefix, False)
        return _mean(losses)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Answer-token loss of the current prefix on the validation rows; tracks the best prefix."""
        self.prefix.eval()
        total, count = 0.0, 0
        for batch in self.val_batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(answer_loss(self.global_model, batch, self.prefix)) * n
            count += n
        loss = total / max(1, count)
        if loss < self.best_val_loss:
            self.best_val_loss = loss
            self.best_state = self.prefix.wire_state()
        return loss


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
