"""A grid of runs for the paper's comparisons: cells, presets, and reuse of finished cells.

Each cell is one ``fedsp run`` (method x task x seed, plus option overrides
such as ``aux_layers=2``) written to ``<out>/cells/<cell name>/``. A cell whose
folder holds a ``results.json`` written with the same configuration is reused,
so an interrupted grid continues where it stopped; a folder without
``results.json`` is an interrupted cell: it continues from its checkpoint, or
starts again if no round completed; a folder written with
other settings is refused (choose another ``--out``); settings that change only
the speed (``fedsp.config.SPEED_ONLY``, e.g. the evaluation batch size) may differ.

Presets (``--scale``): ``cpu`` is sized for a 2-core machine (a cell takes
one to three minutes on SmolLM2-135M); ``paper`` follows the paper and the
reference scripts (``run_opt_ours.sh`` of FederatedScope's prompt_tuning) for
GPU users: 10 clients, batch 16, 5000 KD steps, one learning rate for both
client phases, all evaluation examples, 1024 tokens, and per task the rounds,
T and learning rate of the script (ARC-Easy 20 rounds x T = 10; ARC-Challenge
and OpenBookQA 100 x 20; PIQA 100 x 10; SciQ and RACE 50 x 10; HellaSwag
200 x 20 at lr 1e-4, others 5e-4) and the prefix MLP where the paper has it
(HellaSwag, SciQ, RACE; the script leaves it off for SciQ). A preset's
``per_task`` entry holds these task settings; both presets give SciQ the
length its longest evaluated context needs, so no evaluated question is cut.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsp.config import SPEED_ONLY, RunConfig
from fedsp.data.tasks import NATURAL_FIELDS
from fedsp.errors import FedSPError
from fedsp.evaluation import describe
from fedsp.methods.table import grid_methods, spec_for
from fedsp.runtime.checkpoint import CHECKPOINT

DIRICHLET_ALPHAS = (1.0, 0.1)  # the partitions table's label skews, mild then strong
PER_TASK = "per_task"  # a preset's settings for some tasks, over its others (see the module docstring)
SCALES: dict[str, dict[str, Any]] = {
    "cpu": dict(
        clients=3,
        rounds=2,
        local_steps=2,
        kd_steps=10,
        # 200 validation rows choose the best round (was 50); ARC-Easy has 570, ARC-Challenge 299,
        # OpenBookQA 500, SciQ 100 (all of them then), PIQA and HellaSwag hold theirs out of train
        val_limit=200,
        eval_limit=500,
        eval_every_round=False,
        per_task={"sciq": dict(max_length=512)},  # 256 cut 13 of SciQ's 200 test contexts (SmolLM2)
    ),
    "paper": dict(
        clients=10,
        rounds=20,
        local_steps=10,
        batch_size=16,
        lr=5e-4,
        align_lr=5e-4,
        kd_steps=5000,
        kd_batch_size=16,
        eval_limit=None,
        val_limit=None,
        eval_every_round=True,
        max_length=1024,
        per_task={
            "arc_challenge": dict(rounds=100, local_steps=20),
            "openbookqa": dict(rounds=100, local_steps=20),
            "piqa": dict(rounds=100),
            "sciq": dict(rounds=50, prefix_projection=True),
            "race": dict(rounds=50, prefix_projection=True),
            "hellaswag": dict(rounds=200, local_steps=20, lr=1e-4, align_lr=1e-4, prefix_projection=True),
        },
    ),
}
TASKS = ("arc_easy", "arc_challenge", "openbookqa", "piqa", "sciq")
# The default method lists, from the method table (its ``grid`` field): "opt-in" methods run only when
# named in --methods (SFPrompt: it scores every local example every round).
MAIN_METHODS = grid_methods("main")
ALL_METHODS = grid_methods("main", "all")
OPT_IN_METHODS = grid_methods("opt-in")
# Options a comparison must hold equal across all its cells (else the numbers are not comparable).
SHARED_KEYS = ("model", "eval_limit", "max_length", "data_dir", "data_seed", "dtype")


@dataclass(frozen=True)
class Cell:
    method: str
    task: str
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        extra = "".join(f"__{k}={_short(v)}" for k, v in self.overrides)
        return f"{self.task}__{self.method}{extra}__s{self.seed}"

    def config(self, base: dict[str, Any], out: Path) -> RunConfig:
        """The cell's run: ``base`` (a preset's ``per_task`` settings for this task over the rest), then
        the cell's own overrides."""
        shared = {k: v for k, v in base.items() if k != PER_TASK}
        if not spec_for(self.method).server_tunes:  # fedsp compare --server-steps: FedSP's and its kin's;
            shared.pop("server_steps", None)  # the FedPrompt baselines' server still only averages
        values = {
            **shared,
            **base.get(PER_TASK, {}).get(self.task, {}),
            **dict(self.overrides),
            "method": self.method,
            "task": self.task,
            "seed": self.seed,
            "out": str(out / "cells" / self.name),
            "progress": False,
        }
        if spec_for(self.method).trains:
            values["zero_shot_eval"] = False  # the zero-shot cell of the task gives that row
        return RunConfig.from_dict(values, source=f"grid cell {self.name}")


