"""Convergence: accuracy and server validation loss against rounds and against bytes sent.

From the ``metrics.jsonl`` of a grid's cells (one record per round), for each task:

- ``convergence_<task>.csv``: tidy, one row per cell and round: task, method, seed, round, accuracy (%),
  val_loss, bytes_round and bytes_cumulative (down and up together, all clients);
- ``convergence_<task>.png``: accuracy and validation loss against the round and against the cumulative
  bytes (log axis); one line per method, the mean over seeds, with a min-max band when there are several;

and for all tasks ``convergence.md`` (and its ``.csv``): accuracy, mean ± sd over seeds, at rounds 2, 10,
20 and the last, with the bytes sent by then, and the first round at which each method comes within one
point of FedPrompt's last-round accuracy.

Each CSV row also carries the settings that make cells comparable (:data:`SETTINGS`) and the server's
prefix steps a round that its run took (:data:`PER_METHOD`), so the tidy CSV of an earlier grid can be
merged into this one (``fedsp compare --merge``): a figure whose seeds were run on different machines or
days. Merged rows of a cell this grid has are left out (the grid's own win); rows run with other settings
than the rest of their task, or with other server steps than the method's other seeds, are refused.

A round's bytes are what ``results.json``'s ``comm.total_bytes`` sums over the rounds: the round's payloads
(``bytes_down``, ``bytes_up``), the client model when shipped (``bytes_shipped``) and SFPrompt's split
messages (``split_bytes``). Round 0 is the state before training: its validation loss, 0 bytes and no
accuracy (a grid's trained cells skip the zero-shot evaluation). The zero-shot method trains nothing: its
accuracy is drawn as a dashed horizontal line. Centralised methods (prefix-tuning, finetune) send nothing:
they are drawn against rounds only.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedsp.errors import FedSPError  # noqa: E402
from fedsp.experiments.grid import Cell, Grid  # noqa: E402
from fedsp.experiments.tables import mean_sd, steps_note, write_table  # noqa: E402
from fedsp.methods.table import METHODS, PACE_REFERENCE, spec_for  # noqa: E402
from fedsp.plotting import MB, chance, label_points, percent_limits, setting_line  # noqa: E402
from fedsp.runtime.results import read_metrics  # noqa: E402

# the settings every cell of a task must share: the evaluation's (all cells), the federation's (trained ones)
EVALUATED_ON = ("model", "dtype", "eval_limit", "max_length")
TRAINED_WITH = ("clients", "local_steps")
SETTINGS = (*EVALUATED_ON, *TRAINED_WITH)
# what each method's seeds must share, and methods may not (FedPrompt's server only averages: 0 steps);
# results.json's effective count, so a seed run under an older default is not averaged with today's
PER_METHOD = ("server_steps",)
COLUMNS = [
    "task",
    "method",
    "seed",
    "round",
    "accuracy",
    "val_loss",
    "bytes_round",
    "bytes_cumulative",
    *SETTINGS,
    *PER_METHOD,
]
MARKED_ROUNDS = (2, 10, 20)  # the Markdown table's columns, with the last round
WITHIN = 1.0  # accuracy points below the reference method's last-round accuracy
REFERENCE = PACE_REFERENCE
SENT = ("bytes_down", "bytes_up", "bytes_shipped", "split_bytes")

Rows = list[dict[str, Any]]
Points = dict[int, dict[str, list[float]]]  # round -> column -> one value per seed


def round_bytes(record: dict[str, Any]) -> int:
    """Everything one round sent, both ways, all clients (what ``comm.total_bytes`` sums)."""
    return sum(int(record.get(key) or 0) for key in SENT)


def cell_rows(grid: Grid, cell: Cell) -> Rows:
    """The tidy rows of a finished cell: one per round, round 0 included; one for an untrained method."""
    spec = spec_for(cell.method)
    config = json.loads((grid.cell_dir(cell) / "config.json").read_text())
    steps = grid.results[cell.name].get("server_steps")
    keys = {
        "task": cell.task,
        "method": cell.method,
        "seed": cell.seed,
        **_settings(config),
        "server_steps": "" if steps is None else str(steps),
    }
    if not spec.trains:  # the zero-shot accuracy, the same at every round
        acc = 100 * grid.results[cell.name]["final"]["acc"]
        nothing = {"val_loss": None, "bytes_round": 0, "bytes_cumulative": 0}
        return [{**keys, "round": 0, "accuracy": acc, **nothing}]
    path = grid.cell_dir(cell) / "metrics.jsonl"
    records = read_metrics(path)
    trained = [r["round"] for r in records if r["round"] > 0]
    unevaluated = [r["round"] for r in records if r["round"] > 0 and r.get("acc") is None]
    if not trained or unevaluated:
        what = f"no accuracy for rounds {unevaluated}" if trained else "no completed round"
        raise FedSPError(
            f"grid cell {path}: {what}; the convergence table needs cells run with eval_every_round=True "
            "(remove that folder or use another --out)"
        )
    rows, total = [], 0
    for record in records:
        sent = round_bytes(record) if spec.federated else None
        total += sent or 0
        acc = record.get("acc")
        rows.append(
            {
                **keys,
                "round": record["round"],
                "accuracy": None if acc is None else 100 * acc,
                "val_loss": record.get("val_loss"),
                "bytes_round": sent,
                "bytes_cumulative": total if spec.federated else None,
            }
        )
    return rows


def write_convergence(
    grid: Grid, cells: Sequence[Cell], stem: str = "convergence", merged: Sequence[dict[str, Any]] = ()
) -> list[Path]:
    """Per task the tidy CSV and the figure, then the Markdown table; the paths (Markdown first).

    ``merged``: tidy rows of earlier grids (:func:`read_rows`); those of the tasks and methods of ``cells``
    join the grid's own, except a cell's the grid has finished itself."""
    by_task: dict[str, dict[str, Rows]] = {}  # task -> method -> rows of all its seeds
    own = set()
    for cell in cells:
        if cell.name in grid.results:
            by_task.setdefault(cell.task, {}).setdefault(cell.method, []).extend(cell_rows(grid, cell))
            own.add((cell.task, cell.method, cell.seed))
    wanted = {(cell.task, cell.method) for cell in cells}
    added = [row for row in merged if (row["task"], row["method"]) in wanted and row_key(row) not in own]
    for row in added:
        by_task.setdefault(row["task"], {}).setdefault(row["method"], []).append(row)
    by_task = _in_grid_order(by_task, cells)
    _check_settings(by_task)
    covered = own | {row_key(row) for row in added}
    missing = [cell.name for cell in cells if (cell.task, cell.method, cell.seed) not in covered]
    grid.out.mkdir(parents=True, exist_ok=True)
    written = []
    for task, by_method in by_task.items():
        path = grid.out / f"{stem}_{task}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(row for rows in by_method.values() for row in rows)
        _figure(task, by_method, path.with_suffix(".png"))
        written.append(path)
    merged_note = sorted({f"{task} {method} seed {seed}" for task, method, seed in map(row_key, added)})
    return [_summary(grid.out, stem, by_task, missing, merged_note), *written]


def _in_grid_order(by_task: dict[str, dict[str, Rows]], cells: Sequence[Cell]) -> dict[str, dict[str, Rows]]:
    """Tasks and methods in the order the grid names them (``--tasks``, ``--methods``), whichever CSV or
    cell their rows came from; each method's rows by seed, then round."""
    order = list(dict.fromkeys((cell.task, cell.method) for cell in cells))
    return {
        task: {
            method: sorted(by_task[task][method], key=lambda row: (int(row["seed"]), int(row["round"])))
            for t, method in order
            if t == task and method in by_task[task]
        }
        for task in dict.fromkeys(t for t, _ in order)
        if task in by_task
    }


