"""``fedsp compare``: run the grid behind one or more of the paper's tables, then write them.

    fedsp compare --tables methods --tasks arc_easy --seeds 0,1 --scale cpu --out runs/paper
    fedsp compare --tables methods,efficiency --methods zero-shot,fedsp,fedprompt,sfprompt --seeds 0
    fedsp compare --tables convergence --methods zero-shot,fedsp,fedprompt --seeds 0,1,2 --rounds 20
    fedsp compare --tables convergence ... --merge docs/figures/convergence_arc_easy.csv  # earlier seeds
    fedsp compare --tables partitions --tasks hellaswag --methods zero-shot,fedsp,fedprompt --jobs 2

Every cell is an ordinary run folder under ``<out>/cells/``; finished cells
are reused, so the same command continues an interrupted grid. The tables
(Markdown, CSV, PNG) are written to ``<out>`` from whatever cells exist.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsp.config import METHODS, RunConfig, coerce_value
from fedsp.data.tasks import CUSTOM, GENERATIVE_TASKS, custom_format
from fedsp.errors import FedSPError, cli_wording
from fedsp.experiments import convergence, tables
from fedsp.experiments.grid import (
    ALL_METHODS,
    OPT_IN_METHODS,
    PER_TASK,
    SCALES,
    TASKS,
    Cell,
    Grid,
    build_cells,
    check_comparable,
    partition_label,
    partition_name,
)
from fedsp.methods.table import REFERENCES
from fedsp.models.precision import DTYPE_CHOICES

GRID_KEYS = ("method", "task", "seed", "out", "progress")  # what each cell sets itself
TABLES = ("methods", "layers", "depth", "efficiency", "convergence", "partitions")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="run the grid of a paper table/figure and write it (Markdown, CSV, PNG)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--tables",
        default="methods",
        help=f"comma-separated: {', '.join(TABLES)} (tables 1/2, 3, figure 2, tables 4/5; convergence: "
        "accuracy and server validation loss against rounds and bytes sent, per task, for the --methods; "
        "its cells evaluate every round (eval_every_round=True) and --rounds sets how many; partitions: "
        "the --methods under IID, Dirichlet alpha 1.0 and 0.1 and the task's natural partition, "
        "hellaswag by:activity_label, medmcqa by:subject_name)",
    )
    p.add_argument(
        "--tasks",
        "--task",
        default="arc_easy",
        help=f"comma-separated tasks ({', '.join(TASKS)}, hellaswag, medmcqa; custom: your own "
        "multiple-choice rows in --data-dir)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="with --tasks custom: a folder of train/validation/test files of multiple-choice rows "
        "(as for fedsp run --task custom)",
    )
    p.add_argument(
        "--methods",
        default=",".join(ALL_METHODS),
        help="comma-separated methods for the methods, efficiency and convergence tables; "
        f"{', '.join(OPT_IN_METHODS)} only when named (e.g. --methods fedsp,fedprompt,sfprompt)",
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="preset of run sizes")
    preset_rounds = ", ".join(
        f"{name} {preset['rounds']}"
        + (" or per task" if any("rounds" in t for t in preset.get(PER_TASK, {}).values()) else "")
        for name, preset in SCALES.items()
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"federated rounds of every cell, every task (default: the preset's: {preset_rounds})",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help="clients of every federated cell (default: the preset's: "
        + ", ".join(f"{name} {preset['clients']}" for name, preset in SCALES.items())
        + ")",
    )
    p.add_argument(
        "--server-steps",
        type=int,
        default=None,
        help="server prefix-tuning steps a round of the cells whose server tunes (FedSP, its ablations, "
        "FedPrompt as the authors ran it, server-only; default: --local-steps, at least 4); 0: the server "
        "only averages. --server-steps 2 reruns or reuses FedSP cells made before 2026-12-04",
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run option for every cell, over the preset (repeatable), like --set server_rows=32 or "
        "--set val_limit=200; checked as fedsp run checks it",
    )
    p.add_argument("--model", default="smollm2", help="global model (as for fedsp run)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPE_CHOICES,
        help="as for fedsp run (auto: bfloat16 where native)",
    )
    p.add_argument("--out", default="runs/compare", help="grid folder (cells and tables); reused if present")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells run at once, each in its own process with an equal share of the CPU cores as torch "
        "threads",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="the methods table's reference: each method's difference to it on the same questions, with a "
        "paired bootstrap 95%% interval (default: server-only when among --methods, else zero-shot)",
    )
    p.add_argument(
        "--tables-only", action="store_true", help="write the tables from finished cells, run nothing"
    )
    p.add_argument(
        "--merge",
        default=None,
        help="comma-separated convergence CSVs of earlier grids (convergence_<task>.csv): their cells of "
        "the --tasks and --methods join the figure and table and are not run again (--tables convergence)",
    )


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def plan(args: argparse.Namespace) -> tuple[Grid, dict[str, list[Cell]]]:
    wanted = _split(args.tables)
    bad = [t for t in wanted if t not in TABLES]
    if bad:
        raise FedSPError(f"--tables {bad} not known; choose from {', '.join(TABLES)}")
    methods = _split(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FedSPError(f"--methods {unknown} not known; choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in _split(args.seeds)]
    except ValueError:
        raise FedSPError(f"--seeds {args.seeds!r} must be comma-separated integers") from None
    if args.jobs < 1:
        raise FedSPError(f"--jobs {args.jobs}: must be at least 1")
    tasks = _split(args.tasks)
    data_dir = getattr(args, "data_dir", None)
    if (CUSTOM in tasks) != (data_dir is not None):
        raise FedSPError(
            "--tasks custom and --data-dir go together: your own rows, and the folder that holds them"
        )
    if data_dir is not None:
        if tasks != [CUSTOM]:
            raise FedSPError(f"--data-dir holds the rows of --tasks custom alone, got --tasks {args.tasks}")
        kind = custom_format("train", data_dir)
        if kind != "multiple-choice":
            raise FedSPError(
                f"--data-dir {data_dir}: fedsp compare tabulates accuracy, which needs multiple-choice rows "
                f"(choices, answer); these are {kind} rows: score them with fedsp run (EM / F1 / ROUGE-L)"
            )
    generative = [t for t in tasks if t in GENERATIVE_TASKS]
    if generative:
        raise FedSPError(
            f"--tasks {','.join(generative)}: fedsp compare tabulates accuracy on multiple-choice tasks; "
            "score a generative task with fedsp run (EM / F1 / ROUGE-L)"
        )
    base = {**SCALES[args.scale], "model": args.model, "dtype": args.dtype}
    if data_dir is not None:  # one of SHARED_KEYS: every cell reads the same folder
        base["data_dir"] = str(Path(data_dir).resolve())
    if args.rounds is not None:
        if args.rounds < 1:
            raise FedSPError(f"--rounds {args.rounds}: must be at least 1")
        base["rounds"] = args.rounds  # over the preset's rounds for some tasks too
        if PER_TASK in base:
            per_task = base[PER_TASK].items()
            base[PER_TASK] = {t: {k: v for k, v in s.items() if k != "rounds"} for t, s in per_task}
    if args.clients is not None:
        if args.clients < 1:
            raise FedSPError(f"--clients {args.clients}: must be at least 1")
        base["clients"] = args.clients
    if args.server_steps is not None:
        if args.server_steps < 0:
            raise FedSPError(f"--server-steps {args.server_steps}: must be 0 or more")
        base["server_steps"] = args.server_steps  # the server-tuning methods' cells only (Cell.config)
    base.update(parse_settings(args.settings))
    every_round = bool(base.get("eval_every_round"))
    by_table = {t: build_cells(t, tasks, methods, seeds, every_round) for t in wanted}
    ordered = list(dict.fromkeys(c for cells in by_table.values() for c in cells))  # unique, in order
    return Grid(ordered, base, Path(args.out)), by_table


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as run options (keys with dashes or underscores; values as in a config
    file, checked by :class:`~fedsp.config.RunConfig`); the grid's own keys are refused."""
    known = {f.name: f for f in dataclasses.fields(RunConfig)}
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.strip().replace("-", "_")
        if not sep or not name:
            raise FedSPError(f"--set {item!r}: expected KEY=VALUE, like --set server_rows=32")
        if name in GRID_KEYS:
            raise FedSPError(f"--set {item!r}: {name} is the grid's own (use --{name.replace('_', '-')}s)")
        if name not in known:
            raise FedSPError(f"--set {item!r}: unknown option {key!r}; valid: {', '.join(sorted(known))}")
        settings[name] = coerce_value(name, value.strip(), known[name].type, f"--set {item}")
    return settings