@dataclass
class Grid:
    cells: list[Cell]
    base: dict[str, Any]
    out: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.name

    def reusable(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's results if it finished with the same configuration; None if it must run."""
        folder = self.cell_dir(cell)
        if not (folder / "results.json").is_file():
            return None
        results: dict[str, Any] = json.loads((folder / "results.json").read_text())
        self._check_settings(cell, results)
        return results

    def _check_settings(self, cell: Cell, results: dict[str, Any] | None = None) -> None:
        """Refuse a cell folder written with other settings than this grid's for that cell; with its
        ``results``, also one whose recorded server steps are not what the same settings mean today
        (``server_steps`` unset was read under an older default)."""
        folder = self.cell_dir(cell)
        written = json.loads((folder / "config.json").read_text())
        saved_config = RunConfig.from_dict(written, strict=False, source=str(folder / "config.json"))
        saved = saved_config.to_dict()
        config = cell.config(self.base, self.out)
        wanted = config.to_dict()
        # server steps: compared as the count the run took (results.json), not as the option written
        steps = "server_steps"
        # where the cell lives is not what it computes: a grid folder moved or copied elsewhere is reused
        ignored = (*SPEED_ONLY, steps, "out")
        differs = sorted(k for k in wanted if k not in ignored and saved.get(k) != wanted[k])
        if differs:
            raise FedSPError(
                f"grid cell {folder} was run with other settings ({', '.join(differs)}); "
                "use another --out or remove that folder"
            )
        runs = config.recorded_server_steps
        if runs is None:
            return
        ran = (results or {}).get(steps)
        if ran is None:  # unfinished (or written before results.json recorded it): as its options read today
            ran = saved_config.effective_server_steps
        if int(ran) != runs:
            raise FedSPError(
                f"grid cell {folder} was run with {ran} server steps a round, where this grid's settings "
                f"now mean {runs}; pass --server-steps {ran} to reuse it, or use another --out"
            )

    def run(
        self,
        runner: Callable[[RunConfig, Path | None], Any],
        say: Callable[[str], None] = print,
        jobs: int = 1,
    ) -> None:
        """Run the cells not yet finished, in order; reuse the others.

        ``runner(config, resume)``: a cell interrupted after a completed round (its folder holds a
        checkpoint) continues from it (``resume`` = its folder); one interrupted earlier starts again.
        ``jobs`` > 1 runs that many cells at once, each in its own process (``runner`` must then be a
        module-level function) with an equal share of the CPU cores as torch threads. A cell that fails
        stops the grid: the cells not started are not run, the running ones finish (nothing is lost).
        """
        todo = []
        for cell in self.cells:
            done = self.reusable(cell)
            if done is not None:
                self.results[cell.name] = done
            else:
                todo.append(cell)
        say(
            f"grid: {len(self.cells)} cells, {len(self.cells) - len(todo)} reused, "
            f"{len(todo)} to run in {self.out}"
            + (f", {jobs} at a time" if jobs > 1 and len(todo) > 1 else "")
        )
        progress = _Progress(len(todo), say)
        if jobs > 1 and len(todo) > 1:
            self._run_parallel(todo, runner, progress, jobs)
            return
        for cell in todo:
            resume = self._prepare(cell, progress)
            t0 = time.perf_counter()
            outcome = runner(cell.config(self.base, self.out), resume)
            self.results[cell.name] = outcome.results
            progress.done(cell, outcome.results, time.perf_counter() - t0)

    def _prepare(self, cell: Cell, progress: _Progress) -> Path | None:
        """The folder to resume the cell from (its settings checked), or None to start it afresh."""
        folder = self.cell_dir(cell)
        if (folder / CHECKPOINT).is_file():
            self._check_settings(cell)
            progress.say(f"{cell.name}: continuing the interrupted run in {folder}")
            return folder
        if folder.exists():  # interrupted before any round completed: start that cell again
            shutil.rmtree(folder)
        return None

    def _run_parallel(
        self,
        todo: list[Cell],
        runner: Callable[[RunConfig, Path | None], Any],
        progress: _Progress,
        jobs: int,
    ) -> None:
        workers = min(jobs, len(todo))
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
        pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_limit_threads, initargs=(threads,)
        )
        waiting = list(todo)
        running: dict[Future, tuple[Cell, float]] = {}
        failure: BaseException | None = None
        try:
            while running or (waiting and failure is None):
                while waiting and failure is None and len(running) < workers:  # start cells as slots free
                    cell = waiting.pop(0)
                    resume = self._prepare(cell, progress)
                    job = pool.submit(_run_cell, runner, cell.config(self.base, self.out), resume)
                    running[job] = (cell, time.perf_counter())
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for job in finished:
                    cell, t0 = running.pop(job)
                    error = job.exception()
                    if error is None:
                        self.results[cell.name] = job.result()
                        progress.done(cell, self.results[cell.name], time.perf_counter() - t0)
                    elif failure is None:
                        failure = error
                        progress.say(
                            f"{cell.name} failed: {error}; no further cell starts"
                            + (f", the {len(running)} running finish first" if running else "")
                        )
        except BaseException:  # Ctrl-C: the running cells keep their checkpoints; start nothing more
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        if failure is not None:
            raise failure