def row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    """The cell a tidy row belongs to: task, method, seed."""
    return row["task"], row["method"], int(row["seed"])


def read_rows(path: Path) -> Rows:
    """The rows of a tidy convergence CSV this module wrote (``convergence_<task>.csv``), typed back."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            lacking = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if lacking:
                raise FedSPError(
                    f"--merge {path}: not a convergence CSV of this version "
                    f"(no column {', '.join(lacking)}); write it again from its grid with --tables-only"
                )
            raw = list(reader)
    except OSError as err:
        raise FedSPError(f"--merge {path}: cannot be read ({err.strerror or err})") from None
    rows = []
    for line, row in enumerate(raw, 2):
        try:
            rows.append(
                {
                    **{column: row[column] for column in ("task", "method", *SETTINGS, *PER_METHOD)},
                    "seed": int(row["seed"]),
                    "round": int(row["round"]),
                    "accuracy": _number(row["accuracy"], float),
                    "val_loss": _number(row["val_loss"], float),
                    "bytes_round": _number(row["bytes_round"], int),
                    "bytes_cumulative": _number(row["bytes_cumulative"], int),
                }
            )
        except (TypeError, ValueError) as err:  # a short line leaves its last fields None
            raise FedSPError(f"--merge {path}, line {line}: {err}") from None
        if not (row["server_steps"] or "0").isdigit():
            raise FedSPError(
                f"--merge {path}, line {line}: server_steps {row['server_steps']!r} is not a step count"
            )
        if row["method"] not in METHODS:
            raise FedSPError(f"--merge {path}, line {line}: method {row['method']!r} not known")
    return rows


def _number(text: str, kind: type) -> Any:
    return None if text == "" else kind(text)


def _settings(config: dict[str, Any]) -> dict[str, str]:
    """A cell's comparable settings as the CSV holds them (text; an unset one empty)."""
    return {key: "" if config.get(key) is None else str(config[key]) for key in SETTINGS}


