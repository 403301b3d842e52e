"""Which parties each method has: one table of methods, one small builder per family.

``build_course(config, loaded, data)`` turns a run configuration into a
:class:`~fedsp.methods.base.Course` (server, client factory, what clients hold)
that any runtime drives the same way. Each method also names the options it
reads, so an option it would silently ignore is reported instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.methods.base import ClientModelInfo, Course
from fedsp.methods.fedsp import (
    ALTERNATE,
    JOINT,
    PROMPT_ONLY,
    ClientPlan,
    FedSPClient,
    FedSPServer,
    LocalConfig,
)
from fedsp.methods.finetune import FinetuneServer
from fedsp.methods.optim import OptimConfig
from fedsp.methods.sfprompt import sfprompt_course
from fedsp.models.auxiliary import depth_plan, unique_parameter_count
from fedsp.models.loading import LoadedModel
from fedsp.models.prefix import collapse_layers, expand_layers, prefix_for
from fedsp.runtime.setup import RunData, distilled_auxiliary_model, initial_prefix

# Options by what reads them; an option in no group is read by every method.
TRAINING = frozenset({"rounds", "local_steps", "batch_size", "weight_decay", "warmup_ratio", "val_limit",
                      "eval_every_round", "clients"})  # fmt: skip
FEDERATION = frozenset({"partition", "alpha", "server_steps"})
PREFIX = frozenset({"lr", "prefix_len", "prefix_projection", "prefix_dropout", "prefix_init"})
MODEL_LR = frozenset({"align_lr"})
AUX = frozenset({"aux_layers", "aux_layer_choice"})
KD = frozenset({"kd_steps", "kd_lr", "kd_batch_size", "kd_projection"})
SPLIT = frozenset({"split_layer", "prune_gamma", "local_loss_steps"})  # SFPrompt
GROUPS = [TRAINING, FEDERATION, PREFIX, MODEL_LR, AUX, KD, SPLIT]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    reads: frozenset[str]  # method-specific options it uses (see the groups above)
    build: Callable[[RunConfig, LoadedModel, RunData], Course] | None  # None: nothing is trained
    federated: bool = True

    def ignored_options(self, config: RunConfig) -> dict[str, object]:
        """Options set away from their defaults that this method does not read."""
        defaults = RunConfig()
        specific = frozenset().union(*GROUPS)
        return {name: getattr(config, name) for name in sorted(specific - self.reads)
                if getattr(config, name) != getattr(defaults, name)}  # fmt: skip


def _local(config: RunConfig, steps: int | None = None) -> LocalConfig:
    return LocalConfig(
        steps=config.local_steps if steps is None else steps,
        batch_size=config.batch_size,
        align=OptimConfig(config.align_lr, config.weight_decay, config.warmup_ratio),
        prompt=OptimConfig(config.lr, config.weight_decay, config.warmup_ratio),
    )


def _prefix_server(config: RunConfig, loaded: LoadedModel, data: RunData, rows, steps: int) -> FedSPServer:
    prefix = initial_prefix(config, loaded, data.server_rows)
    return FedSPServer(loaded.model, prefix, rows, data.val_rows, _local(config, steps), config.rounds,
                       loaded.tokenizer.pad_token_id, seed=config.seed,
                       eval_batch_size=config.eval_batch_size)  # fmt: skip


def _global_params(loaded: LoadedModel) -> int:
    return unique_parameter_count(loaded.model)


def fedsp_course(config: RunConfig, loaded: LoadedModel, data: RunData, *, kd: bool = True,
                 share: bool = True, mode: str = ALTERNATE, one_layer: bool = False) -> Course:  # fmt: skip
    """FedSP and its relatives: a client model built from a few global layers, trained or not."""
    server = _prefix_server(config, loaded, data, data.server_rows, config.effective_server_steps)
    num_layers = loaded.model.config.num_hidden_layers
    aux, selected, kd_losses = distilled_auxiliary_model(
        config, loaded, data.server_rows, share=share, kd_steps=None if kd else 0, layers=[0] if one_layer else None
    )  # fmt: skip
    plan = ClientPlan(mode)
    if not share:  # the client prefix has one layer per kept layer; map it to and from the server's depth
        blocks = depth_plan(num_layers, len(selected))
        plan = ClientPlan(
            mode, receive=partial(collapse_layers, plan=blocks), send=partial(expand_layers, plan=blocks)
        )
    client_prefix = prefix_for(aux, config.prefix_len, config.prefix_projection, config.prefix_dropout).config
    local, pad = _local(config), loaded.tokenizer.pad_token_id

    def make_client(k: int) -> FedSPClient:
        return FedSPClient(copy.deepcopy(aux), client_prefix, data.client_rows[k], local, config.rounds, pad,
                           seed=config.seed * 1000 + k + 1, plan=plan)  # fmt: skip

    params = unique_parameter_count(aux)
    info = ClientModelInfo(params, params / _global_params(loaded), tuple(selected), model_private=True)
    shipped = dict(aux.named_parameters())
    return Course(server, make_client, len(data.client_rows), info, shipped,
                  notes={"kd_losses": kd_losses, "aux_layers": selected, "shared_across_depth": share})  # fmt: skip


def fedprompt_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """FedPrompt: every client holds the whole (frozen) global model and tunes only the prefix."""
    server = _prefix_server(config, loaded, data, data.server_rows, config.effective_server_steps)
    local, pad = _local(config), loaded.tokenizer.pad_token_id
    prefix_config = server.prefix.config

    def make_client(k: int) -> FedSPClient:
        # The model is frozen and never modified by a prompt-only client, so in one process they share it.
        return FedSPClient(loaded.model, prefix_config, data.client_rows[k], local, config.rounds, pad,
                           seed=config.seed * 1000 + k + 1, plan=ClientPlan(PROMPT_ONLY))  # fmt: skip

    num_layers = loaded.model.config.num_hidden_layers
    info = ClientModelInfo(_global_params(loaded), 1.0, tuple(range(num_layers)), model_private=False)
    shipped = dict(loaded.model.named_parameters())
    return Course(server, make_client, len(data.client_rows), info, shipped, notes={"model_private": False})


def centralised_course(config: RunConfig, loaded: LoadedModel, data: RunData, *, full: bool) -> Course:
    """Prefix-tuning (``full=False``) or fine-tuning (``full=True``) on the union of all shards.

    Budget: (K + 1) * T steps per round, the batches the whole federation trains the prefix on.
    """
    rows = data.server_rows + [row for shard in data.client_rows for row in shard]
    steps = (len(data.client_rows) + 1) * config.local_steps
    if not full:
        return Course(_prefix_server(config, loaded, data, rows, steps), _no_clients, 0, None)
    optim = OptimConfig(config.align_lr, config.weight_decay, config.warmup_ratio)
    server = FinetuneServer(loaded.model, rows, data.val_rows, steps, config.batch_size, optim, config.rounds,
                            loaded.tokenizer.pad_token_id, config.seed, config.eval_batch_size)  # fmt: skip
    return Course(server, _no_clients, 0, None)


def _no_clients(k: int):
    raise RuntimeError("a centralised method has no clients")


_ALL = TRAINING | FEDERATION | PREFIX | MODEL_LR | AUX | KD
METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in [
    MethodSpec("fedsp", "FedSP: distilled auxiliary model shared across depth, alternating training", _ALL,
               fedsp_course),
    MethodSpec("fedsp-no-kd", "FedSP without knowledge distillation (auxiliary model from the raw layers)",
               _ALL - KD, partial(fedsp_course, kd=False)),
    MethodSpec("fedsp-no-cs", "FedSP without cross-layer sharing (the selected layers, each applied once)", _ALL,
               partial(fedsp_course, share=False)),
    MethodSpec("fedsp-no-at", "FedSP without alternating training (model and prefix trained in one phase)",
               _ALL, partial(fedsp_course, mode=JOINT)),
    MethodSpec("fedprompt", "FedPrompt: clients hold the full global model (no model privacy), tune the prefix",
               TRAINING | FEDERATION | PREFIX, fedprompt_course),
    MethodSpec("fedprompt-single", "FedPrompt-Single: clients hold layer 0 alone (no sharing, no KD), tune "
               "the prefix", TRAINING | FEDERATION | PREFIX,
               partial(fedsp_course, kd=False, share=False, mode=PROMPT_ONLY, one_layer=True)),
    MethodSpec("prefix-tuning", "centralised prefix-tuning of the frozen global model on all shards",
               TRAINING | PREFIX, partial(centralised_course, full=False), federated=False),
    MethodSpec("finetune", "centralised full fine-tuning of the global model on all shards (lr: --align-lr)",
               TRAINING | MODEL_LR, partial(centralised_course, full=True), federated=False),
    MethodSpec("zero-shot", "the global model as it is, no training", frozenset(), None, federated=False),
    MethodSpec("sfprompt", "SFPrompt: split model (client head + tail, server body), input prompts, EL2N "
               "pruning, local-loss steps; P = --prefix-len", TRAINING | SPLIT
               | frozenset({"partition", "alpha", "lr", "prefix_len", "prefix_init"}), sfprompt_course),
]}  # fmt: skip


def build_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    spec = METHOD_SPECS[config.method]
    if spec.build is None:
        raise RuntimeError(f"method {config.method!r} trains nothing")
    return spec.build(config, loaded, data)


def shipped_bytes(course: Course) -> int:
    """Bytes of what each client receives once, before round 1 (the auxiliary or global model)."""
    if not course.shipped_once:
        return 0
    return len(wire.encode(course.shipped_once))
