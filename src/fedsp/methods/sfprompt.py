"""SFPrompt (Cao, Zhu, Gong 2024) for causal LMs: split federated prompt tuning with pruning and local loss.

The model is cut at layer c (:mod:`fedsp.models.split`): clients hold the head
(embeddings + layers 0..c-1, frozen), P prompt vectors on the input embeddings
(trained) and the tail (final norm, trained; LM head frozen and, when tied,
the client's own embedding matrix); the server holds the body (layers c..L-1,
frozen). ``--prefix-len`` is the prompt length P, ``--lr`` its learning rate
(prompts and tail norm), ``--prefix-init tokens`` starts the prompts as the
embeddings of whole training examples of the server's shard (``random``:
N(0, std of the embedding matrix)).

Client round:
  1. self-update, local only: load the broadcast prompts + tail; score every
     local example by EL2N on the shortcut model (head -> tail, body skipped);
     keep the ceil(gamma * n) hardest; ``local_loss_steps`` steps on them
     through the shortcut model;
  2. split training, ``local_steps`` steps on the kept examples: activations up,
     body outputs down, gradient of the outputs up, gradient of the activations
     down (:meth:`SFPromptClient.split_forward` / ``split_backward`` /
     ``split_update``, one message each, so a server can drive them);
  3. upload prompts + tail; the server averages them (FedAvg, N_k / N weights).
The server has no training of its own (``tune`` is a no-op); it validates and
evaluates the full model (head -> body -> tail) through :class:`PromptedModel`.
The split wire, the FLOP estimate and the traffic report (``method_notes.split_traffic``
in ``results.json``; its ``split_bytes_total`` is part of ``comm.total_bytes``) live in
:mod:`fedsp.methods.split_traffic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.data.batching import IGNORE, BatchStream, Encoded, collate, demonstration_tokens, fixed_batches
from fedsp.data.shards import RunData
from fedsp.errors import FedSPError
from fedsp.methods.base import (
    BestKept,
    ClientModelInfo,
    ClientUpdate,
    Course,
    Request,
    load_shipped,
    mean_or_nan,
)
from fedsp.methods.optim import OptimConfig, Phase
from fedsp.methods.split_traffic import FlopModel, add_round, new_report
from fedsp.models.adapters import decoder_layers, embedding_weight, model_device, output_weight
from fedsp.models.forward import mean_answer_loss
from fedsp.models.loading import LoadedModel
from fedsp.models.split import (
    Head,
    PromptedModel,
    ServerBody,
    Tail,
    check_split_layer,
    client_modules,
    split_layout,
    unique_params,
)


@dataclass(frozen=True)
class SFPromptConfig:
    split_layer: int  # c: the client runs layers 0..c-1
    prune_gamma: float  # fraction of local examples kept for split training (the hardest by EL2N)
    local_loss_steps: int  # shortcut-model steps per round
    split_steps: int  # split-training steps per round
    batch_size: int
    optim: OptimConfig

    def __post_init__(self) -> None:
        if not 0 < self.prune_gamma <= 1:
            raise FedSPError(f"--prune-gamma must be in (0, 1], got {self.prune_gamma}")


def prune_hardest(scores: torch.Tensor, gamma: float) -> list[int]:
    """Indices (ascending) of the ceil(gamma * n) highest scores; ties go to the earlier example."""
    n = scores.numel()
    keep = math.ceil(gamma * n)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def answer_positions(labels: torch.Tensor, num_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the (B, P+T) positions predict an answer token, and those tokens (n,), row-major."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    wanted = torch.zeros(labels.shape[0], num_prompts + labels.shape[1], dtype=torch.bool)
    wanted[:, num_prompts : num_prompts + labels.shape[1] - 1] = keep
    return wanted, targets[keep]


def el2n(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per token || softmax(logits) - onehot(target) ||_2 = sqrt(sum p^2 - 2 p_y + 1): (n, V), (n,) -> (n,)"""
    probs = logits.softmax(-1)
    gold = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (probs.pow(2).sum(-1) - 2 * gold + 1).clamp(min=0).sqrt()