def _check_settings(by_task: dict[str, dict[str, Rows]]) -> None:
    """Refuse a task whose cells (own or merged) were evaluated, or trained, with different settings."""
    for task, by_method in by_task.items():
        for keys, trained_only in ((EVALUATED_ON, False), (TRAINED_WITH, True)):
            seen: dict[tuple[str, ...], set[str]] = {}
            for method, rows in by_method.items():
                if trained_only and not spec_for(method).trains:
                    continue
                for row in rows:
                    value = tuple(str(row[key]) for key in keys)
                    seen.setdefault(value, set()).add(f"{method} seed {row['seed']}")
            if len(seen) > 1:  # name the settings that differ, each group with its cells
                differ = [i for i in range(len(keys)) if len({value[i] for value in seen}) > 1]
                found = "; ".join(
                    ", ".join(f"{keys[i]} {value[i] or 'unset'}" for i in differ)
                    + f" ({', '.join(sorted(who))})"
                    for value, who in seen.items()
                )
                raise FedSPError(
                    f"convergence cells of {task!r} were run with different settings: {found}; "
                    "rerun them with the same options"
                )
        for method, rows in by_method.items():
            seeds: dict[str, set[int]] = {}
            for row in rows:
                seeds.setdefault(str(row["server_steps"]), set()).add(int(row["seed"]))
            if len(seeds) > 1:
                found = "; ".join(
                    f"{steps or 'unset'} (seed {', '.join(map(str, sorted(who)))})"
                    for steps, who in seeds.items()
                )
                raise FedSPError(
                    f"convergence cells of {task!r}, {method}: the server tuned the prefix for different "
                    f"numbers of steps a round: {found}; rerun them with the same --server-steps"
                )


def points(rows: Rows) -> Points:
    """The values of each round (ascending), one per seed that has it."""
    out: Points = {}
    for row in sorted(rows, key=lambda r: r["round"]):
        point = out.setdefault(row["round"], {"accuracy": [], "val_loss": [], "bytes_cumulative": []})
        for column, values in point.items():
            if row[column] is not None:
                values.append(float(row[column]))
    return out


def _figure(task: str, by_method: dict[str, Rows], path: Path) -> None:
    fig, ((acc_round, acc_bytes), (loss_round, loss_bytes)) = plt.subplots(2, 2, figsize=(11, 8))
    shown: list[float] = []  # the accuracies drawn: the axes span at least 20 points around them
    for i, (method, rows) in enumerate(by_method.items()):
        colour = f"C{i}"  # the same in every panel
        series = points(rows)
        if not spec_for(method).trains:
            acc = statistics.mean(series[0]["accuracy"])
            shown.append(acc)
            for ax in (acc_round, acc_bytes):
                ax.axhline(acc, color=colour, linestyle="--", label=f"{method} (untrained)")
            continue
        for column, by_round, by_bytes in (
            ("accuracy", acc_round, acc_bytes),
            ("val_loss", loss_round, loss_bytes),
        ):
            line = [(rnd, p) for rnd, p in series.items() if p[column]]
            _band(by_round, [rnd for rnd, _ in line], [p[column] for _, p in line], method, colour)
            if column == "accuracy":
                shown += [statistics.mean(p[column]) for _, p in line]
                label_points(
                    acc_round, [rnd for rnd, _ in line], [statistics.mean(p[column]) for _, p in line], colour
                )
            # methods that send nothing stay off the bytes axis (MB sent, linear)
            sent = [(statistics.mean(p["bytes_cumulative"]) / MB, p[column]) for _, p in line if _sends(p)]
            if sent:
                _band(by_bytes, [x for x, _ in sent], [values for _, values in sent], method, colour)
    for ax in (acc_round, loss_round):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (acc_bytes, loss_bytes):
        ax.set_xlabel("MB sent, cumulative (down + up, all clients)")
    level = chance(task)
    if level is not None:
        shown.append(level)
    for ax in (acc_round, acc_bytes):
        ax.set_ylabel("accuracy (%)")
        if level is not None:
            ax.axhline(level, color="black", linestyle=":", linewidth=1, label=f"chance {level:g}")
        ax.set_ylim(*percent_limits(shown))
    for ax in (loss_round, loss_bytes):
        ax.set_ylabel("server validation loss")
    for ax in (acc_round, acc_bytes, loss_round, loss_bytes):
        if ax.lines:
            ax.legend(fontsize=7)
    seeds = max(len({row["seed"] for row in rows}) for rows in by_method.values())
    band = "; band: min-max over seeds" if seeds > 1 else ""
    first = next(iter(by_method.values()))[0]
    clients = next(
        (row["clients"] for rows in by_method.values() for row in rows if row.get("clients")), None
    )
    questions = first.get("eval_limit") or "all"
    setting = setting_line(first.get("model"), task, clients, seeds, questions)
    fig.suptitle(f"Convergence: {setting} (mean{' over seeds' if seeds > 1 else ''}{band})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _band(ax, xs: Sequence[float], values: list[list[float]], label: str, colour: str) -> None:
    """The mean of each point's values as a line; their min-max as a band where there are several."""
    if not xs:
        return
    ax.plot(xs, [statistics.mean(v) for v in values], marker="o", markersize=3, color=colour, label=label)
    if any(len(v) > 1 for v in values):
        ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2)


