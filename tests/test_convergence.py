"""``fedsp compare --tables convergence``: accuracy and validation loss against rounds and bytes sent."""

from __future__ import annotations

import csv
import json

import pytest

from fedsp.cli import build_parser
from fedsp.errors import FedSPError
from fedsp.experiments.compare import plan, run_compare, write_tables
from fedsp.experiments.convergence import COLUMNS, read_rows, write_convergence
from fedsp.experiments.grid import Cell, Grid, build_cells, check_comparable
from fedsp.runtime.inprocess import run

EVERY = (("eval_every_round", True),)


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _markdown(path) -> dict[str, dict[str, str]]:
    """The Markdown table's rows keyed by method (one task), each keyed by the header."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]
    ]
    return {row["method"]: row for row in rows}


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory, arc_rows):
    """zero-shot, FedSP and FedPrompt (two seeds) on a tiny ARC-style task, 3 rounds; convergence written."""
    root = tmp_path_factory.mktemp("convergence")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(arc_rows(24))
    (data / "validation.jsonl").write_text(arc_rows(6, 100))
    (data / "test.jsonl").write_text(arc_rows(6, 200))
    base = dict(
        model="tiny-llama",
        data_dir=str(data),
        clients=2,
        rounds=3,
        local_steps=1,
        kd_steps=2,
        batch_size=4,
        prefix_len=4,
        eval_limit=6,
        val_limit=6,
        max_length=64,
        eval_every_round=False,  # as the cpu preset: the convergence cells turn it on
    )
    cells = build_cells("convergence", ["arc_easy"], ["zero-shot", "fedsp", "fedprompt"], [0, 1])
    grid = Grid(cells, base, root / "out")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDSP_CACHE_DIR", str(root / "cache"))  # the KD cache of the FedSP cells
    try:
        grid.run(run, say=lambda text: None)
    finally:
        mp.undo()
    check_comparable(grid)
    return grid, write_tables(grid, {"convergence": cells})


def test_convergence_cells_evaluate_every_round_and_rounds_come_from_the_option(tmp_path):
    # Prepare
    parser = build_parser()
    argv = ["compare", "--tables", "methods,convergence", "--methods", "zero-shot,fedsp", "--seeds", "0"]
    args = parser.parse_args([*argv, "--rounds", "4", "--clients", "10", "--out", str(tmp_path)])
    paper = parser.parse_args([*argv, "--scale", "paper", "--rounds", "4", "--out", str(tmp_path)])
    # Execute
    grid, by_table = plan(args)
    paper_grid, paper_tables = plan(paper)
    # Assert: the cpu preset evaluates once, so the trained convergence cell turns eval_every_round on
    assert [c.name for c in by_table["convergence"]] == [
        "arc_easy__zero-shot__s0",
        "arc_easy__fedsp__eval_every_round=True__s0",
    ]
    configs = [c.config(grid.base, grid.out) for c in grid.cells]
    assert [c.rounds for c in configs] == [4, 4, 4]
    assert [c.clients for c in configs] == [10, 10, 10]  # --clients over the preset's 3
    assert configs[-1].eval_every_round and not configs[1].eval_every_round  # convergence, methods
    # Assert: a preset that evaluates every round shares the methods table's cells, at --rounds for any task
    assert paper_tables["convergence"] == paper_tables["methods"] == paper_grid.cells
    assert paper_grid.cells[1].config(paper_grid.base, paper_grid.out).rounds == 4
    with pytest.raises(FedSPError, match=r"rounds 0: must be at least 1"):
        plan(parser.parse_args([*argv, "--rounds", "0"]))
    with pytest.raises(FedSPError, match=r"clients 0: must be at least 1"):
        plan(parser.parse_args([*argv, "--clients", "0"]))


def test_tidy_csv_holds_every_round_of_every_cell(tiny_grid):
    grid, written = tiny_grid
    # Execute
    rows = _rows(grid.out / "convergence_arc_easy.csv")
    # Assert: one row for zero-shot, rounds 0..3 for each trained cell, in the columns promised
    assert list(rows[0]) == COLUMNS
    assert written == [grid.out / "convergence.md", grid.out / "convergence_arc_easy.csv"]
    assert [(r["method"], r["seed"], r["round"]) for r in rows][:5] == [
        ("zero-shot", "0", "0"),
        ("fedsp", "0", "0"),
        ("fedsp", "0", "1"),
        ("fedsp", "0", "2"),
        ("fedsp", "0", "3"),
    ]
    assert len(rows) == 1 + 4 * 4
    zero = grid.results["arc_easy__zero-shot__s0"]["final"]["acc"]
    assert float(rows[0]["accuracy"]) == pytest.approx(100 * zero) and rows[0]["val_loss"] == ""
    for method in ("fedsp", "fedprompt"):
        for seed in (0, 1):
            cell = Cell(method, "arc_easy", seed, EVERY)
            records = [json.loads(line) for line in (grid.cell_dir(cell) / "metrics.jsonl").open()]
            mine = [r for r in rows if r["method"] == method and r["seed"] == str(seed)]
            # Assert: the run's own per-round figures; round 0 has no accuracy and nothing sent
            assert [float(r["val_loss"]) for r in mine] == pytest.approx([m["val_loss"] for m in records])
            assert [float(r["accuracy"]) for r in mine[1:]] == pytest.approx(
                [100 * m["acc"] for m in records[1:]]
            )
            assert mine[0]["accuracy"] == "" and mine[0]["bytes_cumulative"] == "0"
            # Assert: the bytes add up, round by round, to the run's total (the client model's shipping too)
            sent = [int(r["bytes_round"]) for r in mine]
            assert [int(r["bytes_cumulative"]) for r in mine] == [sum(sent[: i + 1]) for i in range(4)]
            assert int(mine[-1]["bytes_cumulative"]) == grid.results[cell.name]["comm"]["total_bytes"]
            # Assert: the client model (FedSP's auxiliary, FedPrompt's global) is shipped in round 1
            assert sent[1:] == [m["bytes_down"] + m["bytes_up"] + m["bytes_shipped"] for m in records[1:]]
            assert sent[1] - sent[2] == records[1]["bytes_shipped"] > 0
    # Assert: each row names the server's prefix steps a round its run took (FedSP: at least 4; FedPrompt as
    # the authors ran it: the same; zero-shot: no server at all)
    steps = {(r["method"], r["server_steps"]) for r in rows}
    assert steps == {("zero-shot", ""), ("fedsp", "4"), ("fedprompt", "4")}


def test_figure_is_a_png_and_the_markdown_has_the_seed_means(tiny_grid):
    grid, written = tiny_grid
    rows = _rows(grid.out / "convergence_arc_easy.csv")
    # Execute
    table = _markdown(written[0])
    # Assert: the figure is written
    assert (grid.out / "convergence_arc_easy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Assert: FedSP's last round is the mean ± sd of its two seeds' round-3 accuracies, bytes beside it
    acc = [float(r["accuracy"]) for r in rows if r["method"] == "fedsp" and r["round"] == "3"]
    sent = [int(r["bytes_cumulative"]) for r in rows if r["method"] == "fedsp" and r["round"] == "3"]
    mean = sum(acc) / 2
    sd = abs(acc[0] - acc[1]) / 2**0.5
    assert table["fedsp"]["last round"] == f"{mean:.1f} ± {sd:.1f} ({sum(sent) / 2 / 1e6:.3g} MB)"
    assert table["fedsp"]["rounds"] == "3" and table["fedsp"]["seeds"] == "2"
    assert table["fedprompt"]["first within 1 point of fedprompt's last round"].startswith("round ")


SETTINGS = {"model": "tiny-llama", "dtype": "float32", "eval_limit": 6, "max_length": 64, "clients": 2}


def _cell(
    grid: Grid,
    cell: Cell,
    accs: list[float],
    sent: tuple[int, int, int],
    final: float = 0.0,
    server_steps: int | None = None,
    **settings,
) -> None:
    """A finished cell as a run writes it: its settings, round 0, then rounds with acc and bytes (down, up,
    shipped); ``server_steps`` in its results.json when given."""
    folder = grid.cell_dir(cell)
    folder.mkdir(parents=True)
    config = {**SETTINGS, "local_steps": 1, "method": cell.method, "seed": cell.seed, **settings}
    (folder / "config.json").write_text(json.dumps(config))
    records = [{"round": 0, "val_loss": 3.0}]
    for rnd, acc in enumerate(accs, 1):
        record = {"round": rnd, "server_loss": 2.0, "val_loss": 3.0 - 0.1 * rnd, "acc": acc, "acc_norm": acc}
        if sent[0]:
            down, up, shipped = sent
            record.update(bytes_down=down, bytes_up=up, bytes_shipped=shipped if rnd == 1 else 0)
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    grid.results[cell.name] = {"final": {"acc": final, "n": 6}}
    if server_steps is not None:
        grid.results[cell.name]["server_steps"] = server_steps


def test_markdown_means_and_the_round_each_method_comes_within_a_point_of_fedprompt(tmp_path):
    # Prepare: two seeds of FedPrompt (last round 50, 54: mean 52) and FedSP; one of prefix-tuning, zero-shot
    grid = Grid([], {}, tmp_path)
    fedsp = (200, 100, 1_000_000)
    _cell(grid, Cell("fedprompt", "arc_easy", 0, EVERY), [0.30, 0.40, 0.50], (1000, 500, 0))
    _cell(grid, Cell("fedprompt", "arc_easy", 1, EVERY), [0.32, 0.42, 0.54], (1000, 500, 0))
    _cell(grid, Cell("fedsp", "arc_easy", 0, EVERY), [0.20, 0.45, 0.53], fedsp)
    _cell(grid, Cell("fedsp", "arc_easy", 1, EVERY), [0.22, 0.47, 0.49], fedsp)
    _cell(grid, Cell("prefix-tuning", "arc_easy", 0, EVERY), [0.60, 0.61, 0.62], (0, 0, 0))
    _cell(grid, Cell("zero-shot", "arc_easy", 0), [], (0, 0, 0), final=0.25)
    names = ["zero-shot", "fedprompt", "fedsp", "prefix-tuning"]
    cells = [Cell(m, "arc_easy", s, EVERY if m != "zero-shot" else ()) for m in names for s in (0, 1)]
    cells = [c for c in cells if c.name in grid.results] + [
        Cell("fedsp", "arc_easy", 2, EVERY)
    ]  # seed 2: not run
    # Execute
    written = write_convergence(grid, cells)
    table = _markdown(written[0])
    rows = _rows(written[1])
    within = "first within 1 point of fedprompt's last round"
    # Assert: mean ± sample sd over seeds at round 2 and the last round, with the mean bytes sent by then
    assert table["fedprompt"]["round 2"] == "41.0 ± 1.4 (0.003 MB)"
    assert table["fedprompt"]["last round"] == "52.0 ± 2.8 (0.0045 MB)"
    assert table["fedsp"]["round 2"] == "46.0 ± 1.4 (1 MB)"
    assert table["fedsp"]["last round"] == "51.0 ± 2.8 (1 MB)"
    assert table["prefix-tuning"]["last round"] == "62.0"  # one seed, nothing sent
    assert table["zero-shot"]["last round"] == "25.0 (0 MB)" and table["zero-shot"]["rounds"] == "–"
    # Assert: the first round at most one point below FedPrompt's 52.0
    assert table["fedsp"][within] == "round 3 (1 MB)"
    assert table["fedprompt"][within] == "round 3 (0.0045 MB)"
    assert table["prefix-tuning"][within] == "round 1"
    assert table["zero-shot"][within] == "never (untrained)"
    # Assert: the cell that never ran is named; the CSV sums the client model's shipping into round 1
    assert "Missing (not run or unfinished), left out: arc_easy__fedsp__eval_every_round=True__s2." in (
        written[0].read_text()
    )
    fedsp0 = [r for r in rows if r["method"] == "fedsp" and r["seed"] == "0"]
    assert [r["bytes_cumulative"] for r in fedsp0] == ["0", "1000300", "1000600", "1000900"]
    assert [r["bytes_cumulative"] for r in rows if r["method"] == "prefix-tuning"] == [""] * 4
    assert (tmp_path / "convergence_arc_easy.png").is_file()


def test_a_cell_without_per_round_accuracy_is_refused_by_name(tmp_path):
    # Prepare: a cell run with eval_every_round off (its rounds have val_loss but no acc)
    grid = Grid([], {}, tmp_path)
    cell = Cell("fedsp", "arc_easy", 0, EVERY)
    _cell(grid, cell, [0.3, 0.4], (10, 10, 0))
    path = grid.cell_dir(cell) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "acc"}) + "\n" for r in records))
    # Execute / Assert
    with pytest.raises(
        FedSPError, match=r"metrics.jsonl: no accuracy for rounds \[1, 2\]; .*eval_every_round=True"
    ):
        write_convergence(grid, [cell])


def test_bytes_sent_read_in_megabytes_then_gigabytes():
    from fedsp.experiments.convergence import _sent

    assert _sent({"bytes_cumulative": [1.5e6, 2.5e6]}) == " (2 MB)"
    assert _sent({"bytes_cumulative": [5.75e9]}) == " (5.75 GB)"
    assert _sent({"bytes_cumulative": []}) == ""


def test_an_earlier_grids_csv_merges_its_seeds_and_this_grids_own_cells_win(tmp_path):
    # Prepare: an earlier grid ran FedSP seed 0 and FedPrompt seed 0; this one FedSP seeds 0 and 1
    earlier = Grid([], {}, tmp_path / "earlier")
    _cell(earlier, Cell("fedsp", "arc_easy", 0, EVERY), [0.20, 0.40], (100, 50, 1000))
    _cell(earlier, Cell("fedprompt", "arc_easy", 0, EVERY), [0.30, 0.50], (1000, 500, 0))
    _cell(earlier, Cell("fedprompt", "sciq", 0, EVERY), [0.70, 0.80], (1000, 500, 0))
    earlier_cells = [Cell(m, "arc_easy", 0, EVERY) for m in ("fedsp", "fedprompt")]
    write_convergence(earlier, [*earlier_cells, Cell("fedprompt", "sciq", 0, EVERY)])
    grid = Grid([], {}, tmp_path / "now")
    _cell(grid, Cell("fedsp", "arc_easy", 0, EVERY), [0.24, 0.44], (100, 50, 1000))
    _cell(grid, Cell("fedsp", "arc_easy", 1, EVERY), [0.26, 0.46], (100, 50, 1000))
    cells = [Cell(m, "arc_easy", s, EVERY) for m in ("fedsp", "fedprompt") for s in (0, 1)]
    # Execute
    merged = read_rows(tmp_path / "earlier" / "convergence_arc_easy.csv")
    written = write_convergence(grid, cells, merged=merged)
    table = _markdown(written[0])
    rows = _rows(written[1])
    # Assert: FedSP's seed 0 is this grid's (24, 44), not the earlier one's (20, 40); FedPrompt's is merged
    assert table["fedsp"]["last round"] == "45.0 ± 1.4 (0.0013 MB)" and table["fedsp"]["seeds"] == "2"
    assert table["fedprompt"]["last round"] == "50.0 (0.003 MB)"
    assert [r["accuracy"] for r in rows if r["method"] == "fedsp" and r["seed"] == "0"] == [
        "",
        "24.0",
        "44.0",
    ]
    # Assert: the merged cell is named, only FedPrompt seed 1 is missing; SciQ (not asked for) left out
    text = written[0].read_text()
    assert "Merged from an earlier grid's CSV (--merge): arc_easy fedprompt seed 0." in text
    assert "left out: arc_easy__fedprompt__eval_every_round=True__s1." in text
    assert {r["task"] for r in rows} == {"arc_easy"} and "sciq" not in text
    # Assert: the merged rows come back as they were written (the CSV round-trips)
    again = read_rows(written[1])
    assert [r for r in again if r["method"] == "fedprompt"] == [
        r for r in merged if r["method"] == "fedprompt"
    ]


def test_merged_methods_and_seeds_come_in_the_grids_order_not_the_csvs(tmp_path):
    # Prepare: three earlier grids' CSVs, merged in the order FedPrompt seed 1, FedSP, zero-shot, FedPrompt
    # seed 0 (as separate runs are joined by hand); this grid names zero-shot, FedSP, FedPrompt
    paths = []
    for name, cell, accs in [
        ("fp1", Cell("fedprompt", "arc_easy", 1, EVERY), [0.32, 0.52]),
        ("sp0", Cell("fedsp", "arc_easy", 0, EVERY), [0.20, 0.40]),
        ("zs", Cell("zero-shot", "arc_easy", 0), []),
        ("fp0", Cell("fedprompt", "arc_easy", 0, EVERY), [0.30, 0.50]),
    ]:
        earlier = Grid([], {}, tmp_path / name)
        _cell(earlier, cell, accs, (10, 10, 0), final=0.25)
        write_convergence(earlier, [cell])
        paths.append(tmp_path / name / "convergence_arc_easy.csv")
    merged = [row for path in paths for row in read_rows(path)]
    cells = [Cell("zero-shot", "arc_easy", 0)] + [
        Cell(m, "arc_easy", s, EVERY) for m in ("fedsp", "fedprompt") for s in (0, 1)
    ]
    # Execute
    written = write_convergence(Grid([], {}, tmp_path / "now"), cells, merged=merged)
    # Assert: the table's rows follow --methods; the CSV's too, each method's seeds in order, then rounds
    assert list(_markdown(written[0])) == ["zero-shot", "fedsp", "fedprompt"]
    rows = _rows(written[1])
    assert [(r["method"], r["seed"], r["round"]) for r in rows if r["method"] == "fedprompt"] == [
        ("fedprompt", s, r) for s in "01" for r in "012"
    ]
    assert list(dict.fromkeys(r["method"] for r in rows)) == ["zero-shot", "fedsp", "fedprompt"]


def test_merged_rows_with_other_settings_or_a_bad_csv_are_refused_by_name(tmp_path):
    # Prepare: the earlier grid evaluated 200 questions, this one 6; a CSV of another tool
    earlier = Grid([], {}, tmp_path / "earlier")
    _cell(earlier, Cell("fedprompt", "arc_easy", 0, EVERY), [0.30, 0.50], (1000, 500, 0), eval_limit=200)
    write_convergence(earlier, [Cell("fedprompt", "arc_easy", 0, EVERY)])
    grid = Grid([], {}, tmp_path / "now")
    _cell(grid, Cell("fedsp", "arc_easy", 0, EVERY), [0.24, 0.44], (100, 50, 1000))
    cells = [Cell(m, "arc_easy", 0, EVERY) for m in ("fedsp", "fedprompt")]
    merged = read_rows(tmp_path / "earlier" / "convergence_arc_easy.csv")
    other = tmp_path / "other.csv"
    other.write_text("task,method,seed\narc_easy,fedsp,0\n")
    # Execute / Assert
    with pytest.raises(
        FedSPError,
        match=r"'arc_easy' were run with different settings: eval_limit 6 \(fedsp seed 0\); "
        r"eval_limit 200 \(fedprompt seed 0\)",
    ):
        write_convergence(grid, cells, merged=merged)
    with pytest.raises(FedSPError, match=r"--merge .*other.csv: not a convergence CSV .*no column round"):
        read_rows(other)
    with pytest.raises(FedSPError, match=r"--merge .*absent.csv: cannot be read"):
        read_rows(tmp_path / "absent.csv")


def test_a_seed_run_with_other_server_steps_is_refused_and_the_steps_are_named(tmp_path):
    # Prepare: an earlier grid's FedSP seed 0 ran 2 server steps a round (the old default), this grid's seed 1
    # runs 4; FedPrompt's two seeds 0 (the server only averages); a CSV written before the column existed
    earlier = Grid([], {}, tmp_path / "earlier")
    _cell(earlier, Cell("fedsp", "arc_easy", 0, EVERY), [0.20, 0.40], (100, 50, 1000), server_steps=2)
    csv_path = write_convergence(earlier, [Cell("fedsp", "arc_easy", 0, EVERY)])[1]
    grid = Grid([], {}, tmp_path / "now")
    _cell(grid, Cell("fedsp", "arc_easy", 1, EVERY), [0.24, 0.44], (100, 50, 1000), server_steps=4)
    for seed in (0, 1):
        _cell(grid, Cell("fedprompt", "arc_easy", seed, EVERY), [0.3, 0.5], (100, 50, 0), server_steps=0)
    cells = [Cell(m, "arc_easy", s, EVERY) for m in ("fedsp", "fedprompt") for s in (0, 1)]
    old = tmp_path / "old.csv"
    lines = csv_path.read_text().splitlines()
    old.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in lines))  # the last column removed
    # Execute / Assert: the two FedSP seeds are not averaged; the message names each count and its seeds
    with pytest.raises(
        FedSPError,
        match=r"cells of 'arc_easy', fedsp: the server tuned the prefix for different numbers of steps a "
        r"round: 2 \(seed 0\); 4 \(seed 1\); rerun them with the same server_steps",
    ):
        write_convergence(grid, cells, merged=read_rows(csv_path))
    with pytest.raises(
        FedSPError, match=r"old.csv: .*\(no column server_steps\); write it again .*--tables-only"
    ):
        read_rows(old)
    bad = tmp_path / "bad.csv"
    bad.write_text(csv_path.read_text().replace(",2\n", ",two\n"))
    with pytest.raises(FedSPError, match=r"bad.csv, line 2: server_steps 'two' is not a step count"):
        read_rows(bad)
    # Execute: an earlier seed 0 that ran 4 steps, as this grid's seed 1 did, merged (its CSV read back)
    again = Grid([], {}, tmp_path / "again")
    _cell(again, Cell("fedsp", "arc_easy", 0, EVERY), [0.22, 0.42], (100, 50, 1000), server_steps=4)
    merged = read_rows(write_convergence(again, [Cell("fedsp", "arc_easy", 0, EVERY)])[1])
    written = write_convergence(grid, cells, merged=merged)
    # Assert: both FedSP seeds averaged; the Markdown says how many steps each method's server took
    table = _markdown(written[0])
    assert table["fedsp"]["seeds"] == "2" and table["fedsp"]["last round"].startswith("43.0 ± 1.4")
    text = written[0].read_text()
    assert "Server prefix-tuning steps per round: fedsp 4, fedprompt 0 (0: the server only averages)." in text


def test_a_merged_seed_with_other_server_steps_is_refused_before_anything_runs(tmp_path):
    # Prepare: an earlier grid's FedSP seed 0 ran 2 server steps a round; this grid (--scale cpu: T = 2,
    # so 4 server steps today) would run seed 1
    earlier = Grid([], {}, tmp_path / "earlier")
    _cell(earlier, Cell("fedsp", "arc_easy", 0, EVERY), [0.20, 0.40], (100, 50, 1000), server_steps=2)
    csv_path = write_convergence(earlier, [Cell("fedsp", "arc_easy", 0, EVERY)])[1]
    argv = ["compare", "--tables", "convergence", "--methods", "fedsp", "--seeds", "0,1"]
    argv += ["--out", str(tmp_path / "now"), "--merge", str(csv_path)]
    # Execute / Assert: refused by name, with the option that would match, and nothing ran
    with pytest.raises(
        FedSPError,
        match=r"--merge: arc_easy fedsp seed 0 ran 2 server steps a round, where this grid's fedsp cells "
        r"run 4; merge seeds run with the same steps, or pass server_steps 2 to run this grid's as "
        r"they did",
    ):
        run_compare(build_parser().parse_args(argv))
    assert not (tmp_path / "now" / "cells").exists()
    # Execute / Assert: with --server-steps 2 the grid's cells would run as the merged seed did: accepted
    # (--tables-only: nothing is run; seed 1 is named missing)
    args = build_parser().parse_args([*argv, "--server-steps", "2", "--tables-only"])
    assert run_compare(args) == 0
    assert "Merged from an earlier grid's CSV (--merge): arc_easy fedsp seed 0." in (
        (tmp_path / "now" / "convergence.md").read_text()
    )


def test_merge_only_with_the_convergence_table_and_merged_cells_are_not_run(tmp_path):
    # Prepare: an earlier grid's CSV holding FedSP seed 0
    earlier = Grid([], {}, tmp_path / "earlier")
    _cell(earlier, Cell("fedsp", "arc_easy", 0, EVERY), [0.20, 0.40], (100, 50, 1000))
    csv_path = write_convergence(earlier, [Cell("fedsp", "arc_easy", 0, EVERY)])[1]
    parser = build_parser()
    argv = ["compare", "--methods", "fedsp", "--seeds", "0", "--out", str(tmp_path / "now")]
    # Execute: nothing is left to run, so the command only writes the table
    code = run_compare(parser.parse_args([*argv, "--tables", "convergence", "--merge", str(csv_path)]))
    # Assert
    assert code == 0
    assert not (tmp_path / "now" / "cells").exists()
    assert "Missing" not in (tmp_path / "now" / "convergence.md").read_text()
    with pytest.raises(FedSPError, match=r"--merge: only with --tables convergence alone \(not methods,"):
        run_compare(parser.parse_args([*argv, "--tables", "methods,convergence", "--merge", str(csv_path)]))


def test_a_cell_interrupted_after_a_round_continues_from_it(tiny_grid, tmp_path, interrupt_at):
    # Prepare: the FedPrompt cell of the fixture's grid, in a new grid, stopped by Ctrl-C as round 2 starts
    done, _ = tiny_grid
    cell = Cell("fedprompt", "arc_easy", 0, EVERY)
    grid = Grid([cell], done.base, tmp_path / "out")
    interrupt_at(2)
    with pytest.raises(KeyboardInterrupt):
        grid.run(run, say=lambda text: None)
    interrupt_at(None)
    resumed_from = []

    def runner(config, resume):
        resumed_from.append(resume)
        return run(config, resume)

    # Execute: the same grid again
    said: list[str] = []
    grid.run(runner, say=said.append)
    # Assert: the cell continued from its folder (round 1 kept, not run again) and matches the uninterrupted
    assert resumed_from == [grid.cell_dir(cell)]
    assert any("continuing the interrupted run" in line for line in said)

    def metrics(g: Grid) -> list[dict]:
        return [json.loads(line) for line in (g.cell_dir(cell) / "metrics.jsonl").read_text().splitlines()]

    assert [m["round"] for m in metrics(grid)] == [0, 1, 2, 3]
    expected = [m["val_loss"] for m in metrics(done)]
    assert [m["val_loss"] for m in metrics(grid)] == pytest.approx(expected, abs=1e-5)


def test_cells_run_two_at_a_time_give_the_same_numbers_as_one_at_a_time(tiny_grid, tmp_path):
    # Prepare: the fixture's FedSP and FedPrompt seed-0 cells (run one at a time) in a new grid
    done, _ = tiny_grid
    cells = [Cell("fedsp", "arc_easy", 0, EVERY), Cell("fedprompt", "arc_easy", 0, EVERY)]
    grid = Grid(cells, done.base, tmp_path / "out")
    said: list[str] = []
    # Execute: two worker processes (the KD cache of the fixture's grid is not shared: distilled again)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSP_CACHE_DIR", str(tmp_path / "cache"))
        grid.run(run, say=said.append, jobs=2)
    # Assert: both cells finished, with the same validation losses and accuracy every round
    assert said[0].endswith("2 to run in " + str(tmp_path / "out") + ", 2 at a time")
    assert sorted(line.split()[1] for line in said[1:]) == sorted(f"{c.name}:" for c in cells)

    def metrics(g: Grid, cell: Cell) -> list[dict]:
        return [json.loads(x) for x in (g.cell_dir(cell) / "metrics.jsonl").read_text().splitlines()]

    for cell in cells:
        assert [m["round"] for m in metrics(grid, cell)] == [0, 1, 2, 3]
        assert [m["val_loss"] for m in metrics(grid, cell)] == pytest.approx(
            [m["val_loss"] for m in metrics(done, cell)], abs=1e-4
        )
        assert [m.get("acc") for m in metrics(grid, cell)] == [m.get("acc") for m in metrics(done, cell)]
        assert grid.results[cell.name]["final"] == pytest.approx(done.results[cell.name]["final"], abs=1e-4)


def _fails_on_seed_1(config, resume):
    """A grid runner (module level: it crosses to a worker process) whose seed-1 cells fail."""
    if config.seed == 1:
        raise FedSPError("seed 1 refused by the test")
    return run(config, resume)


def test_a_failing_cell_stops_the_grid_and_the_running_cell_finishes(tiny_grid, tmp_path):
    # Prepare: three cells, two workers; the first fails at once, the second is running beside it
    done, _ = tiny_grid
    failing = Cell("fedprompt", "arc_easy", 1, EVERY)
    running = Cell("fedprompt", "arc_easy", 0, EVERY)
    never = Cell("zero-shot", "arc_easy", 0, EVERY)
    grid = Grid([failing, running, never], done.base, tmp_path / "out")
    said: list[str] = []
    # Execute
    with pytest.raises(FedSPError, match="seed 1 refused by the test"):
        grid.run(_fails_on_seed_1, say=said.append, jobs=2)
    # Assert: the running cell finished and kept its results; the third never started
    assert any(f"{failing.name} failed: seed 1 refused" in line and "the 1 running" in line for line in said)
    assert (grid.cell_dir(running) / "results.json").is_file()
    assert not grid.cell_dir(never).exists()


def test_jobs_below_one_is_refused_by_name():
    args = build_parser().parse_args(["compare", "--jobs", "0"])
    with pytest.raises(FedSPError, match="--jobs 0: must be at least 1"):
        plan(args)
