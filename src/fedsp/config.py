"""The run configuration: one typed, validated, frozen dataclass.

CLI options, TOML/YAML config files and ``config.json`` of a results folder
all convert into :class:`RunConfig` once, at the boundary. Keys use
underscores; the CLI spells them with dashes (``--local-steps``). Which
methods exist, and which engines each runs on, is the method table's
(:mod:`fedsp.methods.table`). A configuration written by another version
(server and clients may differ) loads with ``strict=False``: unknown keys are
dropped with one warning, missing ones take their defaults. Each field carries
its help text, and each numeric one its range, in its metadata
(:mod:`fedsp.options`): the CLI shows the one, ``__post_init__`` checks the
other first, whichever door the value came in by.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from fedsp.config_input import OPTIONS, coerce_value, load_config_file, parse_layer_choice  # noqa: F401
from fedsp.errors import FedSPError, declare_fields
from fedsp.methods.table import (
    ENGINES,
    METHODS,
    spec_for,
)
from fedsp.models.precision import DTYPE_CHOICES, resolve_dtype
from fedsp.options import (
    MAX_BATCH,
    MAX_SEED,
    MAX_STEPS,
    check_bounds,
    count,
    option,
    real,
    shown,
)
from fedsp.protection import (
    ATTACK_FORMS,
    MEAN,
    RULE_FORMS,
    SECAGG_MIN_CLIENTS,
    SECAGG_RANGE,
    clients_per_round,
    parse_attack,
    parse_partitions,
    parse_rule,
)
from fedsp.spellings import (  # noqa: F401  (read from here too: the spellings of the options)
    BFLOAT16,
    FLOAT32,
    FULL,
    INT8,
    KD_OBJECTIVES,
    LAYER_ORDERS,
    LOWRANK,
    PARTITIONS,
    PREFIX_INITS,
    PRUNED,
    STATE_MOMENTS,
    WIRE_DTYPES,
)

MAX_PREFIX_LEN = 4096  # a sane bound, checked before any work (the paper's prefixes are 40 tokens)
MAX_LR = 100.0  # a learning rate beyond this only makes NaN (the defaults are 1e-4 to 1e-2)
# DP noise beyond 10^4 x the clip is no model at all, and the accountant's epsilon underflows to 0 past
# about 10^5 (with 2 clients): it would report "epsilon 0"
MAX_NOISE_MULTIPLIER = 1e4
MAX_EXAMPLES = 10**12  # example counts (--eval-limit, --max-client-weight)


# Settings that change how a run is batched or shown, not what it computes (up to float rounding):
# a grid reuses, and --resume accepts, a run that differs from the current settings only in these.
SPEED_ONLY = ("progress", "eval_batch_size")

# FedSP's server tunes at least this many prefix steps a round. The paper's T server steps, with the CPU
# presets' T = 2, left FedSP 2-3 points below FedPrompt after 20 rounds on ARC-Easy and SciQ; 4 steps
# gained 1.5-2 points on both (2 seeds each, docs/results.md, "The server's prefix steps"). T >= 4
# (the paper's own scripts: T = 10 or 20) is unchanged.
MIN_SERVER_STEPS = 4


@dataclass(frozen=True)
class RunOptions:
    """What is trained, on what data, where, and where its results go."""

    TITLE: ClassVar[str] = "run"

    method: str = option("fedsp", f"method: {', '.join(METHODS)}")
    model: str = option(
        "smollm2",
        "global model: smollm2 (bundled), a Hugging Face folder or id, a .gguf file, "
        "or tiny-llama/tiny-gpt2/tiny-opt",
    )
    task: str = option("arc_easy", "task: {tasks} (custom: your own files in --data-dir)")
    data_dir: str | None = option(
        None,
        "folder with <split>.jsonl/.json/.csv/.parquet files: the task's Hugging Face schema, or with --task "
        "custom prompt/completion, messages, alpaca or multiple-choice rows (not bundled data); in a config "
        "file, a relative folder is read from the file's own folder",
    )
    dtype: str = option(  # auto is not the default: 1.3-2.2x faster steps where it applies, FedSP 0.6
        "float32",  # points lower over 3 seeds (docs/performance.md)
        "float32, bfloat16, or auto: bfloat16 where the CPU (AMX/AVX512-BF16) or GPU multiplies it natively",
    )
    device: str = option("auto", "where the models run: auto (CUDA when present, else CPU), cpu or cuda")
    seed: int = count(0, "training seed", 0, MAX_SEED)
    out: str | None = option(
        None, "results folder to create (must not exist; default runs/<method>-<task>-<time>)"
    )
    progress: bool = option(True, compare=False)  # --quiet sets it off

    def check_section(self) -> None:
        """The method, dtype and device are known ones; the dtype is recorded as computed, never auto."""
        _check_choice("method", self.method, METHODS)
        _check_choice("dtype", self.dtype, DTYPE_CHOICES)
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        # a run records the dtype it computed in (config.json, --resume, grid cells), never "auto"
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))


@dataclass(frozen=True)
class FederationOptions:
    """Who takes part: the clients and their shards, the rounds, the engine, partial participation
    and failures, the audit."""

    TITLE: ClassVar[str] = "federation"

    clients: int = count(
        10,
        "number of clients K (the train split is cut into K+1 shards; shard 0 is the server's)",
        1,
        100_000,
    )
    rounds: int = count(3, "federated rounds", 1, MAX_STEPS)
    partition: str = option(
        "iid",
        f"how the train split is shared out: {', '.join(PARTITIONS)} (FIELD: a field of the rows, e.g. "
        "by:activity_label; each client gets whole groups, the server an IID sample)",
    )
    alpha: float = real(
        1.0,
        "Dirichlet concentration for --partition dirichlet (smaller = more skewed)",
        0,
        1e6,
        low_open=True,
    )
    # None: --seed, so each training seed also resamples the partition (and the held-out validation rows)
    data_seed: int | None = count(
        None,
        "seed of the data partition and of the held-out validation rows (default: --seed, so each seed "
        "resamples the partition; 12345: the fixed partition of results before 2026-12-07)",
        0,
        MAX_SEED,
    )
    server_rows: int | None = count(
        None,
        "cut the server's own shard to N rows (a model owner with little in-domain data; default: its "
        "whole shard, 1/(K+1) of the train split); the clients' shards are unchanged",
        1,
        MAX_EXAMPLES,
    )
    engine: str = option(
        "inprocess",
        "federation engine: inprocess (one process, clients in turn) or flower (Flower simulation)",
    )
    fraction_fit: float = real(
        1.0,
        "fraction of the clients sampled each round (seeded, the same in both engines)",
        0,
        1,
        low_open=True,
    )
    min_replies: int = count(
        1,
        "fewest accepted client updates a round needs; fewer stops the run with an error (more than the "
        "clients sampled a round, --clients x --fraction-fit, is refused at start)",
        1,
        100_000,
    )
    max_client_weight: int | None = count(
        None,
        "largest example count (FedAvg weight) a client's update counts with; larger claims are cut to it "
        "and recorded (a deployed server cannot check a client's count)",
        1,
        MAX_EXAMPLES,
    )
    client_timeout: float | None = real(
        None,
        "seconds a round waits for a client's reply (both engines); late clients are left out",
        0,
        1e7,
        low_open=True,
    )
    audit: bool = option(
        False,
        "record every tensor sent to clients and check none is a private global-model weight (true/false)",
    )

    @property
    def clients_per_round(self) -> int:
        return clients_per_round(self.clients, self.fraction_fit)

    def check_section(self) -> None:
        """The engine and the partition are known ones; a round can have the replies it must wait for."""
        _check_choice("engine", self.engine, ENGINES)
        if not (isinstance(self.partition, str) and self.partition.startswith("by:")):
            _check_choice("partition", self.partition, PARTITIONS)
        elif not self.partition[3:] or self.partition[3:] != self.partition[3:].strip():
            raise FedSPError(
                f"--partition {self.partition!r} needs a field name after by: (no spaces around it), "
                "like by:activity_label"
            )
        if self.min_replies > self.clients_per_round:  # refused, not capped: the run would stop anyway
            raise FedSPError(
                f"--min-replies {self.min_replies} is more than the {self.clients_per_round} clients sampled "
                f"a round (--clients {self.clients}, --fraction-fit {self.fraction_fit:g}); a round can "
                f"accept at most {self.clients_per_round} updates"
            )


@dataclass(frozen=True)
class TrainingOptions:
    """The optimisation steps of every phase: how many, on which batches, at which learning rates."""

    TITLE: ClassVar[str] = "training"

    local_steps: int = count(
        2, "T: steps per phase per round (client alignment, client prompt tuning)", 0, MAX_STEPS
    )
    # None: local_steps, or 0 for methods whose server only averages
    server_steps: int | None = count(
        None,
        "the server's own tuning steps per round on its shard (default: --local-steps, at least 4, for "
        "fedsp, its ablations, fedprompt and fedprompt-single as the authors' scripts run them, and "
        "server-only; 0 for offsite-tuning, whose server only plugs the adapters in); 0: the server only "
        "averages",
        0,
        MAX_STEPS,
    )
    batch_size: int = count(8, "training batch size", 1, MAX_BATCH)
    # prefix phases (clients' knowledge capturing, server tuning); see docs/results.md
    lr: float = real(1e-2, "learning rate of the prefix phases", 0, MAX_LR, low_open=True)
    # a lever of issue 38: the clients' prefix steps at their own rate, the server's at --lr
    client_lr: float | None = real(
        None,
        "learning rate of the clients' prefix phases (fedsp, its ablations, fedprompt, fedprompt-single); "
        "unset: --lr; the server's own steps and local-only's owners keep --lr",
        0,
        MAX_LR,
        low_open=True,
    )
    align_lr: float = real(  # clients' auxiliary-model phase
        1e-4,
        "learning rate of model weights (clients' auxiliary-model phase; finetune; offsite-tuning's adapter)",
        0,
        MAX_LR,
        low_open=True,
    )
    weight_decay: float = real(0.01, "AdamW weight decay", 0, 100)
    warmup_ratio: float = real(0.1, "fraction of each schedule spent warming up", 0, 1, high_open=True)
    # every training phase's gradient clipped to this L2 norm; 0 (default, as the reference code): none.
    # Measured: FedSP 58.5 without, 58.3 with 1.0 (3 seeds, docs/results.md)
    max_grad_norm: float = real(
        0.0, "gradient L2 norm every training phase is clipped to (KD included); 0: no clipping", 0, 1e9
    )

    def check_section(self) -> None:
        """Every value is a bounded number (``check_bounds``); nothing else to check."""


@dataclass(frozen=True)
class PrefixOptions:
    """The soft prompt: its length, form, dropout and initialisation."""

    TITLE: ClassVar[str] = "prefix"

    prefix_len: int = count(40, "P: number of prefix tokens", 1, MAX_PREFIX_LEN)
    prefix_projection: bool = option(False, "reparametrise the prefix through an MLP (true/false)")
    prefix_dropout: float = real(0.1, "dropout on the prefix in training", 0, 1, high_open=True)
    prefix_init: str = option(
        "tokens", "prefix initialisation: tokens (the model's own keys/values of task text) or random"
    )

    def check_section(self) -> None:
        _check_choice("prefix-init", self.prefix_init, PREFIX_INITS)


@dataclass(frozen=True)
class AuxiliaryOptions:
    """FedSP's client model: which global layers it is built from, its embedding, and how it is
    distilled (KD)."""

    TITLE: ClassVar[str] = "auxiliary model and KD"

    aux_layers: int = count(
        1, "N: number of global-model layers in the auxiliary model (each shared L/N times)", 1, 10_000
    )
    aux_layer_choice: str | tuple[int, ...] = option(
        "bottom", "which layers: bottom, middle, top, or indices like 0,15"
    )
    aux_layer_order: str = option(  # models/auxiliary.py
        "cyclic",
        "which of N > 1 auxiliary layers runs at each depth: cyclic (0,1,..,N-1,0,1,..; the reference "
        "code's) or blocks (each layer one contiguous block of depths)",
    )
    aux_embedding: str = option(  # lowrank:R: the client's embedding and head as factors (models/embedding)
        "full",
        "the auxiliary model's embedding and tied head: full (the global model's), lowrank:R (two factors "
        "of rank R from its SVD, then distilled) or pruned:V (V kept tokens; a client's other tokens "
        "written as their BPE merge parts): a smaller client model",
    )
    kd_steps: int = count(
        20, "knowledge-distillation steps for the auxiliary model (0 = no KD)", 0, MAX_STEPS
    )
    kd_lr: float = real(5e-4, "KD learning rate", 0, MAX_LR, low_open=True)
    kd_batch_size: int = count(8, "KD batch size", 1, MAX_BATCH)
    kd_projection: bool = option(False, "learnable W_S in the KD loss, as in the paper (true/false)")
    kd_objective: str = option(
        "hidden",
        "what KD matches: hidden (MSE of the last hidden states, the paper's), logits (KL divergence of "
        "the next-token distributions, the teacher's from its cached states) or both (their sum)",
    )

    def check_section(self) -> None:
        """Known layer order, KD objective and embedding; layer indices kept as a tuple."""
        _check_choice("aux-layer-order", self.aux_layer_order, LAYER_ORDERS)
        _check_choice("kd-objective", self.kd_objective, KD_OBJECTIVES)
        parse_embedding(self.aux_embedding)  # one line naming the forms, when it is none of them
        if isinstance(self.aux_layer_choice, list):
            object.__setattr__(self, "aux_layer_choice", tuple(self.aux_layer_choice))


@dataclass(frozen=True)
class SplitOptions:
    """SFPrompt's split of the model and its local steps (its prompt length is ``prefix_len``)."""

    TITLE: ClassVar[str] = "split learning (sfprompt)"

    split_layer: int = count(  # checked against the model's L at build time
        2, "sfprompt: cut layer c (1..L-1): clients run layers 0..c-1, the server the rest", 1, 10_000
    )
    prune_gamma: float = real(
        0.5,
        "sfprompt: fraction in (0, 1] of each client's examples kept (the hardest by EL2N)",
        0,
        1,
        low_open=True,
    )
    local_loss_steps: int = count(
        2, "sfprompt: shortcut-model steps per round before split training (--local-steps)", 0, MAX_STEPS
    )

    def check_section(self) -> None:
        """Every value is a bounded number (``check_bounds``); the split layer is checked against the
        model once it is loaded."""