def _summary(
    out: Path, stem: str, by_task: dict[str, dict[str, Rows]], missing: list[str], merged: Sequence[str] = ()
) -> Path:
    """Accuracy at the marked rounds and the last, with the bytes sent by then; when FedPrompt's is met."""
    last = max(
        (row["round"] for by_method in by_task.values() for rows in by_method.values() for row in rows),
        default=0,
    )
    marked = [rnd for rnd in MARKED_ROUNDS if rnd < last]  # tasks may differ in rounds (--scale paper)
    header = ["task", "method", "seeds", "rounds", *[f"round {rnd}" for rnd in marked], "last round"]
    reference = any(REFERENCE in by_method for by_method in by_task.values())
    if reference:
        header.append(f"first within {WITHIN:g} point of {REFERENCE}'s last round")
    table: list[list[str]] = []
    targets: dict[str, float] = {}  # task -> the reference method's last-round accuracy
    for task, by_method in by_task.items():
        target = _last_accuracy(points(by_method[REFERENCE])) if REFERENCE in by_method else None
        if target is not None:
            targets[task] = target
        for method, rows in by_method.items():
            series = points(rows)
            untrained = not spec_for(method).trains
            rounds = max(series)
            row = [task, method, str(len({r["seed"] for r in rows})), "–" if untrained else str(rounds)]
            for rnd in [*marked, rounds]:
                row.append(_at(series[0] if untrained else series.get(rnd)))
            if reference:
                row.append("–" if target is None else _first_within(series, target, untrained))
            table.append(row)
    notes = [
        "Accuracy (%) on the same evaluation questions every round, mean ± sd over seeds; in brackets the "
        "bytes sent by then (down and up, all clients, the client model's shipping and split-learning "
        "messages included). zero-shot trains nothing: its accuracy is the same at every round."
    ]
    if targets:
        notes.append(
            f"The last column: the first round whose mean accuracy is at most {WITHIN:g} point below "
            f"{REFERENCE}'s mean accuracy at its last round ("
            + ", ".join(f"{task} {target:.1f}" for task, target in targets.items())
            + ")."
        )
    steps: dict[str, set[int]] = {}  # each method's, over its tasks (one value per task: checked)
    for by_method in by_task.values():
        for method, rows in by_method.items():
            if rows[0]["server_steps"] != "":
                steps.setdefault(method, set()).add(int(rows[0]["server_steps"]))
    notes += steps_note(steps)
    if missing:
        notes.append(f"Missing (not run or unfinished), left out: {', '.join(missing)}.")
    if merged:
        notes.append(f"Merged from an earlier grid's CSV (--merge): {', '.join(merged)}.")
    title = "Convergence: accuracy (%) by round, mean ± sd over seeds (bytes sent by then)"
    return write_table(out, stem, header, table, title, notes)


def _at(point: dict[str, list[float]] | None) -> str:
    if point is None or not point["accuracy"]:
        return "–"
    return mean_sd(point["accuracy"]) + _sent(point)


def _last_accuracy(series: Points) -> float | None:
    evaluated = [p["accuracy"] for p in series.values() if p["accuracy"]]
    return statistics.mean(evaluated[-1]) if evaluated else None


def _first_within(series: Points, target: float, untrained: bool) -> str:
    for rnd, point in series.items():
        if point["accuracy"] and statistics.mean(point["accuracy"]) >= target - WITHIN:
            return f"round {rnd}{_sent(point)}"
    return "never (untrained)" if untrained else f"not by round {max(series)}"


def _sent(point: dict[str, list[float]]) -> str:
    """`` (1.23 MB)`` (GB from 1 GB on): the mean bytes sent by that point; nothing for a method that
    sends nothing."""
    sent = point["bytes_cumulative"]
    if not sent:
        return ""
    mean = statistics.mean(sent)
    return f" ({mean / 1e9:.3g} GB)" if mean >= 1e9 else f" ({mean / 1e6:.3g} MB)"


def _sends(point: dict[str, list[float]]) -> bool:
    """The point has bytes sent, more than none (a log axis shows it)."""
    return bool(point["bytes_cumulative"]) and statistics.mean(point["bytes_cumulative"]) > 0
