"""Offsite-Tuning (Xiao, Lin, Han 2023) as a federated method: clients tune adapter layers on an emulator.

The model owner never ships its model; it ships an *emulator*
(:mod:`fedsp.models.emulator`): the global
model's embeddings, final norm and LM head, its bottom and top
``--ot-adapter-layers`` decoder layers (the *adapter*, ``a`` each), and the
middle layers compressed by uniform layer drop: of the M = L - 2a middle layers
it keeps k = max(1, round(``--ot-keep-ratio`` * M)), at evenly spaced indices
(the first and last middle layer among them when k > 1), and drops the rest.
With ``--ot-distill true`` the kept middle layers are then distilled against the
global model (the project's KD, :mod:`fedsp.methods.kd`: last hidden states,
the server's shard, ``--kd-steps`` / ``--kd-lr`` / ``--kd-batch-size``; the adapter,
embeddings and head stay frozen, so the adapter still fits the global model),
cached like FedSP's auxiliary model.

What the paper tunes, and what this module does: the adapter layers' **full
weights** (every parameter of the 2 + 2 layers; the paper also combines its
adapter with parameter-efficient methods such as LoRA: ``--ot-lora-rank R``
trains PEFT's LoRA factors of rank R on the adapter layers' linear maps instead,
:func:`~fedsp.models.emulator.add_lora`, and the adapter's base weights then go
with the emulator, once); its default is a = 2, and its layer drop
keeps 8 of OPT-1.3B's 20 middle layers (16 of GPT2-XL's 44), so
``--ot-keep-ratio`` defaults to 0.4 (SmolLM2-135M: 10 of its 26 middle layers,
a client model of 14 of 30 layers). The paper distils its emulators for
OPT-1.3B and GPT2-XL on the Pile and uses the layer-dropped emulator alone for
its 6.7B / 7B models; here distillation is off by default (the server's shard
is small) and ``--ot-distill true`` turns it on. Learning rate: ``--align-lr``
(the project's learning rate of model weights).

A round (the round driver's, as for every method):
  1. the server broadcasts the adapter (the 2a layers' weights, by global layer index);
  2. each client loads it into its emulator and tunes it for ``--local-steps`` steps on its own rows
     (answer-token loss, the emulator's other weights frozen), then sends the adapter back;
  3. the round's aggregate (FedAvg, a robust rule, DP or SecAgg+: the update is only another state
     dict) is plugged into the global model's adapter layers: the *plug-in* (with LoRA the factors A and
     B are averaged apart, so the plug-in's change is mean(B) mean(A), not the mean of the B_k A_k);
  4. validation loss of the plug-in; the best adapter is kept. The server tunes nothing itself unless
     ``--server-steps N`` > 0 (then N steps on the plug-in's adapter layers with its own shard).
What crosses the wire: the emulator's frozen part once (at ``--wire-dtype``, like FedSP's auxiliary
model; the adapter is not in it: it comes with every round), then the adapter each round, both ways.
The emulator alone, with the best adapter, is scored too (``results.json``: ``emulator``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.data.batching import BatchStream, Encoded, fixed_batches
from fedsp.data.shards import RunData
from fedsp.errors import FedSPError
from fedsp.methods.base import BestKept, ClientModelInfo, ClientUpdate, Course, mean_or_nan
from fedsp.methods.fedsp import client_seed, local_config
from fedsp.methods.kd import cache_key, distill, kd_config_from, load_student, save_student
from fedsp.methods.optim import OptimConfig, Phase
from fedsp.models.adapters import decoder_layers
from fedsp.models.auxiliary import unique_parameter_count
from fedsp.models.emulator import (
    EmulatorPlan,
    Named,
    adapter_named,
    add_lora,
    build_emulator,
    emulator_plan,
    frozen_named,
)
from fedsp.models.export import ADAPTER_DIR
from fedsp.models.forward import answer_loss, mean_answer_loss
from fedsp.models.layer_export import LAYERS_FILE, write_layer_weights, write_peft_lora
from fedsp.models.loading import LoadedModel, cache_dir
from fedsp.models.prefix import Prefix


def plan_for(config: RunConfig, num_layers: int) -> EmulatorPlan:
    return emulator_plan(num_layers, config.ot_adapter_layers, config.ot_keep_ratio)


def lora(config: RunConfig) -> bool:
    """Clients train LoRA factors on the adapter layers instead of their weights (``--ot-lora-rank``)."""
    return config.ot_lora_rank > 0


def with_lora(config: RunConfig, model: PreTrainedModel, held: Sequence[int], plan: EmulatorPlan) -> None:
    """``model``'s adapter layers get LoRA factors when the run trains them (the same on every party)."""
    if lora(config):
        add_lora(model, held, plan.adapters, config.ot_lora_rank, config.seed)


