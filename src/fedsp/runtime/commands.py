"""``fedsp eval``, ``fedsp generate`` and ``fedsp export``: a finished run's best prefix, used.

Each command opens the results folder (:func:`fedsp.runtime.outputs.open_run`),
loads the global model once with the run's own settings (model, dtype,
device, seed) and says which prefix it uses. ``eval`` scores it on the run's
own evaluation examples (the same numbers as the run's ``final`` block) or on
another task or folder; ``generate`` prints greedy completions; ``export``
writes ``prefix.safetensors`` or a PEFT adapter elsewhere (also for runs made
before every run wrote them). Nothing is written on an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedsp.config import RunConfig
from fedsp.data.batching import text_ids
from fedsp.data.formats import render_chat
from fedsp.data.shards import generation_stop
from fedsp.data.sources import read_local
from fedsp.data.tasks import eval_split, load_task
from fedsp.errors import FedSPError
from fedsp.evaluation import describe, evaluate_examples
from fedsp.evaluation.generative import generate
from fedsp.models import export
from fedsp.models.loading import LoadedModel, load_global_model
from fedsp.runtime.outputs import (
    NOTHING_TRAINED,
    FinishedRun,
    base_model_id,
    open_run,
    prefix_metadata,
    run_prefix,
)

FORMATS = ("peft", "safetensors")


def add_parsers(sub: Any) -> None:
    """The three subcommands, on ``fedsp``'s subparsers."""
    ev = sub.add_parser("eval", help="score a finished run's best prefix on its task, or another")
    ev.add_argument("run", help="results folder of a finished run")
    ev.add_argument("--task", help="another task to score on (default: the run's)")
    ev.add_argument("--data-dir", help="a folder of your own data files to score on (with --task custom)")
    ev.add_argument(
        "--eval-limit", type=int, help="the first N evaluation examples (0 = all; default: the run's)"
    )
    ev.add_argument("--split", help="the split to score (default: test, else validation)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    gen = sub.add_parser("generate", help="greedy completions with a finished run's best prefix")
    gen.add_argument("run", help="results folder of a finished run")
    gen.add_argument("prompt", nargs="?", help="the text to continue")
    gen.add_argument("--input", help='a .jsonl file of {"prompt": ...} or {"messages": [...]} rows')
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user turn (chat template; the default for a run trained on chat rows)",
    )
    gen.add_argument("--max-new-tokens", type=int, help="tokens generated at most (default: the run's)")
    gen.add_argument("--stop", help="text that ends a completion, like '\\n' (default: the run's)")
    gen.add_argument("--no-prefix", action="store_true", help="the global model alone, for comparison")
    exp = sub.add_parser("export", help="write a finished run's best prefix as a PEFT adapter or safetensors")
    exp.add_argument("run", help="results folder of a finished run")
    exp.add_argument("--format", choices=FORMATS, default="peft", help="peft adapter folder or one file")
    exp.add_argument("--out", required=True, help="folder (peft) or file (safetensors) to create")


def _load(run: FinishedRun) -> LoadedModel:
    c = run.config
    return load_global_model(c.model, c.dtype, c.seed, device=c.device)


def _prefix(run: FinishedRun, loaded: LoadedModel, needed: bool = True):
    prefix, where = run_prefix(run, loaded.model)
    if prefix is None and needed:
        raise FedSPError(f"{run.folder}: {where}")
    print(f"fedsp: prefix: {where}", file=sys.stderr)
    return prefix


