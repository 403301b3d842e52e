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
import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from fedsp.config import RunConfig
from fedsp.data.batching import text_ids
from fedsp.data.formats import generation_prompt
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
    adapter_base,
    open_run,
    prefix_metadata,
    run_prefix,
    run_weights,
    run_weights_kind,
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
    gen.add_argument(
        "--input",
        help='a .jsonl/.json/.csv file of rows in any format the run accepts, answers left out: {"prompt"}, '
        '{"messages"}, alpaca {"instruction", "input"} or multiple-choice {"question"}',
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user turn (chat template; the default for a run trained on chat rows)",
    )
    gen.add_argument(
        "--raw",
        action="store_true",
        help="continue the prompt text as it is (by default it takes the run's template: Alpaca, chat...)",
    )
    gen.add_argument("--max-new-tokens", type=int, help="tokens generated at most (default: the run's)")
    gen.add_argument("--stop", help="text that ends a completion, like '\\n' (default: the run's)")
    gen.add_argument("--no-prefix", action="store_true", help="the global model alone, for comparison")
    exp = sub.add_parser("export", help="write a finished run's best prefix as a PEFT adapter or safetensors")
    exp.add_argument("run", help="results folder of a finished run")
    exp.add_argument("--format", choices=FORMATS, default="peft", help="peft adapter folder or one file")
    exp.add_argument("--out", required=True, help="folder (peft) or file (safetensors) to create")


def load_model(run: FinishedRun) -> LoadedModel:
    """The run's global model, loaded with the run's own settings (model, dtype, seed, device)."""
    c = run.config
    return load_global_model(c.model, c.dtype, c.seed, device=c.device)


def _prefix(run: FinishedRun, loaded: LoadedModel, needed: bool = True, say: bool = True):
    prefix, where = run_prefix(run, loaded.model)
    if prefix is None and needed:
        raise FedSPError(f"{run.folder}: {where}")
    if say:
        print(f"fedsp: prefix: {where}", file=sys.stderr)
    return prefix


def _tuned(
    run: FinishedRun, loaded: LoadedModel, shared: bool, needed: bool = True, say: bool = True
) -> tuple[Any, Any]:
    """The model and prefix the run's result is used with: the global model and the best prefix, or, for
    a run that tuned the global model's own layers, the model holding them and no prefix. ``shared``: the
    caller reuses ``loaded`` (the Python API), so the layers go into a copy and it is left as it is."""
    if run_weights_kind(run) is None:
        return loaded.model, _prefix(run, loaded, needed=needed, say=say)
    model = copy.deepcopy(loaded.model) if shared else loaded.model
    where = run_weights(run, model)
    if say:
        print(f"fedsp: tuned layers: {where}", file=sys.stderr)
    return model, None


def evaluate_run(
    run: FinishedRun,
    *,
    task: str | None = None,
    data_dir: str | None = None,
    eval_limit: int | None = None,
    split: str | None = None,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    say: bool = True,
) -> dict[str, Any]:
    """Score the run's best prefix: ``{"task", "split", "n", ...figures}`` (fractions in [0, 1]).

    With no arguments: the run's own evaluation examples, the same numbers as its ``final`` block.
    ``eval_limit`` 0 means every example; None the run's own limit.
    """
    values = run.config.to_dict()
    if task or data_dir:
        values.update(task=task or run.config.task, data_dir=data_dir)
    if eval_limit is not None:
        if eval_limit < 0:
            raise FedSPError(f"--eval-limit must be 0 (all) or more, got {eval_limit}")
        values["eval_limit"] = eval_limit or None
    config = RunConfig.from_dict(values, strict=False)
    split = split or eval_split(config.task, config.data_dir)
    shared, loaded = loaded is not None, loaded or load_model(run)
    examples = load_task(config.task, split, config.data_dir, loaded.tokenizer)
    examples = examples[: config.eval_limit] if config.eval_limit else examples
    untrained = (run.results.get("export") or {}).get("why") == NOTHING_TRAINED
    model, prefix = _tuned(run, loaded, shared, needed=not untrained, say=say)
    result = evaluate_examples(
        model,
        loaded.tokenizer,
        examples,
        prefix,
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
        max_new_tokens=config.max_new_tokens,
        stop=generation_stop(config),
        desc="eval",
        progress=progress,
    )
    return {"task": config.task, "split": split, **result.summary()}


def run_eval(args: argparse.Namespace) -> int:
    run = open_run(args.run)
    out = evaluate_run(
        run,
        task=args.task,
        data_dir=args.data_dir,
        eval_limit=args.eval_limit,
        split=args.split,
        progress=not args.quiet,
    )
    summary = {k: v for k, v in out.items() if k not in ("task", "split")}
    print(f"{out['task']} ({out['split']}, {summary['n']} examples): {describe(summary)}")
    print(json.dumps(out))
    return 0