def distilled(config: RunConfig) -> bool:
    """The emulator's middle layers are distilled (so none of them is a global layer as it is)."""
    return config.ot_distill and config.kd_steps > 0


def promised_layers(config: RunConfig, num_layers: int) -> set[int]:
    """The global layers clients may receive as they are: the adapter, and the kept middle layers unless
    they are distilled (the model-privacy audit checks every other layer, dropped ones first of all)."""
    plan = plan_for(config, num_layers)
    return set(plan.adapters) | (set() if distilled(config) else set(plan.kept))


def emulator_for(
    config: RunConfig, loaded: LoadedModel, plan: EmulatorPlan, rows: list[Encoded]
) -> tuple[PreTrainedModel, list[float]]:
    """The run's emulator and the KD losses that made it ([] without distillation); distilled weights of
    the middle layers are cached under ``<cache>/emulator`` (a cached emulator comes with its losses)."""
    emulator = build_emulator(loaded.model, plan)
    if not distilled(config):
        return emulator, []
    layers = decoder_layers(emulator)
    middle = nn.ModuleList(layers[plan.layers.index(g)] for g in plan.kept)
    kd_config = kd_config_from(config)
    model_config = {**loaded.model.config.to_dict(), "weights_dtype": str(loaded.model.dtype)}
    key = cache_key(
        loaded.name,
        model_config,
        plan.layers,
        None,
        kd_config,
        rows,
        config.seed,
        extra={"method": "offsite-tuning", "adapters": list(plan.adapters)},
    )
    path: Path = cache_dir() / "emulator" / f"{key}.safetensors"
    if path.is_file():
        try:
            return emulator, load_student(middle, path)
        except Exception as err:  # truncated or foreign: say which file, then distil again
            warnings.warn(f"cached emulator {path} cannot be read ({err}); distilling it again", stacklevel=2)
            path.unlink(missing_ok=True)
            emulator = build_emulator(loaded.model, plan)
            middle = nn.ModuleList(decoder_layers(emulator)[plan.layers.index(g)] for g in plan.kept)
    middle.requires_grad_(True)  # only the middle learns: the adapter must still fit the global model
    try:
        losses = distill(
            loaded.model,
            emulator,
            rows,
            kd_config,
            loaded.tokenizer.pad_token_id,
            config.seed,
            progress=config.progress,
            trainable=list(middle.parameters()),
        )
    finally:
        emulator.requires_grad_(False)
    save_student(middle, path, losses)
    return emulator, losses


