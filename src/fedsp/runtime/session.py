"""One run's life on the server side, shared by every runtime.

``Session.start`` does everything before round 1 (results folder, global model,
data, zero-shot accuracy, the method's parties); ``Session.finish_round``
aggregates the updates a runtime collected, tunes, validates, evaluates and
records the round; ``Session.finish`` evaluates the best state and writes
``results.json`` and ``curves.png``. The rounds in between are the round
driver's (:mod:`fedsp.runtime.rounds`), over an engine that only decides how
orders reach the clients and how their replies come back: in-process calls,
or Flower messages.

What the run holds is :class:`~fedsp.runtime.run_state.RunState`; its checkpoint is written and
read back by :mod:`fedsp.runtime.checkpoint` (``save_run``, ``restore_run``), its results by
:mod:`fedsp.runtime.report`; the session keeps the run's life: folder and lock, start or resume, each
round's server half, the end.

After every round the session checkpoints the server (``checkpoint.pt``);
``Session.start(config, resume=DIR)`` rebuilds the same parties and continues
after the last completed round (``session.first_round``). With ``--audit``
every tensor a runtime reports through :meth:`Session.record_sent` is checked
against the global model's private weights at the end (``audit.json``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsp import wire
from fedsp.config import RunConfig
from fedsp.data.shards import prepare_data
from fedsp.errors import RunFinished, RunInterrupted
from fedsp.evaluation import describe, metric_figures
from fedsp.files import remove_stale_temporaries
from fedsp.methods.builders import build_course
from fedsp.methods.fidelity import FIDELITY, describe_fidelity
from fedsp.methods.table import spec_for
from fedsp.models.adapters import check_lengths
from fedsp.models.loading import load_global_model
from fedsp.runtime import checkpoint, report, results
from fedsp.runtime.audit import Audit, private_weights
from fedsp.runtime.privacy import Aggregator, RoundAggregate
from fedsp.runtime.report import contributions
from fedsp.runtime.run_state import RunState


class _RoundLines:
    """Whether a run without progress output still prints one line a round (``fedsp run --quiet`` sets
    it for the run it starts; grid cells and library runs with ``progress=False`` stay silent)."""

    on = False


ROUND_LINES = _RoundLines()


class RunClosed(RuntimeError):
    """A round that an engine's thread finished after the run was stopped and its folder let go."""


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends, then act as they would have (SIGTERM first when both
    came). An error inside the block is raised as it is, the held signal dropped: the error says more.
    Outside the main thread, where handlers cannot be set, the block runs as it is (a session's
    ``recording`` lock covers that case: :func:`run_course`)."""
    held: list[int] = []
    before: dict[int, Any] = {}
    try:
        for kind in (signal.SIGTERM, signal.SIGINT):
            before[kind] = signal.signal(kind, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main thread (any handler already set is put back)
        _restore_handlers(before)
    if not before:
        yield
        return
    try:
        yield
    except BaseException:
        _restore_handlers(before)
        raise
    _restore_handlers(before)
    for kind in (signal.SIGTERM, signal.SIGINT):
        if kind in held:  # delivered again, now to the handler it was meant for
            signal.raise_signal(kind)


def _restore_handlers(before: dict[int, Any]) -> None:
    """Put back each handler ``before`` holds, each whatever happens to the others."""
    try:
        for kind, handler in before.items():
            signal.signal(kind, handler)
    finally:
        before.clear()


@dataclass
class RunOutcome:
    """A finished run: its results folder and what ``results.json`` holds."""

    out_dir: Path
    results: dict[str, Any]


class Session(RunState):
    """A run's life: its folder and lock, everything before round 1 (or a resume), each round's server
    half, and its end; its state is :class:`~fedsp.runtime.run_state.RunState`."""

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
            # the round-0 validation; the fidelity measurement already made it (and offered the state)
            measured = fidelity["val_loss_global"] if fidelity and fidelity.get("measured") else None
            loss0 = session.course.server.validation_loss() if measured is None else measured
            record0 = {"round": 0, "val_loss": loss0}
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
        checkpoint.restore_run(self, saved)

    def save_checkpoint(self, rnd: int) -> None:
        """The run's checkpoint after round ``rnd`` (:func:`fedsp.runtime.checkpoint.save_run`)."""
        checkpoint.save_run(self, rnd)

    def finish(self) -> dict[str, Any]:
        """Evaluate the best state, write results.json and curves.png (:mod:`fedsp.runtime.report`)."""
        return report.write_results(self)

    def record_sent(
        self, rnd: int, kind: str, tensors: dict[str, torch.Tensor], partitions: list[int]
    ) -> None:
        """Runtimes report every payload they send to clients here (kept only with --audit)."""
        if self.audit is not None:
            self.audit.record(rnd, kind, tensors, partitions)

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
        gains = (
            f" (clients {record['clients_gain']:+.4f}, server {record['server_gain']:+.4f})"
            if "clients_gain" in record
            else ""
        )
        line = f"round {rnd}: val_loss {val_loss:.4f}{gains}  server_loss {server_loss:.4f}"
        if self.last_eval and self.config.eval_every_round:
            line += f"  {describe(self.last_eval.summary())}"
        # a stop during the round's record waits for it: a signal in this thread, or the main thread's
        # clean-up (run_course) while an engine records rounds in a thread of its own
        with self.recording, signals_held():
            if self.closed:  # the run was stopped meanwhile and its folder let go: nothing more is written
                raise RunClosed(f"round {rnd} ended after the run was stopped; it is not recorded")
            self.history.append(record)
            # the checkpoint first: metrics.jsonl never holds a round that a resume could not continue from
            try:
                self.save_checkpoint(rnd)
            except BaseException:
                self.history.pop()  # not kept: the run's last completed round is the one before
                raise
            results.append_metrics(self.out_dir / "metrics.jsonl", record)
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
        with session.recording:  # a round an engine's thread is recording now completes first
            session.closed = True
            completed = max((h["round"] for h in session.history), default=0)
        session.abandon()
        kept = str(session.out_dir) if session.out_dir.is_dir() else None
        if isinstance(err, KeyboardInterrupt):  # say what is left: the folder (if kept) and its last round
            raise RunInterrupted(kept, completed) from err
        if isinstance(err, OSError):  # a full disk, a folder made read-only...: the run's, said in one line
            raise results.stopped_by_disk(err, kept, completed) from err
        raise
    session.release()
    return RunOutcome(session.out_dir, summary)