def _exchanged(prompts: nn.Parameter, tail: Tail) -> list[tuple[str, torch.Tensor]]:
    """What is averaged each round: the prompts and the tail's trainable norm, by wire name."""
    return [("prompts", prompts), *(("tail." + name, p) for name, p in tail.named_parameters())]


def _wire_state(prompts: nn.Parameter, tail: Tail) -> dict[str, torch.Tensor]:
    return wire.snapshot(_exchanged(prompts, tail))


def _load_wire_state(prompts: nn.Parameter, tail: Tail, state: dict[str, torch.Tensor]) -> None:
    wire.load_snapshot(_exchanged(prompts, tail), state, "SFPrompt")


class SFPromptClient:
    """A data owner: a frozen head, its own prompts and tail, its rows; its round goes through the server.

    ``fit`` runs the self-update and returns the first split step's activations as a
    :class:`~fedsp.methods.base.Request`; each ``answer`` takes the server's reply
    (``outputs``, then ``grad_inputs``) and returns the next message, until the
    last step's update returns the :class:`ClientUpdate`. Between two messages
    everything of the round in progress is in ``state_dict`` (prompts, tail, the
    step's batch and the body's outputs, the stream's position), so a Flower node
    can serve every message in a fresh process; the head's activations are computed
    again for the update instead of being kept (the head is frozen and runs in eval
    mode: the same values on the CPU; the client's FLOP estimate counts the
    second forward).
    """

    def __init__(
        self,
        head: Head,
        tail: Tail,
        num_prompts: int,
        rows: Sequence[Encoded],
        config: SFPromptConfig,
        total_rounds: int,
        pad_id: int,
        seed: int,
        flops: FlopModel,
    ) -> None:
        self.head, self.tail, self.flops = head, tail, flops
        device = model_device(head.view)
        width = embedding_weight(head.view).shape[1]
        self.prompts = nn.Parameter(torch.zeros(num_prompts, width, device=device))  # (P, E)
        self.tail.to(device)
        self.rows, self.config, self.pad_id, self.seed = list(rows), config, pad_id, seed
        params = [self.prompts, *self.tail.parameters()]
        self.local_phase = Phase(params, config.optim, total_rounds * config.local_loss_steps)
        self.split_phase = Phase(params, config.optim, total_rounds * config.split_steps)
        self.round = 0
        self.client_flops = 0
        self.progress: dict[str, Any] | None = None  # the round in progress, between split messages

    # -- the shortcut model: head -> tail, body skipped
    def _shortcut(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (n, V) at the answer-predicting positions, and their targets (n,)."""
        cut = self.head(self.prompts, batch["input_ids"], batch["attention_mask"])
        wanted, targets = answer_positions(batch["labels"], self.prompts.shape[0])
        hidden = cut["activations"][wanted.to(cut["activations"].device)]  # (n, H)
        B, S = wanted.shape
        self.client_flops += self.flops.layers(self.config.split_layer, B, S) + self.flops.head_logits(
            len(targets)
        )
        return self.tail(hidden), targets.to(hidden.device)

    @torch.no_grad()
    def el2n_scores(self) -> torch.Tensor:
        """EL2N of every local row, averaged over its answer tokens: (n_rows,)."""
        scores = []
        for start in range(0, len(self.rows), self.config.batch_size):
            batch = collate(self.rows[start : start + self.config.batch_size], self.pad_id)
            logits, targets = self._shortcut(batch)
            wanted, _ = answer_positions(batch["labels"], self.prompts.shape[0])
            owner = (
                torch.arange(wanted.shape[0]).unsqueeze(1).expand_as(wanted)[wanted]
            )  # (n,) row of each token
            per_token = el2n(logits, targets).cpu()
            total = torch.zeros(wanted.shape[0]).index_add_(0, owner, per_token)
            scores.append(total / wanted.sum(1).clamp(min=1))
        return torch.cat(scores)

    def _stream(self, progress: dict[str, Any]) -> BatchStream:
        kept = [self.rows[i] for i in progress["kept"]]
        stream = BatchStream(kept, self.config.batch_size, self.pad_id, self.seed * 1000 + self.round)
        if "stream" in progress:
            stream.load_state_dict(progress["stream"])
        return stream

    # -- the round: self-update, then split steps as messages
    def fit(self, state: dict[str, torch.Tensor]) -> ClientUpdate | Request:
        _load_wire_state(self.prompts, self.tail, state)
        self.round += 1
        self.client_flops = 0
        # 1) self-update: EL2N pruning on the shortcut model, then local-loss steps on the kept rows
        scores = self.el2n_scores()
        progress: dict[str, Any] = {"kept": prune_hardest(scores, self.config.prune_gamma)}
        stream = self._stream(progress)
        local_losses = []
        for _ in range(self.config.local_loss_steps):
            before = self.client_flops
            logits, targets = self._shortcut(next(stream))
            self.client_flops += self.client_flops - before  # the backward: about one more forward
            local_losses.append(self.local_phase.step(F.cross_entropy(logits, targets)))
        progress.update(
            stream=stream.state_dict(),
            step=0,
            local_losses=local_losses,
            split_losses=[],
            el2n_mean=float(scores.mean()),
        )
        self.progress = progress
        # 2) split training on the kept rows, one message at a time
        return self._next()

    def _next(self) -> ClientUpdate | Request:
        """The next split step's activations, or (all steps done) the update: prompts + tail."""
        progress = self.progress
        assert progress is not None
        if progress["step"] < self.config.split_steps:
            stream = self._stream(progress)
            batch = next(stream)
            progress.update(stream=stream.state_dict(), batch=batch)
            return Request("activations", self.split_forward(batch))
        self.progress = None
        metrics = {
            "prompt_loss": mean_or_nan(progress["split_losses"]),
            "local_loss": mean_or_nan(progress["local_losses"]),
            "el2n_mean": progress["el2n_mean"],
            "kept_rows": float(len(progress["kept"])),
            "client_flops": float(self.client_flops),
        }
        return ClientUpdate(_wire_state(self.prompts, self.tail), len(self.rows), metrics)

    def answer(self, message: Request) -> ClientUpdate | Request:
        """The server's answer to the last message: ``outputs`` -> ``grad_outputs``; ``grad_inputs`` -> the
        next step's activations, or the update."""
        progress = self.progress
        awaiting = progress.get("awaiting") if progress is not None else None
        if progress is None or message.step != awaiting:
            raise FedSPError(
                f"split step message {message.step!r} came when the client expected "
                f"{awaiting or 'no split message (no round in progress)'!r}"
            )
        if message.step == "outputs":
            return Request("grad_outputs", self.split_backward(message.tensors))
        self.split_update(message.tensors)
        progress["step"] += 1
        return self._next()

    # -- split training, one message at a time
    def split_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the head; the message to the server: activations (B, P+T, H), mask, positions, wanted."""
        with torch.no_grad():
            cut = self.head(self.prompts, batch["input_ids"], batch["attention_mask"])
        wanted, _ = answer_positions(batch["labels"], self.prompts.shape[0])
        B, S = wanted.shape
        self.client_flops += self.flops.layers(self.config.split_layer, B, S)  # this forward
        assert self.progress is not None
        self.progress["awaiting"] = "outputs"
        return {**cut, "wanted": wanted}

    def _tail_loss(self, outputs: torch.Tensor) -> torch.Tensor:
        assert self.progress is not None
        _, targets = answer_positions(self.progress["batch"]["labels"], self.prompts.shape[0])
        return F.cross_entropy(self.tail(outputs), targets.to(outputs.device))

    def split_backward(self, reply: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tail and loss on the body's outputs (n, H); the message back: the loss gradient of the outputs."""
        progress = self.progress
        assert progress is not None
        wanted, _ = answer_positions(progress["batch"]["labels"], self.prompts.shape[0])
        hidden = self.head.view.config.hidden_size
        _check_tensor(reply, "outputs", (int(wanted.sum()), hidden), self.tail_dtype)
        outputs = reply["outputs"].to(model_device(self.head.view)).requires_grad_(True)  # (n, H)
        loss = self._tail_loss(outputs)
        (grad,) = torch.autograd.grad(loss, outputs)
        self.client_flops += 2 * self.flops.head_logits(outputs.shape[0])
        progress.update(outputs=outputs.detach(), loss=float(loss.detach()), awaiting="grad_inputs")
        return {"grad_outputs": grad}

    def split_update(self, reply: dict[str, torch.Tensor]) -> None:
        """One optimiser step: the tail by the loss on the body's outputs, the prompts by the server's
        gradient of the activations (B, P+T, H), back through the head."""
        progress = self.progress
        assert progress is not None
        batch = progress["batch"]
        cut = self.head(self.prompts, batch["input_ids"], batch["attention_mask"])  # the same activations
        activations = cut["activations"]
        B, S = activations.shape[:2]
        self.client_flops += 2 * self.flops.layers(self.config.split_layer, B, S)  # forward again + backward
        _check_tensor(reply, "grad_inputs", tuple(activations.shape), activations.dtype)
        # d/d(activations) of sum(activations * g) is g: the prompts get exactly the chain-rule gradient,
        # and the tail the gradient of the loss (neither term reaches the other's parameters)
        linked = (activations * reply["grad_inputs"].to(activations.device)).sum()
        self.split_phase.step(self._tail_loss(progress["outputs"]) + linked)
        progress["split_losses"].append(progress.pop("loss"))
        for key in ("batch", "outputs", "awaiting"):
            progress.pop(key)

    @property
    def tail_dtype(self) -> torch.dtype:
        return next(self.head.view.parameters()).dtype

    def state_dict(self) -> dict[str, Any]:
        """Kept between rounds: optimiser states and the round counter (prompts and tail come down each
        round); in the middle of a round, that round too (prompts, tail, progress, FLOPs so far)."""
        state: dict[str, Any] = {
            "local": self.local_phase.state_dict(),
            "split": self.split_phase.state_dict(),
            "round": self.round,
        }
        if self.progress is not None:
            state["progress"] = {
                **self.progress,
                "flops": self.client_flops,
                "values": _wire_state(self.prompts, self.tail),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        progress = state.get("progress")
        if progress is not None:  # first the values: the phases then write their float32 masters over them
            progress = dict(progress)
            _load_wire_state(self.prompts, self.tail, progress.pop("values"))
            self.client_flops = int(progress.pop("flops"))
        self.progress = progress
        self.local_phase.load_state_dict(state["local"])
        self.split_phase.load_state_dict(state["split"])
        self.round = int(state["round"])


def _check_tensor(
    message: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype | None
) -> None:
    """A split message's tensor ``name`` has ``shape`` and ``dtype`` (None: any integer or bool dtype),
    or a one-line FedSPError says why."""
    value = message.get(name)
    if not isinstance(value, torch.Tensor):
        raise FedSPError(f"the message has no {name!r} tensor (it holds {sorted(message)})")
    if dtype is None and not value.is_floating_point() and not value.is_complex():
        dtype = value.dtype
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise FedSPError(
            f"{name} of shape {tuple(value.shape)} and dtype {value.dtype}, expected {tuple(shape)} {dtype}"
        )
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise FedSPError(f"{name} holds NaN or Inf values")


class SFPromptServer:
    """The model owner: the body (driven by the clients' messages), the averaged prompts + tail."""

    def __init__(
        self,
        model: PreTrainedModel,
        body: ServerBody,
        prompts: nn.Parameter,
        val_rows: Sequence[Encoded],
        pad_id: int,
        eval_batch_size: int = 128,
        max_batch: int = 1024,
        max_length: int = 1 << 16,
    ) -> None:
        self.body, self.prompts, self.tail = body, prompts, Tail(model)
        self.hidden, self.dtype = int(model.config.hidden_size), next(model.parameters()).dtype
        self.max_batch, self.max_length = max_batch, max_length  # the largest split message it takes
        self.full = PromptedModel(model, prompts, self.tail)  # head -> body -> tail in one stack
        self.val_batches = fixed_batches(val_rows, eval_batch_size, pad_id)
        self.best = BestKept(self.broadcast, lambda state: _load_wire_state(self.prompts, self.tail, state))
        self.report: dict[str, Any] = {}  # split traffic and compute, per client and round (goes to results)

    def broadcast(self) -> dict[str, torch.Tensor]:
        return _wire_state(self.prompts, self.tail)

    def aggregate(self, state: dict[str, torch.Tensor] | None, updates: Sequence[ClientUpdate]) -> None:
        if state is None:
            return
        _load_wire_state(self.prompts, self.tail, state)
        add_round(self.report, updates)

    def tune(self) -> float:
        return float("nan")  # SFPrompt's server trains nothing of its own

    def respond(self, partition: int, message: Request) -> Request:
        """The body's part of a split step: ``activations`` -> ``outputs``, ``grad_outputs`` ->
        ``grad_inputs``; a message of the wrong shape, dtype or order raises a one-line FedSPError."""
        tensors = message.tensors
        if message.step == "activations":
            acts = tensors.get("activations")
            if not isinstance(acts, torch.Tensor) or acts.dim() != 3:
                raise FedSPError(
                    "activations: expected a (batch, length, hidden) tensor, got "
                    + (f"shape {tuple(acts.shape)}" if isinstance(acts, torch.Tensor) else "none")
                )
            B, S, _ = acts.shape
            if B > self.max_batch or S > self.max_length:  # a body pass costs the server B*S tokens
                raise FedSPError(
                    f"activations of {B} rows of {S} positions: the run allows at most {self.max_batch} "
                    f"rows (--batch-size) of {self.max_length} positions (prompts + --max-length)"
                )
            _check_tensor(tensors, "activations", (B, S, self.hidden), self.dtype)
            _check_tensor(tensors, "attention_mask", (B, S), None)
            _check_tensor(tensors, "position_ids", (B, S), torch.long)
            _check_tensor(tensors, "wanted", (B, S), torch.bool)
            if not bool(tensors["wanted"].any()):
                raise FedSPError("wanted: no position predicts an answer token")
            return Request("outputs", self.body.body_forward(partition, tensors))
        if message.step == "grad_outputs":
            pending = self.body.pending.get(partition)
            if pending is None:
                raise FedSPError("grad_outputs came before this round's activations")
            outputs = pending[1]
            _check_tensor(tensors, "grad_outputs", tuple(outputs.shape), outputs.dtype)
            return Request("grad_inputs", self.body.body_backward(partition, tensors))
        raise FedSPError(f"unknown split step {message.step!r} (expected activations or grad_outputs)")

    def forget(self, partition: int) -> None:
        self.body.pending.pop(partition, None)

    @torch.no_grad()
    def validation_loss(self, track: bool = True) -> float:
        loss = mean_answer_loss(cast(PreTrainedModel, self.full), self.val_batches, None)  # quacks like one
        if track:
            self.best.offer(loss)
        return loss

    def use_best(self) -> None:
        self.best.restore()

    def evaluation_target(self):
        return self.full, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "state": self.broadcast(),
            **self.best.state_dict(),
            "report": dict(self.report),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_wire_state(self.prompts, self.tail, state["state"])
        self.best.load_state_dict(state)
        self.report.clear()
        self.report.update(state["report"])


def initial_prompts(config: RunConfig, loaded: LoadedModel, server_rows: list[Encoded]) -> nn.Parameter:
    """Round-0 prompts (P, E): embeddings of whole server-shard examples (``tokens``) or random."""
    embeddings = loaded.model.get_input_embeddings()
    weight = embedding_weight(loaded.model)
    with torch.no_grad():
        if config.prefix_init == "random":
            values = (
                torch.randn(config.prefix_len, weight.shape[1], device=weight.device) * weight.float().std()
            )
        else:
            tokens = demonstration_tokens(server_rows, config.prefix_len, loaded.tokenizer)
            values = embeddings(torch.tensor(tokens, device=weight.device)).float()
    return nn.Parameter(values)


def node_client(
    config: RunConfig,
    skeleton: PreTrainedModel,
    layers: Sequence[int],
    shipped: dict[str, torch.Tensor],
    rows: Sequence[Encoded],
    partition: int,
    pad_id: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> SFPromptClient:
    """A Flower node's client: the head and tail of the global architecture ``skeleton`` (uninitialised)
    hold the ``shipped`` weights; the body's layers stay uninitialised and never run."""
    check_split_layer(config.split_layer, skeleton.config.num_hidden_layers)
    held = {id(p) for m in client_modules(skeleton, config.split_layer) for p in m.parameters()}
    load_shipped(skeleton, shipped, {n for n, p in skeleton.named_parameters() if id(p) in held})
    return split_client(config, skeleton, rows, partition, pad_id)


def promised_layers(config: RunConfig, num_layers: int) -> set[int]:
    """The global layers a client holds: the head's, 0..c-1 (the model-privacy audit checks the others)."""
    return set(range(config.split_layer))


def split_client(
    config: RunConfig,
    model: PreTrainedModel,
    rows: Sequence[Encoded],
    partition: int,
    pad_id: int,
    head: Head | None = None,
    flops: FlopModel | None = None,
) -> SFPromptClient:
    """Client ``partition`` over ``model``, of which it needs only what it holds (embeddings, layers
    0..c-1, final norm, LM head): the course's clients and a Flower node's are made here."""
    local = SFPromptConfig(
        config.split_layer,
        config.prune_gamma,
        config.local_loss_steps,
        config.local_steps,
        config.batch_size,
        OptimConfig(config.lr, config.weight_decay, config.warmup_ratio, grad_clip=config.max_grad_norm),
    )
    return SFPromptClient(
        head or Head(model, config.split_layer),
        Tail(model),
        config.prefix_len,
        rows,
        local,
        config.rounds,
        pad_id,
        config.seed * 1000 + partition + 1,
        flops or FlopModel.of(model),
    )


def sfprompt_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """Server (body + averaged prompts and tail) and clients (shared head, own tail) for one SFPrompt run."""
    model, c = loaded.model, config.split_layer
    split_layout(model)  # an unknown family fails here, with the known ones
    num_layers = len(decoder_layers(model))
    check_split_layer(c, num_layers)
    body = ServerBody(model, c)
    server = SFPromptServer(
        model,
        body,
        initial_prompts(config, loaded, data.server_rows),
        data.val_rows,
        loaded.tokenizer.pad_token_id,
        config.eval_batch_size,
        config.batch_size,
        config.prefix_len + config.max_length,
    )
    pad = loaded.tokenizer.pad_token_id
    head, flops = Head(model, c), FlopModel.of(model)  # one head for every client: frozen and shared

    def make_client(k: int) -> SFPromptClient:
        return split_client(config, model, data.client_rows[k], k, pad, head, flops)

    held = client_modules(model, c)
    held_ids = {id(p) for m in held for p in m.parameters()}
    # sent once, before round 1
    shipped: dict[str, torch.Tensor] = {name: p for name, p in model.named_parameters() if id(p) in held_ids}
    tied = "tied" if output_weight(model) is embedding_weight(model) else "untied"
    exchanged = server.broadcast()
    params = unique_params(held) + server.prompts.numel()
    info = ClientModelInfo(params, params / unique_params([model]), tuple(range(c)), model_private=True)
    state_bytes = len(wire.encode(exchanged))
    server.report.update(new_report())
    notes = {
        "split_layer": c,
        "client_layers": list(range(c)),
        "server_layers": list(range(c, num_layers)),
        "client_holds": f"embeddings (+ position tables), layers 0..{c - 1}, final norm, LM head ({tied}), "
        "prompts",
        "prompt_len": config.prefix_len,
        "prompt_tail_params": wire.num_params(exchanged),
        "prompt_tail_bytes": state_bytes,
        "trainable": "prompts + final norm (LM head frozen)",
        "prune_gamma": config.prune_gamma,
        "local_loss_steps": config.local_loss_steps,
        "flops": "estimated: 2 per weight per token + 4*S*H per token per layer; training = 2x forward",
        "split_traffic": server.report,  # filled in by the server every round
    }
    return Course(server, make_client, len(data.client_rows), info, shipped, notes)