class AdapterClient:
    """A data owner: the emulator (frozen but for its adapter), its rows; stateful across rounds."""

    def __init__(
        self,
        emulator: PreTrainedModel,
        adapter: Named,
        rows: Sequence[Encoded],
        optim: OptimConfig,
        steps: int,
        batch_size: int,
        total_rounds: int,
        pad_id: int,
        seed: int,
    ) -> None:
        self.emulator, self.adapter, self.rows, self.steps = emulator, adapter, list(rows), steps
        self.phase = Phase([p for _, p in adapter], optim, total_rounds * steps)
        self.stream = BatchStream(self.rows, batch_size, pad_id, seed)

    def fit(self, state: dict[str, torch.Tensor]) -> ClientUpdate:
        # 1) the round's adapter into the emulator; 2) T steps on it alone; 3) the adapter back
        wire.load_snapshot(self.adapter, state, "adapter")
        params = [p for _, p in self.adapter]
        for p in params:
            p.requires_grad_(True)
        self.emulator.train()  # the model's own dropout on, as in FedSP's client phases
        try:
            losses = [
                self.phase.step(answer_loss(self.emulator, next(self.stream))) for _ in range(self.steps)
            ]
        finally:
            self.emulator.eval()
            for p in params:
                p.requires_grad_(False)
        # "prompt_loss": the loss of what the client trains, where the round's record looks for it
        return ClientUpdate(wire.snapshot(self.adapter), len(self.rows), {"prompt_loss": mean_or_nan(losses)})

    def state_dict(self) -> dict[str, Any]:
        """Kept between rounds: the optimiser's state and the data position (the adapter comes down)."""
        return {"adapter_phase": self.phase.state_dict(), "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase.load_state_dict(state["adapter_phase"])
        self.stream.load_state_dict(state["stream"])


class OffsiteServer:
    """The model owner: the global model whose adapter layers take the clients' aggregate (the plug-in),
    and its copy of the emulator (to score what the clients hold)."""

    def __init__(
        self,
        global_model: PreTrainedModel,
        emulator: PreTrainedModel,
        plan: EmulatorPlan,
        rows: Sequence[Encoded],
        val_rows: Sequence[Encoded],
        config: RunConfig,
        steps: int,
        pad_id: int,
    ) -> None:
        self.global_model, self.emulator, self.plan, self.steps = global_model, emulator, plan, steps
        self.lora = lora(config)
        self.adapter = adapter_named(global_model, range(plan.num_layers), plan.adapters, self.lora)
        self.emulator_adapter = adapter_named(emulator, plan.layers, plan.adapters, self.lora)
        total = config.rounds * steps
        self.phase = Phase([p for _, p in self.adapter], local_config(config).align, total) if steps else None
        self.stream = BatchStream(rows, config.batch_size, pad_id, config.seed) if rows and steps else None
        self.val_batches = fixed_batches(val_rows, config.eval_batch_size, pad_id)
        self.best = BestKept(self.broadcast, lambda state: wire.load_snapshot(self.adapter, state, "adapter"))

    def broadcast(self) -> dict[str, torch.Tensor]:
        """The plug-in's adapter layers, sent to the round's clients."""
        return wire.snapshot(self.adapter)

    def aggregate(self, state: dict[str, torch.Tensor] | None, updates: Sequence[ClientUpdate]) -> None:
        if state is not None:  # plugged into the global model
            wire.load_snapshot(self.adapter, state, "adapter")

    def tune(self) -> float:
        """``--server-steps`` steps on the plug-in's adapter layers with the server's shard (nan: none)."""
        if self.phase is None or self.stream is None:
            return float("nan")
        params = [p for _, p in self.adapter]
        for p in params:
            p.requires_grad_(True)
        self.global_model.train()
        try:
            losses = [
                self.phase.step(answer_loss(self.global_model, next(self.stream))) for _ in range(self.steps)
            ]
        finally:
            self.global_model.eval()
            for p in params:
                p.requires_grad_(False)
        return mean_or_nan(losses)

    @torch.no_grad()
    def validation_loss(self, track: bool = True) -> float:
        """Answer-token loss of the plug-in on the validation rows; ``track``: keep the adapter when it is
        the best so far (False: a measurement only)."""
        loss = mean_answer_loss(self.global_model, self.val_batches, None)
        if track:
            self.best.offer(loss)
        return loss

    def use_best(self) -> None:
        self.best.restore()

    def evaluation_target(self) -> tuple[PreTrainedModel, Prefix | None]:
        return self.global_model, None

    def emulator_target(self) -> tuple[PreTrainedModel, Prefix | None]:
        """The emulator with the plug-in's current adapter: what a client alone holds after the course."""
        wire.load_snapshot(self.emulator_adapter, self.broadcast(), "adapter")
        return self.emulator, None

    def write_weights(self, out_dir: Path, base_model: str, metadata: dict[str, str]) -> dict[str, str]:
        """The plug-in's adapter for use outside fedsp: with LoRA, a PEFT LoRA adapter folder
        (``adapter/``); else the adapter layers' weights under the global model's parameter names
        (``adapter_layers.safetensors``, for ``load_state_dict(..., strict=False)``)."""
        if self.lora:
            write_peft_lora(out_dir / ADAPTER_DIR, self.global_model, base_model, overwrite=True)
            return {"adapter": ADAPTER_DIR}
        trained = {id(p) for _, p in self.adapter}
        names = [name for name, p in self.global_model.named_parameters() if id(p) in trained]
        layers = ",".join(str(g) for g in self.plan.adapters)
        write_layer_weights(out_dir / LAYERS_FILE, self.global_model, names, {**metadata, "layers": layers})
        return {"layers": LAYERS_FILE}

    def state_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.broadcast(),
            "phase": self.phase.state_dict() if self.phase else None,
            "stream": self.stream.state_dict() if self.stream else None,
            **self.best.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        wire.load_snapshot(self.adapter, state["adapter"], "adapter")
        if self.phase is not None:
            self.phase.load_state_dict(state["phase"])
        if self.stream is not None:
            self.stream.load_state_dict(state["stream"])
        self.best.load_state_dict(state)


def adapter_client(
    config: RunConfig,
    emulator: PreTrainedModel,
    plan: EmulatorPlan,
    rows: Sequence[Encoded],
    partition: int,
    pad_id: int,
) -> AdapterClient:
    """Client ``partition`` over its own ``emulator``: the one way a client is made, in every engine."""
    return AdapterClient(
        emulator,
        adapter_named(emulator, plan.layers, plan.adapters, lora(config)),
        rows,
        local_config(config).align,
        config.local_steps,
        config.batch_size,
        config.rounds,
        pad_id,
        client_seed(config, partition),
    )


def node_client(
    config: RunConfig,
    skeleton: PreTrainedModel,
    layers: Sequence[int],
    shipped: dict[str, torch.Tensor],
    rows: Sequence[Encoded],
    partition: int,
    pad_id: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> AdapterClient:
    """A Flower node's client: the emulator's structure from the global architecture (uninitialised), the
    shipped frozen part loaded into it (names, shapes and finiteness checked); the adapter comes with
    each round's broadcast. ``layers``: the server's emulator stack, which must be this configuration's."""
    plan = plan_for(config, skeleton.config.num_hidden_layers)
    if tuple(layers) != plan.layers:
        raise FedSPError(
            f"the server's emulator holds the global layers {list(layers)}, but --ot-adapter-layers "
            f"{config.ot_adapter_layers} --ot-keep-ratio {config.ot_keep_ratio} make {list(plan.layers)}"
        )
    emulator = build_emulator(skeleton, plan)
    with_lora(config, emulator, plan.layers, plan)
    wire.load_snapshot(frozen_named(emulator, plan, lora(config)), shipped, "shipped emulator")
    return adapter_client(config, emulator, plan, rows, partition, pad_id)


def offsite_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """The server (global model + plug-in adapter), the emulator shipped once, and the client factory."""
    model = loaded.model
    plan = plan_for(config, len(decoder_layers(model)))
    emulator, kd_losses = emulator_for(config, loaded, plan, data.server_rows)
    # the frozen part as it is sent; the server's emulator copy gets what a client decodes
    with_lora(config, emulator, plan.layers, plan)
    with_lora(config, model, range(plan.num_layers), plan)  # the plug-in: the global model's adapter layers
    shipped = wire.ship_once(dict(frozen_named(emulator, plan, lora(config))), config.wire_dtype)
    pad = loaded.tokenizer.pad_token_id
    steps = config.effective_server_steps
    server = OffsiteServer(model, emulator, plan, data.server_rows, data.val_rows, config, steps, pad)
    server.emulator_target()  # its adapter: the global model's (the round-0 plug-in)

    def make(k: int) -> AdapterClient:  # each client its own emulator: it trains the adapter in it
        return adapter_client(config, copy.deepcopy(emulator), plan, data.client_rows[k], k, pad)

    params = unique_parameter_count(emulator)
    info = ClientModelInfo(
        params,
        params / unique_parameter_count(model),
        plan.layers,
        model_private=True,
        privacy=plan.describe(distilled(config), lora(config)),
    )
    notes = {
        "kd_losses": kd_losses,
        "emulator": {
            "adapter_layers": list(plan.adapters),
            "kept_middle_layers": list(plan.kept),
            "dropped_layers": list(plan.dropped),
            "keep_ratio": config.ot_keep_ratio,
            "distilled": distilled(config),
            "trained": f"LoRA factors of rank {config.ot_lora_rank} (alpha {2 * config.ot_lora_rank}) on the "
            "adapter layers' linear maps"
            if lora(config)
            else "the adapter layers' full weights",
            "adapter_params": wire.num_params(server.broadcast()),
        },
    }
    return Course(server, make, len(data.client_rows), info, shipped, notes=notes)
