"""The table of methods: one entry per method, as data, read by everything that needs to know a method.

An entry (:class:`MethodSpec`) says:
  - whether it trains anything (``trains``; zero-shot does not);
  - what its clients hold (:class:`ClientShape`; ``None``: no clients, a
    centralised method): the auxiliary model and how it is trained, the whole
    global model, SFPrompt's split head, or Offsite-Tuning's emulator. Only the
    methods' own modules read it;
  - whether client-level DP covers all a client sends (``client_dp``) and
    whether SecAgg+ can sum its updates;
  - the options it reads (the others are reported as ignored), the engines it
    runs on, and where the experiment grid lists it.

``config.py`` (which methods exist, which engines each allows, what each reads),
``experiments/grid.py`` (default method lists), ``cli.py`` and the runtime read
this table; the runtime reads :mod:`fedsp.methods.builders` for each method's
functions (its builder, its Flower client, the layers the audit allows); no module outside
``methods/`` tests a method's name or a client's shape (tests/test_layout.py). The
table is plain data and imports nothing of the package, so the configuration can
read it; the functions that build each method's parties (which import the
configuration) are bound to its name in :mod:`fedsp.methods.builders`.

Adding a method: one module under ``methods/`` with its server, client and
builder, one entry below, and its functions in ``builders.PARTS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Options by what reads them; an option in no group is read by every method.
TRAINING = frozenset(
    {
        "rounds",
        "local_steps",
        "batch_size",
        "weight_decay",
        "warmup_ratio",
        "max_grad_norm",
        "val_limit",
        "eval_every_round",
        "clients",
    }
)
FEDERATION = frozenset({"partition", "alpha", "server_steps"})
PREFIX = frozenset({"lr", "prefix_len", "prefix_projection", "prefix_dropout", "prefix_init"})
MODEL_LR = frozenset({"align_lr"})
CLIENT_PREFIX = frozenset({"client_lr"})  # the clients' own prefix learning rate (FedSP-shaped clients)
# The groups below are also sections of the options (fedsp.config.SECTIONS), in this order.
AUX_OPTIONS = ("aux_layers", "aux_layer_choice", "aux_layer_order", "aux_embedding")
KD_OPTIONS = ("kd_steps", "kd_lr", "kd_batch_size", "kd_projection", "kd_objective")
SPLIT_OPTIONS = ("split_layer", "prune_gamma", "local_loss_steps")  # SFPrompt
OFFSITE_OPTIONS = ("ot_adapter_layers", "ot_keep_ratio", "ot_distill", "ot_lora_rank")  # its emulator
# how clients' updates are combined and protected (fedsp.protection): every federated method reads these
PROTECTION_OPTIONS = (
    "aggregation",
    "dp_noise_multiplier",
    "dp_clip",
    "dp_epsilon",
    "dp_delta",
    "dp_clip_quantile",
    "dp_clip_lr",
    "dp_noise_seed",
    "secure_aggregation",
    "attack",
    "attackers",
)
# how each round's messages are encoded (fedsp.wire) and how a client keeps its state between rounds
WIRE_OPTIONS = ("wire_dtype", "state_moments")
AUX, KD, SPLIT = frozenset(AUX_OPTIONS), frozenset(KD_OPTIONS), frozenset(SPLIT_OPTIONS)
OFFSITE, PROTECTION, WIRE = frozenset(OFFSITE_OPTIONS), frozenset(PROTECTION_OPTIONS), frozenset(WIRE_OPTIONS)
GROUPS = (TRAINING, FEDERATION, PREFIX, CLIENT_PREFIX, MODEL_LR, AUX, KD, SPLIT, OFFSITE, PROTECTION, WIRE)
SPECIFIC = frozenset().union(*GROUPS)

# What a client holds of the global model.
AUXILIARY = "auxiliary"  # an auxiliary model made from a few global layers (FedSP and its relatives)
GLOBAL = "global"  # the whole global model, frozen (FedPrompt: no model privacy)
SPLIT_HEAD = "split-head"  # embeddings, layers 0..c-1 and the tail (SFPrompt; the server keeps the body)
# bottom and top adapter layers around a layer-dropped middle (Offsite-Tuning; fedsp.methods.offsite)
EMULATOR = "emulator"

# How a client trains (FedSP's client, fedsp.methods.fedsp.ClientPlan; ADAPTER: Offsite-Tuning's client
# tunes the emulator's adapter layers, nothing else).
ALTERNATE, JOINT, PROMPT_ONLY, ADAPTER = "alternate", "joint", "prompt-only", "adapter"

ENGINES = ("inprocess", "flower")
# Where the experiment grid lists a method: in every default list ("main"), in the full default list
# ("all"), or only when named ("opt-in").
GRID_LISTS = ("main", "all", "opt-in")


@dataclass(frozen=True)
class ClientShape:
    """What a method's client holds and how it trains it."""

    holds: str  # AUXILIARY, GLOBAL, SPLIT_HEAD or EMULATOR
    mode: str = ALTERNATE  # ALTERNATE (FedSP), JOINT (w/o AT), PROMPT_ONLY (FedPrompt) or ADAPTER
    share: bool = True  # auxiliary layers shared across the global depth (False: each applied once)
    kd: bool = True  # the auxiliary model is distilled (False: the raw global layers)
    layers: tuple[int, ...] | None = None  # fixed global layers; None: --aux-layers / --aux-layer-choice

    def __post_init__(self) -> None:
        if self.holds not in (AUXILIARY, GLOBAL, SPLIT_HEAD, EMULATOR) or self.mode not in (
            ALTERNATE,
            JOINT,
            PROMPT_ONLY,
            ADAPTER,
        ):
            raise ValueError(f"unknown client shape {self}")

    @property
    def trains_model(self) -> bool:
        return self.mode != PROMPT_ONLY


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    reads: frozenset[str]  # method-specific options it uses (see the groups above)
    trains: bool  # False: nothing is trained (zero-shot)
    client: ClientShape | None  # None: no clients (centralised or untrained)
    engines: tuple[str, ...] = ENGINES
    grid: str = "all"
    secure_aggregation: bool = True  # its updates can be summed by SecAgg+ (each one a single reply)
    # the server tunes the aggregated prefix on its own shard each round (a round's step 5, and FedPrompt as
    # the authors' scripts run it: MAKE_GLOBAL_TRAIN=True, one of the client_num + 1 shards the server's)
    # unless --server-steps says otherwise (0: FedAvg of the clients' prefixes alone); False: a method
    # whose server has no step of its own
    server_tunes: bool = True
    # a client sends nothing but its update (client-level DP of the aggregate covers what it sends);
    # False: split learning, whose activations and gradients cross the wire outside the aggregate
    client_dp: bool = True

    @property
    def federated(self) -> bool:
        return self.client is not None

    def ignored_options(self, config: Any) -> dict[str, Any]:
        """Options of ``config`` (a :class:`~fedsp.config.RunConfig`) set away from their defaults that
        this method does not read."""
        defaults = type(config)()
        return {
            name: getattr(config, name)
            for name in sorted(SPECIFIC - self.reads)
            if getattr(config, name) != getattr(defaults, name)
        }


