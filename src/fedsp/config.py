"""The run configuration: one typed, validated, frozen dataclass.

CLI options, TOML/YAML config files and ``config.json`` of a results folder
all convert into :class:`RunConfig` once, at the boundary. Keys use
underscores; the CLI spells them with dashes (``--local-steps``). Which
methods exist, and which engines each runs on, is the method table's
(:mod:`fedsp.methods.table`). A configuration written by another version
(server and clients may differ) loads with ``strict=False``: unknown keys are
dropped with one warning, missing ones take their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsp.errors import FedSPError
from fedsp.files import io_reason
from fedsp.methods.table import ENGINES, METHODS, SPLIT_HEAD, spec_for
from fedsp.models.precision import DTYPE_CHOICES, resolve_dtype
from fedsp.protection import (
    MEAN,
    SECAGG_MIN_CLIENTS,
    SECAGG_RANGE,
    clients_per_round,
    parse_attack,
    parse_partitions,
    parse_rule,
)

# The spellings of --wire-dtype (encoded by fedsp.wire) and --aux-embedding (built by fedsp.models.embedding
# and fedsp.models.vocabulary) live here, with no torch: a ClientApp process reads a RunConfig and imports
# this module, and torch and transformers take seconds to import.
FLOAT32, BFLOAT16, INT8 = "float32", "bfloat16", "int8"
WIRE_DTYPES = (FLOAT32, BFLOAT16, INT8)
FULL, LOWRANK, PRUNED = "full", "lowrank", "pruned"

STATE_MOMENTS = (FLOAT32, BFLOAT16)  # --state-moments: how a client keeps its AdamW moments between rounds

PARTITIONS = ("iid", "dirichlet", "by:FIELD")  # by:FIELD: each client whole groups of a row field
MAX_PREFIX_LEN = 4096  # a sane bound, checked before any work (the paper's prefixes are 40 tokens)
PREFIX_INITS = ("tokens", "random")
LAYER_ORDERS = ("cyclic", "blocks")  # --aux-layer-order (fedsp.models.auxiliary.depth_plan)


# Settings that change how a run is batched or shown, not what it computes (up to float rounding):
# a grid reuses, and --resume accepts, a run that differs from the current settings only in these.
SPEED_ONLY = ("progress", "eval_batch_size")

# FedSP's server tunes at least this many prefix steps a round. The paper's T server steps, with the CPU
# presets' T = 2, left FedSP 2-3 points below FedPrompt after 20 rounds on ARC-Easy and SciQ; 4 steps
# gained 1.5-2 points on both (2 seeds each, docs/results.md, "The server's prefix steps"). T >= 4
# (the paper's own scripts: T = 10 or 20) is unchanged.
MIN_SERVER_STEPS = 4


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Defaults are the CPU-sized main job on SmolLM2 + ARC-Easy."""

    method: str = "fedsp"
    model: str = "smollm2"
    task: str = "arc_easy"
    data_dir: str | None = None
    # federation
    clients: int = 10
    rounds: int = 3
    partition: str = "iid"
    alpha: float = 1.0
    # the partition's seed; None: --seed, so each training seed also resamples the partition (and the
    # held-out validation rows). 12345 is the seed every result before 2026-12-07 was cut with.
    data_seed: int | None = None
    server_rows: int | None = None  # the server's shard cut to this many rows (None: its whole shard)
    # local training (T steps per phase per round, clients and server)
    local_steps: int = 2
    server_steps: int | None = None  # None: local_steps, or 0 for methods whose server only averages
    batch_size: int = 8
    lr: float = 1e-2  # prefix phases (clients' knowledge capturing, server tuning); see docs/results.md
    align_lr: float = 1e-4  # clients' auxiliary-model phase
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    # every training phase's gradient clipped to this L2 norm; 0 (default, as the reference code): none.
    # Measured: FedSP 58.5 without, 58.3 with 1.0 (3 seeds, docs/results.md)
    max_grad_norm: float = 0.0
    # prefix
    prefix_len: int = 40
    prefix_projection: bool = False
    prefix_dropout: float = 0.1
    prefix_init: str = "tokens"
    # auxiliary model and KD
    aux_layers: int = 1
    aux_layer_choice: str | tuple[int, ...] = "bottom"
    aux_layer_order: str = "cyclic"  # which of N > 1 layers runs at each depth (models/auxiliary.py)
    aux_embedding: str = "full"  # lowrank:R: the client's embedding and head as factors (models/embedding)
    kd_steps: int = 20
    kd_lr: float = 5e-4
    kd_batch_size: int = 8
    kd_projection: bool = False
    # SFPrompt (prompt length: prefix_len)
    split_layer: int = 2  # c: clients run layers 0..c-1, the server c..L-1 (checked against L at build time)
    prune_gamma: float = 0.5  # fraction of each client's examples kept for split training (hardest by EL2N)
    local_loss_steps: int = 2  # shortcut-model (body skipped) steps per round, before split training
    # Offsite-Tuning (fedsp.methods.offsite): the emulator clients tune the adapter layers on
    ot_adapter_layers: int = 2  # adapter layers at the bottom and at the top, each (the paper's 2 + 2)
    ot_keep_ratio: float = 0.4  # middle layers kept by uniform layer drop (the paper's OPT-1.3B: 8 of 20)
    ot_distill: bool = False  # distil the kept middle layers (--kd-steps, --kd-lr, --kd-batch-size)
    ot_lora_rank: int = 0  # 0: the adapter layers' full weights (the paper's); R: LoRA factors of rank R
    # evaluation
    eval_limit: int | None = 200
    val_limit: int | None = 100
    eval_every_round: bool = True
    zero_shot_eval: bool = True
    eval_batch_size: int = 128
    max_length: int = 256
    max_new_tokens: int = 32  # generative tasks: greedy tokens generated per example at most
    stop: str | None = None  # generative tasks: text that ends a generation; None: the task's (SQuAD: "\n")
    # runtime
    dtype: str = "float32"  # or bfloat16; auto: bfloat16 where the device multiplies it natively (not the
    # default: 1.3-2.2x faster steps there, FedSP 0.6 points lower over 3 seeds; docs/performance.md)
    device: str = "auto"  # auto: CUDA when present, else CPU
    seed: int = 0
    out: str | None = None
    progress: bool = field(default=True, compare=False)
    # federation runtime: engine, partial participation, failures, audit
    engine: str = "inprocess"
    fraction_fit: float = 1.0  # fraction of the K clients sampled per round
    min_replies: int = 1  # fewer accepted updates than this stops the run
    max_client_weight: int | None = None  # a client's example count (FedAvg weight) is cut to this
    client_timeout: float | None = None  # seconds a round waits for a client's reply; None: no limit
    audit: bool = False  # record every tensor sent to clients (audit.json in the results folder)
    wire_dtype: str = "float32"  # each round's messages: float32, or bfloat16 / int8 deltas (fedsp.wire)
    state_moments: str = "float32"  # the dtype of the AdamW moments a client keeps between rounds
    # the data owners' protection (fedsp.protection; README "Privacy and robustness")
    aggregation: str = "mean"  # mean, median, trimmed-mean:F, clipped-mean:C
    dp_noise_multiplier: float | None = None  # client-level DP: Gaussian noise Z * clip on the sum
    dp_clip: float | None = None  # client-level DP: each update's L2 norm clipped to this (initial, adaptive)
    dp_epsilon: float | None = None  # the privacy budget (Z chosen for the planned rounds when Z is not set)
    dp_delta: float = 1e-5
    dp_clip_quantile: float | None = None  # adaptive clip: the fraction of updates left unclipped it aims for
    dp_clip_lr: float = 0.2  # adaptive clip: geometric learning rate (Flower's default)
    dp_noise_seed: int | None = None  # None: a secret seed (checkpoint only); set: reproducible, no guarantee
    secure_aggregation: bool = False  # Flower's SecAgg+: the server sees only the sum of the updates
    attack: str | None = None  # evaluation only: what --attackers send instead of their update
    attackers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        if not (isinstance(self.partition, str) and self.partition.startswith("by:")):
            _check_choice("partition", self.partition, PARTITIONS)
        elif not self.partition[3:] or self.partition[3:] != self.partition[3:].strip():
            raise FedSPError(
                f"--partition {self.partition!r} needs a field name after by: (no spaces around it), "
                "like by:activity_label"
            )
        _check_choice("prefix-init", self.prefix_init, PREFIX_INITS)
        _check_choice("dtype", self.dtype, DTYPE_CHOICES)
        _check_choice("aux-layer-order", self.aux_layer_order, LAYER_ORDERS)
        _check_choice("wire-dtype", self.wire_dtype, WIRE_DTYPES)
        _check_choice("state-moments", self.state_moments, STATE_MOMENTS)
        if (
            parse_embedding(self.aux_embedding) is not None
            and "aux_embedding" not in spec_for(self.method).reads
        ):
            raise FedSPError(
                f"--aux-embedding {self.aux_embedding} shrinks a distilled auxiliary model; the clients of "
                f"--method {self.method} hold none (use fedsp or its ablations, or --aux-embedding full)"
            )
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        # a run records the dtype it computed in (config.json, --resume, grid cells), never "auto"
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        for name in (
            "clients",
            "rounds",
            "prefix_len",
            "aux_layers",
            "batch_size",
            "kd_batch_size",
            "eval_batch_size",
            "max_length",
            "split_layer",
            "max_new_tokens",
            "ot_adapter_layers",
        ):
            _check_min(name, getattr(self, name), 1)
        for name in ("local_steps", "kd_steps", "local_loss_steps", "ot_lora_rank"):
            _check_min(name, getattr(self, name), 0)
        if self.server_steps is not None:
            _check_min("server_steps", self.server_steps, 0)
        if self.server_rows is not None:
            _check_min("server_rows", self.server_rows, 1)
        if self.data_seed is not None:
            _check_min("data_seed", self.data_seed, 0)
        if self.max_length < 2:  # one context token and one answer token at the least
            raise FedSPError(f"--max-length {self.max_length} is too short for a context plus its answer")
        if self.max_new_tokens >= self.max_length:
            raise FedSPError(
                f"--max-new-tokens {self.max_new_tokens} leaves no room for a prompt in --max-length "
                f"{self.max_length}; generation keeps prompt + new tokens within it"
            )
        if self.prefix_len > MAX_PREFIX_LEN:
            raise FedSPError(
                f"--prefix-len {self.prefix_len} is beyond the sane bound of {MAX_PREFIX_LEN} tokens"
            )
        for name in ("eval_limit", "val_limit"):
            if getattr(self, name) is not None:
                _check_min(name, getattr(self, name), 1)
        for name in ("lr", "align_lr", "kd_lr", "alpha"):
            if not getattr(self, name) > 0:
                raise FedSPError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        if not 0 < self.prune_gamma <= 1:
            raise FedSPError(f"--prune-gamma must be in (0, 1], got {self.prune_gamma}")
        if not 0 < self.ot_keep_ratio <= 1:
            raise FedSPError(f"--ot-keep-ratio must be in (0, 1], got {self.ot_keep_ratio}")
        if not 0 <= self.prefix_dropout < 1:
            raise FedSPError(f"--prefix-dropout must be in [0, 1), got {self.prefix_dropout}")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise FedSPError(
                f"--max-grad-norm must be 0 (no clipping) or a positive norm, got {self.max_grad_norm}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise FedSPError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        _check_choice("engine", self.engine, ENGINES)
        engines = spec_for(self.method).engines
        if self.engine not in engines:
            raise FedSPError(
                f"--method {self.method} runs with --engine {' or '.join(engines)} only for now, "
                f"got --engine {self.engine}"
            )
        if not 0 < self.fraction_fit <= 1:
            raise FedSPError(f"--fraction-fit must be in (0, 1], got {self.fraction_fit}")
        _check_min("min_replies", self.min_replies, 1)
        if self.max_client_weight is not None:
            _check_min("max_client_weight", self.max_client_weight, 1)
        if self.client_timeout is not None and not self.client_timeout > 0:
            raise FedSPError(f"--client-timeout must be positive seconds, got {self.client_timeout}")
        if isinstance(self.aux_layer_choice, list):
            object.__setattr__(self, "aux_layer_choice", tuple(self.aux_layer_choice))
        self._check_protection()

    @property
    def dp(self) -> bool:
        """Client-level differential privacy is on (a noise multiplier or a budget was given)."""
        return self.dp_noise_multiplier is not None or self.dp_epsilon is not None

    @property
    def clients_per_round(self) -> int:
        return clients_per_round(self.clients, self.fraction_fit)

    def _check_protection(self) -> None:
        """The privacy and robustness options: each value, then how they combine (one-line errors)."""
        object.__setattr__(self, "aggregation", str(parse_rule(self.aggregation)))  # canonical spelling
        rule = parse_rule(self.aggregation)
        per_round = self.clients_per_round
        if rule.trim and 2 * rule.trim >= per_round:
            raise FedSPError(
                f"--aggregation {rule} drops the {rule.trim} largest and {rule.trim} smallest values of "
                f"each coordinate, which leaves none of the {per_round} clients a round "
                f"(--clients {self.clients}, --fraction-fit {self.fraction_fit:g}); F must be below "
                f"{per_round / 2:g}"
            )
        if self.dp_clip is not None and not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
            raise FedSPError(f"--dp-clip must be a positive L2 norm, got {self.dp_clip}")
        if self.dp_noise_multiplier is not None and not (
            math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier >= 0
        ):
            raise FedSPError(f"--dp-noise-multiplier must be 0 or more, got {self.dp_noise_multiplier}")
        if self.dp_epsilon is not None and not (math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0):
            raise FedSPError(f"--dp-epsilon must be positive, got {self.dp_epsilon}")
        if not 0 < self.dp_delta < 1:
            raise FedSPError(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_clip_quantile is not None and not 0 < self.dp_clip_quantile < 1:
            raise FedSPError(f"--dp-clip-quantile must be in (0, 1), got {self.dp_clip_quantile}")
        if not (math.isfinite(self.dp_clip_lr) and self.dp_clip_lr > 0):
            raise FedSPError(f"--dp-clip-lr must be positive, got {self.dp_clip_lr}")
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
        shape = spec_for(self.method).client
        if self.dp and shape is not None and shape.holds == SPLIT_HEAD:
            raise FedSPError(
                f"--method {self.method} sends activations and gradients to the server at every split step, "
                "outside the aggregate; client-level DP of the aggregate would not cover them"
            )
        if self.dp and rule.name != MEAN:
            raise FedSPError(
                f"differential privacy aggregates with its own clipped uniform mean; --aggregation {rule} "
                "cannot be combined with it (use mean)"
            )
        if self.secure_aggregation:
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
        if self.attack is not None:
            object.__setattr__(self, "attack", str(parse_attack(self.attack)))
        object.__setattr__(self, "attackers", parse_partitions(self.attackers) if self.attackers else ())
        if (self.attack is None) != (not self.attackers):
            raise FedSPError(
                "--attack and --attackers go together: an attack and the partitions that send it"
            )
        outside = [k for k in self.attackers if not 0 <= k < self.clients]
        if outside:
            raise FedSPError(
                f"--attackers {','.join(map(str, self.attackers))}: {outside} are not partitions of this run "
                f"(0..{self.clients - 1} with --clients {self.clients})"
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
        known = {f.name: f for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            name = key.replace("-", "_")
            if name in known:
                clean[name] = coerce_value(name, value, known[name].type, source)
            else:
                unknown.append(key)
        if unknown and strict:
            raise FedSPError(f"{source}: unknown keys {unknown}; valid keys: {', '.join(sorted(known))}")
        if unknown:
            warnings.warn(
                f"{source}: ignoring unknown keys {unknown} (written by another version?)", stacklevel=2
            )
        return cls(**clean)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file of run keys into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FedSPError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FedSPError(
            f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise FedSPError(f"config file {str(path)!r} cannot be read: {io_reason(err)}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise FedSPError(f"config file {str(path)!r} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError, yaml.YAMLError) as err:
        if isinstance(err, FedSPError):
            raise
        where = " ".join(str(err).split())  # parsers' messages span lines: one line here
        raise FedSPError(f"config file {str(path)!r} cannot be parsed: {where[:300]}") from None
    if not isinstance(data, dict):
        raise FedSPError(f"config file {str(path)!r} must hold a table of keys, got {type(data).__name__}")
    return data


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


def parse_layer_choice(text: str) -> str | tuple[int, ...]:
    """``bottom`` / ``middle`` / ``top``, or comma-separated layer indices such as ``0,15``."""
    if text in ("bottom", "middle", "top"):
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise FedSPError(
            f"--aux-layer-choice {text!r} must be bottom, middle, top or indices like 0,15"
        ) from None


def coerce_value(name: str, value: Any, annotation: Any, source: str) -> Any:
    text = str(annotation)
    if name == "aux_layer_choice":
        if isinstance(value, str):
            return parse_layer_choice(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)  # one layer index
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        raise FedSPError(
            f"{source}: aux_layer_choice = {value!r} is not valid: bottom, middle, top, or layer indices"
        )
    if name == "stop" and isinstance(value, str):  # "\\n" on a command line means a newline
        text = (
            value.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in value else value
        )
        if not text:
            raise FedSPError(f"{source}: stop must be a non-empty text (leave it unset for the task's own)")
        return text
    if name == "attackers":
        return parse_partitions(value) if value not in (None, "", []) else ()
    if value is None:
        return None
    try:
        if text.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if text.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if text.startswith("float"):
            return float(value)
        if text.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise FedSPError(f"{source}: {name} = {value!r} is not a valid {text.split(' ')[0]}") from None
    return value


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FedSPError(f"--{name} {value!r} is not valid; choose one of: {', '.join(allowed)}")


def _check_min(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise FedSPError(f"{_flag(name)} must be an integer >= {minimum}, got {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
