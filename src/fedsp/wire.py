"""What crosses the wire between server and clients, and how it is counted: the one owner of both.

Every payload is a flat ``{name: tensor}`` dict serialised with safetensors
(no pickle: a client never executes what it receives):
  - :func:`snapshot` makes the message of a module's trainable tensors (a
    prefix, SFPrompt's prompts and tail), detached CPU copies;
  - :func:`load_snapshot` writes a received message back into those tensors,
    checking names, shapes and finiteness first;
  - :func:`encode` / :func:`decode` turn a message into bytes and back;
  - :func:`encode_broadcast` / :func:`decode_broadcast` and :func:`encode_update` /
    :func:`decode_update` are a round's two messages at the run's ``--wire-dtype``.
Parameter and byte counts in the results come from these functions, so they
measure what is sent; every engine (in-process, Flower) moves these bytes.

``--wire-dtype`` (the round's prefix, prompts or tail, and the distilled auxiliary
model shipped once, :func:`ship_once`; not split-learning activations, and not
FedPrompt's global model or SFPrompt's head and tail, parts of the server's own
model, which are shipped as they are):
  - ``float32``: every tensor as it is, the client's update its new state;
  - ``bfloat16``: floating tensors rounded to bfloat16 (relative error at most
    2^-8 of each value);
  - ``int8``: floating tensors as int8 codes with one float32 scale per group
    of 64 consecutive values (the group's largest magnitude over 127, sent as
    ``<name>::scale``; 6% more bytes than one scale per row, but a prefix row
    holds every layer's keys and values, whose magnitudes differ by orders):
    error at most half a step, scale/2.
With a compressed dtype the client sends its **change** from the broadcast it
received, not its state (a change is small beside the prefix, so its rounding
error is too), plus what the rounding of its earlier updates left out (error
feedback: the client keeps that residual between rounds, so over many rounds
the server receives the sum of the true changes within one rounding). The
server adds the decoded change to the exact broadcast it kept. Received
messages decode to float32. A non-finite update stays non-finite on the wire
(int8: a NaN scale), so the server refuses it as a float32 one, and the client
starts its residual again from zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsp.errors import FedSPError
from fedsp.spellings import BFLOAT16, FLOAT32, INT8  # the spellings of --wire-dtype

Tensors = dict[str, torch.Tensor]
SCALE = "::scale"  # the int8 scales of tensor <name> travel as <name>::scale
INT8_MAX = 127
GROUP = 64  # int8: consecutive values sharing one scale (a prefix row spans every layer's keys and values)


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


def _groups(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in order, zero-padded to whole groups: (groups, GROUP)."""
    flat = t.detach().float().reshape(-1)
    return F.pad(flat, (0, -flat.numel() % GROUP)).reshape(-1, GROUP)


