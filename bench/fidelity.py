"""How well FedSP's auxiliary model stands in for the global model, against the KD settings.

    .venv/bin/python bench/fidelity.py [--model smollm2] [--task arc_easy] [--kd-steps 20,100,500]
                                       [--kd-objectives hidden,logits,both] [--aux-layers 1,2,4]
                                       [--set KEY=VALUE ...] [--seed 0] [--out FILE.json]

For each combination of KD budget, KD objective and number of auxiliary
layers: the auxiliary model is distilled on the server's shard (or read from
the KD cache), then measured as every FedSP run measures it before round 1
(:mod:`fedsp.methods.fidelity`): the cosine between the round-0 prefix's
gradient through the auxiliary model and through the global model (same server
batches), and the round-0 prefix's validation loss on each. A cosine near 0
means the clients' prefix steps point nowhere useful for the global model.
Prints a Markdown table; writes JSON (after each row, so a long sweep keeps
what it measured).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from fedsp.config import RunConfig
from fedsp.data.shards import prepare_data
from fedsp.experiments.compare import parse_settings
from fedsp.methods.builders import build_course
from fedsp.methods.fidelity import FIDELITY
from fedsp.models.loading import load_global_model


def _list(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--kd-steps", default="20,100,500", help="comma-separated KD budgets")
    parser.add_argument("--kd-objectives", default="hidden", help="comma-separated: hidden, logits, both")
    parser.add_argument("--aux-layers", default="1", help="comma-separated numbers of auxiliary layers")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run option")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--val-limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench/fidelity.json")
    args = parser.parse_args()
    extra = parse_settings(args.set)
    loaded = load_global_model(args.model, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    combos = itertools.product(
        _list(args.aux_layers, int), _list(args.kd_objectives, str), _list(args.kd_steps, int)
    )
    for layers, objective, steps in combos:
        config = RunConfig.from_dict(
            {
                "model": args.model,
                "task": args.task,
                "clients": args.clients,
                "kd_steps": steps,
                "kd_objective": objective,
                "aux_layers": layers,
                "val_limit": args.val_limit,
                "seed": args.seed,
                "progress": False,
                **extra,
            }
        )
        data = prepare_data(config, loaded.tokenizer)
        t0 = time.perf_counter()
        course = build_course(config, loaded, data)
        fidelity = course.notes[FIDELITY]
        kd_losses = course.notes.get("kd_losses") or []
        rows.append(
            {
                "aux_layers": layers,
                "kd_objective": objective,
                "kd_steps": steps,
                "kd_last_loss": kd_losses[-1] if kd_losses else None,
                "seconds": time.perf_counter() - t0,
                "server_rows": len(data.server_rows),
                **fidelity,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\n{args.model} / {args.task}, seed {args.seed}, {args.val_limit} validation rows")
    print(
        "| aux layers | KD objective | KD steps | KD loss (last) | prefix-gradient cosine | val loss aux "
        "| val loss global |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        kd_loss = "–" if row["kd_last_loss"] is None else f"{row['kd_last_loss']:.4f}"
        print(
            f"| {row['aux_layers']} | {row['kd_objective']} | {row['kd_steps']} | {kd_loss} | "
            f"{row['grad_cosine']:.3f} | {row['val_loss_aux']:.3f} | {row['val_loss_global']:.3f} |"
        )


if __name__ == "__main__":
    main()
