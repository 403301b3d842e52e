"""The in-process runner: server and clients in one process, clients in turn.

A FedSP course, top to bottom:
  1. load the global model and the task; cut the train split into K+1 shards;
  2. zero-shot accuracy on the fixed evaluation examples;
  3. server: round-0 prefix, auxiliary model distilled on its shard (KD);
  4. send the auxiliary model once; each client keeps its own copy;
  5. rounds: prefix down -> clients align + tune -> prefix up -> average -> server tunes;
  6. accuracy of the best prefix (lowest validation loss) on the same examples;
  7. results folder: config.json, metrics.jsonl, results.json, curves.png.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.evaluation.multiple_choice import MCResult, evaluate_multiple_choice
from fedsp.methods.fedsp import FedSPClient, FedSPServer, LocalConfig
from fedsp.methods.optim import OptimConfig
from fedsp.models.auxiliary import unique_parameter_count
from fedsp.models.loading import load_global_model
from fedsp.runtime import results
from fedsp.runtime.setup import distilled_auxiliary_model, initial_prefix, prepare_data


@dataclass
class RunOutcome:
    out_dir: Path
    results: dict[str, Any]


def run(config: RunConfig) -> RunOutcome:
    started = time.perf_counter()
    out_dir = results.create_run_dir(config.out, config.method, config.task)
    results.write_json(out_dir / "config.json", config.to_dict())
    torch.manual_seed(config.seed)
    say = print if config.progress else (lambda *a, **k: None)

    # 1) global model and data
    loaded = load_global_model(config.model, config.dtype, config.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    data = prepare_data(config, tokenizer)
    pad_id = tokenizer.pad_token_id
    say(f"fedsp: {config.model} on {config.task}: {len(data.server_rows)} server rows, "
        f"{len(data.client_rows)} clients x ~{len(data.client_rows[0])} rows, "
        f"{len(data.eval_examples)} {data.eval_split} examples for evaluation")  # fmt: skip

    def evaluate(prefix, desc: str) -> MCResult:
        return evaluate_multiple_choice(model, tokenizer, data.eval_examples, prefix, config.eval_batch_size,
                                        config.max_length, desc=desc, progress=config.progress)  # fmt: skip

    # 2) zero-shot
    zero_shot = evaluate(None, "zero-shot eval")
    say(f"zero-shot: acc {100 * zero_shot.acc:.1f}  acc_norm {100 * zero_shot.acc_norm:.1f}")

    # 3) server: prefix and distilled auxiliary model
    prefix = initial_prefix(config, loaded, data.server_rows)
    aux_model, selected, kd_losses = distilled_auxiliary_model(config, loaded, data.server_rows)
    aux_params = unique_parameter_count(aux_model)
    global_params = unique_parameter_count(model)
    aux_bytes = len(wire.encode(dict(aux_model.named_parameters())))

    # 4) clients, each with its own copy of the auxiliary model
    local = LocalConfig(
        steps=config.local_steps,
        batch_size=config.batch_size,
        align=OptimConfig(config.align_lr, config.weight_decay, config.warmup_ratio),
        prompt=OptimConfig(config.lr, config.weight_decay, config.warmup_ratio),
    )
    clients = [FedSPClient(copy.deepcopy(aux_model), prefix.config, rows, local, config.rounds, pad_id,
                           seed=config.seed * 1000 + k + 1)
               for k, rows in enumerate(data.client_rows)]  # fmt: skip
    del aux_model
    server_local = LocalConfig(config.effective_server_steps, config.batch_size, local.align, local.prompt)
    server = FedSPServer(model, prefix, data.server_rows, data.val_rows, server_local, config.rounds, pad_id,
                         seed=config.seed, eval_batch_size=config.eval_batch_size)  # fmt: skip

    # 5) rounds
    metrics_path = out_dir / "metrics.jsonl"
    initial_val = server.validation_loss()
    record0: dict[str, Any] = {"round": 0, "val_loss": initial_val, "kd_first_loss": kd_losses[0] if kd_losses else None,
                               "kd_last_loss": kd_losses[-1] if kd_losses else None}  # fmt: skip
    results.append_metrics(metrics_path, record0)
    history: list[dict[str, Any]] = [record0]
    last_eval: MCResult | None = None
    for rnd in tqdm(range(1, config.rounds + 1), desc="rounds", unit="round", disable=not config.progress):
        t0 = time.perf_counter()
        sent = server.broadcast()
        down = wire.encode(sent)
        updates, ups = [], []
        for client in tqdm(clients, desc=f"round {rnd} clients", unit="client", leave=False,
                           disable=not config.progress):  # fmt: skip
            update = client.fit(wire.decode(down))
            payload = wire.encode(update.prefix)
            ups.append(payload)
            updates.append(dataclasses.replace(update, prefix=wire.decode(payload)))
        server.aggregate(updates)
        server_loss = server.tune()
        val_loss = server.validation_loss()
        record = {
            "round": rnd,
            "client_losses": [u.prompt_loss for u in updates],
            "client_align_losses": [u.align_loss for u in updates],
            "server_loss": server_loss,
            "val_loss": val_loss,
            "params_down": wire.num_params(sent),
            "params_up": wire.num_params(updates[0].prefix),
            "bytes_down": len(down) * len(clients),
            "bytes_up": sum(len(p) for p in ups),
            "num_clients": len(clients),
        }
        if config.eval_every_round:
            last_eval = evaluate(server.prefix, f"round {rnd} eval")
            record.update(acc=last_eval.acc, acc_norm=last_eval.acc_norm)
        record["seconds"] = time.perf_counter() - t0
        results.append_metrics(metrics_path, record)
        history.append(record)
        say(f"round {rnd}: val_loss {val_loss:.4f}  server_loss {server_loss:.4f}"
            + (f"  acc {100 * last_eval.acc:.1f}" if config.eval_every_round and last_eval else ""))  # fmt: skip

    # 6) the best prefix on the same evaluation examples
    best_round = min(history, key=lambda h: h["val_loss"])["round"]
    if best_round == config.rounds and last_eval is not None:
        final = last_eval
    else:
        server.prefix.load_wire_state(server.best_state)
        final = evaluate(server.prefix, "final eval")

    # 7) results
    last = history[-1]  # every client receives and returns a prefix of the same size
    prefix_params = last["params_down"]
    summary = {
        "method": config.method,
        "task": config.task,
        "model": config.model,
        "eval_split": data.eval_split,
        "zero_shot": zero_shot.summary(),
        "final": final.summary(),
        "best_round": best_round,
        "rounds": config.rounds,
        "comm": {
            "params_down_per_round": prefix_params,
            "params_up_per_round": last["params_up"],
            "bytes_down_per_round": last["bytes_down"] // last["num_clients"],
            "bytes_up_per_round": last["bytes_up"] // last["num_clients"],
            "per": "client and round",
            "aux_model_bytes_once": aux_bytes,
            "total_bytes": aux_bytes * len(clients)
            + sum(h.get("bytes_down", 0) + h.get("bytes_up", 0) for h in history),
        },
        "client_model": {
            "params": aux_params,
            "fraction_of_global": aux_params / global_params,
            "layers": selected,
        },
        "global_model": {"params": global_params},
        "prefix": {"params": prefix_params, "fraction_of_global": prefix_params / global_params},
        "wall_seconds": time.perf_counter() - started,
    }
    results.write_json(out_dir / "results.json", summary)
    results.plot_curves(
        history, zero_shot.acc, out_dir / "curves.png", f"FedSP on {config.task} ({config.model})"
    )
    return RunOutcome(out_dir, summary)
