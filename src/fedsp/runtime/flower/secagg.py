"""Secure aggregation on Flower (``--secure-aggregation``): Flower's SecAgg+, so the server sees only a sum.

Server: one run of Flower's ``SecAggPlusWorkflow`` per round (:func:`secure_round`),
driven from the round driver's exchange instead of a Flower strategy: a
throw-away strategy names the round's nodes and catches the unmasked result,
and the workflow's "collect masked vectors" stage carries each node's usual
``train`` content (prefix, order, the client model when shipped). Every message
of the four stages is counted (its protobuf size) for ``bytes_down`` / ``bytes_up``.

Client: :func:`client_mod` hands SecAgg+ messages to Flower's ``secaggplus_mod``
(plain messages pass untouched); in the stage that trains, the client's reply
becomes one masked float64 vector (:func:`contribution`):
  - without DP: ``[a * (state - sent), a, 1]`` with ``a = N_k / 1024`` (the example
    count, scaled into SecAgg+'s clipping range): the server learns
    ``sum_k N_k * update_k`` and ``sum_k N_k``, never a client's update or count;
  - with DP: ``[clip(state - sent, C), 1, 1]``: the client clips its own update
    (the server cannot), the server adds the noise to the sum.
The client's losses and status (``ok``, ``need-aux``, ``lost-state``) travel in
the clear beside the vector. SecAgg+ quantises each value to ``QUANTIZATION``
levels over ``[-CLIPPING_RANGE, CLIPPING_RANGE]`` (stochastic rounding), so each
coordinate of the sum is off by less than n * 2 * CLIPPING_RANGE / QUANTIZATION
(n clients; 2.4e-7 per client); a value outside the range is refused by the
client that would send it (SecAgg+ would clip it silently).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

from flwr.app import Context, Message, RecordDict

from fedsp.config import RunConfig
from fedsp.errors import FedSPError
from fedsp.protection import SECAGG_RANGE
from fedsp.runtime.flower import payload
from fedsp.runtime.messages import OK, Reply

log = logging.getLogger("fedsp.flower.secagg")

CLIPPING_RANGE = float(SECAGG_RANGE)  # SecAgg+ quantises values in [-8, 8] (its client checks it is a float)
QUANTIZATION = 2**26  # levels over the range: 2.4e-7 apart
MODULUS = (
    2**36
)  # the masked sum wraps modulo this: n * QUANTIZATION < MODULUS for up to 1,023 clients a round
WEIGHT_SCALE = 1 / 1024  # example counts enter the vector as N_k / 1024: within the range up to 8,192
MAX_SHARES = 11  # each client's secret is shared among at most this many (all of them up to 11; Flower
# makes an even count odd)


def contribution(config: RunConfig, sent: dict, reply: Reply) -> tuple[Any, dict[str, Any]]:
    """The float64 vector a client masks, and the metrics it sends in the clear."""
    import torch

    from fedsp import wire
    from fedsp.methods.aggregation import clip, delta

    size = sum(t.numel() for t in sent.values())
    metrics: dict[str, Any] = {"status": reply.status, "partition": reply.partition}
    if reply.status != OK:  # it trained nothing: it adds nothing, and says why
        return torch.zeros(size + 2, dtype=torch.float64), metrics
    update = delta(sent, wire.decode(reply.payload))
    if config.dp:
        assert config.dp_clip is not None
        update, _ = clip(update, config.dp_clip)
        weight = 1.0
    else:
        weight = reply.num_examples * WEIGHT_SCALE
    vector = torch.cat([weight * wire.flatten(update), torch.tensor([weight, 1.0], dtype=torch.float64)])
    if not bool(torch.isfinite(vector).all()):  # SecAgg+ would quantise NaN into garbage in the sum
        raise FedSPError(f"partition {reply.partition}: the update holds NaN or Inf values")
    largest = float(vector.abs().max())
    if largest > CLIPPING_RANGE:
        raise FedSPError(
            f"partition {reply.partition}: a value of {largest:.3g} in the update is beyond SecAgg+'s "
            f"range of +-{CLIPPING_RANGE:g}; it would be clipped without notice"
        )
    metrics.update({name: float(value) for name, value in reply.metrics.items()})
    return vector, metrics


def client_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; fedsp's own reply turned into the masked vector."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:  # a plain round or a query
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    from fedsp import wire

    def masked(message: Message, ctx: Context) -> Message:
        answer = call_next(message, ctx)  # the train handler: fedsp's reply, update in the clear
        order = payload.TrainOrder.from_record(message.content[payload.META])  # type: ignore[arg-type]
        sent = wire.decode(payload.record_bytes(message.content[payload.PREFIX]))  # type: ignore[arg-type]
        reply = payload.parse_reply(order.partition, answer.content)
        if reply.status == "failed":
            raise FedSPError(reply.reason or "the client failed")
        vector, metrics = contribution(order.config, sent, reply)
        result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector.numpy()]), 1, metrics)
        return Message(fitres_to_recorddict(result, keep_input=False), reply_to=message)

    return secaggplus_mod(msg, context, masked)


@dataclass
class SecureResult:
    """What one SecAgg+ round shows the server."""

    total: Any  # the sum of the survivors' vectors (float64 torch vector), None if the round halted
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)  # node id -> its clear metrics
    bytes_down: int = 0  # every message of the four stages, server to clients
    bytes_up: int = 0


class _CountingGrid:
    """The grid, with the size of every message content it carries counted (protobuf bytes)."""

    def __init__(self, grid: Any) -> None:
        self.grid, self.down, self.up = grid, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> Any:
        from flwr.common.serde import recorddict_to_proto

        messages = list(messages)
        self.down += sum(recorddict_to_proto(m.content).ByteSize() for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(recorddict_to_proto(m.content).ByteSize() for m in replies if not m.has_error())
        return replies


def secure_round(
    grid: Any, context: Context, rnd: int, contents: dict[int, RecordDict], timeout: float | None
) -> SecureResult:
    """One SecAgg+ round over the nodes of ``contents`` (node id -> its train content)."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.common import FitIns, Parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy
    from flwr.server.workflow import SecAggPlusWorkflow

    counting = _CountingGrid(grid)
    outcome = SecureResult(None)

    class RoundNodes(Strategy):  # names the round's nodes; keeps what SecAgg+ unmasked
        def initialize_parameters(self, client_manager: Any) -> None:
            return None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
            run_id = grid.run.run_id
            return [
                (GridClientProxy(n, cast(Any, counting), run_id), FitIns(Parameters([], ""), {}))
                for n in contents
            ]

        def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
            import torch

            if results:  # every result holds the same unmasked mean; times their number: the sum
                mean = parameters_to_ndarrays(results[0][1].parameters)[0]
                outcome.total = torch.from_numpy(mean).double() * len(results)
                outcome.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
            return None, {}

        def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
            return []

        def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> None:
            return None

    class Workflow(SecAggPlusWorkflow):  # the training stage carries each node's own fedsp content
        def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
            state.nid_to_fitins = {nid: RecordDict(dict(contents[nid])) for nid in state.nid_to_fitins}
            return bool(super().collect_masked_vectors_stage(grid, context, state))

    legacy = LegacyContext(context, ServerConfig(num_rounds=rnd), RoundNodes())
    legacy.state.config_records["config"] = ConfigRecord({"current_round": rnd})
    legacy.state.array_records["parameters"] = ArrayRecord()
    shares: int | float = 1.0 if len(contents) <= MAX_SHARES else MAX_SHARES
    Workflow(
        shares,
        0.5,
        max_weight=1.0,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION,
        modulus_range=MODULUS,
        timeout=timeout,
    )(cast(Any, counting), legacy)
    outcome.bytes_down, outcome.bytes_up = counting.down, counting.up
    return outcome