@dataclass(frozen=True)
class EmulatorOptions:
    """Offsite-Tuning's emulator: the adapter layers clients tune, the layer-dropped middle, LoRA."""

    TITLE: ClassVar[str] = "emulator (offsite-tuning)"

    ot_adapter_layers: int = count(
        2,
        "offsite-tuning: adapter layers clients tune at the bottom and at the top of the emulator, each "
        "(whole layers of the global model, full weights; the paper's 2 + 2)",
        1,
        10_000,
    )
    ot_keep_ratio: float = real(
        0.4,
        "offsite-tuning: fraction in (0, 1] of the middle layers the emulator keeps (uniform layer drop; 1: "
        "no drop; the paper's OPT-1.3B keeps 8 of 20)",
        0,
        1,
        low_open=True,
    )
    ot_distill: bool = option(
        False,
        "offsite-tuning: distil the emulator's kept middle layers against the global model (--kd-steps, "
        "--kd-lr, --kd-batch-size; cached; true/false)",
    )
    ot_lora_rank: int = count(
        0,
        "offsite-tuning: 0 trains the adapter layers' full weights (the paper's); R > 0 trains LoRA factors "
        "of rank R on their linear maps instead (PEFT; the base weights go once, with the emulator)",
        0,
        100_000,
    )

    def check_section(self) -> None:
        """Every value is a bounded number or a flag; the adapter layers are checked against the model
        once it is loaded."""


