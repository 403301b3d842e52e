"""A run's results writer: what a finished run leaves in its folder (``results.json``, ``questions.json``,
``curves.png``, the exported prefix), and the figures each round's record and the results derive from
the history.

It reads the run's state (:class:`~fedsp.runtime.run_state.RunState`): the best state is scored by
the run's evaluation, each method's own figures come from its course (``course.notes``, its server's
kind: one prefix per owner, an emulator, a client model).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from fedsp.evaluation import headline
from fedsp.methods.base import Emulated, ManyPrefixes, TunesModelWeights
from fedsp.methods.fidelity import FIDELITY
from fedsp.models.auxiliary import unique_parameter_count
from fedsp.plotting import chance, setting_line
from fedsp.runtime import outputs, results
from fedsp.runtime.messages import STATE_BYTES
from fedsp.runtime.outputs import NOTHING_TRAINED, QUESTIONS_FILE
from fedsp.runtime.run_state import RunState


def write_results(run: RunState) -> dict[str, Any]:
    """Evaluate the best state (lowest validation loss), write results.json and curves.png."""
    config, spec = run.config, run.spec
    global_params = unique_parameter_count(run.loaded.model)
    summary: dict[str, Any] = {
        "method": config.method,
        "method_summary": spec.summary,
        "task": config.task,
        "model": config.model,
        "eval_split": run.data.eval_split,
        "data_format": run.data.data_format,
        "eval_examples": len(run.data.eval_examples),
        "seed": config.seed,
        "zero_shot": run.zero_shot.summary() if run.zero_shot else None,
        "ignored_options": run.ignored,
        "truncation": run.data.truncation,
        "shards": run.data.shards,
        "global_model": {"params": global_params},
    }
    if config.recorded_server_steps is not None:  # 0: the server only averages (paper's FedPrompt)
        summary["server_steps"] = config.recorded_server_steps
    if spec.federated:  # how updates were combined and protected, and any simulated attack
        summary["protection"] = {
            "aggregation": config.aggregation,
            "secure_aggregation": config.secure_aggregation,
            "attack": config.attack,
            "attackers": list(config.attackers),
        }
        rounds_done = sum(1 for h in run.history if h["round"] > 0)
        privacy = run.aggregator.summary(rounds_done) if run.aggregator else None
        if privacy is not None:
            summary["privacy"] = privacy
    if run.course is None:  # nothing trained: the zero-shot accuracy is the result
        assert run.zero_shot is not None
        summary.update(final=run.zero_shot.summary(), best_round=0, rounds=0)
        run.final_scores = run.question_scores(run.zero_shot)
    else:
        summary.update(_trained_summary(run, global_params))
    _write_question_scores(run)
    summary["export"] = _export(run, summary["best_round"])
    if run.audit is not None:
        info = run.course.client_model if run.course is not None else None
        holds = info.privacy if info is not None else ""
        summary["audit"] = run.audit.report(run.loaded.model, config, run.out_dir / "audit.json", holds=holds)
    summary["wall_seconds"] = time.perf_counter() - run.started
    results.write_json(run.out_dir / "results.json", summary)
    if run.history:
        clients = config.clients if spec.federated else None
        setting = setting_line(config.model, config.task, clients, None, len(run.data.eval_examples))
        results.plot_curves(
            run.history,
            headline(run.zero_shot.summary()) if run.zero_shot else None,
            run.out_dir / "curves.png",
            f"{config.method}: {setting} (seed {config.seed})",
            chance(config.task),
        )
    return summary


def _write_question_scores(run: RunState) -> None:
    """``questions.json``: each evaluated question's score, zero-shot and final, so that two runs on
    the same questions can be compared pairwise (``fedsp compare``'s paired intervals)."""
    if run.final_scores is None:
        return
    zero = run.question_scores(run.zero_shot) if run.zero_shot is not None else None
    results.write_json(
        run.out_dir / QUESTIONS_FILE,
        {
            "ids": [ex.id for ex in run.data.eval_examples],
            "eval_split": run.data.eval_split,
            "final": run.final_scores,
            "zero_shot": zero,
        },
    )


def _export(run: RunState, best_round: int) -> dict[str, Any]:
    """The best prefix, outside fedsp: ``prefix.safetensors`` and a PEFT adapter (``adapter/``)."""
    if run.course is not None and isinstance(run.course.server, ManyPrefixes):
        return {
            "prefix": None,
            "why": "every data owner keeps its own prefix (local-only): no shared one",
        }
    if run.course is not None and isinstance(run.course.server, TunesModelWeights):
        return outputs.write_run_weights(run.out_dir, run.course.server, run.loaded, run.config, best_round)
    prefix = run.course.server.evaluation_target()[1] if run.course is not None else None
    if prefix is None:
        why = NOTHING_TRAINED if run.course is None else f"--method {run.config.method} trains no prefix"
        return {"prefix": None, "why": why}
    return outputs.write_run_outputs(run.out_dir, prefix, run.loaded, run.config, best_round)


def _trained_summary(run: RunState, global_params: int) -> dict[str, Any]:
    assert run.course is not None
    config, course = run.config, run.course
    best_round = min(run.history, key=lambda h: h["val_loss"])["round"]
    owners: dict[str, Any] | None = None
    if isinstance(course.server, ManyPrefixes):  # one prefix per data owner: each one scored
        course.server.use_best()
        scored = [
            run.evaluate(model, prefix, f"final eval, owner {k}")
            for k, (model, prefix) in enumerate(course.server.evaluation_targets())
        ]
        owners = owner_spread([result.summary() for result in scored])
        final_summary = owners["mean"]
        run.final_scores = mean_scores([run.question_scores(result) for result in scored])
    else:
        if best_round == len(run.history) - 1 and run.last_eval is not None:
            final = run.last_eval
        else:
            course.server.use_best()
            final = run.evaluate(*course.server.evaluation_target(), "final eval")
        final_summary = final.summary()
        run.final_scores = run.question_scores(final)
    # the model-private methods' clients hold a model of their own: the same state scored with it
    emulator = course.server.emulator_target() if isinstance(course.server, Emulated) else None
    out: dict[str, Any] = {
        "final": final_summary,
        "best_round": best_round,
        "rounds": config.rounds,
        "rounds_completed": sum(1 for h in run.history if h["round"] > 0),
        "federated": run.spec.federated,
    }
    if emulator is not None:
        out["emulator"] = run.evaluate(*emulator, "emulator eval").summary()
    if owners is not None:
        out["local_only"] = owners
    rounds = [h for h in run.history if h["round"] > 0]
    if any("clients_gain" in h for h in rounds):
        out["contributions"] = contribution_totals(rounds)
    if run.spec.federated and rounds:
        last = rounds[-1]
        per_client = max(1, last["num_clients"])
        out["comm"] = {
            "params_down_per_round": last["params_down"],
            "params_up_per_round": last["params_up"],
            "bytes_down_per_round": last["bytes_down"] // per_client,
            "bytes_up_per_round": last["bytes_up"] // per_client,
            "per": "client and round",
            "model_bytes_once": run.once_bytes,
            # everything sent: the client model each time it was shipped, and every round's payloads
            "total_bytes": sum(
                h.get("bytes_shipped", 0) + h.get("bytes_down", 0) + h.get("bytes_up", 0) for h in rounds
            ),
        }
        split = course.notes.get("split_traffic")
        if split:  # split learning (SFPrompt): activations and gradients crossed the wire too
            out["comm"]["split_bytes_down_per_round"] = split["split_bytes_down_per_round"]
            out["comm"]["split_bytes_up_per_round"] = split["split_bytes_up_per_round"]
            # every split message the round driver counted, those of clients dropped mid-round too
            split_total = sum(h.get("split_bytes", 0) for h in rounds)
            out["comm"]["split_bytes_total"] = split_total
            out["comm"]["total_bytes"] += split_total
        sizes = [b for b in last.get("client_metrics", {}).get(STATE_BYTES, []) if b is not None]
        if sizes:  # what each client keeps on disk between rounds (its client model held apart)
            out["client_state"] = {
                "bytes_per_client": round(statistics.fmean(sizes)),
                "clients": len(sizes),
            }
        out["prefix"] = {
            "params": last["params_down"],
            "fraction_of_global": last["params_down"] / global_params,
        }
    if course.client_model is not None:
        info = course.client_model
        out["client_model"] = {
            "params": info.params,
            "fraction_of_global": info.fraction_of_global,
            "layers": list(info.global_layers),
            "model_private": info.model_private,
        }
        if info.privacy:
            out["client_model"]["privacy"] = info.privacy
    if FIDELITY in course.notes:
        out[FIDELITY] = course.notes[FIDELITY]
    notes = {k: v for k, v in course.notes.items() if k not in ("kd_losses", FIDELITY)}
    if notes:
        out["method_notes"] = notes
    return out


def contributions(loss_sent: float, loss_aggregate: float, val_loss: float) -> dict[str, float]:
    """What one round's two halves did to the validation loss: the broadcast state's loss, the clients'
    aggregate's (before the server's step), and the gains (positive: the loss went down) of each half."""
    return {
        "val_loss_sent": loss_sent,
        "val_loss_aggregate": loss_aggregate,
        "clients_gain": loss_sent - loss_aggregate,
        "server_gain": loss_aggregate - val_loss,
    }


def contribution_totals(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``results.json``'s ``contributions``: each half's gains summed over the rounds that measured them,
    and in how many rounds the clients' aggregate lowered the validation loss."""
    measured = [h for h in rounds if h.get("clients_gain") is not None]
    clients = [float(h["clients_gain"]) for h in measured]
    return {
        "rounds": len(measured),
        "clients_gain_total": sum(clients),
        "server_gain_total": sum(float(h["server_gain"]) for h in measured),
        "clients_gain_mean": statistics.fmean(clients) if clients else None,
        "rounds_clients_lowered_loss": sum(1 for g in clients if g > 0),
    }


def mean_scores(per_owner: Sequence[list[float] | None]) -> list[float] | None:
    """Per question, the mean of several owners' scores (local-only: the share of owners right)."""
    if not per_owner or any(scores is None for scores in per_owner):
        return None
    return [statistics.fmean(column) for column in zip(*per_owner, strict=True)]


def owner_spread(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every owner's evaluation summary, and per figure their mean (with the same ``n``), sd, min and max."""
    figures = [k for k, v in scores[0].items() if isinstance(v, float)]
    spread = {
        k: {
            "sd": statistics.stdev(s[k] for s in scores) if len(scores) > 1 else 0.0,
            "min": min(s[k] for s in scores),
            "max": max(s[k] for s in scores),
        }
        for k in figures
    }
    mean = {**scores[0], **{k: statistics.fmean(s[k] for s in scores) for k in figures}}
    return {"owners": len(scores), "per_owner": list(scores), "mean": mean, "spread": spread}
