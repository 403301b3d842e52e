"""FedSP: the client's alternating update and the server's aggregate-then-tune update.

Plain objects with no runtime code: the in-process runner calls them in a
loop, a Flower app can call the same methods from its handlers.

A round's steps are numbered as in the glossary (docs/architecture.md) and :mod:`fedsp.methods.base`.
The client's part, step 2 (clients train), in two phases of T steps:
  a. load the received prefix into the auxiliary model;
  b. global-model alignment: T steps on the auxiliary model, prefix frozen;
  c. local knowledge capturing: T steps on the prefix, auxiliary model frozen;
  d. return the prefix and the number of local examples (step 3, updates back).
The server's part: step 4, the round's aggregate of the prefixes (FedAvg, N_k / N, by default); step 5,
T steps of prefix tuning on the frozen global model with its own shard; step 6, validation loss,
keeping the best prefix.

The same two classes serve the prompt-only baselines and the ablations through
``ClientPlan``: FedPrompt is a client that skips the alignment (b) on the full model;
"w/o AT" trains model and prefix together in one phase; one-layer clients
(FedPrompt-Single, "w/o CS") see the server's L-layer prefix averaged over
depth and send theirs back repeated to L layers. Which of these a method is
comes from its :class:`~fedsp.methods.table.ClientShape` in the method table.

Building (:func:`fedsp_course`, the builder of every method whose clients run
:class:`FedSPClient`): the server with its round-0 prefix, the auxiliary model
distilled once (or the whole global model for FedPrompt), and the client
factory. :func:`make_client` is the one way a client is made, in every engine:
in one process from a copy of the auxiliary model, on a Flower node from the
shipped weights loaded into :func:`client_model_from`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsp import wire
from fedsp.config import LOWRANK, RunConfig, parse_embedding
from fedsp.data.batching import BatchStream, Encoded, fixed_batches
from fedsp.data.shards import RunData
from fedsp.errors import FedSPError
from fedsp.methods.base import BestKept, ClientModelInfo, ClientUpdate, Course, load_shipped, mean_or_nan
from fedsp.methods.fidelity import FIDELITY, emulator_fidelity
from fedsp.methods.kd import distilled_auxiliary_model
from fedsp.methods.optim import OptimConfig, Phase, set_trainable
from fedsp.methods.table import ALTERNATE, AUXILIARY, GLOBAL, JOINT, PROMPT_ONLY, ClientShape, spec_for
from fedsp.models.auxiliary import build_auxiliary_model, depth_plan, select_layers, unique_parameter_count
from fedsp.models.embedding import factorise_embedding
from fedsp.models.forward import answer_loss, mean_answer_loss
from fedsp.models.loading import LoadedModel
from fedsp.models.prefix import (
    Prefix,
    PrefixConfig,
    collapse_layers,
    expand_layers,
    initial_prefix,
    prefix_for,
)
from fedsp.models.vocabulary import PrunedVocabulary, prune_embedding, pruned_embedding, vocabulary_buffers

StateMap = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LocalConfig:
    """Local training of one party per round."""

    steps: int  # T: steps per phase per round
    batch_size: int
    align: OptimConfig  # auxiliary-model phase (clients)
    prompt: OptimConfig  # prefix phase (clients and server)


@dataclass(frozen=True)
class ClientPlan:
    """How a client trains: ``alternate`` (FedSP), ``joint`` (w/o AT) or ``prompt-only`` (FedPrompt)."""

    mode: str = ALTERNATE
    receive: StateMap | None = None  # server prefix -> client prefix (one-layer clients: mean over depth)
    send: StateMap | None = None  # client prefix -> server prefix (one-layer clients: repeat over depth)

    @property
    def trains_model(self) -> bool:
        return self.mode != PROMPT_ONLY


class FedSPClient:
    """A data owner: client model + prefix + private rows; stateful across rounds."""

    def __init__(
        self,
        aux_model: PreTrainedModel,
        prefix_config: PrefixConfig,
        rows: Sequence[Encoded],
        config: LocalConfig,
        total_rounds: int,
        pad_id: int,
        seed: int,
        plan: ClientPlan = ClientPlan(),
        oov_rate: float | None = None,
    ) -> None:
        self.aux_model = aux_model
        self.oov_rate = oov_rate  # a pruned vocabulary: the share of its tokens written in kept pieces
        # on the client model's device from the start: a phase state loaded before the first forward
        # (round 2 on) lands on its parameters' device, so they must not move afterwards
        self.prefix = Prefix(prefix_config).follow(aux_model)
        self.rows = list(rows)
        self.config = config
        self.plan = plan
        # Like the reference code, clients never update a reparametrisation MLP: only its input.
        prompt_params = (
            [self.prefix.embedding] if prefix_config.projection else list(self.prefix.parameters())
        )
        if plan.mode == JOINT:  # one optimiser, two learning rates, 2T steps (as many batches as FedSP)
            self.joint = _joint_phase(aux_model, prompt_params, config, total_rounds * 2 * config.steps)
        total = total_rounds * config.steps
        self.align = Phase(aux_model.parameters(), config.align, total) if plan.mode == ALTERNATE else None
        self.prompt = Phase(prompt_params, config.prompt, total)
        self.stream = BatchStream(self.rows, config.batch_size, pad_id, seed)

    def _loss(self) -> torch.Tensor:
        return answer_loss(self.aux_model, next(self.stream), self.prefix)

    def fit(self, state: dict[str, torch.Tensor]) -> ClientUpdate:
        self.prefix.load_wire_state(self.plan.receive(state) if self.plan.receive else state)
        self.aux_model.train()  # dropout on in both phases, as in the reference's training loop
        self.prefix.train()
        metrics: dict[str, float] = {} if self.oov_rate is None else {"oov_rate": self.oov_rate}
        if self.align is not None:  # ALTERNATE
            # 1) global-model alignment: auxiliary model trained, prefix frozen
            set_trainable(self.prefix, False)
            set_trainable(self.aux_model, True)
            metrics["align_loss"] = mean_or_nan(
                [self.align.step(self._loss()) for _ in range(self.config.steps)]
            )
        if self.plan.mode == JOINT:
            set_trainable(self.aux_model, True)
            for p in self.prompt.params:
                p.requires_grad_(True)
            losses = [self.joint.step(self._loss()) for _ in range(2 * self.config.steps)]
            metrics["align_loss"] = metrics["prompt_loss"] = mean_or_nan(losses)
        else:
            # 2) local knowledge capturing: prefix trained, client model frozen
            set_trainable(self.aux_model, False)
            for p in self.prompt.params:
                p.requires_grad_(True)
            metrics["prompt_loss"] = mean_or_nan(
                [self.prompt.step(self._loss()) for _ in range(self.config.steps)]
            )
        set_trainable(self.prefix, False)
        set_trainable(self.aux_model, False)
        self.aux_model.eval()
        sent = self.prefix.wire_state()
        return ClientUpdate(self.plan.send(sent) if self.plan.send else sent, len(self.rows), metrics)

    def state_dict(self) -> dict[str, Any]:
        """Everything kept between rounds: trained model weights, optimiser states, data position."""
        state: dict[str, Any] = {"prompt": self.prompt.state_dict(), "stream": self.stream.state_dict()}
        if self.plan.trains_model:
            state["model"] = {k: v.detach().clone() for k, v in self.aux_model.named_parameters()}
        if self.align is not None:
            state["align"] = self.align.state_dict()
        if self.plan.mode == JOINT:
            state["joint"] = self.joint.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "model" in state:
            own = dict(self.aux_model.named_parameters())
            with torch.no_grad():
                for name, value in state["model"].items():
                    own[name].copy_(value)
        self.prompt.load_state_dict(state["prompt"])
        self.stream.load_state_dict(state["stream"])
        if self.align is not None:
            self.align.load_state_dict(state["align"])
        if self.plan.mode == JOINT:
            self.joint.load_state_dict(state["joint"])


@dataclass
class ClientView:
    """The client model the server shipped, and a prefix shaped for it: the server's prefix scored as a
    client alone would run it (``receive``: server prefix -> client prefix, for one-layer clients)."""

    model: PreTrainedModel
    prefix: Prefix
    receive: StateMap | None = None

    def target(self, state: dict[str, torch.Tensor]) -> tuple[PreTrainedModel, Prefix]:
        self.prefix.load_wire_state(self.receive(state) if self.receive else state)
        return self.model, self.prefix


class FedSPServer:
    """The model owner: frozen global model + prefix + its own rows and the validation rows.

    With no clients it is centralised prefix-tuning: ``rows`` are then the union
    of all shards and ``config.steps`` the whole per-round budget.
    """

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
        eval_batch_size: int = 128,
    ) -> None:
        self.global_model = global_model
        self.prefix = prefix
        self.config = config
        self.phase = Phase(prefix.parameters(), config.prompt, total_rounds * config.steps)
        self.stream = BatchStream(rows, config.batch_size, pad_id, seed) if rows else None
        self.val_batches = fixed_batches(val_rows, eval_batch_size, pad_id)
        self.best = BestKept(prefix.wire_state, prefix.load_wire_state)
        self.client_view: ClientView | None = None  # what a model-private method's clients hold

    def broadcast(self) -> dict[str, torch.Tensor]:
        """The prefix sent to clients this round."""
        return self.prefix.wire_state()

    def aggregate(self, state: dict[str, torch.Tensor] | None, updates: Sequence[ClientUpdate]) -> None:
        if state is not None:
            self.prefix.load_wire_state(state)

    def tune(self) -> float:
        """T steps of prefix tuning on the frozen global model; mean training loss (nan without a shard)."""
        if self.stream is None or self.config.steps == 0:
            return float("nan")
        self.prefix.train()
        set_trainable(self.prefix, True)
        self.global_model.train()  # the model's own dropout on as in the reference's training (not SmolLM2's)
        try:
            losses = [
                self.phase.step(answer_loss(self.global_model, next(self.stream), self.prefix))
                for _ in range(self.config.steps)
            ]
        finally:
            self.global_model.eval()
            set_trainable(self.prefix, False)
        return mean_or_nan(losses)

    @torch.no_grad()
    def validation_loss(self, track: bool = True) -> float:
        """Answer-token loss of the current prefix on the validation rows; tracks the best prefix."""
        self.prefix.eval()
        loss = mean_answer_loss(self.global_model, self.val_batches, self.prefix)
        if track:
            self.best.offer(loss)
        return loss

    def use_best(self) -> None:
        self.best.restore()

    def evaluation_target(self) -> tuple[PreTrainedModel, Prefix | None]:
        return self.global_model, self.prefix

    def emulator_target(self) -> tuple[PreTrainedModel, Prefix | None] | None:
        """The clients' model (as shipped) with the current prefix as a client receives it; None when the
        clients hold the global model (FedPrompt) or there are none."""
        return None if self.client_view is None else self.client_view.target(self.prefix.wire_state())

    def state_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix.wire_state(),
            "phase": self.phase.state_dict(),
            "stream": self.stream.state_dict() if self.stream else None,
            **self.best.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prefix.load_wire_state(state["prefix"])
        self.phase.load_state_dict(state["phase"])
        if self.stream is not None:
            self.stream.load_state_dict(state["stream"])
        self.best.load_state_dict(state)


def _joint_phase(model: PreTrainedModel, prompt_params: list, config: LocalConfig, total: int) -> Phase:
    """One optimiser for "w/o AT": the model at the alignment learning rate, the prefix at the prompt one."""
    groups = [
        {"params": list(model.parameters()), "lr": config.align.lr},
        {"params": prompt_params, "lr": config.prompt.lr},
    ]
    return Phase(groups, config.prompt, total)


# -- building the parties (one client factory for every engine)


def local_config(config: RunConfig, steps: int | None = None, client: bool = False) -> LocalConfig:
    """A party's per-round training, from the run configuration (``steps``: T unless given; ``client``:
    a federation's client, whose prefix steps take ``--client-lr`` where it is set)."""
    prompt_lr = config.client_lr if client and config.client_lr is not None else config.lr
    return LocalConfig(
        steps=config.local_steps if steps is None else steps,
        batch_size=config.batch_size,
        align=OptimConfig(
            config.align_lr, config.weight_decay, config.warmup_ratio, grad_clip=config.max_grad_norm
        ),
        prompt=OptimConfig(
            prompt_lr, config.weight_decay, config.warmup_ratio, grad_clip=config.max_grad_norm
        ),
    )