@dataclass(frozen=True)
class EvaluationOptions:
    """What the run scores, and how: the examples, the validation rows, lengths for generation."""

    TITLE: ClassVar[str] = "evaluation"

    eval_limit: int | None = count(
        200,
        "evaluate on the first N examples of the evaluation split (0 = all)",
        1,
        MAX_EXAMPLES,
        zero_unsets=True,
    )
    val_limit: int | None = count(
        100,
        "server validation loss on the first N validation examples (0 = all)",
        1,
        MAX_EXAMPLES,
        zero_unsets=True,
    )
    eval_every_round: bool = option(True, "evaluate accuracy after every round (true/false)")
    zero_shot_eval: bool = option(
        True, "evaluate the untrained model first, on the same examples (true/false)"
    )
    eval_batch_size: int = count(
        128, "evaluation batch size (sequences; speed only, results are the same)", 1, MAX_BATCH
    )
    max_length: int = count(
        256, "maximum tokens per sequence (context truncated from the left)", 1, MAX_STEPS
    )
    max_new_tokens: int = count(
        32, "generative tasks: tokens generated per example at most (greedy)", 1, MAX_STEPS
    )
    stop: str | None = option(
        None,
        "generative tasks: text that ends a generation, like '\\n' (default: the task's, SQuAD: a newline; "
        "custom: end of text only)",
    )

    def check_section(self) -> None:
        """Room for a context and its answer, and for generated tokens."""
        if self.max_length < 2:  # one context token and one answer token at the least
            raise FedSPError(f"--max-length {self.max_length} is too short for a context plus its answer")
        if self.max_new_tokens >= self.max_length:
            raise FedSPError(
                f"--max-new-tokens {self.max_new_tokens} leaves no room for a prompt in --max-length "
                f"{self.max_length}; generation keeps prompt + new tokens within it"
            )


