"""Greedy generation speed on SmolLM2: new tokens per second, batch sizes 1 and 16, with a 40-token prefix.

    .venv/bin/python bench/generate_speed.py [--batch-sizes 1 16] [--prompts 16] [--new-tokens 32]
                                             [--prefix-len 40] [--dtypes float32] [--threads 0]
                                             [--reference] [--device auto] [--out FILE.json]

Prompts: the first ``--prompts`` SciQ test contexts of 100-200 tokens
(``{support}\\nQuestion: ...\\nAnswer:``). The prefix holds the model's own
keys/values of the first ``--prefix-len`` tokens of a SciQ training passage
(the default initialisation of a run). Every configuration generates for the
same prompts, ``batch size`` at a time, exactly ``--new-tokens`` tokens each
(eos does not stop a row here, so every row does the same work); one untimed
warm-up call first. Columns: seconds for all prompts, new tokens/s, seconds of
one batch's prefill + first token (a ``max_new_tokens=1`` pass), and decode
tokens/s after it. ``--reference`` adds ``model.generate`` of transformers
without a prefix, next to ours without a prefix, to compare the loops.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from benchlib import attention_arg, common_args, machine, print_table, resolve, synchronize, write_json

from fedsp.data.tasks import load_task
from fedsp.evaluation.generative import generate
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import Prefix, init_prefix_from_tokens, prefix_for


class NoEos:
    """A tokenizer view without eos: every row runs to ``max_new_tokens``."""

    eos_token_id = None

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.pad_token_id = tokenizer, tokenizer.pad_token_id

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)


def sciq_prompts(tokenizer, count: int) -> list[list[int]]:
    rows = [tokenizer(ex.context, add_special_tokens=False)["input_ids"] for ex in load_task("sciq", "test")]
    picked = [ids for ids in rows if 100 <= len(ids) <= 200][:count]
    if len(picked) < count:
        raise SystemExit(f"only {len(picked)} SciQ test prompts have 100-200 tokens")
    return picked


def make_prefix(model, tokenizer, length: int) -> Prefix:
    text = " ".join(ex.context for ex in load_task("sciq", "train")[:5])
    prefix = prefix_for(model, length, dropout=0.0)
    init_prefix_from_tokens(
        prefix, model, torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:length])
    )
    return prefix


def one_pass(
    path: str, model, tokenizer, prompts, prefix: Prefix | None, new_tokens: int, batch: int
) -> None:
    """``new_tokens`` for every prompt, ``batch`` prompts at a time, by our loop or transformers'."""
    if path == "ours":
        generate(model, NoEos(tokenizer), prompts, prefix, max_new_tokens=new_tokens, batch_size=batch)
    else:
        run_reference(model, tokenizer, prompts, new_tokens, batch)


def run_reference(model, tokenizer, prompts, new_tokens: int, batch_size: int) -> None:
    """transformers' ``generate``, greedy, no prefix, the same batches (sorted by length, left-padded)."""
    device = model.device
    ordered = sorted(prompts, key=len)
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``reps`` calls."""
    seconds = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompts", type=int, default=16, help="prompts generated for per configuration")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=40)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=1, help="timed repetitions (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--reference", action="store_true", help="also time transformers' generate")
    attention_arg(parser)
    common_args(parser, "generate_speed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve(args.device)
    rows = []
    for dtype in args.dtypes:
        loaded = load_global_model(args.model, dtype, device=args.device, attention=args.attention)
        model, tokenizer = loaded.model, loaded.tokenizer
        prompts = sciq_prompts(tokenizer, args.prompts)
        prefix = make_prefix(model, tokenizer, args.prefix_len)
        paths = [("ours", prefix)] + ([("ours", None), ("transformers", None)] if args.reference else [])
        one_pass("ours", model, tokenizer, prompts[:2], prefix, 2, 2)  # warm-up: threads, kernel selection
        for batch_size in args.batch_sizes:
            for path, with_prefix in paths:
                run = functools.partial(one_pass, path, model, tokenizer, prompts, with_prefix)
                seconds = timed(functools.partial(run, args.new_tokens, batch_size), device, args.reps)
                first = timed(functools.partial(run, 1, batch_size), device, args.reps)
                batches = -(-len(prompts) // batch_size)
                new = len(prompts) * args.new_tokens
                rows.append(
                    {
                        "dtype": dtype,
                        "path": path,
                        "prefix_len": args.prefix_len if with_prefix is not None else 0,
                        "batch_size": batch_size,
                        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
                        "new_tokens": new,
                        "seconds": seconds,
                        "new_tokens_per_s": new / seconds,
                        "first_token_s_per_batch": first / batches,
                        "decode_tokens_per_s": (new - len(prompts)) / max(1e-9, seconds - first),
                    }
                )
                print(
                    f"{dtype} {path} P={rows[-1]['prefix_len']} B={batch_size}: {seconds:.2f} s", flush=True
                )
        del loaded
    headers = ["dtype", "path", "prefix", "batch", "prompt tok", "new tok", "seconds", "new tok/s"]
    print_table(
        headers + ["1st token s/batch", "decode tok/s"],
        [
            [
                r["dtype"],
                r["path"],
                r["prefix_len"],
                r["batch_size"],
                r["prompt_tokens_mean"],
                r["new_tokens"],
                r["seconds"],
                r["new_tokens_per_s"],
                r["first_token_s_per_batch"],
                r["decode_tokens_per_s"],
            ]
            for r in rows
        ],
    )
    write_json(args.out, {"machine": machine(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