def compress(tensors: Mapping[str, torch.Tensor], wire_dtype: str) -> Tensors:
    """The message of ``tensors`` at ``wire_dtype`` (floating tensors only; others pass as they are).

    int8: a group holding NaN or Inf gets a NaN scale, so it decodes to NaN and the update is refused
    as a float32 one would be."""
    if wire_dtype == FLOAT32:
        return dict(tensors)
    out: Tensors = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            out[name] = t
        elif wire_dtype == BFLOAT16:
            out[name] = t.detach().to(torch.bfloat16)
        else:
            groups = _groups(t)
            finite = torch.isfinite(groups).all(dim=1)
            groups = torch.nan_to_num(groups, nan=0.0, posinf=0.0, neginf=0.0)
            scale = groups.abs().amax(dim=1) / INT8_MAX
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: codes of 0
            codes = torch.round(groups / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
            out[name] = codes.reshape(-1)[: t.numel()].reshape(t.shape)
            out[name + SCALE] = torch.where(finite, scale, torch.full_like(scale, math.nan))
    return out


def decompress(message: Mapping[str, torch.Tensor], wire_dtype: str, what: str) -> Tensors:
    """``compress``'s inverse, in float32 (float32 messages as they are); a malformed message is refused.

    A NaN or Inf scale decodes its group to NaN: the receiver refuses non-finite values as it would
    in a float32 message."""
    if wire_dtype == FLOAT32:
        return dict(message)
    out: Tensors = {}
    for name, t in message.items():
        if name.endswith(SCALE):
            if name[: -len(SCALE)] not in message:
                raise FedSPError(f"{what} holds a scale {name!r} without its tensor")
            continue
        if wire_dtype == INT8 and t.dtype == torch.int8:
            scale = message.get(name + SCALE)
            groups = -(-t.numel() // GROUP)
            if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != (groups,):
                got = "none" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
                raise FedSPError(
                    f"{what} tensor {name!r}: int8 codes need a float32 scale of shape ({groups},), got {got}"
                )
            scale = torch.where(torch.isfinite(scale), scale, torch.full_like(scale, math.nan))
            values = _groups(t) * scale[:, None]
            out[name] = values.reshape(-1)[: t.numel()].reshape(t.shape)
        elif t.is_floating_point():
            out[name] = t.float()
        else:
            out[name] = t
    return out


def ship_once(params: Mapping[str, torch.Tensor], wire_dtype: str) -> Tensors:
    """The client model's message at ``wire_dtype``, sent once to each client; ``params`` (the server's
    copy, the template of in-process clients) are overwritten with what a client decodes, so that every
    engine's clients start from the same weights."""
    message = compress(params, wire_dtype)
    if wire_dtype != FLOAT32:
        decoded = decompress(message, wire_dtype, "client model")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(decoded[name].to(param.dtype))
    return message


def decode_shipped(message: Mapping[str, torch.Tensor], wire_dtype: str) -> Tensors:
    """The client model a client builds from the message :func:`ship_once` made (kept as received)."""
    return decompress(message, wire_dtype, "client model")


def encode_broadcast(sent: Mapping[str, torch.Tensor], wire_dtype: str) -> bytes:
    """The round's broadcast at ``wire_dtype``."""
    return encode(compress(sent, wire_dtype))


def decode_broadcast(payload: bytes, wire_dtype: str) -> Tensors:
    """What a client received: the broadcast as the wire carried it (float32 when compressed)."""
    return decompress(decode(payload), wire_dtype, "broadcast")


def encode_update(
    state: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    wire_dtype: str,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[bytes, Tensors | None]:
    """A client's update and its new residual (error feedback; None at float32, which sends the state).

    Compressed: the change ``state - received`` plus the ``residual`` its earlier rounds left out is
    rounded to ``wire_dtype``; the new residual is what that rounding left out.
    """
    if wire_dtype == FLOAT32:
        return encode(state), None
    change = {name: state[name].detach().float() - received[name].float() for name in state}
    if residual is not None and set(residual) == set(change):
        change = {name: value + residual[name].float() for name, value in change.items()}
    message = compress(change, wire_dtype)
    arrived = decompress(message, wire_dtype, "update")
    left_out = {name: change[name] - arrived[name] for name in change}
    if not all(bool(torch.isfinite(value).all()) for value in left_out.values()):
        left_out = {name: torch.zeros_like(value) for name, value in left_out.items()}  # start again
    return encode(message), left_out


def decode_update(payload: bytes, sent: Mapping[str, torch.Tensor], wire_dtype: str) -> Tensors:
    """A client's new state as the server sees it: the state itself (float32), or the broadcast the
    server kept plus the decoded change, in the broadcast's dtypes."""
    message = decode(payload)
    if wire_dtype == FLOAT32:
        return message
    change = decompress(message, wire_dtype, "update")
    if set(change) != set(sent):
        raise FedSPError(f"update has keys {sorted(change)}, expected {sorted(sent)}")
    for name, value in change.items():
        if tuple(value.shape) != tuple(sent[name].shape):
            raise FedSPError(
                f"update tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(sent[name].shape)}"
            )
    return {name: (sent[name].float() + change[name]).to(sent[name].dtype) for name in sent}
