"""An optimisation phase: AdamW with linear warm-up then linear decay, kept across rounds.

Parameters stored in a low-precision dtype (bfloat16 runs, see
:mod:`fedsp.models.precision`) are updated through float32 master copies: the
gradient is taken in the model's dtype, AdamW steps the float32 master, and the
parameter receives the master rounded to its dtype. Updates smaller than
bfloat16's resolution (about 0.4% of a weight) thus accumulate instead of
vanishing. A parameter's master is shared by every phase that trains it
(SFPrompt's local-loss and split phases step the same prompts and tail). A
parameter written from outside between steps (a loaded state, a received
aggregate) is noticed by its version counter and re-seeds its master.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # L2 norm the gradient is clipped to before the step; 0: no clipping


LOW_PRECISION = (torch.bfloat16, torch.float16)


class _Master:
    """The float32 copy of one low-precision parameter, and the parameter's version when last in step."""

    def __init__(self, param: torch.Tensor) -> None:
        self.value = param.detach().float().clone()
        self.version = param._version


_MASTERS = WeakIdKeyDictionary()  # parameter -> _Master, by identity; gone with the parameter


def _master(param: torch.Tensor) -> _Master:
    if param not in _MASTERS:
        _MASTERS[param] = _Master(param)
    return _MASTERS[param]


class Phase:
    """One AdamW + schedule over ``total_steps`` steps; ``step`` does backward, clip, update.

    ``params`` is parameters, or parameter groups (dicts with ``params`` and their own ``lr``).
    """

    def __init__(
        self, params: Iterable[nn.Parameter] | Iterable[dict], config: OptimConfig, total_steps: int
    ) -> None:
        given: list[Any] = list(params)
        grouped = bool(given) and isinstance(given[0], dict)
        groups: list[dict[str, Any]] = (
            [{**g, "params": list(g["params"])} for g in given] if grouped else [{"params": given}]
        )
        self.params: list[torch.Tensor] = [p for group in groups for p in group["params"]]
        self.config = config
        # float32 masters of the low-precision parameters: what AdamW actually steps
        self._low = [p for p in self.params if p.dtype in LOW_PRECISION]
        self._masters = [_master(p) for p in self._low]
        swap = {id(p): m.value for p, m in zip(self._low, self._masters, strict=True)}

        def stepped(ps: Iterable[torch.Tensor]) -> list[torch.Tensor]:
            return [swap.get(id(p), p) for p in ps]

        self._stepped = stepped(self.params)
        opt_groups: Any = (
            [{**g, "params": stepped(g["params"])} for g in groups] if grouped else self._stepped
        )
        # fused: one pass over each tensor instead of one per AdamW operation (6x faster on the CPU for
        # the auxiliary model's 32 M parameters, where the optimiser step was a fifth of an alignment step)
        self.optimizer = torch.optim.AdamW(
            opt_groups,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            fused=True,
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
        self._reseed_written_masters()
        for p, master in zip(self._low, self._masters, strict=True):
            master.value.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._stepped, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._write_masters()
        return float(loss.detach())

    def _reseed_written_masters(self) -> None:
        """A low-precision parameter changed since a phase last wrote it: its master starts from it."""
        with torch.no_grad():
            for p, master in zip(self._low, self._masters, strict=True):
                if p._version != master.version:
                    master.value.copy_(p)
                    master.version = p._version

    def _write_masters(self) -> None:
        with torch.no_grad():
            for p, master in zip(self._low, self._masters, strict=True):
                p.copy_(master.value)
                master.version = p._version

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self._masters:
            self._reseed_written_masters()
            state["masters"] = [m.value.detach().clone() for m in self._masters]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        masters = state.get("masters")
        if masters is None:  # saved by a float32 phase: the parameters themselves are the best estimate
            for master in self._masters:
                master.version = -1
            return
        if len(masters) != len(self._masters):
            raise ValueError(f"phase state has {len(masters)} master weights, expected {len(self._masters)}")
        with torch.no_grad():
            for own, saved in zip(self._masters, masters, strict=True):
                own.value.copy_(saved)
        self._write_masters()


def set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)
