"""Command line: ``fedsp run [options]``; ``fedsp eval|generate|export RUN`` on a finished run.

Precedence: built-in defaults < ``--config FILE`` < options given on the
command line. Input errors print one line (``fedsp: error: ...``) and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsp.config import PARTITIONS, RunConfig, load_config_file
from fedsp.data.tasks import TASKS
from fedsp.errors import FedSPError, RunFinished, RunInterrupted
from fedsp.evaluation import METRIC_COLUMNS
from fedsp.files import io_reason
from fedsp.methods.fidelity import FIDELITY, describe_fidelity
from fedsp.methods.table import METHODS, spec_for
from fedsp.protection import ATTACK_FORMS, RULE_FORMS

_HELP = {
    "method": f"method: {', '.join(METHODS)}",
    "model": "global model: smollm2 (bundled), a Hugging Face folder or id, a .gguf file, "
    "or tiny-llama/tiny-gpt2/tiny-opt",
    "task": f"task: {', '.join(TASKS)} (custom: your own files in --data-dir)",
    "data_dir": "folder with <split>.jsonl/.json/.csv/.parquet files: the task's Hugging Face schema, or "
    "with --task custom prompt/completion, messages, alpaca or multiple-choice rows (not bundled data)",
    "clients": "number of clients K (the train split is cut into K+1 shards; shard 0 is the server's)",
    "rounds": "federated rounds",
    "partition": f"how the train split is shared out: {', '.join(PARTITIONS)} (FIELD: a field of the "
    "rows, e.g. by:activity_label; each client gets whole groups, the server an IID sample)",
    "alpha": "Dirichlet concentration for --partition dirichlet (smaller = more skewed)",
    "data_seed": "seed of the data partition and of the held-out validation rows (default: --seed, so "
    "each seed resamples the partition; 12345: the fixed partition of results before 2026-12-07)",
    "server_rows": "cut the server's own shard to N rows (a model owner with little in-domain data; "
    "default: its whole shard, 1/(K+1) of the train split); the clients' shards are unchanged",
    "local_steps": "T: steps per phase per round (client alignment, client prompt tuning)",
    "server_steps": "server steps per round on its own shard: prefix tuning (default: --local-steps, at "
    "least 4; 0: the server only averages), or offsite-tuning's plugged-in adapter layers (default 0)",
    "batch_size": "training batch size",
    "lr": "learning rate of the prefix phases",
    "align_lr": "learning rate of model weights (clients' auxiliary-model phase; finetune; offsite-tuning's "
    "adapter)",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient L2 norm every training phase is clipped to (KD included); 0: no clipping",
    "warmup_ratio": "fraction of each schedule spent warming up",
    "prefix_len": "P: number of prefix tokens",
    "prefix_projection": "reparametrise the prefix through an MLP (true/false)",
    "prefix_dropout": "dropout on the prefix in training",
    "prefix_init": "prefix initialisation: tokens (the model's own keys/values of task text) or random",
    "aux_layers": "N: number of global-model layers in the auxiliary model (each shared L/N times)",
    "aux_layer_choice": "which layers: bottom, middle, top, or indices like 0,15",
    "aux_layer_order": "which of N > 1 auxiliary layers runs at each depth: cyclic (0,1,..,N-1,0,1,..; "
    "the reference code's) or blocks (each layer one contiguous block of depths)",
    "aux_embedding": "the auxiliary model's embedding and tied head: full (the global model's), lowrank:R "
    "(two factors of rank R from its SVD, then distilled) or pruned:V (V kept tokens; a client's other "
    "tokens written as their BPE merge parts): a smaller client model",
    "kd_steps": "knowledge-distillation steps for the auxiliary model (0 = no KD)",
    "kd_lr": "KD learning rate",
    "kd_batch_size": "KD batch size",
    "kd_projection": "learnable W_S in the KD loss, as in the paper (true/false)",
    "split_layer": "sfprompt: cut layer c (1..L-1): clients run layers 0..c-1, the server the rest",
    "prune_gamma": "sfprompt: fraction in (0, 1] of each client's examples kept (the hardest by EL2N)",
    "local_loss_steps": "sfprompt: shortcut-model steps per round before split training (--local-steps)",
    "ot_adapter_layers": "offsite-tuning: adapter layers clients tune at the bottom and at the top of the "
    "emulator, each (whole layers of the global model, full weights)",
    "ot_keep_ratio": "offsite-tuning: fraction in (0, 1] of the middle layers the emulator keeps (uniform "
    "layer drop; 1: no drop)",
    "ot_distill": "offsite-tuning: distil the emulator's kept middle layers against the global model "
    "(--kd-steps, --kd-lr, --kd-batch-size; cached; true/false)",
    "ot_lora_rank": "offsite-tuning: 0 trains the adapter layers' full weights (the paper's); R > 0 trains "
    "LoRA factors of rank R on their linear maps instead (PEFT; the base weights go once, with the emulator)",
    "eval_limit": "evaluate on the first N examples of the evaluation split (0 = all)",
    "val_limit": "server validation loss on the first N validation examples (0 = all)",
    "eval_every_round": "evaluate accuracy after every round (true/false)",
    "zero_shot_eval": "evaluate the untrained model first, on the same examples (true/false)",
    "eval_batch_size": "evaluation batch size (sequences; speed only, results are the same)",
    "max_length": "maximum tokens per sequence (context truncated from the left)",
    "max_new_tokens": "generative tasks: tokens generated per example at most (greedy)",
    "stop": "generative tasks: text that ends a generation, like '\\n' (default: the task's; custom: end of "
    "text only)",
    "dtype": "float32, bfloat16, or auto: bfloat16 where the CPU (AMX/AVX512-BF16) or GPU multiplies it "
    "natively",
    "device": "where the models run: auto (CUDA when present, else CPU), cpu or cuda",
    "seed": "training seed",
    "out": "results folder to create (must not exist; default runs/<method>-<task>-<time>)",
    "engine": "federation engine: inprocess (one process, clients in turn) or flower (Flower simulation)",
    "fraction_fit": "fraction of the clients sampled each round (seeded, the same in both engines)",
    "min_replies": "fewest accepted client updates a round needs; fewer stops the run with an error",
    "max_client_weight": "largest example count (FedAvg weight) a client's update counts with; larger "
    "claims are cut to it and recorded (a deployed server cannot check a client's count)",
    "client_timeout": "seconds a round waits for a client's reply (both engines); late clients are left out",
    "audit": "record every tensor sent to clients and check none is a private global-model weight "
    "(true/false)",
    "wire_dtype": "how each round's prefix and the client model shipped once travel: float32 (as trained), "
    "or bfloat16 / int8 (a scale per 64 values): then updates are sent as their change from the "
    "broadcast, with error feedback",
    "state_moments": "the dtype of the AdamW moments a client keeps on its disk between rounds: float32 "
    "or bfloat16 (half the bytes; the weights it trains are kept exactly)",
    "aggregation": f"how the round's updates are combined: {RULE_FORMS}",
    "dp_noise_multiplier": "client-level differential privacy: Gaussian noise of Z x clip on the sum of the "
    "clipped updates (needs --dp-clip)",
    "dp_clip": "client-level DP: each update (prefix minus broadcast) clipped to this L2 norm (the initial "
    "clip with --dp-clip-quantile)",
    "dp_epsilon": "client-level DP budget: without --dp-noise-multiplier, the noise is chosen for the "
    "planned rounds; with it, a round that would exceed it is not started",
    "dp_delta": "client-level DP: the delta epsilon is reported at",
    "dp_clip_quantile": "client-level DP: adapt the clip each round towards this fraction of unclipped "
    "updates (Andrew et al. 2021)",
    "dp_clip_lr": "client-level DP: learning rate of the adaptive clip",
    "dp_noise_seed": "client-level DP: seed of the noise and the sampling, for tests and reproduction only "
    "(written to config.json: anyone who reads it can remove the noise); unset: a secret seed",
    "secure_aggregation": "Flower's SecAgg+: the server sees only the sum of the updates (--engine flower, "
    "aggregation mean; true/false)",
    "attack": f"evaluation only: what --attackers send instead of their update: {ATTACK_FORMS}",
    "attackers": "evaluation only: the partitions that send --attack, like 1,4",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsp", description="Federated fine-tuning of a private LLM with soft prompts (FedSP)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a federated course and write a results folder",
        description="Run a FedSP course. With no options: SmolLM2-135M on ARC-Easy, 10 clients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--config", help="TOML or YAML file of the same keys (options on the command line win)")
    defaults = RunConfig()
    for name, help_text in _HELP.items():
        default = getattr(defaults, name)
        run.add_argument(
            "--" + name.replace("_", "-"), default=argparse.SUPPRESS, help=f"{help_text} (default: {default})"
        )
    run.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in results folder DIR after its last "
        "completed round (its config.json is the configuration; options given must agree)",
    )
    from fedsp.experiments import compare
    from fedsp.runtime import commands

    compare.add_parser(sub)
    commands.add_parsers(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = load_config_file(args.config) if args.config else {}
    if getattr(args, "resume", None):
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise FedSPError(f"--resume {args.resume!r} is not a results folder (no config.json there)")
        # written by this or another version: unknown keys dropped (one warning), missing ones defaulted
        written = RunConfig.from_dict(load_config_file(saved), strict=False, source=str(saved))
        values = {**written.to_dict(), **values}
    given = {k: v for k, v in vars(args).items() if k in _HELP}
    for key in ("eval_limit", "val_limit"):  # 0 on the command line means "all"
        if str(given.get(key, values.get(key, ""))) == "0":
            given[key] = None
    source = f"config file {args.config!r}" if args.config else "options"
    config = RunConfig.from_dict({**values, **given}, source=source)
    if args.quiet:
        config = RunConfig.from_dict({**config.to_dict(), "progress": False})
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives an optional positional (generate's prompt) nothing once an option follows the run
    # folder: `fedsp generate RUN --no-prefix "text"` leaves "text" over; it is the prompt
    if args.command == "generate" and args.prompt is None and len(extra) == 1:
        if not extra[0].startswith("-"):
            args.prompt, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "compare":
            from fedsp.experiments.compare import run_compare

            return run_compare(args)
        if args.command in ("eval", "generate", "export"):
            from fedsp.runtime.commands import COMMANDS

            return COMMANDS[args.command](args)
        config = config_from_args(args)
        resume = Path(args.resume) if getattr(args, "resume", None) else None
        if config.engine == "flower":
            from fedsp.runtime.flower import simulation

            outcome = simulation.run(config, resume=resume)
        else:
            from fedsp.runtime import inprocess

            outcome = inprocess.run(config, resume=resume)
    except RunFinished as done:
        print(f"fedsp: {done}", file=sys.stderr)
        return 0
    except FedSPError as err:
        print(f"fedsp: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions...: completed rounds stay (every write is atomic)
        where = f"{err.filename}: " if err.filename else ""
        kept = "; completed rounds are kept (--resume continues)" if args.command == "run" else ""
        print(f"fedsp: error: {where}{io_reason(err)}{kept}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"fedsp: {interrupted(err, args.command)}", file=sys.stderr)
        return 130
    print(format_summary(outcome.results, str(outcome.out_dir)))
    return 0


def interrupted(err: KeyboardInterrupt, command: str) -> str:
    """What Ctrl-C left: a run's completed rounds and how to continue them, or nothing."""
    if command == "compare":  # a cell interrupted after a round continues from it
        return "interrupted; the same fedsp compare continues the unfinished cells"
    if not isinstance(err, RunInterrupted):
        return "interrupted"
    if err.folder is None:  # a folder this run made is kept only once a round completed
        return "interrupted before the first round completed; nothing was kept"
    return f"interrupted after round {err.completed}; fedsp run --resume {err.folder} continues"