def generate_texts(
    run: FinishedRun,
    rows: list[tuple[str, dict]],
    *,
    chat: bool = False,
    raw: bool = False,
    max_new_tokens: int | None = None,
    stop: str | None = None,
    no_prefix: bool = False,
    loaded: LoadedModel | None = None,
    say: bool = True,
) -> list[tuple[str, str]]:
    """Greedy completions of ``rows`` (``(where, row)``: any row format the run accepts, answer left out),
    each prompt rendered with the run's own template: ``(prompt text, completion)`` per row.

    A bare ``{"prompt": ...}`` row takes the run's format (an Alpaca run's instruction, a chat run's user
    turn, a multiple-choice run's question); ``chat`` makes it a user turn whatever the run; ``raw``
    continues its text as it is.
    """
    max_new = run.config.max_new_tokens if max_new_tokens is None else max_new_tokens
    window = run.config.max_length  # prompt + new tokens, as the run evaluated them
    if not 1 <= max_new < window:
        raise FedSPError(
            f"--max-new-tokens {max_new} must be at least 1 and leave room for a prompt in this run's "
            f"--max-length of {window} tokens (prompt + new tokens, as the run evaluated)"
        )
    given = {"stop": stop} if stop is not None else {}
    stops = generation_stop(RunConfig.from_dict({**run.config.to_dict(), **given}, strict=False))
    shared, loaded = loaded is not None, loaded or load_model(run)
    kind = "messages" if chat else (None if raw else run.results.get("data_format"))
    texts = [generation_prompt(row, where, loaded.tokenizer, kind) for where, row in rows]
    prompts = [text_ids(loaded.tokenizer, t) for t in texts]
    for (where, _), ids in zip(rows, prompts, strict=True):
        if not ids:
            raise FedSPError(f"{where}: the prompt is empty")
        if len(ids) > window - max_new and say:  # cut from the left, as evaluation cuts a long context
            print(
                f"fedsp: note: {where} is cut to its last {window - max_new} of {len(ids)} tokens (the run's "
                f"--max-length {window} less --max-new-tokens {max_new})",
                file=sys.stderr,
            )
    prompts = [ids[-(window - max_new) :] for ids in prompts]
    model, prefix = (loaded.model, None) if no_prefix else _tuned(run, loaded, shared, say=say)
    out = generate(model, loaded.tokenizer, prompts, prefix, max_new_tokens=max_new, stop=stops)
    return [(text, generation.text) for text, generation in zip(texts, out, strict=True)]


def run_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.input is None):
        raise FedSPError("give either a prompt text or --input FILE.jsonl (not both)")
    if args.chat and args.raw:
        raise FedSPError("--chat and --raw cannot be combined: a user turn, or the text as it is")
    run = open_run(args.run)
    if args.prompt is not None:
        rows = [("the prompt", {"prompt": args.prompt})]
    else:
        path = Path(args.input)
        rows = [(f"{path} row {n}", row) for n, row in read_local(path)]
    out = generate_texts(
        run,
        rows,
        chat=args.chat,
        raw=args.raw,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        no_prefix=args.no_prefix,
    )
    for text, completion in out:
        print(json.dumps({"prompt": text, "completion": completion}) if args.input else completion)
    return 0


def export_run(
    run: FinishedRun,
    out: str | Path,
    format: str = "peft",
    loaded: LoadedModel | None = None,
    say: bool = True,
) -> Path:
    """Write the run's best prefix to ``out`` (a new path): a PEFT adapter folder, or one safetensors file."""
    out = Path(out)
    if format not in FORMATS:
        raise FedSPError(f"--format {format!r} is not valid; choose one of: {', '.join(FORMATS)}")
    if out.exists():
        raise FedSPError(f"--out {str(out)!r} exists already; choose a new path")
    kind = run_weights_kind(run)
    if kind is not None:  # tuned layers: the run's own file or adapter, copied
        return _copy_weights(run, kind, out, format)
    loaded = loaded or load_model(run)
    prefix = _prefix(run, loaded, say=say)
    if format == "safetensors":
        export.write_prefix_file(out, prefix, prefix_metadata(run.config, run.results.get("best_round", 0)))
    else:
        base = adapter_base(run.folder, run.config, loaded)  # a tiny model: saved in the run's folder
        export.write_peft_adapter(out, prefix, loaded.model.config, base)
    return out


def _copy_weights(run: FinishedRun, kind: str, out: Path, format: str) -> Path:
    """A run that tuned the global model's own layers: its layers file (``safetensors``) or its PEFT
    LoRA adapter (``peft``), copied to ``out``."""
    exported = run.results["export"]
    wanted = {"layers": "safetensors", "adapter": "peft"}[kind]
    if format != wanted:
        raise FedSPError(
            f"{run.folder} tuned the global model's layers ({exported[kind]}): export them with "
            f"--format {wanted}"
        )
    source = run.folder / exported[kind]
    if not source.exists():
        raise FedSPError(f"{source} is missing: the run's tuned layers cannot be exported")
    out.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, out)
    else:
        shutil.copyfile(source, out)
    return out


def run_export(args: argparse.Namespace) -> int:
    out = export_run(open_run(args.run), args.out, args.format)
    print(f"fedsp: wrote {out} ({args.format})")
    return 0


COMMANDS = {"eval": run_eval, "generate": run_generate, "export": run_export}
