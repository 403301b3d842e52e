"""How well FedSP's auxiliary model stands in for the global model, against the KD budget.

    .venv/bin/python bench/fidelity.py [--model smollm2] [--task arc_easy] [--kd-steps 20,100,500]
                                       [--aux-layers 1] [--seed 0] [--out FILE.json]

For each KD budget: the auxiliary model is distilled on the server's shard (or
read from the KD cache), then measured as every FedSP run measures it before
round 1 (:mod:`fedsp.methods.fidelity`): the cosine between the round-0
prefix's gradient through the auxiliary model and through the global model
(same server batches), and the round-0 prefix's validation loss on each. A
cosine near 0 means the clients' prefix steps point nowhere useful for the
global model. Prints a Markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedsp.config import RunConfig
from fedsp.data.shards import prepare_data
from fedsp.methods.fidelity import FIDELITY
from fedsp.methods.table import build_course
from fedsp.models.loading import load_global_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--kd-steps", default="20,100,500", help="comma-separated KD budgets")
    parser.add_argument("--aux-layers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--val-limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench/fidelity.json")
    args = parser.parse_args()
    budgets = [int(part) for part in args.kd_steps.split(",") if part.strip()]
    loaded = load_global_model(args.model, seed=args.seed)
    rows = []
    for steps in budgets:
        config = RunConfig(
            model=args.model,
            task=args.task,
            clients=args.clients,
            kd_steps=steps,
            aux_layers=args.aux_layers,
            val_limit=args.val_limit,
            seed=args.seed,
            progress=False,
        )
        data = prepare_data(config, loaded.tokenizer)
        t0 = time.perf_counter()
        course = build_course(config, loaded, data)
        fidelity = course.notes[FIDELITY]
        kd_losses = course.notes.get("kd_losses") or []
        rows.append(
            {
                "kd_steps": steps,
                "kd_last_loss": kd_losses[-1] if kd_losses else None,
                "seconds": time.perf_counter() - t0,
                **fidelity,
            }
        )
        print(f"kd {steps}: {json.dumps(rows[-1])}", flush=True)
    print(
        f"\n{args.model} / {args.task}, {args.aux_layers} auxiliary layer(s), seed {args.seed}, "
        f"{len(data.server_rows)} server rows, {args.val_limit} validation rows"
    )
    print("| KD steps | KD loss (last) | prefix-gradient cosine | val loss aux | val loss global |")
    print("|---|---|---|---|---|")
    for row in rows:
        kd_loss = "–" if row["kd_last_loss"] is None else f"{row['kd_last_loss']:.4f}"
        print(
            f"| {row['kd_steps']} | {kd_loss} | {row['grad_cosine']:.3f} | {row['val_loss_aux']:.3f} | "
            f"{row['val_loss_global']:.3f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
