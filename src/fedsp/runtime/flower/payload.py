"""How fedsp payloads ride in Flower messages.

Tensors travel as one ``uint8`` array holding the :mod:`fedsp.wire` payload
(safetensors bytes, encoded once by the round driver or the client): the one
way into a record is :func:`to_record`, so byte counts equal the in-process
engine's and Flower chunks large payloads (the auxiliary model) by itself.
Small facts travel in a ``ConfigRecord`` named ``fedsp``; the run configuration
as JSON inside it. :func:`reply_content` / :func:`parse_reply` turn a
:class:`~fedsp.runtime.messages.Reply` into a message's content and back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsp.config import RunConfig
from fedsp.runtime.messages import FAILED, LOST_STATE, NEED_AUX, OK, STEP, Reply

if TYPE_CHECKING:  # torch is imported when tensors are (de)coded: a ``query`` never needs it
    import torch

PREFIX, AUX, UPDATE, META, METRICS = "prefix", "aux", "update", "fedsp", "metrics"
__all__ = [
    "LOST_STATE",
    "NEED_AUX",
    "OK",
    "TrainOrder",
    "from_record",
    "parse_reply",
    "reply_content",
    "to_record",
]


def to_record(payload: bytes) -> ArrayRecord:
    """An encoded :mod:`fedsp.wire` payload as a record (the one way tensors enter a message)."""
    return ArrayRecord({"payload": Array(np.frombuffer(payload, dtype=np.uint8))})


def record_bytes(record: ArrayRecord) -> bytes:
    """The encoded payload a record carries."""
    return bytes(record["payload"].numpy().tobytes())


def from_record(record: ArrayRecord) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of a record and the size of their payload in bytes."""
    from fedsp import wire

    payload = record_bytes(record)
    return wire.decode(payload), len(payload)


def reply_content(reply: Reply) -> RecordDict:
    """A client's reply as message content: its status; with ``ok`` the update, count and metrics; with
    ``step`` the split message and its name."""
    meta = ConfigRecord({"status": reply.status, "partition": reply.partition})
    content = RecordDict({META: meta})
    if reply.status == OK:
        meta["num-examples"] = reply.num_examples
        content[UPDATE] = to_record(reply.payload)
        content[METRICS] = MetricRecord(dict(reply.metrics))
    elif reply.status == STEP:
        meta["step"] = reply.step
        content[UPDATE] = to_record(reply.payload)
    elif reply.status == FAILED:
        meta["reason"] = reply.reason
    return content


def parse_reply(partition: int, content: RecordDict) -> Reply:
    """The :class:`~fedsp.runtime.messages.Reply` in a message's content; a malformed one is a failure."""
    try:
        meta: Any = content[META]
        status = str(meta["status"])
        if status == STEP:
            return Reply(partition, STEP, record_bytes(content[UPDATE]), step=str(meta["step"]))  # type: ignore[arg-type]
        if status == FAILED:
            return Reply.failed(partition, str(meta.get("reason", "")) or "the client failed")
        if status != OK:
            return Reply(partition, status)
        metrics: Any = content[METRICS]
        update: Any = content[UPDATE]
        values = {str(name): float(v) for name, v in metrics.items()}
        return Reply(partition, OK, record_bytes(update), int(meta["num-examples"]), values)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return Reply.failed(partition, f"malformed reply (missing or bad {err})")


@dataclass(frozen=True)
class TrainOrder:
    """What the server tells a client with each prefix (the ``fedsp`` ConfigRecord of a train message)."""

    config: RunConfig
    run_key: str  # names the run's client-state directories (stable across a resume)
    rnd: int
    partition: int
    expects_state: bool  # the client trained before: it must still hold its state
    model_config: str  # JSON of the global model's architecture (no weights): the client model's skeleton
    client_layers: tuple[int, ...]  # the global layers the client model is built from
    step: str = ""  # a split message (``train.split``): what its payload is, e.g. "outputs"

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "run-config": json.dumps(self.config.to_dict()),
                "run-key": self.run_key,
                "round": self.rnd,
                "partition": self.partition,
                "expects-state": self.expects_state,
                "model-config": self.model_config,
                "client-layers": list(self.client_layers),
                "step": self.step,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainOrder:
        fields: Any = record  # values typed by Flower as any record value; checked by the conversions
        config = RunConfig.from_dict(json.loads(str(fields["run-config"])), strict=False, source="server")
        return cls(
            config,
            str(fields["run-key"]),
            int(fields["round"]),
            int(fields["partition"]),
            bool(fields["expects-state"]),
            str(fields["model-config"]),
            tuple(int(i) for i in fields["client-layers"]),
            str(fields.get("step", "")),
        )
