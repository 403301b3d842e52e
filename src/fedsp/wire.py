"""What crosses the wire between server and clients, and how it is counted: the one owner of both.

Every payload is a flat ``{name: tensor}`` dict serialised with safetensors
(no pickle: a client never executes what it receives):
  - :func:`snapshot` makes the message of a module's trainable tensors (a
    prefix, SFPrompt's prompts and tail), detached CPU copies;
  - :func:`load_snapshot` writes a received message back into those tensors,
    checking names, shapes and finiteness first;
  - :func:`encode` / :func:`decode` turn a message into bytes and back.
Parameter and byte counts in the results come from these functions, so they
measure what is sent; every engine (in-process, Flower) moves these bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsp.errors import FedSPError

Tensors = dict[str, torch.Tensor]


def snapshot(named: Iterable[tuple[str, torch.Tensor]], prefix: str = "") -> Tensors:
    """``{prefix + name: tensor}``: detached, contiguous CPU copies of ``named`` (e.g.
    ``named_parameters()``)."""
    return {prefix + name: t.detach().to("cpu", copy=True).contiguous() for name, t in named}


def load_snapshot(
    named: Iterable[tuple[str, torch.Tensor]], state: Mapping[str, torch.Tensor], what: str, prefix: str = ""
) -> None:
    """Copy ``state[prefix + name]`` into each tensor of ``named``, in its dtype and on its device.

    Refuses (``FedSPError`` naming ``what``) a message whose names differ, whose
    shapes differ, or that holds NaN or Inf: nothing is written then.
    """
    own = {prefix + name: t for name, t in named}
    if set(state) != set(own):
        raise FedSPError(f"{what} state has keys {sorted(state)}, expected {sorted(own)}")
    for name, target in own.items():
        value = state[name]
        if tuple(value.shape) != tuple(target.shape):
            raise FedSPError(
                f"{what} tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FedSPError(f"{what} tensor {name!r} holds NaN or Inf values")
    with torch.no_grad():
        for name, target in own.items():
            target.copy_(state[name].to(target.dtype))


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    return st_save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})


def decode(payload: bytes) -> Tensors:
    try:
        return st_load(payload)
    except Exception as err:  # safetensors raises its own error types
        raise FedSPError(f"received payload is not a valid tensor message ({err})") from err


def num_params(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def num_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the encoded message (0 for an empty one: nothing is sent)."""
    return len(encode(tensors)) if tensors else 0


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One float64 vector of ``tensors``' values, by sorted name (what secure aggregation sums)."""
    return torch.cat([tensors[name].detach().double().reshape(-1).cpu() for name in sorted(tensors)])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Tensors:
    """``flatten``'s inverse: float64 tensors shaped as ``like``'s (a vector of another length: refused)."""
    size = sum(t.numel() for t in like.values())
    if vector.numel() != size:
        raise FedSPError(f"a summed vector of {vector.numel()} values cannot hold {size} values")
    out, start = {}, 0
    for name in sorted(like):
        count = like[name].numel()
        out[name] = vector[start : start + count].double().reshape(like[name].shape)
        start += count
    return out