class _Progress:
    """The grid's lines: each finished cell with its result, its time and an estimate of what is left."""

    def __init__(self, total: int, say: Callable[[str], None]) -> None:
        self.total, self.say, self.finished, self.started = total, say, 0, time.perf_counter()

    def done(self, cell: Cell, results: dict[str, Any], seconds: float) -> None:
        self.finished += 1
        eta = (time.perf_counter() - self.started) / self.finished * (self.total - self.finished)
        self.say(
            f"[{self.finished}/{self.total}] {cell.name}: {describe(results['final'])} "
            f"({seconds:.0f} s; about {eta / 60:.0f} min left)"
        )


def _limit_threads(threads: int) -> None:
    """A grid worker process's share of the cores (``--jobs``)."""
    import torch

    torch.set_num_threads(threads)


def _run_cell(
    runner: Callable[[RunConfig, Path | None], Any], config: RunConfig, resume: Path | None
) -> dict[str, Any]:
    """One cell in a worker process; only its results (a plain dict) travel back."""
    return runner(config, resume).results


def check_comparable(grid: Grid) -> None:
    """Refuse a grid whose cells would be evaluated on different examples."""
    by_task: dict[str, set] = {}
    for cell in grid.cells:
        res = grid.results.get(cell.name)
        if res is None:
            continue
        config = json.loads((grid.cell_dir(cell) / "config.json").read_text())
        key = (tuple(config.get(k) for k in SHARED_KEYS), res.get("eval_split"), res["final"]["n"])
        by_task.setdefault(cell.task, set()).add(key)
    for task, keys in by_task.items():
        if len(keys) > 1:
            raise FedSPError(
                f"grid cells for {task!r} disagree on the evaluation examples or settings "
                f"({sorted(map(str, keys))}); rerun them with the same options"
            )


