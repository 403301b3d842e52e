"""The paper's tables and figure from a grid's results: Markdown, CSV and PNG side by side.

- ``methods`` (paper tables 1/2): accuracy of each method on each task, mean and
  sample standard deviation over seeds;
- ``layers`` (table 3): FedSP with the bottom, middle or top layer as its auxiliary model;
- ``depth`` (figure 2): FedSP accuracy against the number of auxiliary layers;
- ``efficiency`` (tables 4/5): what a client holds, what crosses the wire per round (SFPrompt's
  split-training activations and gradients included) and, where estimated, the client's FLOPs;
- ``convergence`` (:mod:`fedsp.experiments.convergence`): accuracy and validation loss against
  rounds and bytes sent.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsp.errors import FedSPError  # noqa: E402
from fedsp.experiments.grid import Cell, Grid  # noqa: E402
from fedsp.experiments.stats import RESAMPLES, paired_difference, seed_means  # noqa: E402
from fedsp.methods.table import METHOD_SPECS, spec_for  # noqa: E402
from fedsp.plotting import chance, label_points, percent_limits, setting_line  # noqa: E402
from fedsp.runtime.outputs import QUESTIONS_FILE  # noqa: E402


def _accs(grid: Grid, cells: Sequence[Cell]) -> list[float]:
    return [100 * grid.results[c.name]["final"]["acc"] for c in cells if c.name in grid.results]


def mean_sd(values: list[float]) -> str:
    """``52.0`` for one value, ``52.0 ± 1.3`` (sample sd) for several, ``–`` for none."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def write_table(
    out: Path, stem: str, header: list[str], rows: list[list[str]], title: str, notes: Sequence[str] = ()
) -> Path:
    """``<stem>.csv`` and ``<stem>.md`` (a titled table, then ``notes`` as paragraphs); the .md's path."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for note in notes:
        lines += ["", note]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _grouped(grid: Grid, label_of, cells: Sequence[Cell]) -> dict[tuple[str, str], list[Cell]]:
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((label_of(cell), cell.task), []).append(cell)
    return groups


def accuracy_table(
    grid: Grid,
    cells: Sequence[Cell],
    label_of,
    labels: Sequence[str],
    stem: str,
    title: str,
    notes: Sequence[str] = (),
) -> Path:
    """Rows: labels (methods or variants); columns: tasks; cells: acc mean ± sd over seeds (and n)."""
    tasks = list(dict.fromkeys(c.task for c in cells))
    groups = _grouped(grid, label_of, cells)
    header = ["", *tasks, "mean"]
    rows, bars = [], {}
    for label in labels:
        means = []
        row = [label]
        for task in tasks:
            values = _accs(grid, groups.get((label, task), []))
            row.append(mean_sd(values) + (f" ({len(values)})" if len(values) > 1 else ""))
            means.append(statistics.mean(values) if values else float("nan"))
        done = [m for m in means if m == m]
        row.append(f"{statistics.mean(done):.1f}" if len(done) == len(tasks) else "–")
        rows.append(row)
        bars[label] = means
    finished = [c for c in cells if c.name in grid.results]
    seeds = len({c.seed for c in finished})
    if seeds == 1:  # one seed: no sd, no count to show
        title = title.replace("mean ± sd over seeds (n)", "one seed").replace(
            "mean ± sd over seeds", "one seed"
        )
    questions = {
        t: max((grid.results[c.name]["final"]["n"] for c in finished if c.task == t), default=0)
        for t in tasks
    }
    path = write_table(grid.out, stem, header, rows, title, notes)
    setting = setting_line(grid.base.get("model"), None, grid.base.get("clients"), seeds, None)
    _bar_png(bars, tasks, grid.out / f"{stem}.png", f"{title}\n{setting}", questions)
    return path


def server_steps_note(grid: Grid, cells: Sequence[Cell]) -> list[str]:
    """One line naming each federated method's server prefix-tuning steps per round (``results.json``'s
    ``server_steps``; 0: the server only averages, the paper's FedPrompt), when the cells record any."""
    steps: dict[str, set[int]] = {}
    for cell in cells:
        res = grid.results.get(cell.name)
        if res is not None and res.get("server_steps") is not None:
            steps.setdefault(cell.method, set()).add(int(res["server_steps"]))
    return steps_note(steps)