def run_compare(args: argparse.Namespace) -> int:
    """``fedsp compare``: plan the grid, run or reuse its cells, write the tables (errors name flags)."""
    with cli_wording():
        return _run_compare(args)


def _run_compare(args: argparse.Namespace) -> int:
    grid, by_table = plan(args)
    if getattr(args, "reference", None) is not None:  # refused before any cell runs
        reference_method(_split(args.methods), args.reference)
    merged = merged_rows(args, by_table)
    if merged:  # a cell an earlier grid ran comes from its CSV, not run again (unless this grid has it)
        earlier = {convergence.row_key(row) for row in merged}
        grid.cells = [
            c for c in grid.cells if (c.task, c.method, c.seed) not in earlier or grid.reusable(c) is not None
        ]
    for cell in grid.cells:  # validate every cell's configuration before running any
        cell.config(grid.base, grid.out)
    _check_merged_steps(grid, merged)
    if args.tables_only:
        for cell in grid.cells:
            done = grid.reusable(cell)
            if done is not None:
                grid.results[cell.name] = done
    else:
        from fedsp.runtime.inprocess import run

        grid.run(run, jobs=args.jobs)
    check_comparable(grid)
    written = write_tables(grid, by_table, merged, args)
    for path in written:
        extra = [s for s in (".csv", ".png") if s != path.suffix and path.with_suffix(s).exists()]
        print(f"wrote {path}" + (f" (+ {', '.join(extra)})" if extra else ""))
    return 0


