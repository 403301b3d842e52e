"""An optimisation phase: AdamW with linear warm-up then linear decay, kept across rounds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0


class Phase:
    """One AdamW + schedule over ``total_steps`` steps; ``step`` does backward, clip, update.

    ``params`` is parameters, or parameter groups (dicts with ``params`` and their own ``lr``).
    """

    def __init__(
        self, params: Iterable[nn.Parameter] | Iterable[dict], config: OptimConfig, total_steps: int
    ) -> None:
        groups = list(params)
        if groups and isinstance(groups[0], dict):
            self.params = [p for group in groups for p in group["params"]]
        else:
            self.params = groups
        self.config = config
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        warmup = int(config.warmup_ratio * total_steps)
        total = max(1, total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def step(self, loss: torch.Tensor) -> float:
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)