def steps_note(steps: dict[str, set[int]]) -> list[str]:
    """The line naming each method's server prefix-tuning steps per round (none when no method has any)."""
    if not steps:
        return []
    told = [f"{method} {'/'.join(str(n) for n in sorted(ns))}" for method, ns in steps.items()]
    return [f"Server prefix-tuning steps per round: {', '.join(told)} (0: the server only averages)."]


def local_only_note(
    grid: Grid, cells: Sequence[Cell], name: Callable[[Cell], str] | None = None
) -> list[str]:
    """local-only's accuracy is the mean over the owners' prefixes: their spread, per cell, which
    ``name`` names (``arc_easy seed 0`` unless told; the partitions table adds the partition)."""
    told = []
    for cell in cells:
        spread = (grid.results.get(cell.name) or {}).get("local_only")
        if spread:
            acc = spread["spread"]["acc"]
            told.append(
                f"{name(cell) if name else f'{cell.task} seed {cell.seed}'}: "
                f"{100 * acc['min']:.1f}-{100 * acc['max']:.1f} "
                f"(sd {100 * acc['sd']:.1f}, {spread['owners']} owners)"
            )
    if not told:
        return []
    return [
        "local-only: each owner's own prefix on the global model, the mean over owners; "
        f"the owners' range: {'; '.join(told)}."
    ]


def _bar_png(
    bars: dict[str, list[float]], tasks: list[str], path: Path, title: str, questions: dict[str, int]
) -> None:
    """Grouped bars from zero, each labelled with its value; per task the chance accuracy (dotted) and the
    zero-shot accuracy (dashed, when a zero-shot row is among the bars); the question counts under the
    task names."""
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(tasks) + 2), 4.4))
    width = 0.8 / max(1, len(bars))
    for i, (label, values) in enumerate(bars.items()):
        xs = [t + i * width for t in range(len(tasks))]
        drawn = ax.bar(xs, [v if v == v else 0.0 for v in values], width, label=label)
        ax.bar_label(drawn, [f"{v:.1f}" if v == v else "" for v in values], fontsize=6, padding=1)
    left = -width / 2
    untrained = [label for label in bars if label in METHOD_SPECS and not spec_for(label).trains]
    zero_shot = bars[untrained[0]] if untrained else None
    for t, task in enumerate(tasks):
        level = chance(task)
        if level is not None:
            ax.hlines(
                level,
                t + left,
                t + left + 0.8,
                colors="black",
                linestyles=":",
                linewidth=1,
                label="chance" if t == 0 else "_chance",  # one legend entry
            )
        if zero_shot is not None and zero_shot[t] == zero_shot[t]:
            ax.hlines(
                zero_shot[t],
                t + left,
                t + left + 0.8,
                colors="grey",
                linestyles="--",
                linewidth=1,
                label="zero-shot level" if t == 0 else "_zero-shot",
            )
    ax.set_xticks(
        [t + 0.4 - width / 2 for t in range(len(tasks))],
        [f"{task}\n({questions.get(task, 0)} questions)" for task in tasks],
    )
    ax.set_ylim(0, 100)  # bars start at zero: their heights compare
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def depth_figure(grid: Grid, cells: Sequence[Cell], stem: str = "fig2_depth") -> Path:
    """Accuracy against the number of auxiliary layers, one line per task (PNG), with its table."""

    def count(cell: Cell) -> str:
        return str(dict(cell.overrides).get("aux_layers", 1))

    counts = sorted({count(c) for c in cells}, key=int)
    path = accuracy_table(
        grid, cells, count, counts, stem, "FedSP accuracy (%) by number of auxiliary layers"
    )
    tasks = list(dict.fromkeys(c.task for c in cells))
    groups = _grouped(grid, count, cells)
    fig, ax = plt.subplots(figsize=(6, 4))
    shown: list[float] = []
    for task in tasks:
        ys = [
            statistics.mean(v) if (v := _accs(grid, groups.get((n, task), []))) else float("nan")
            for n in counts
        ]
        ax.plot([int(n) for n in counts], ys, marker="o", label=task)
        label_points(ax, [int(n) for n in counts], ys)
        shown += ys
        level = chance(task)
        if level is not None:
            shown.append(level)
            ax.axhline(level, color="black", linestyle=":", linewidth=1)
    ax.set_ylim(*percent_limits(shown))
    done = [c for c in cells if c.name in grid.results]
    setting = setting_line(
        grid.base.get("model"), None, grid.base.get("clients"), len({c.seed for c in done})
    )
    ax.set_title(f"FedSP accuracy by auxiliary layers (dotted: chance)\n{setting}", fontsize=9)
    ax.set_xlabel("auxiliary layers N")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks([int(n) for n in counts])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(grid.out / f"{stem}.png", dpi=110)
    plt.close(fig)
    return path