def merged_rows(args: argparse.Namespace, by_table: dict[str, list[Cell]]) -> convergence.Rows:
    """The rows of ``--merge``'s CSVs (none without it); only with ``--tables convergence`` alone."""
    paths = _split(args.merge or "")
    if not paths:
        return []
    if list(by_table) != ["convergence"]:
        raise FedSPError(f"--merge: only with --tables convergence alone (not {','.join(by_table)})")
    return [row for path in paths for row in convergence.read_rows(Path(path))]


def _check_merged_steps(grid: Grid, merged: Sequence[dict[str, Any]]) -> None:
    """Refuse, before anything runs, merged rows whose server steps a round differ from those this grid's
    cells of the same task and method run (the table would refuse to average them, after the run)."""
    for cell in grid.cells:
        rows = [row for row in merged if (row["task"], row["method"]) == (cell.task, cell.method)]
        if not rows:
            continue
        steps = cell.config(grid.base, grid.out).recorded_server_steps
        runs = "" if steps is None else str(steps)
        other = sorted({str(row["server_steps"]) for row in rows} - {runs})
        if other:
            seeds = sorted({int(row["seed"]) for row in rows if str(row["server_steps"]) in other})
            hint = f", or pass --server-steps {other[0]} to run this grid's as they did" if other[0] else ""
            raise FedSPError(
                f"--merge: {cell.task} {cell.method} seed {', '.join(map(str, seeds))} ran "
                f"{'/'.join(s or 'unset' for s in other)} server steps a round, where this grid's "
                f"{cell.method} cells run {runs or 'none'}; merge seeds run with the same steps{hint}"
            )


def reference_method(methods: Sequence[str], asked: str | None) -> str | None:
    """The methods table's reference: ``--reference``, else the first of the method table's
    :data:`~fedsp.methods.table.REFERENCES` that was run."""
    if asked is not None:
        if asked not in methods:
            raise FedSPError(f"--reference {asked}: not among --methods ({', '.join(methods)})")
        return asked
    return next((m for m in REFERENCES if m in methods), None)


def write_tables(
    grid: Grid,
    by_table: dict[str, list[Cell]],
    merged: Sequence[dict[str, Any]] = (),
    args: argparse.Namespace | None = None,
) -> list[Path]:
    written = []
    for table, cells in by_table.items():
        if table == "methods":
            labels = list(dict.fromkeys(c.method for c in cells))
            written.append(
                tables.accuracy_table(
                    grid,
                    cells,
                    lambda c: c.method,
                    labels,
                    "table12_methods",
                    "Accuracy (%) by method and task, mean ± sd over seeds (n)",
                    tables.server_steps_note(grid, cells) + tables.local_only_note(grid, cells),
                )
            )
            reference = reference_method(labels, getattr(args, "reference", None))
            paired = tables.paired_table(grid, cells, reference) if reference is not None else None
            if paired is not None:
                written.append(paired)
        elif table == "layers":

            def choice(cell: Cell) -> str:
                return str(dict(cell.overrides).get("aux_layer_choice", "bottom"))

            written.append(
                tables.accuracy_table(
                    grid,
                    cells,
                    choice,
                    ["bottom", "middle", "top"],
                    "table3_layers",
                    "FedSP accuracy (%) by auxiliary layer choice",
                )
            )
        elif table == "depth":
            written.append(tables.depth_figure(grid, cells))
        elif table == "convergence":
            written.extend(convergence.write_convergence(grid, cells, merged=merged))
        elif table == "partitions":
            labels = list(dict.fromkeys(partition_label(c) for c in cells))
            written.append(
                tables.accuracy_table(
                    grid,
                    cells,
                    partition_label,
                    labels,
                    "partitions",
                    "Accuracy (%) by method and partition of the clients' data, mean ± sd over seeds (n)",
                    tables.server_steps_note(grid, cells)
                    + tables.local_only_note(grid, cells, _partition_and_seed),
                )
            )
        else:
            written.append(tables.efficiency_table(grid, cells))
    return written


def _partition_and_seed(cell: Cell) -> str:
    """``hellaswag dirichlet 0.1 seed 1``: a partitions-table cell named without its method."""
    return f"{cell.task} {partition_name(cell)} seed {cell.seed}"


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsp.experiments.compare ...``: the same as ``fedsp compare ...``."""
    import sys

    parser = argparse.ArgumentParser(prog="fedsp")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_compare(args)
    except FedSPError as err:
        print(f"fedsp: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