@dataclass(frozen=True)
class WireOptions:
    """How each round's messages are encoded, and how a client keeps its state between rounds."""

    TITLE: ClassVar[str] = "wire"

    wire_dtype: str = option(  # encoded by fedsp.wire
        "float32",
        "how each round's prefix and the client model shipped once travel: float32 (as trained), or "
        "bfloat16 / int8 (a scale per 64 values): then updates are sent as their change from the broadcast, "
        "with error feedback",
    )
    state_moments: str = option(
        "float32",
        "the dtype of the AdamW moments a client keeps on its disk between rounds: float32 or bfloat16 "
        "(half the bytes; the weights it trains are kept exactly)",
    )

    def check_section(self) -> None:
        _check_choice("wire-dtype", self.wire_dtype, WIRE_DTYPES)
        _check_choice("state-moments", self.state_moments, STATE_MOMENTS)


@dataclass(frozen=True)
class ProtectionOptions:
    """How the clients' updates are combined and protected: robust rules, DP, SecAgg+, and the
    test attacks."""

    TITLE: ClassVar[str] = "protection"

    aggregation: str = option("mean", f"how the round's updates are combined: {RULE_FORMS}")
    dp_noise_multiplier: float | None = real(
        None,
        "client-level differential privacy: Gaussian noise of Z x clip on the sum of the clipped updates "
        "(needs --dp-clip)",
        0,
        MAX_NOISE_MULTIPLIER,
    )
    dp_clip: float | None = real(
        None,
        "client-level DP: each update (prefix minus broadcast) clipped to this L2 norm (the initial clip "
        "with --dp-clip-quantile)",
        0,
        1e9,
        low_open=True,
    )
    dp_epsilon: float | None = real(
        None,
        "client-level DP budget: without --dp-noise-multiplier, the noise is chosen for the planned "
        "rounds; with it, a round that would exceed it is not started",
        0,
        1e6,
        low_open=True,
    )
    dp_delta: float = real(
        1e-5, "client-level DP: the delta epsilon is reported at", 0, 1, low_open=True, high_open=True
    )
    dp_clip_quantile: float | None = real(
        None,
        "client-level DP: adapt the clip each round towards this fraction of unclipped updates "
        "(Andrew et al. 2021)",
        0,
        1,
        low_open=True,
        high_open=True,
    )
    dp_clip_lr: float = real(  # Flower's default
        0.2, "client-level DP: learning rate of the adaptive clip", 0, MAX_LR, low_open=True
    )
    dp_noise_seed: int | None = count(
        None,
        "client-level DP: seed of the noise and the sampling, for tests and reproduction only (written to "
        "config.json: anyone who reads it can remove the noise); unset: a secret seed",
        0,
        MAX_SEED,
    )
    secure_aggregation: bool = option(
        False,
        "Flower's SecAgg+: the server sees only the sum of the updates (--engine flower, aggregation mean; "
        "true/false)",
    )
    attack: str | None = option(
        None, f"evaluation only: what --attackers send instead of their update: {ATTACK_FORMS}"
    )
    attackers: tuple[int, ...] = option((), "evaluation only: the partitions that send --attack, like 1,4")

    @property
    def dp(self) -> bool:
        """Client-level differential privacy is on (a noise multiplier or a budget was given)."""
        return self.dp_noise_multiplier is not None or self.dp_epsilon is not None

    def check_section(self) -> None:
        """Each value, then how the protection options combine with each other (one-line errors)."""
        object.__setattr__(self, "aggregation", str(parse_rule(self.aggregation)))  # canonical spelling
        rule = parse_rule(self.aggregation)
        if self.dp and self.dp_clip is None:
            raise FedSPError("differential privacy (--dp-noise-multiplier or --dp-epsilon) needs --dp-clip C")
        if not self.dp and (self.dp_clip is not None or self.dp_clip_quantile is not None):
            given = "--dp-clip" if self.dp_clip is not None else "--dp-clip-quantile"
            raise FedSPError(
                f"{given} needs --dp-noise-multiplier Z or --dp-epsilon E (for clipping without noise: "
                "--aggregation clipped-mean:C)"
            )
        if self.dp_epsilon is not None and self.dp_noise_multiplier == 0:
            raise FedSPError(
                f"--dp-epsilon {self.dp_epsilon:g} cannot hold with --dp-noise-multiplier 0 (no noise: no "
                "privacy); give a positive noise multiplier, or --dp-epsilon alone to have one chosen"
            )
        if self.dp and rule.name != MEAN:
            raise FedSPError(
                f"differential privacy aggregates with its own clipped uniform mean; --aggregation {rule} "
                "cannot be combined with it (use mean)"
            )
        if self.secure_aggregation:
            if rule.name != MEAN:
                raise FedSPError(
                    f"--secure-aggregation shows the server only the sum of the updates; --aggregation "
                    f"{rule} needs each update (use mean)"
                )
            if self.dp_clip_quantile is not None:
                raise FedSPError(
                    "--dp-clip-quantile needs each update's norm, which --secure-aggregation hides; "
                    "use a fixed --dp-clip"
                )
            if self.dp and self.dp_clip is not None and self.dp_clip > SECAGG_RANGE:
                raise FedSPError(
                    f"--dp-clip {self.dp_clip:g} with --secure-aggregation: a clipped update's values must "
                    f"fit SecAgg+'s range of +-{SECAGG_RANGE:g}; use a clip of at most {SECAGG_RANGE:g}"
                )
        if self.attack is not None:
            object.__setattr__(self, "attack", str(parse_attack(self.attack)))
        object.__setattr__(self, "attackers", parse_partitions(self.attackers) if self.attackers else ())
        if (self.attack is None) != (not self.attackers):
            raise FedSPError(
                "--attack and --attackers go together: an attack and the partitions that send it"
            )


