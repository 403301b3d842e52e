"""Evaluation speed and accuracy: the ARC-Easy validation questions scored with SmolLM2.

    .venv/bin/python bench/eval_arc.py [--limit 0] [--paths cached full] [--dtypes float32 bfloat16]
                                       [--batch-size 128] [--prefix-len 0] [--device auto|cpu|cuda]
                                       [--out FILE.json]

For each dtype and scoring path, one timed pass over the same questions (no
prefix: the zero-shot model; ``--prefix-len N``: a random N-token prefix, seed 0,
as a run evaluates with its trained one): seconds, questions/s, tokens/s, accuracy, and
whether the choice picked per question equals the float32 cached pass's pick.
``cached`` runs each context once and scores its choices from the cached
keys/values (the default path); ``full`` scores every context + choice
sequence in full with logits only at the choice tokens. The target of issue 6
is the 570 questions in at most 60 s here.
"""

from __future__ import annotations

import argparse
import time

import torch
from benchlib import PeakMemory, attention_arg, common_args, machine, print_table, resolve, write_json

from fedsp.data.tasks import load_task
from fedsp.evaluation.multiple_choice import evaluate_multiple_choice
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import prefix_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=0, help="first N questions (0 = all)")
    parser.add_argument("--paths", nargs="+", default=["cached", "full"], choices=("cached", "full"))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per batch")
    parser.add_argument("--prefix-len", type=int, default=0, help="random prefix of N tokens (0: none)")
    attention_arg(parser)
    common_args(parser, "eval_arc")
    args = parser.parse_args()
    device = resolve(args.device)
    examples = load_task(args.task, args.split)
    examples = examples[: args.limit] if args.limit else examples
    rows, reference = [], None
    for dtype in args.dtypes:
        loaded = load_global_model(args.model, dtype, device=args.device, attention=args.attention)
        prefix = None
        if args.prefix_len:
            torch.manual_seed(0)
            prefix = prefix_for(loaded.model, args.prefix_len, dropout=0.0)
        for path in args.paths:
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                result = evaluate_multiple_choice(
                    loaded.model,
                    loaded.tokenizer,
                    examples,
                    prefix=prefix,
                    batch_size=args.batch_size,
                    progress=False,
                    cached=path == "cached",
                )
                seconds = time.perf_counter() - start
            reference = reference or result.predictions
            agree = sum(a == b for a, b in zip(result.predictions, reference, strict=True)) / len(examples)
            rows.append(
                {
                    "dtype": dtype,
                    "path": path,
                    "questions": len(examples),
                    "seconds": seconds,
                    "questions_per_s": len(examples) / seconds,
                    "acc": result.acc,
                    "acc_norm": result.acc_norm,
                    "same_pick_as_first": agree,
                    "peak_rss_mb": memory.peak_rss,
                    "peak_cuda_mb": memory.peak_cuda,
                }
            )
            print(f"{dtype} {path}: {seconds:.1f} s, acc {100 * result.acc:.1f}", flush=True)
        del loaded
    print_table(
        [
            "dtype",
            "path",
            "questions",
            "seconds",
            "questions/s",
            "acc %",
            "acc_norm %",
            "same pick",
            "peak RSS MB",
        ],
        [
            [
                r["dtype"],
                r["path"],
                r["questions"],
                r["seconds"],
                r["questions_per_s"],
                100 * r["acc"],
                100 * r["acc_norm"],
                r["same_pick_as_first"],
                r["peak_rss_mb"],
            ]
            for r in rows
        ],
    )
    write_json(args.out, {"machine": machine(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
