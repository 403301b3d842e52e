"""How FedSP payloads ride in Flower messages.

Tensors travel as one ``uint8`` array holding the :mod:`fedsp.wire` payload
(safetensors bytes), so byte counts equal the in-process runner's and Flower
chunks large payloads (the auxiliary model) by itself. Small facts travel in
a ``ConfigRecord`` named ``fedsp``; the run configuration as JSON inside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsp.config import RunConfig

if TYPE_CHECKING:  # torch is imported when tensors are (de)coded: a ``query`` never needs it
    import torch

PREFIX, AUX, UPDATE, META, METRICS = "prefix", "aux", "update", "fedsp", "metrics"
OK, NEED_AUX, LOST_STATE = "ok", "need-aux", "lost-state"


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    from fedsp import wire

    return bytes_record(wire.encode(tensors))


def bytes_record(payload: bytes) -> ArrayRecord:
    return ArrayRecord({"payload": Array(np.frombuffer(payload, dtype=np.uint8))})


def from_record(record: ArrayRecord) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of a record and the size of their payload in bytes."""
    from fedsp import wire

    payload = record["payload"].numpy().tobytes()
    return wire.decode(payload), len(payload)


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

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "run-config": json.dumps(self.config.to_dict()), "run-key": self.run_key, "round": self.rnd,
            "partition": self.partition, "expects-state": self.expects_state,
            "model-config": self.model_config, "client-layers": list(self.client_layers),
        })  # fmt: skip

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainOrder:
        config = RunConfig.from_dict(json.loads(str(record["run-config"])), strict=False, source="server")
        return cls(config, str(record["run-key"]), int(record["round"]), int(record["partition"]),  # type: ignore[arg-type]
                   bool(record["expects-state"]), str(record["model-config"]),
                   tuple(int(i) for i in record["client-layers"]))  # type: ignore[union-attr]  # fmt: skip
