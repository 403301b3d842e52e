"""One run's life on the server side, shared by every runtime.

``Session.start`` does everything before round 1 (results folder, global model,
data, zero-shot accuracy, the method's parties); ``Session.finish_round``
aggregates the updates a runtime collected, tunes, validates, evaluates and
records the round; ``Session.finish`` evaluates the best state and writes
``results.json`` and ``curves.png``. The rounds in between are the round
driver's (:mod:`fedsp.runtime.rounds`), over an engine that only decides how
orders reach the clients and how their replies come back: in-process calls,
or Flower messages.

After every round the session checkpoints the server (``checkpoint.pt``);
``Session.start(config, resume=DIR)`` rebuilds the same parties and continues
after the last completed round (``session.first_round``). With ``--audit``
every tensor a runtime reports through :meth:`Session.record_sent` is checked
against the global model's private weights at the end (``audit.json``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.data.shards import RunData, generation_stop, prepare_data
from fedsp.data.tasks import MCExample
from fedsp.errors import RunFinished, RunInterrupted
from fedsp.evaluation import EvalResult, describe, evaluate_examples, headline, metric_figures
from fedsp.evaluation.multiple_choice import MCResult
from fedsp.files import atomic_write, remove_stale_temporaries
from fedsp.methods.base import Course, Emulated, ManyPrefixes
from fedsp.methods.fidelity import FIDELITY, describe_fidelity
from fedsp.methods.table import MethodSpec, build_course, spec_for
from fedsp.models.adapters import check_lengths
from fedsp.models.auxiliary import unique_parameter_count
from fedsp.models.loading import LoadedModel, load_global_model
from fedsp.plotting import chance, setting_line
from fedsp.runtime import checkpoint, outputs, results
from fedsp.runtime.audit import Audit, private_weights
from fedsp.runtime.messages import STATE_BYTES
from fedsp.runtime.outputs import NOTHING_TRAINED, QUESTIONS_FILE
from fedsp.runtime.privacy import Aggregator, RoundAggregate


class _RoundLines:
    """Whether a run without progress output still prints one line a round (``fedsp run --quiet`` sets
    it for the run it starts; grid cells and library runs with ``progress=False`` stay silent)."""

    on = False


ROUND_LINES = _RoundLines()


@dataclass
class RunOutcome:
    """A finished run: its results folder and what ``results.json`` holds."""

    out_dir: Path
    results: dict[str, Any]


@dataclass
class Session:
    config: RunConfig
    spec: MethodSpec
    out_dir: Path
    loaded: LoadedModel
    data: RunData
    zero_shot: EvalResult | None
    course: Course | None  # None for methods that train nothing
    started: float
    history: list[dict[str, Any]] = field(default_factory=list)
    last_eval: EvalResult | None = None
    once_bytes: int = 0
    ignored: dict[str, Any] = field(default_factory=dict)
    first_round: int = 1  # > 1 when resumed
    audit: Audit | None = None
    runtime_state: dict[str, Any] = field(default_factory=dict)  # what a runtime checkpoints with the server
    lock: results.RunLock | None = None  # held while this process runs in out_dir
    created: bool = False  # out_dir was made by this session (removed if the run fails before round 1)
    aggregator: Aggregator | None = None  # the round's aggregate: rule or DP, adaptive clip, accountant
    final_scores: list[float] | None = None  # per evaluated question, the final result's (questions.json)

    @classmethod
    def start(cls, config: RunConfig, resume: Path | None = None) -> Session:
        """Everything before round 1; with ``resume`` (a results folder) the state after its last round.

        The session holds its folder's lock until :meth:`release`. A new run's folder is created
        here; if anything fails before the session exists, the folder is removed again.
        """
        if resume is not None:
            folder = Path(resume)
            lock = results.RunLock(folder) if folder.is_dir() else None  # a live run's folder: refused
            try:
                saved = checkpoint.load_checkpoint(folder, config.to_dict())
                if saved["round"] >= config.rounds and (folder / "results.json").is_file():
                    raise RunFinished(
                        f"--resume {str(folder)!r}: this run finished all its {config.rounds} "
                        "rounds already (see results.json); nothing was changed"
                    )
                remove_stale_temporaries(folder)  # what a killed writer left behind
                assert lock is not None
                return cls._start(config, folder, saved, lock, created=False)
            except BaseException:
                if lock is not None:
                    lock.release()
                raise
        folder = results.create_run_dir(config.out, config.method, config.task)
        lock = results.RunLock(folder)
        try:
            return cls._start(config, folder, None, lock, created=True)
        except BaseException:  # nothing of this run is worth keeping: no round completed
            lock.release()
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @classmethod
    def _start(
        cls,
        config: RunConfig,
        out_dir: Path,
        saved: dict[str, Any] | None,
        lock: results.RunLock,
        created: bool,
    ) -> Session:
        started = time.perf_counter()
        spec = spec_for(config.method)
        ignored = spec.ignored_options(config)
        if ignored:
            listed = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in ignored.items())
            print(f"fedsp: note: --method {config.method} does not use {listed}; ignored", file=sys.stderr)
        if saved is None:
            results.write_json(out_dir / "config.json", config.to_dict())
        torch.manual_seed(config.seed)
        loaded = load_global_model(config.model, config.dtype, config.seed, device=config.device)
        check_lengths(loaded.model.config, config.prefix_len, config.max_length)
        data = prepare_data(config, loaded.tokenizer)
        session = cls(config, spec, out_dir, loaded, data, None, None, started, lock=lock, created=created)
        session.say(
            f"fedsp: {config.method}, {config.model} on {config.task}"
            + (f" ({data.data_format} rows)" if data.data_format else "")
            + f": {len(data.server_rows)} server "
            f"rows, {len(data.client_rows)} clients x ~{len(data.client_rows[0])} rows, "
            f"{len(data.eval_examples)} {data.eval_split} examples for evaluation"
        )
        session.ignored = ignored
        # the private weights as loaded: a method may change the global model's own layers in training
        session.audit = Audit(private_weights(loaded.model, config)) if config.audit else None
        if saved is not None:
            session._restore(saved)
            return session
        if config.zero_shot_eval or not spec.trains:
            session.zero_shot = session.evaluate(loaded.model, None, "zero-shot eval")
            session.say(f"zero-shot: {describe(session.zero_shot.summary())}")
        if spec.trains:
            # the aggregator first: a DP setting that cannot work is refused before KD and the clients
            session.aggregator = Aggregator(config, config.clients if spec.federated else 0)
            session.course = build_course(config, loaded, data)
            session.once_bytes = wire.num_bytes(session.course.shipped_once)
            fidelity = session.course.notes.get(FIDELITY)
            if fidelity is not None:
                session.say(f"fedsp: {describe_fidelity(fidelity)}")
            record0 = {"round": 0, "val_loss": session.course.server.validation_loss()}
            kd_losses = session.course.notes.get("kd_losses")
            if kd_losses:
                record0.update(kd_first_loss=kd_losses[0], kd_last_loss=kd_losses[-1])
            results.append_metrics(out_dir / "metrics.jsonl", record0)
            session.history.append(record0)
        cut = data.truncation  # said once the run is set up: an error before it stays one line
        if cut.get("train_contexts_cut") or cut.get("eval_contexts_cut"):
            rows, lose = f"{cut['train_contexts_cut']} of {cut['train_rows']}", cut["train_answers_cut"]
            questions = f"{cut['eval_contexts_cut']} of {cut['eval_questions']}"
            print(
                f"fedsp: note: --max-length {config.max_length} cuts the context of {rows} training rows "
                f"({lose} lose answer tokens) and of {questions} evaluated questions (results.json: "
                "truncation)",
                file=sys.stderr,
            )
        return session

    def release(self) -> None:
        """Let go of the results folder's lock (another process may resume the run from now on)."""
        if self.lock is not None:
            self.lock.release()

    def abandon(self) -> None:
        """After a failure: a folder this session made and no round completed in is removed; then release."""
        self.release()
        if self.created and not any(h["round"] > 0 for h in self.history):
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def _restore(self, saved: dict[str, Any]) -> None:
        """Continue after the checkpointed round: server state, metrics, RNG states, runtime state."""
        self.zero_shot, self.last_eval, self.history = (
            saved["zero_shot"],
            saved["last_eval"],
            saved["history"],
        )
        if saved["server"] is not None:
            self.course = self.course or build_course(self.config, self.loaded, self.data)
            self.once_bytes = wire.num_bytes(self.course.shipped_once)
            self.course.server.load_state_dict(saved["server"])
            self.aggregator = Aggregator(self.config, self.course.num_clients)
            if saved.get("aggregator") is not None:  # absent in checkpoints of older versions
                self.aggregator.load_state_dict(saved["aggregator"])
        if self.audit is not None and saved.get("audit") is not None:
            self.audit.load_state_dict(saved["audit"])
        self.runtime_state = saved.get("runtime", {})
        self.first_round = saved["round"] + 1
        # wall_seconds counts every process's time on the run (not the pause between them); absent in
        # checkpoints of older versions: only this process's time is counted
        self.started -= saved.get("wall_seconds", 0.0)
        # metrics.jsonl may hold a round that finished after the checkpoint was written: keep the checkpoint's
        lines = "".join(json.dumps(results._clean(h)) + "\n" for h in self.history)
        atomic_write(self.out_dir / "metrics.jsonl", lines.encode())
        checkpoint.set_rng_states(saved["rng"])
        # said whatever --quiet: the user asked for a new run or a continued one, and should know which
        print(
            f"fedsp: resuming {self.out_dir} after round {saved['round']} of {self.config.rounds}",
            file=sys.stderr,
            flush=True,
        )

    def record_sent(
        self, rnd: int, kind: str, tensors: dict[str, torch.Tensor], partitions: list[int]
    ) -> None:
        """Runtimes report every payload they send to clients here (kept only with --audit)."""
        if self.audit is not None:
            self.audit.record(rnd, kind, tensors, partitions)

    def save_checkpoint(self, rnd: int) -> None:
        """Server state after round ``rnd`` (called by ``finish_round``; runtimes add ``runtime_state``)."""
        assert self.course is not None
        checkpoint.save_checkpoint(
            self.out_dir,
            {
                "round": rnd,
                "config": self.config.to_dict(),
                "server": self.course.server.state_dict(),
                "history": self.history,
                "zero_shot": self.zero_shot,
                "last_eval": self.last_eval,
                "audit": self.audit.state_dict() if self.audit else None,
                "runtime": self.runtime_state,
                "aggregator": self.aggregator.state_dict() if self.aggregator else None,
                "wall_seconds": time.perf_counter() - self.started,
            },
        )

    def say(self, text: str) -> None:
        if self.config.progress:
            print(text)

    def evaluate(self, model, prefix, desc: str) -> EvalResult:
        c = self.config
        return evaluate_examples(
            model,
            self.loaded.tokenizer,
            self.data.eval_examples,
            prefix,
            batch_size=c.eval_batch_size,
            max_length=c.max_length,
            max_new_tokens=c.max_new_tokens,
            stop=generation_stop(c),
            desc=desc,
            progress=c.progress,
        )

    def finish_round(
        self,
        rnd: int,
        sent: dict[str, torch.Tensor],
        bytes_down: int,
        bytes_up: Sequence[int],
        aggregated: RoundAggregate,
        seconds_before: float,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Steps 5-6 on the server: take the round's aggregate, tune, validate, evaluate; append the round
        to metrics.jsonl.

        ``bytes_down`` is the total sent to all the round's clients, ``bytes_up`` one entry per update.
        Under secure aggregation the updates carry only their metrics and example counts.
        """
        assert self.course is not None
        t0 = time.perf_counter()
        server = self.course.server
        # what the round started from: the broadcast state, the server's after the previous round
        loss_sent = self._loss_sent(rnd) if self.spec.federated else None
        updates, protection = aggregated.updates, aggregated.record
        server.aggregate(aggregated.state, updates)
        # the clients' aggregate alone, before the server's own step: a measurement, never the best state
        loss_aggregate = server.validation_loss(track=False) if loss_sent is not None else None
        server_loss = server.tune()
        val_loss = server.validation_loss()
        record: dict[str, Any] = {"round": rnd, "server_loss": server_loss, "val_loss": val_loss}
        record.update(protection)
        if loss_sent is not None and loss_aggregate is not None:
            record.update(contributions(loss_sent, loss_aggregate, val_loss))
        if self.spec.federated:
            record.update(
                client_losses=[u.metrics.get("prompt_loss") for u in updates],
                client_align_losses=[u.metrics.get("align_loss") for u in updates],
                params_down=sum(t.numel() for t in sent.values()),
                params_up=sum(t.numel() for t in sent.values()) if updates else 0,
                bytes_down=bytes_down,
                bytes_up=sum(bytes_up),
                num_clients=len(updates),
            )
            other = sorted({k for u in updates for k in u.metrics} - {"prompt_loss", "align_loss"})
            if other:  # method-specific per-client figures (e.g. split-learning traffic), one list per key
                record["client_metrics"] = {k: [u.metrics.get(k) for u in updates] for k in other}
        record.update(extra or {})
        if self.config.eval_every_round:
            self.last_eval = self.evaluate(*server.evaluation_target(), f"round {rnd} eval")
            record.update(metric_figures(self.last_eval.summary()))
        record["seconds"] = seconds_before + time.perf_counter() - t0
        self.history.append(record)
        # the checkpoint first: metrics.jsonl never holds a round that a resume could not continue from
        self.save_checkpoint(rnd)
        results.append_metrics(self.out_dir / "metrics.jsonl", record)
        gains = (
            f" (clients {record['clients_gain']:+.4f}, server {record['server_gain']:+.4f})"
            if "clients_gain" in record
            else ""
        )
        line = f"round {rnd}: val_loss {val_loss:.4f}{gains}  server_loss {server_loss:.4f}"
        if self.last_eval and self.config.eval_every_round:
            line += f"  {describe(self.last_eval.summary())}"
        if self.config.progress or ROUND_LINES.on:  # --quiet: no bars, but still one line a round
            print(line if self.config.progress else f"{line}  ({record['seconds']:.0f} s)", flush=True)
        return record

    def _loss_sent(self, rnd: int) -> float:
        """The validation loss of the state broadcast in round ``rnd``: the server's state after round
        ``rnd - 1``, whose loss that round recorded (measured again when the history lacks it)."""
        assert self.course is not None
        last = self.history[-1] if self.history else None
        if last is not None and last["round"] == rnd - 1 and last.get("val_loss") is not None:
            return float(last["val_loss"])
        return self.course.server.validation_loss(track=False)

    def finish(self) -> dict[str, Any]:
        """Evaluate the best state (lowest validation loss), write results.json and curves.png."""
        config, spec = self.config, self.spec
        global_params = unique_parameter_count(self.loaded.model)
        summary: dict[str, Any] = {
            "method": config.method,
            "method_summary": spec.summary,
            "task": config.task,
            "model": config.model,
            "eval_split": self.data.eval_split,
            "data_format": self.data.data_format,
            "eval_examples": len(self.data.eval_examples),
            "seed": config.seed,
            "zero_shot": self.zero_shot.summary() if self.zero_shot else None,
            "ignored_options": self.ignored,
            "truncation": self.data.truncation,
            "shards": self.data.shards,
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
            rounds_done = sum(1 for h in self.history if h["round"] > 0)
            privacy = self.aggregator.summary(rounds_done) if self.aggregator else None
            if privacy is not None:
                summary["privacy"] = privacy
        if self.course is None:  # nothing trained: the zero-shot accuracy is the result
            assert self.zero_shot is not None
            summary.update(final=self.zero_shot.summary(), best_round=0, rounds=0)
            self.final_scores = self.question_scores(self.zero_shot)
        else:
            summary.update(self._trained_summary(global_params))
        self._write_question_scores()
        summary["export"] = self._export(summary["best_round"])
        if self.audit is not None:
            info = self.course.client_model if self.course is not None else None
            holds = info.privacy if info is not None else ""
            summary["audit"] = self.audit.report(
                self.loaded.model, config, self.out_dir / "audit.json", holds=holds
            )
        summary["wall_seconds"] = time.perf_counter() - self.started
        results.write_json(self.out_dir / "results.json", summary)
        if self.history:
            clients = config.clients if spec.federated else None
            setting = setting_line(config.model, config.task, clients, None, len(self.data.eval_examples))
            results.plot_curves(
                self.history,
                headline(self.zero_shot.summary()) if self.zero_shot else None,
                self.out_dir / "curves.png",
                f"{config.method}: {setting} (seed {config.seed})",
                chance(config.task),
            )
        return summary

    def question_scores(self, result: EvalResult) -> list[float] | None:
        """Per evaluated question, 1.0 when the prediction is right and 0.0 when not (multiple choice;
        None for generated answers, which have no single right choice)."""
        if not isinstance(result, MCResult):
            return None
        golds = [ex.gold for ex in self.data.eval_examples if isinstance(ex, MCExample)]
        return [float(p == g) for p, g in zip(result.predictions, golds, strict=True)]

    def _write_question_scores(self) -> None:
        """``questions.json``: each evaluated question's score, zero-shot and final, so that two runs on
        the same questions can be compared pairwise (``fedsp compare``'s paired intervals)."""
        if self.final_scores is None:
            return
        zero = self.question_scores(self.zero_shot) if self.zero_shot is not None else None
        results.write_json(
            self.out_dir / QUESTIONS_FILE,
            {
                "ids": [ex.id for ex in self.data.eval_examples],
                "eval_split": self.data.eval_split,
                "final": self.final_scores,
                "zero_shot": zero,
            },
        )

    def _export(self, best_round: int) -> dict[str, Any]:
        """The best prefix, outside fedsp: ``prefix.safetensors`` and a PEFT adapter (``adapter/``)."""
        if self.course is not None and isinstance(self.course.server, ManyPrefixes):
            return {
                "prefix": None,
                "why": "every data owner keeps its own prefix (local-only): no shared one",
            }
        prefix = self.course.server.evaluation_target()[1] if self.course is not None else None
        if prefix is None:
            why = (
                NOTHING_TRAINED if self.course is None else f"--method {self.config.method} trains no prefix"
            )
            return {"prefix": None, "why": why}
        return outputs.write_run_outputs(self.out_dir, prefix, self.loaded, self.config, best_round)

    def _trained_summary(self, global_params: int) -> dict[str, Any]:
        assert self.course is not None
        config, course = self.config, self.course
        best_round = min(self.history, key=lambda h: h["val_loss"])["round"]
        owners: dict[str, Any] | None = None
        if isinstance(course.server, ManyPrefixes):  # one prefix per data owner: each one scored
            course.server.use_best()
            scored = [
                self.evaluate(model, prefix, f"final eval, owner {k}")
                for k, (model, prefix) in enumerate(course.server.evaluation_targets())
            ]
            owners = owner_spread([result.summary() for result in scored])
            final_summary = owners["mean"]
            self.final_scores = mean_scores([self.question_scores(result) for result in scored])
        else:
            if best_round == len(self.history) - 1 and self.last_eval is not None:
                final = self.last_eval
            else:
                course.server.use_best()
                final = self.evaluate(*course.server.evaluation_target(), "final eval")
            final_summary = final.summary()
            self.final_scores = self.question_scores(final)
        # the model-private methods' clients hold a model of their own: the same state scored with it
        emulator = course.server.emulator_target() if isinstance(course.server, Emulated) else None
        out: dict[str, Any] = {
            "final": final_summary,
            "best_round": best_round,
            "rounds": config.rounds,
            "rounds_completed": sum(1 for h in self.history if h["round"] > 0),
            "federated": self.spec.federated,
        }
        if emulator is not None:
            out["emulator"] = self.evaluate(*emulator, "emulator eval").summary()
        if owners is not None:
            out["local_only"] = owners
        rounds = [h for h in self.history if h["round"] > 0]
        if any("clients_gain" in h for h in rounds):
            out["contributions"] = contribution_totals(rounds)
        if self.spec.federated and rounds:
            last = rounds[-1]
            per_client = max(1, last["num_clients"])
            out["comm"] = {
                "params_down_per_round": last["params_down"],
                "params_up_per_round": last["params_up"],
                "bytes_down_per_round": last["bytes_down"] // per_client,
                "bytes_up_per_round": last["bytes_up"] // per_client,
                "per": "client and round",
                "model_bytes_once": self.once_bytes,
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


def run_course(config: RunConfig, resume: Path | None, drive: Callable[[Session], None]) -> RunOutcome:
    """A whole run with any engine: start, ``drive`` the rounds, finish; on failure nothing half-made stays.

    A failure before any round completed removes the folder this run created; the folder's lock is
    released whatever happens, so the run can be resumed (or retried) at once.
    """
    session = Session.start(config, resume=resume)
    try:
        if session.course is not None:
            drive(session)
        summary = session.finish()
    except BaseException as err:
        session.abandon()
        kept = str(session.out_dir) if session.out_dir.is_dir() else None
        completed = max((h["round"] for h in session.history), default=0)
        if isinstance(err, KeyboardInterrupt):  # say what is left: the folder (if kept) and its last round
            raise RunInterrupted(kept, completed) from err
        if isinstance(err, OSError):  # a full disk, a folder made read-only...: the run's, said in one line
            raise results.stopped_by_disk(err, kept, completed) from err
        raise
    session.release()
    return RunOutcome(session.out_dir, summary)


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