def format_summary(res: dict, out_dir: str) -> str:
    fin = res["final"]
    columns = [(k, label) for k, label in METRIC_COLUMNS.items() if k in fin]
    lines = [
        "",
        f"{res['method']} on {res['task']} ({res['model']}), {fin['n']} {res['eval_split']} examples:",
        f"  {'':<28}" + "".join(f"{label:>10}" for _, label in columns),
    ]

    def cells(figures: dict) -> str:
        return "".join(f"{100 * figures[k]:>10.1f}" for k, _ in columns)

    if res.get("zero_shot") and spec_for(res["method"]).trains:
        lines.append(f"  {'zero-shot':<28}" + cells(res["zero_shot"]))
    label = res["method"] + (f" (best round {res['best_round']})" if res.get("rounds") else "")
    lines.append(f"  {label:<28}" + cells(fin))
    if res.get("emulator"):  # the same prompt or adapter on the clients' own model
        lines.append(f"  {'  emulator (clients model)':<28}" + cells(res["emulator"]))
    client = res.get("client_model")
    if client:
        privacy = "" if client["model_private"] else "; the whole global model: no model privacy"
        if client.get("privacy"):
            privacy = "; model privacy " + client["privacy"].split(":")[0]
        lines.append(
            f"  client model: {client['params'] / 1e6:.1f} M params "
            f"({100 * client['fraction_of_global']:.1f}% of the global model{privacy})"
        )
    gains = res.get("contributions")
    if gains:
        lines.append(
            f"  validation loss lowered by the clients' aggregate {gains['clients_gain_total']:+.4f} "
            f"(in {gains['rounds_clients_lowered_loss']} of {gains['rounds']} rounds), by the server's "
            f"own steps {gains['server_gain_total']:+.4f}"
        )
    fidelity = res.get(FIDELITY)
    if fidelity:
        lines.append(f"  {describe_fidelity(fidelity)}")
    comm = res.get("comm")
    if comm:
        lines.append(
            f"  per client and round: {comm['params_down_per_round']:,} params down / "
            f"{comm['params_up_per_round']:,} up ({comm['bytes_down_per_round'] / 1e6:.2f} MB each way)"
        )
    dp: dict[str, Any] = res.get("privacy") or {}
    if dp:
        stopped = (
            f"; stopped before round {dp['stopped_before_round']} (budget)"
            if "stopped_before_round" in dp
            else ""
        )
        lines.append(
            f"  client-level DP: epsilon {dp['epsilon']:.3g} at delta {dp['delta']:g} "
            f"(noise multiplier {dp['noise_multiplier']:.3g}, clip {dp['clip']:g}){stopped}"
        )
    protection: dict[str, Any] = res.get("protection") or {}
    if protection.get("aggregation", "mean") != "mean" or protection.get("secure_aggregation"):
        secure = ", secure aggregation (SecAgg+)" if protection.get("secure_aggregation") else ""
        lines.append(f"  aggregation: {protection['aggregation']}{secure}")
    if protection.get("attack"):
        attackers = ",".join(map(str, protection["attackers"]))
        lines.append(f"  SIMULATED ATTACK: partitions {attackers} sent {protection['attack']}")
    exported = res.get("export") or {}
    if exported.get("adapter"):
        lines.append(
            f"  best prefix: {out_dir}/{exported['prefix']}; PEFT adapter: {out_dir}/{exported['adapter']}"
        )
    if res.get("ignored_options"):
        lines.append(f"  ignored options: {res['ignored_options']}")
    lines.append(f"  wall time {res['wall_seconds']:.0f} s; results in {out_dir}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
