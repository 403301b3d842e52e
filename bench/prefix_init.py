"""Round-0 accuracy of the global model with each prefix initialisation (no training).

    .venv/bin/python bench/prefix_init.py [--model smollm2] [--task arc_easy] [--eval-limit 100]
                                          [--out FILE.json]

Compares, on the same evaluation examples: no prefix (zero-shot); the default
(keys/values of whole server-shard examples, at positions -P..-1 on rotary
models); the first P tokens of the server shard's text (cut mid-example);
a random N(0, 1) prefix.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedsp.config import RunConfig
from fedsp.data.shards import prepare_data
from fedsp.evaluation.multiple_choice import evaluate_multiple_choice
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import init_prefix_from_tokens, initial_prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--prefix-len", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = RunConfig(
        model=args.model, task=args.task, eval_limit=args.eval_limit, prefix_len=args.prefix_len
    )
    loaded = load_global_model(config.model)
    data = prepare_data(config, loaded.tokenizer)

    def acc(prefix) -> float:
        if prefix is not None:
            prefix.eval()
        result = evaluate_multiple_choice(
            loaded.model, loaded.tokenizer, data.eval_examples, prefix, progress=False
        )
        return result.acc

    rows = {"zero-shot (no prefix)": acc(None)}

    def start(init: str = "tokens"):
        return initial_prefix(loaded.model, loaded.tokenizer, data.server_rows, config.prefix_len, init=init)

    rows["default: whole server examples"] = acc(start())
    stretch = start()
    text = [t for row in data.server_rows for t in row.ids][: config.prefix_len]
    init_prefix_from_tokens(stretch, loaded.model, torch.tensor(text))
    rows["first P tokens of shard text"] = acc(stretch)
    torch.manual_seed(0)
    rows["random N(0,1)"] = acc(start("random"))
    print(
        f"{args.model} / {args.task}, first {len(data.eval_examples)} {data.eval_split} examples, "
        f"P={args.prefix_len}"
    )
    for name, value in rows.items():
        print(f"  {name:<34}{100 * value:6.1f}%")
    if args.out:
        record = {
            "model": args.model,
            "task": args.task,
            "n": len(data.eval_examples),
            "prefix_len": args.prefix_len,
            "acc": rows,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