def client_seed(config: RunConfig, partition: int) -> int:
    """The data-stream seed of client ``partition``."""
    return config.seed * 1000 + partition + 1


def client_model_from(
    shape: ClientShape,
    skeleton: PreTrainedModel,
    layers: Sequence[int],
    order: str = "cyclic",
    embedding: str = "full",
) -> PreTrainedModel:
    """The structure of what a client holds, built from the global architecture ``skeleton``.

    Its weights are then replaced by the ones the server shipped (a Flower node
    never has the global weights, only their shapes). ``order``: ``--aux-layer-order``;
    ``embedding``: ``--aux-embedding`` (a low-rank one's factors, a pruned one's rows and kept ids are
    left for the shipped ones).
    """
    if shape.holds == GLOBAL:
        return skeleton.requires_grad_(False)
    aux = build_auxiliary_model(skeleton, list(layers), share=shape.share, order=order)
    design = parse_embedding(embedding)
    if design is None:
        return aux
    kind, size = design
    if kind == LOWRANK:
        return factorise_embedding(aux, size, initialise=False)
    return prune_embedding(aux, torch.arange(size), initialise=False)


def node_client(
    config: RunConfig,
    skeleton: PreTrainedModel,
    layers: Sequence[int],
    shipped: dict[str, torch.Tensor],
    rows: Sequence[Encoded],
    partition: int,
    pad_id: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> FedSPClient:
    """A Flower node's client: the client model's structure from the global architecture ``skeleton``
    (uninitialised), the ``shipped`` weights loaded into it (names and shapes checked)."""
    shape = spec_for(config.method).client
    assert shape is not None, config.method  # the table names this builder for methods with clients only
    model = client_model_from(shape, skeleton, layers, config.aux_layer_order, config.aux_embedding)
    load_shipped(model, shipped)
    num_layers = skeleton.config.num_hidden_layers
    return make_client(config, shape, model, rows, partition, pad_id, num_layers, layers, tokenizer)


def promised_layers(config: RunConfig, num_layers: int) -> set[int]:
    """The global layers a client may hold (the model-privacy audit checks the others): a fixed set
    (FedPrompt-Single's layer 0), else the layers ``--aux-layers`` / ``--aux-layer-choice`` select.
    FedPrompt, whose clients get the whole model, breaks this promise, and its audit says so."""
    shape = spec_for(config.method).client
    if shape is not None and shape.layers is not None:
        return set(shape.layers)
    return set(select_layers(num_layers, config.aux_layers, config.aux_layer_choice))


def client_plan(
    config: RunConfig, shape: ClientShape, num_global_layers: int, layers: Sequence[int]
) -> ClientPlan:
    """How a client of ``shape`` trains, and how its prefix maps to the server's (one-layer clients)."""
    if shape.holds == AUXILIARY and not shape.share:  # one prefix layer per kept layer, mapped to L
        blocks = depth_plan(num_global_layers, len(layers), config.aux_layer_order)
        return ClientPlan(
            shape.mode,
            receive=partial(collapse_layers, plan=blocks),
            send=partial(expand_layers, plan=blocks),
        )
    return ClientPlan(shape.mode)


def make_client(
    config: RunConfig,
    shape: ClientShape,
    model: PreTrainedModel,
    rows: Sequence[Encoded],
    partition: int,
    pad_id: int,
    num_global_layers: int,
    layers: Sequence[int],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> FedSPClient:
    """Client ``partition`` of the method: ``model`` is what it holds (its own copy when it trains it).

    A model with a pruned vocabulary (``--aux-embedding pruned:V``) gets the client's ``rows`` rewritten
    into its kept ids, with ``tokenizer``'s merges; the share of rewritten tokens is the client's
    ``oov_rate`` (reported by each of its rounds)."""
    pruned, oov_rate = pruned_embedding(model), None
    if pruned is not None:
        if tokenizer is None:
            raise ValueError("a client model with a pruned vocabulary needs the tokenizer")
        kept = [int(i) for i in torch.as_tensor(pruned.kept_ids).tolist()]
        vocabulary = PrunedVocabulary.of(tokenizer, kept, f"--aux-embedding {config.aux_embedding}")
        oov_rate = vocabulary.out_of_vocabulary(rows)
        rows, pad_id = [vocabulary.encode_row(row) for row in rows], vocabulary.pieces(pad_id)[0]
    plan = client_plan(config, shape, num_global_layers, layers)
    prefix_config = prefix_for(
        model, config.prefix_len, config.prefix_projection, config.prefix_dropout
    ).config
    return FedSPClient(
        model,
        prefix_config,
        rows,
        local_config(config, client=True),
        config.rounds,
        pad_id,
        seed=client_seed(config, partition),
        plan=plan,
        oov_rate=oov_rate,
    )


def prefix_server(
    config: RunConfig,
    loaded: LoadedModel,
    data: RunData,
    rows: Sequence[Encoded],
    steps: int,
    seed: int | None = None,
) -> FedSPServer:
    """The model owner with its round-0 prefix, tuning ``steps`` steps a round on ``rows``.

    ``seed`` (the batch order; default ``--seed``) and a prefix initialised from ``rows`` instead of the
    server's shard make it a data owner tuning alone (the local-only baseline)."""
    prefix = initial_prefix(
        loaded.model,
        loaded.tokenizer,
        data.server_rows if seed is None else rows,
        config.prefix_len,
        config.prefix_projection,
        config.prefix_dropout,
        config.prefix_init,
    )
    return FedSPServer(
        loaded.model,
        prefix,
        rows,
        data.val_rows,
        local_config(config, steps),
        config.rounds,
        loaded.tokenizer.pad_token_id,
        seed=config.seed if seed is None else seed,
        eval_batch_size=config.eval_batch_size,
    )


def fedsp_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """FedSP, its ablations and the prompt-only baselines: what differs is the method's client shape."""
    shape = spec_for(config.method).client
    if shape is None or shape.holds not in (AUXILIARY, GLOBAL):
        raise FedSPError(f"method {config.method!r} has no FedSP-shaped clients")
    server = prefix_server(config, loaded, data, data.server_rows, config.effective_server_steps)
    num_layers = loaded.model.config.num_hidden_layers
    global_params = unique_parameter_count(loaded.model)
    notes: dict[str, Any]
    if shape.holds == GLOBAL:  # FedPrompt: the whole (frozen) global model
        template, layers = loaded.model, list(range(num_layers))
        info = ClientModelInfo(global_params, 1.0, tuple(layers), model_private=False)
        notes = {"model_private": False}
    else:
        template, layers, kd_losses = distilled_auxiliary_model(
            config,
            loaded,
            data.server_rows,
            share=shape.share,
            kd_steps=None if shape.kd else 0,
            layers=list(shape.layers) if shape.layers else None,
        )
        params = unique_parameter_count(template)
        info = ClientModelInfo(params, params / global_params, tuple(layers), model_private=True)
        notes = {"kd_losses": kd_losses, "aux_layers": layers, "shared_across_depth": shape.share}
        notes[FIDELITY] = emulator_fidelity(
            loaded.model,
            template,
            server.prefix,
            data.server_rows,
            server.val_batches,
            config.batch_size,
            loaded.tokenizer.pad_token_id,
            global_loss=server.validation_loss,  # the round-0 validation, kept as the best state so far
        )
    pad = loaded.tokenizer.pad_token_id

    def make(k: int) -> FedSPClient:
        # A frozen model no client modifies is shared in one process; a trained one is the client's own copy.
        model = copy.deepcopy(template) if shape.trains_model else template
        return make_client(
            config, shape, model, data.client_rows[k], k, pad, num_layers, layers, loaded.tokenizer
        )

    shipped: dict[str, torch.Tensor] = dict(template.named_parameters())
    if shape.holds == AUXILIARY:  # the server's own copy of the client model: compressed as it is sent
        shipped = {**wire.ship_once(shipped, config.wire_dtype), **vocabulary_buffers(template)}
        # the emulator's score: a pruned vocabulary reads other token ids than the evaluation's, so none
        if pruned_embedding(template) is None:
            view = prefix_for(template, config.prefix_len, config.prefix_projection, config.prefix_dropout)
            server.client_view = ClientView(
                template, view, client_plan(config, shape, num_layers, layers).receive
            )
    return Course(server, make, len(data.client_rows), info, shipped, notes=notes)