@dataclass(frozen=True)
class RunConfig(
    ProtectionOptions,
    WireOptions,
    EvaluationOptions,
    EmulatorOptions,
    SplitOptions,
    AuxiliaryOptions,
    PrefixOptions,
    TrainingOptions,
    FederationOptions,
    RunOptions,
):
    """Everything a run depends on: the sections' options, flat (``config.lr``), each section checking
    its own values, then how they fit together. Defaults are the CPU-sized main job on SmolLM2 + ARC-Easy."""

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):  # 0 means "all" for these, in Python as on the command line
            value = getattr(self, spec.name)
            if spec.metadata.get("zero_unsets") and value == 0 and not isinstance(value, bool):
                object.__setattr__(self, spec.name, None)
        check_bounds(self)  # every numeric field against the range it declares (fedsp.options)
        for section in SECTION_TYPES:  # each section its own values, in the order of SECTIONS
            section.check_section(self)
        self._check_across()

    def _check_across(self) -> None:
        """How the sections fit together: the method (and its table entry) with the engine, the client
        model, DP and SecAgg+; the clients a round with the aggregation rule, SecAgg+ and the attackers."""
        spec = spec_for(self.method)
        if self.engine not in spec.engines:
            raise FedSPError(
                f"--method {self.method} runs with --engine {' or '.join(spec.engines)} only for now, "
                f"got --engine {self.engine}"
            )
        if parse_embedding(self.aux_embedding) is not None and "aux_embedding" not in spec.reads:
            raise FedSPError(
                f"--aux-embedding {self.aux_embedding} shrinks a distilled auxiliary model; the clients of "
                f"--method {self.method} hold none (use fedsp or its ablations, or --aux-embedding full)"
            )
        rule = parse_rule(self.aggregation)
        per_round = self.clients_per_round
        if rule.trim and 2 * rule.trim >= per_round:
            raise FedSPError(
                f"--aggregation {rule} drops the {rule.trim} largest and {rule.trim} smallest values of "
                f"each coordinate, which leaves none of the {per_round} clients a round "
                f"(--clients {self.clients}, --fraction-fit {self.fraction_fit:g}); F must be below "
                f"{per_round / 2:g}"
            )
        if self.dp and not spec.client_dp:
            raise FedSPError(
                f"--method {self.method} sends activations and gradients to the server at every split step, "
                "outside the aggregate; client-level DP of the aggregate would not cover them"
            )
        if self.secure_aggregation:
            self._check_secure_aggregation(per_round)
        outside = [k for k in self.attackers if not 0 <= k < self.clients]
        if outside:
            given = shown(",".join(map(shown, self.attackers)))
            raise FedSPError(
                f"--attackers {given}: {shown(outside)} are not partitions of this run "
                f"(0..{self.clients - 1} with --clients {self.clients})"
            )

    def _check_secure_aggregation(self, per_round: int) -> None:
        """SecAgg+ with the wire, the method, the engine and the federation (its own options with each
        other: :meth:`ProtectionOptions.check_section`)."""
        if self.wire_dtype != FLOAT32:
            raise FedSPError(
                f"--secure-aggregation masks float32 updates (SecAgg+ quantises them itself); "
                f"--wire-dtype {self.wire_dtype} cannot be combined with it (use float32)"
            )
        if not spec_for(self.method).secure_aggregation:
            raise FedSPError(
                f"--secure-aggregation is not available with --method {self.method}: its clients' "
                "update is the last of each round's split-learning messages, which SecAgg+ cannot mask"
            )
        if self.engine != "flower":
            raise FedSPError(
                f"--secure-aggregation runs with --engine flower only (Flower's SecAgg+), "
                f"got --engine {self.engine}"
            )
        if self.max_client_weight is not None:
            raise FedSPError(
                "--max-client-weight needs each client's example count, which --secure-aggregation "
                "hides (counts are summed inside the masked vectors)"
            )
        if per_round < SECAGG_MIN_CLIENTS:
            raise FedSPError(
                f"--secure-aggregation needs at least {SECAGG_MIN_CLIENTS} clients a round "
                f"(SecAgg+ shares each client's mask among the others); --clients {self.clients} "
                f"--fraction-fit {self.fraction_fit:g} gives {per_round}"
            )

    @property
    def partition_seed(self) -> int:
        """The seed the train split is cut (and validation rows held out) with: ``--data-seed`` when
        given, else ``--seed``, so seeds resample the partition."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def effective_server_steps(self) -> int:
        """Server prefix-tuning steps a round: ``--server-steps`` when given; else ``--local-steps`` (the
        paper's T) but at least :data:`MIN_SERVER_STEPS` for every method whose server tunes (FedSP, its
        ablations, FedPrompt as the authors' scripts run it, server-only); 0 for one whose server only
        averages."""
        if self.server_steps is not None:
            return self.server_steps
        return max(self.local_steps, MIN_SERVER_STEPS) if spec_for(self.method).server_tunes else 0

    @property
    def recorded_server_steps(self) -> int | None:
        """The server steps a round that ``results.json`` records and grids compare: the effective
        count for a method with a server step (0: its server only averages), None for one without."""
        return self.effective_server_steps if "server_steps" in spec_for(self.method).reads else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.aux_layer_choice, tuple):
            data["aux_layer_choice"] = list(self.aux_layer_choice)
        data["attackers"] = list(self.attackers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True, source: str = "configuration") -> RunConfig:
        """Build from plain keys (dashes or underscores). Unknown keys: an error if ``strict``, else one
        warning."""
        return cls(**cls.coerce(data, strict, source))

    @classmethod
    def coerce(
        cls, data: dict[str, Any], strict: bool = True, source: str = "configuration"
    ) -> dict[str, Any]:
        """``data``'s keys as field names and its values as the fields' types (text from a command line,
        numbers from a file), unchecked; errors name ``source``."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name in known:
                clean[name] = coerce_value(name, value, known[name].type, source)
            else:
                unknown.append(key)
        if unknown and strict:
            raise FedSPError(
                f"{source}: unknown keys {shown(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        if unknown:
            warnings.warn(
                f"{source}: ignoring unknown keys {shown(unknown)} (written by another version?)",
                stacklevel=2,
            )
        return clean


declare_fields(f.name for f in dataclasses.fields(RunConfig))  # errors name these fields, not their flags


# The options in sections, in the order the command line's help and the options page show them: each
# field in exactly one (tests/test_layout.py). RunConfig inherits them all, flat, so flat flags, flat
# TOML/YAML keys and every config.json written so far keep working.
SECTION_TYPES: tuple[type[Any], ...] = (
    RunOptions,
    FederationOptions,
    TrainingOptions,
    PrefixOptions,
    AuxiliaryOptions,
    SplitOptions,
    EmulatorOptions,
    EvaluationOptions,
    WireOptions,
    ProtectionOptions,
)
SECTIONS: dict[str, tuple[str, ...]] = {
    section.TITLE: tuple(f.name for f in dataclasses.fields(section)) for section in SECTION_TYPES
}


def section_of(name: str) -> str:
    """The section a field is shown in."""
    return next(title for title, names in SECTIONS.items() if name in names)


def parse_embedding(text: str) -> tuple[str, int] | None:
    """``full`` -> None; ``lowrank:R`` -> (``lowrank``, R); ``pruned:V`` -> (``pruned``, V) (at least 1,
    written without leading zeros or spaces, so one design has one spelling); anything else refused in
    one line. (V's range depends on the tokenizer: checked when the vocabulary is chosen.)"""
    if text == FULL:
        return None
    found = re.fullmatch(rf"({LOWRANK}|{PRUNED}):([1-9][0-9]*)", text)
    if found:
        return found.group(1), int(found.group(2))
    raise FedSPError(
        f"--aux-embedding {text!r} is not valid; choose {FULL}, {LOWRANK}:R with a rank R of at least 1, "
        f"or {PRUNED}:V with V kept tokens"
    )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FedSPError(f"--{name} {shown(value)} is not valid; choose one of: {', '.join(allowed)}")