def efficiency_table(grid: Grid, cells: Sequence[Cell], stem: str = "table45_efficiency") -> Path:
    """Client model size, traffic and compute per client and round: counts, % of the global model, bytes.

    Split learning (SFPrompt) adds the activations and gradients exchanged with the
    server body (``method_notes.split_traffic``): they are in the split column, in the
    per-round sum and in the run total; the other columns keep their meaning for every method.
    """
    header = [
        "method",
        "server steps per round",
        "client params",
        "% of global",
        "global layers held",
        "params down / up per round",
        "% of global",
        "MB down / up per round",
        "split MB down / up per round",
        "MB per round, all",
        "client GFLOPs per round",
        "MB sent once",
        "MB in total (run)",
        "model private",
    ]
    rows: list[list[str]] = []
    for cell in cells:
        res: dict[str, Any] | None = grid.results.get(cell.name)
        if res is None:
            continue
        glob = res["global_model"]["params"]
        client, comm = res.get("client_model"), res.get("comm")
        if client is None or comm is None:
            rows.append([cell.method, "–", "– (centralised)", *[""] * (len(header) - 3)])
            continue
        split = _split_traffic(res)
        down, up = comm["bytes_down_per_round"], comm["bytes_up_per_round"]
        flops = split["flops"]
        rows.append(
            [
                cell.method,
                "–" if res.get("server_steps") is None else str(res["server_steps"]),
                f"{client['params']:,}",
                f"{100 * client['fraction_of_global']:.1f}",
                _ranges(client["layers"]),
                f"{comm['params_down_per_round']:,} / {comm['params_up_per_round']:,}",
                f"{100 * comm['params_up_per_round'] / glob:.2f}",
                f"{_mb(down)} / {_mb(up)}",
                f"{_mb(split['down'])} / {_mb(split['up'])}",
                _mb(down + up + split["down"] + split["up"]),
                "–" if flops is None else f"{flops / 1e9:.3g}",
                f"{comm.get('model_bytes_once', 0) / 1e6:.1f}",
                f"{comm['total_bytes'] / 1e6:.1f}",
                "yes" if client["model_private"] else "no",
            ]
        )
    title = "What a client holds, exchanges and computes (per client and round)"
    return write_table(grid.out, stem, header, rows, title)


def _split_traffic(res: dict[str, Any]) -> dict[str, Any]:
    """Split-learning bytes per client and round each way, and client FLOPs."""
    report = (res.get("method_notes") or {}).get("split_traffic")
    if not report:  # no split learning: nothing crosses a cut, compute not estimated
        return {"down": 0, "up": 0, "flops": None}
    mean = report["last_round_mean_per_client"]
    return {
        "down": mean["split_act_bytes_down"] + mean["split_grad_bytes_down"],
        "up": mean["split_act_bytes_up"] + mean["split_grad_bytes_up"],
        "flops": mean["client_flops"],
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _ranges(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))


def question_scores(grid: Grid, cell: Cell) -> tuple[list[str], list[float]] | None:
    """A finished cell's evaluated question ids and their final scores (``questions.json``), or None
    (a cell run before runs wrote it, or a generative one)."""
    path = grid.cell_dir(cell) / QUESTIONS_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("final") is None:
        return None
    return list(saved["ids"]), [float(v) for v in saved["final"]]