_ALL = TRAINING | FEDERATION | PREFIX | CLIENT_PREFIX | MODEL_LR | AUX | KD | PROTECTION | WIRE
_PROMPT_ONLY = TRAINING | FEDERATION | PREFIX | CLIENT_PREFIX | PROTECTION | WIRE
_TABLE = [
    MethodSpec("zero-shot", "the global model as it is, no training", frozenset(), False, None, grid="main"),
    MethodSpec(
        "fedsp",
        "FedSP: distilled auxiliary model shared across depth, alternating training",
        _ALL,
        True,
        ClientShape(AUXILIARY),
        grid="main",
    ),
    MethodSpec(
        "fedprompt",
        "FedPrompt: clients hold the full global model (no model privacy), tune the prefix; the server "
        "tunes the average on its shard (--server-steps 0: it only averages)",
        _PROMPT_ONLY,
        True,
        ClientShape(GLOBAL, PROMPT_ONLY),
        grid="main",
    ),
    MethodSpec(
        "fedprompt-single",
        "FedPrompt-Single: clients hold layer 0 alone (no sharing, no KD), tune the prefix; the server "
        "tunes the average on its shard (--server-steps 0: it only averages)",
        _PROMPT_ONLY,
        True,
        ClientShape(AUXILIARY, PROMPT_ONLY, share=False, kd=False, layers=(0,)),
        grid="main",
    ),
    MethodSpec(
        "server-only",
        "server-only: the model owner tunes the prefix on its own shard alone, the same server steps a "
        "round and rounds as FedSP, no clients (the control every federated result is read against)",
        TRAINING | PREFIX | FEDERATION,
        True,
        None,
        engines=("inprocess",),  # no clients: nothing to federate
        grid="main",
    ),
    MethodSpec(
        "fedsp-no-kd",
        "FedSP without knowledge distillation (auxiliary model from the raw layers)",
        _ALL - KD,
        True,
        ClientShape(AUXILIARY, kd=False),
    ),
    MethodSpec(
        "fedsp-no-cs",
        "FedSP without cross-layer sharing (the selected layers, each applied once)",
        _ALL,
        True,
        ClientShape(AUXILIARY, share=False),
    ),
    MethodSpec(
        "fedsp-no-at",
        "FedSP without alternating training (model and prefix trained in one phase)",
        _ALL,
        True,
        ClientShape(AUXILIARY, JOINT),
    ),
    MethodSpec(
        "prefix-tuning",
        "centralised prefix-tuning of the frozen global model on all shards",
        TRAINING | PREFIX,
        True,
        None,
        engines=("inprocess",),  # no clients: nothing to federate
    ),
    MethodSpec(
        "local-only",
        "local-only: each data owner tunes a prefix of the global model on its own shard alone (no "
        "averaging); the mean and spread over owners",
        TRAINING | PREFIX | frozenset({"partition", "alpha"}),
        True,
        None,
        engines=("inprocess",),  # nothing crosses a wire
        grid="main",
    ),
    MethodSpec(
        "finetune",
        "centralised full fine-tuning of the global model on all shards (lr: --align-lr)",
        TRAINING | MODEL_LR,
        True,
        None,
        engines=("inprocess",),
    ),
    # In no default grid list: it scores every local example (EL2N, through the client's head) every round;
    # with tiny-llama at --scale cpu its cell took 190 s, FedSP's 35 s.
    MethodSpec(
        "sfprompt",
        "SFPrompt: split model (client head + tail, server body), input prompts, EL2N "
        "pruning, local-loss steps; P = --prefix-len",
        TRAINING
        | SPLIT
        | PROTECTION
        | WIRE
        | frozenset({"partition", "alpha", "lr", "prefix_len", "prefix_init"}),
        True,
        ClientShape(SPLIT_HEAD),
        grid="opt-in",
        secure_aggregation=False,  # the update is the last of a round's split messages
        client_dp=False,
    ),
    MethodSpec(
        "offsite-tuning",
        "Offsite-Tuning: clients tune the bottom and top adapter layers on a layer-dropped emulator; the "
        "server plugs the averaged adapters into the global model (lr: --align-lr)",
        TRAINING | FEDERATION | MODEL_LR | KD | OFFSITE | PROTECTION | WIRE,
        True,
        ClientShape(EMULATOR, ADAPTER),
        grid="opt-in",
        server_tunes=False,  # the paper's owner only plugs the adapters in; --server-steps N tunes them
    ),
]
METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in _TABLE}
# What a comparison is read against, in order of preference: the model owner alone (the control of every
# federated result), else the untrained model.
REFERENCES = ("server-only", "zero-shot")
# The method `fedsp convergence` times the others against: each one's first round within a point of this
# method's last-round accuracy (fedsp.experiments.convergence).
PACE_REFERENCE = "fedprompt"
METHODS = tuple(METHOD_SPECS)


def spec_for(method: str) -> MethodSpec:
    """The table entry of ``method`` (the configuration has already refused unknown names)."""
    return METHOD_SPECS[method]


def grid_methods(*lists: str) -> tuple[str, ...]:
    """The methods the experiment grid lists in ``lists`` (of :data:`GRID_LISTS`), in table order."""
    return tuple(spec.name for spec in _TABLE if spec.grid in lists)