def run_eval(args: argparse.Namespace) -> int:
    run = open_run(args.run)
    values = run.config.to_dict()
    if args.task or args.data_dir:
        values.update(task=args.task or run.config.task, data_dir=args.data_dir)
    if args.eval_limit is not None:
        if args.eval_limit < 0:
            raise FedSPError(f"--eval-limit must be 0 (all) or more, got {args.eval_limit}")
        values["eval_limit"] = args.eval_limit or None
    config = RunConfig.from_dict(values, strict=False)
    split = args.split or eval_split(config.task, config.data_dir)
    loaded = _load(run)
    examples = load_task(config.task, split, config.data_dir, loaded.tokenizer)
    examples = examples[: config.eval_limit] if config.eval_limit else examples
    untrained = (run.results.get("export") or {}).get("why") == NOTHING_TRAINED
    prefix = _prefix(run, loaded, needed=not untrained)
    result = evaluate_examples(
        loaded.model,
        loaded.tokenizer,
        examples,
        prefix,
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
        max_new_tokens=config.max_new_tokens,
        stop=generation_stop(config),
        desc="eval",
        progress=not args.quiet,
    )
    summary = result.summary()
    print(f"{config.task} ({split}, {summary['n']} examples): {describe(summary)}")
    print(json.dumps({"task": config.task, "split": split, **summary}))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.input is None):
        raise FedSPError("give either a prompt text or --input FILE.jsonl (not both)")
    run = open_run(args.run)
    max_new = run.config.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    window = run.config.max_length  # prompt + new tokens, as the run evaluated them
    if not 1 <= max_new < window:
        raise FedSPError(
            f"--max-new-tokens {max_new} must be at least 1 and leave room for a prompt in this run's "
            f"--max-length of {window} tokens (prompt + new tokens, as the run evaluated)"
        )
    given = {"stop": args.stop} if args.stop is not None else {}
    stop = generation_stop(RunConfig.from_dict({**run.config.to_dict(), **given}, strict=False))
    rows = _prompt_rows(args)
    loaded = _load(run)
    chat = args.chat or run.results.get("data_format") == "messages"  # a chat-trained prefix: chat prompts
    texts = [_render(loaded, row, chat or "messages" in row, where) for where, row in rows]
    prompts = [text_ids(loaded.tokenizer, t) for t in texts]
    for (where, _), ids in zip(rows, prompts, strict=True):
        if not ids:
            raise FedSPError(f"{where}: the prompt is empty")
        if len(ids) > window - max_new:  # cut from the left, as evaluation cuts a long context
            print(
                f"fedsp: note: {where} is cut to its last {window - max_new} of {len(ids)} tokens (the run's "
                f"--max-length {window} less --max-new-tokens {max_new})",
                file=sys.stderr,
            )
    prompts = [ids[-(window - max_new) :] for ids in prompts]
    prefix = None if args.no_prefix else _prefix(run, loaded)
    out = generate(loaded.model, loaded.tokenizer, prompts, prefix, max_new_tokens=max_new, stop=stop)
    for text, generation in zip(texts, out, strict=True):
        if args.input:
            print(json.dumps({"prompt": text, "completion": generation.text}))
        else:
            print(generation.text)
    return 0


def _prompt_rows(args: argparse.Namespace) -> list[tuple[str, dict]]:
    if args.prompt is not None:
        return [("the prompt", {"prompt": args.prompt})]
    path = Path(args.input)
    rows = [(f"{path} row {n}", row) for n, row in read_local(path)]
    for where, row in rows:
        if not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list):
            keys = ", ".join(sorted(row)) or "none"
            raise FedSPError(f'{where}: expected a "prompt" text or a "messages" list (keys found: {keys})')
    return rows


def _render(loaded: LoadedModel, row: dict, chat: bool, where: str) -> str:
    if not chat:
        return str(row["prompt"])
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise FedSPError(
            f"{where}: --chat or messages rows need a chat template, and this model's tokenizer has none"
        )
    turns = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    return render_chat(tokenizer, turns, True, where)


def run_export(args: argparse.Namespace) -> int:
    run = open_run(args.run)
    out = Path(args.out)
    if out.exists():
        raise FedSPError(f"--out {str(out)!r} exists already; choose a new path")
    loaded = _load(run)
    prefix = _prefix(run, loaded)
    if args.format == "safetensors":
        export.write_prefix_file(out, prefix, prefix_metadata(run.config, run.results.get("best_round", 0)))
    else:
        export.write_peft_adapter(out, prefix, loaded.model.config, base_model_id(run.config.model))
    print(f"fedsp: wrote {out} ({args.format})")
    return 0


COMMANDS = {"eval": run_eval, "generate": run_generate, "export": run_export}