def paired_table(
    grid: Grid, cells: Sequence[Cell], reference: str, label_of: Callable[[Cell], str] = lambda c: c.method
) -> Path | None:
    """Per task, each method against ``reference`` on the same questions: accuracy (mean ± sd over seeds),
    the difference with its paired bootstrap 95% interval (each question's score averaged over the seeds
    first), and what the clients' aggregate did to the server's validation loss (mean ``clients_gain``
    and the share of rounds it was positive). None when the reference has no finished cell."""
    tasks = list(dict.fromkeys(c.task for c in cells))
    groups = _grouped(grid, label_of, cells)
    labels = list(dict.fromkeys(label_of(c) for c in cells))
    header = [
        "task",
        "method",
        "seeds",
        "accuracy (%)",
        f"difference to {reference} (points) [paired 95% interval]",
        "mean clients_gain (nats)",
        "rounds the clients lowered the loss",
        "mean server_gain (nats)",
    ]
    rows: list[list[str]] = []
    for task in tasks:
        ref = _seed_scores(grid, groups.get((reference, task), []))
        if ref is None:
            continue
        for label in labels:
            group = [c for c in groups.get((label, task), []) if c.name in grid.results]
            if not group:
                continue
            accs = _accs(grid, group)
            scores = _seed_scores(grid, group)
            if label == reference:
                vs = "(reference)"
            elif scores is None:
                vs = "– (no questions.json)"
            else:
                if scores[0] != ref[0]:
                    raise FedSPError(f"{task}: {label} and {reference} were scored on different questions")
                vs = paired_difference(scores[1], ref[1]).percent()
            gains = [grid.results[c.name].get("contributions") for c in group]
            measured = [g for g in gains if g and g.get("rounds")]
            rows.append(
                [
                    task,
                    label,
                    str(len(group)) + (" (single seed)" if len(group) == 1 and _seeded(group[0]) else ""),
                    mean_sd(accs),
                    vs,
                    _gain(measured, "clients_gain_mean"),
                    _share(measured),
                    _gain(measured, "server_gain_total", per_round=True),
                ]
            )
    if not rows:
        return None
    notes = [
        f"Each method's score per question is averaged over its seeds, then compared with {reference}'s on "
        f"the same questions; the interval is a paired bootstrap over the questions ({RESAMPLES:,} "
        "resamples, BCa). Seeds resample the data partition. clients_gain: how much the round's aggregate "
        "of the clients' updates lowered the server's validation loss before the server's own step; "
        "server_gain: how much the server's step lowered it after (metrics.jsonl)."
    ]
    title = f"Each method against {reference}, paired over the same questions"
    return write_table(grid.out, f"paired_vs_{reference}", header, rows, title, notes)


def _seed_scores(grid: Grid, cells: Sequence[Cell]) -> tuple[list[str], list[float]] | None:
    """The ids and the per-question mean over the finished cells' seeds; None if any lacks its scores."""
    found = []
    for cell in cells:
        if cell.name in grid.results:
            scores = question_scores(grid, cell)
            if scores is None:
                return None
            found.append(scores)
    if not found:
        return None
    ids = found[0][0]
    if any(other != ids for other, _ in found):
        raise FedSPError("seeds of one method were scored on different questions")
    return ids, seed_means([values for _, values in found])


def _seeded(cell: Cell) -> bool:
    """A method whose result depends on its seed (one that trains)."""
    return spec_for(cell.method).trains


def _gain(measured: list[dict[str, Any]], key: str, per_round: bool = False) -> str:
    if not measured:
        return "–"
    values = [g[key] / g["rounds"] if per_round else g[key] for g in measured]
    return f"{statistics.mean(values):+.4f}"


def _share(measured: list[dict[str, Any]]) -> str:
    if not measured:
        return "–"
    lowered = sum(g["rounds_clients_lowered_loss"] for g in measured)
    rounds = sum(g["rounds"] for g in measured)
    return f"{lowered} of {rounds} ({100 * lowered / rounds:.0f}%)"
