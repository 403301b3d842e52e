"""What crosses the wire between server and clients, and how it is counted.

Every payload is a flat ``{name: tensor}`` dict serialised with safetensors
(no pickle: a client never executes what it receives). Parameter and byte
counts in the results come from these functions, so they measure what is sent.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsp.errors import FedSPError


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(payload)
    except Exception as err:  # safetensors raises its own error types
        raise FedSPError(f"received payload is not a valid tensor message ({err})") from err


def num_params(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())