def build_cells(
    table: str,
    tasks: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    every_round: bool = False,
) -> list[Cell]:
    """The cells one table or figure needs.

    ``every_round``: the base settings already evaluate every round, so the convergence cells need no
    ``eval_every_round`` override (and are the methods table's cells).
    """
    if table in ("methods", "convergence"):
        # an untrained method (zero-shot) does not depend on the training seed: one cell, seed 0
        every = () if table == "methods" or every_round else (("eval_every_round", True),)
        return [
            Cell(m, t, s, every if spec_for(m).trains else ())
            for t in tasks
            for m in methods
            for s in (seeds if spec_for(m).trains else [0])
        ]
    if table == "layers":
        return [
            Cell("fedsp", t, s, (("aux_layer_choice", c),) if c != "bottom" else ())
            for t in tasks
            for c in ("bottom", "middle", "top")
            for s in seeds
        ]
    if table == "depth":
        return [
            Cell("fedsp", t, s, (("aux_layers", n),) if n != 1 else ())
            for t in tasks
            for n in (1, 2, 3, 4)
            for s in seeds
        ]
    if table == "partitions":
        # a method that reads no --partition (zero-shot, the centralised ones) gets one cell per seed,
        # an untrained one (zero-shot) one cell in all (seed 0: it does not depend on the training seed)
        return [
            Cell(m, t, s, o)
            for t in tasks
            for m in methods
            for o in (partition_overrides(t) if _partitioned(m) else [()])
            for s in (seeds if spec_for(m).trains else [0])
        ]
    if table == "efficiency":
        return [Cell(m, t, seeds[0]) for t in tasks[:1] for m in methods if spec_for(m).trains]
    raise FedSPError(
        f"unknown table {table!r}; choose methods, layers, depth, efficiency, convergence or partitions"
    )


def partition_overrides(task: str) -> list[tuple[tuple[str, Any], ...]]:
    """The partitions table's federations of a task: IID (the preset's), Dirichlet label skew with alpha
    1.0 and 0.1, and the task's natural partition by a row field where it has one (HellaSwag's
    ``activity_label``, MedMCQA's ``subject_name``)."""
    dirichlet = [(("partition", "dirichlet"), ("alpha", alpha)) for alpha in DIRICHLET_ALPHAS]
    natural = NATURAL_FIELDS.get(task)
    return [(), *dirichlet, *([(("partition", f"by:{natural}"),)] if natural else [])]


def _partitioned(method: str) -> bool:
    """Whether ``method`` reads ``--partition`` (zero-shot and the centralised methods do not)."""
    return "partition" in spec_for(method).reads


def partition_label(cell: Cell) -> str:
    """``fedsp, iid``, ``fedsp, dirichlet 0.1``, ``fedsp, by:subject_name``; the method alone for one that
    reads no partition (zero-shot, the centralised ones)."""
    if not _partitioned(cell.method):
        return cell.method
    return f"{cell.method}, {partition_name(cell)}"


def partition_name(cell: Cell) -> str:
    """``iid``, ``dirichlet 0.1``, ``by:subject_name``: how a cell's clients' data is partitioned."""
    settings = dict(cell.overrides)
    kind = settings.get("partition", "iid")
    return kind + (f" {settings['alpha']}" if kind == "dirichlet" else "")


def _short(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
