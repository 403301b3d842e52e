"""``fedsp compare`` on tiny models: SFPrompt beside FedSP in the methods and efficiency tables."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from fedsp.cli import build_parser
from fedsp.config import SPEED_ONLY
from fedsp.errors import FedSPError
from fedsp.experiments.compare import plan, write_tables
from fedsp.experiments.grid import ALL_METHODS, Cell, Grid, build_cells, check_comparable
from fedsp.runtime.checkpoint import config_differences
from fedsp.runtime.inprocess import run


def _table(path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {row[next(iter(row))]: row for row in rows}  # keyed by the first column


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory, arc_rows):
    """zero-shot, FedSP and SFPrompt on a tiny ARC-style task, run as a grid; both tables written."""
    root = tmp_path_factory.mktemp("grid")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(arc_rows(24))
    (data / "validation.jsonl").write_text(arc_rows(6, 100))
    (data / "test.jsonl").write_text(arc_rows(6, 200))
    base = dict(
        model="tiny-llama",
        data_dir=str(data),
        clients=2,
        rounds=2,
        local_steps=1,
        local_loss_steps=1,
        kd_steps=2,
        batch_size=4,
        prefix_len=4,
        split_layer=2,
        eval_limit=6,
        val_limit=6,
        max_length=64,
        eval_every_round=False,
    )
    methods = ["zero-shot", "fedsp", "fedprompt", "local-only", "sfprompt"]
    by_table = {t: build_cells(t, ["arc_easy"], methods, [0]) for t in ("methods", "efficiency")}
    cells = list(dict.fromkeys(c for table in by_table.values() for c in table))
    grid = Grid(cells, base, root / "out")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDSP_CACHE_DIR", str(root / "cache"))  # the KD cache of the FedSP cell
    try:
        grid.run(run, say=lambda text: None)
    finally:
        mp.undo()
    check_comparable(grid)
    return grid, write_tables(grid, by_table)


def _metrics(grid: Grid, method: str) -> list[dict]:
    path = grid.cell_dir(Cell(method, "arc_easy", 0)) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sfprompt_is_opt_in_and_accepted_by_the_grid(tmp_path):
    # Prepare: the compare options with sfprompt named, and the default
    args = build_parser().parse_args(
        [
            "compare",
            "--tables",
            "methods,efficiency",
            "--methods",
            "fedsp,sfprompt",
            "--seeds",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    default = build_parser().parse_args(["compare"])
    # Execute
    grid, by_table = plan(args)
    # Assert: one sfprompt cell, shared by both tables, with a valid run configuration
    assert "sfprompt" not in ALL_METHODS and "sfprompt" not in default.methods.split(",")
    assert [c.name for c in grid.cells] == ["arc_easy__fedsp__s0", "arc_easy__sfprompt__s0"]
    assert by_table["methods"] == by_table["efficiency"] == grid.cells
    config = grid.cells[1].config(grid.base, grid.out)
    assert config.method == "sfprompt" and config.out == str(tmp_path / "cells" / "arc_easy__sfprompt__s0")


def test_methods_table_has_an_sfprompt_row(tiny_grid):
    grid, written = tiny_grid
    # Execute
    table = _table(written[0].with_suffix(".csv"))
    # Assert: one row per method, the accuracy of its results.json
    assert list(table) == ["zero-shot", "fedsp", "fedprompt", "local-only", "sfprompt"]
    for method in table:
        acc = grid.results[Cell(method, "arc_easy", 0).name]["final"]["acc"]
        assert table[method]["arc_easy"] == f"{100 * acc:.1f}"
    # Assert: the notes say which server tuned the prefix (FedPrompt's too, as the authors ran it) and
    # local-only's spread over its owners
    markdown = written[0].read_text()
    assert "Server prefix-tuning steps per round: fedsp 4, fedprompt 4 (" in markdown
    spread = grid.results[Cell("local-only", "arc_easy", 0).name]["local_only"]["spread"]["acc"]
    assert f"arc_easy seed 0: {100 * spread['min']:.1f}-{100 * spread['max']:.1f}" in markdown


def test_efficiency_table_puts_split_traffic_and_compute_beside_fedsp(tiny_grid):
    grid, written = tiny_grid
    # Execute
    table = _table(next(p for p in written if p.stem == "table45_efficiency").with_suffix(".csv"))
    fedsp, sfp = table["fedsp"], table["sfprompt"]
    res = grid.results["arc_easy__sfprompt__s0"]
    last = _metrics(grid, "sfprompt")[-1]["client_metrics"]  # per client, last round

    def mean(*keys: str) -> float:
        return sum(sum(last[k]) for k in keys) / len(last[keys[0]])

    # Assert: no zero-shot row; FedPrompt's server tunes as FedSP's;
    # SFPrompt holds layers 0 and 1 and exchanges prompts + final norm
    assert list(table) == ["fedsp", "fedprompt", "local-only", "sfprompt"]
    assert fedsp["server steps per round"] == "4" and table["fedprompt"]["server steps per round"] == "4"
    assert sfp["global layers held"] == "0,1" and fedsp["global layers held"] == "0"
    assert sfp["client params"] == f"{res['client_model']['params']:,}"
    assert sfp["params down / up per round"] == "320 / 320"  # 4 prompts x 64 + a norm of 64
    # Assert: split traffic as the driver counted each client's messages; FedSP: no activations, no FLOPs
    split_down = mean("bytes_outputs", "bytes_grad_inputs")  # the body's outputs, the activations' gradient
    split_up = mean("bytes_activations", "bytes_grad_outputs")
    assert split_down > 0 and split_up > 0
    assert sfp["split MB down / up per round"] == f"{split_down / 1e6:.2f} / {split_up / 1e6:.2f}"
    assert fedsp["split MB down / up per round"] == "0.00 / 0.00" and fedsp["client GFLOPs per round"] == "–"
    comm = res["comm"]
    per_round = comm["bytes_down_per_round"] + comm["bytes_up_per_round"] + split_down + split_up
    assert sfp["MB per round, all"] == f"{per_round / 1e6:.2f}"
    assert sfp["client GFLOPs per round"] == f"{mean('client_flops') / 1e9:.3g}"
    # Assert: the run total counts every split message of both rounds on top of the runtime's total
    split_total = sum(
        sum(m["client_metrics"][k])
        for m in _metrics(grid, "sfprompt")[1:]
        for k in last
        if k.startswith("bytes_")
    )
    assert comm["split_bytes_total"] == split_total > 0
    federated = sum(m["bytes_down"] + m["bytes_up"] for m in _metrics(grid, "sfprompt")[1:])
    assert comm["total_bytes"] == 2 * comm["model_bytes_once"] + federated + split_total
    assert sfp["MB in total (run)"] == f"{comm['total_bytes'] / 1e6:.1f}"
    fedsp_total = grid.results["arc_easy__fedsp__s0"]["comm"]["total_bytes"]
    assert fedsp["MB in total (run)"] == f"{fedsp_total / 1e6:.1f}"
    assert sfp["model private"] == fedsp["model private"] == "yes"


def test_grid_reuses_cells_across_speed_only_settings_and_refuses_others(tiny_grid):
    # Prepare: the finished grid, asked for again with another evaluation batch size, then another KD budget
    grid, _ = tiny_grid
    cell = Cell("fedsp", "arc_easy", 0)
    faster = Grid([cell], {**grid.base, "eval_batch_size": 7}, grid.out)
    other = Grid([cell], {**grid.base, "kd_steps": 3}, grid.out)
    # Execute
    reused = faster.reusable(cell)
    # Assert: the same results come back; a setting that changes results is named and refused
    assert reused == json.loads((grid.cell_dir(cell) / "results.json").read_text())
    with pytest.raises(FedSPError, match=r"other settings \(kd_steps\)"):
        other.reusable(cell)


def test_a_grid_folder_moved_elsewhere_is_reused(tiny_grid, tmp_path):
    # Prepare: the finished grid's folder copied to another path (its cells' config.json name the old one)
    grid, _ = tiny_grid
    cell = Cell("fedsp", "arc_easy", 0)
    moved = tmp_path / "moved"
    shutil.copytree(grid.out, moved)
    # Execute + Assert: the same results, not "run with other settings (out)"
    again = Grid([cell], grid.base, moved)
    assert again.reusable(cell) == json.loads((grid.cell_dir(cell) / "results.json").read_text())


def test_resume_compares_every_setting_but_the_speed_only_ones():
    # Prepare
    saved = {"rounds": 2, "eval_batch_size": 32, "progress": True, "out": "a"}
    # Execute
    same = config_differences(saved, {**saved, "eval_batch_size": 128, "progress": False, "out": "b"})
    differ = config_differences(saved, {**saved, "rounds": 3})
    # Assert
    assert set(SPEED_ONLY) == {"progress", "eval_batch_size"}
    assert same == ""
    assert differ == "rounds: 2 then, 3 now"


def test_compare_dtype_reaches_every_cell_and_a_float32_grid_is_not_reused_as_bfloat16(tmp_path):
    # Prepare: a finished float32 cell, as docs/results.md's grid was run
    parser = build_parser()
    args = parser.parse_args(
        [
            "compare",
            "--model",
            "tiny-llama",
            "--methods",
            "fedsp",
            "--seeds",
            "0",
            "--out",
            str(tmp_path),
            "--dtype",
            "float32",
        ]
    )
    grid, _ = plan(args)
    cell = grid.cells[0]
    assert cell.config(grid.base, grid.out).dtype == "float32"
    folder = grid.cell_dir(cell)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cell.config(grid.base, grid.out).to_dict()))
    (folder / "results.json").write_text("{}")
    assert grid.reusable(cell) == {}
    # Execute: the same grid asked for in bfloat16
    args.dtype = "bfloat16"
    other, _ = plan(args)
    # Assert: refused, naming the setting
    with pytest.raises(FedSPError, match="dtype"):
        other.reusable(other.cells[0])


def test_a_cell_run_under_the_old_server_steps_default_is_not_reused_silently(tmp_path):
    # Prepare: a finished FedSP cell whose config leaves --server-steps unset and whose results say it
    # tuned 2 server steps a round (T = 2), as every FedSP cell did before the default became max(T, 4)
    args = build_parser().parse_args(
        ["compare", "--model", "tiny-llama", "--methods", "fedsp", "--seeds", "0", "--out", str(tmp_path)]
    )
    grid, _ = plan(args)
    cell = grid.cells[0]
    config = cell.config(grid.base, grid.out)
    assert config.server_steps is None and config.local_steps < 4
    folder = grid.cell_dir(cell)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    (folder / "results.json").write_text(json.dumps({"server_steps": config.local_steps}))
    # Execute / Assert: refused, saying how to reuse it
    with pytest.raises(FedSPError, match=f"run with {config.local_steps} server steps.*server_steps"):
        grid.reusable(cell)
    # Execute / Assert: the option the message names reuses it; FedPrompt's server takes the same steps
    old = {"server_steps": config.local_steps}
    argv = ["compare", "--model", "tiny-llama", "--methods", "fedsp,fedprompt", "--seeds", "0"]
    argv += ["--out", str(tmp_path), "--server-steps", str(config.local_steps)]
    again, _ = plan(build_parser().parse_args(argv))
    fedsp_cell, fedprompt_cell = again.cells
    assert fedsp_cell == cell and again.reusable(cell) == old
    assert fedprompt_cell.config(again.base, again.out).effective_server_steps == config.local_steps
    with pytest.raises(FedSPError, match=r"server_steps -1: must be 0 or more"):
        plan(build_parser().parse_args([*argv[:-1], "-1"]))
    # the cell as it would run today is reused by a grid without the option
    (folder / "results.json").write_text(json.dumps({"server_steps": config.effective_server_steps}))
    assert grid.reusable(cell) == {"server_steps": config.effective_server_steps}


def test_paired_table_compares_every_method_with_the_reference_on_the_same_questions(tiny_grid):
    grid, written = tiny_grid
    # Execute: the grid has zero-shot and no server-only: zero-shot is the reference
    path = next(p for p in written if p.stem == "paired_vs_zero-shot")
    # Assert: the difference is the mean per-question difference of the two questions.json files
    diff_column = "difference to zero-shot (points) [paired 95% interval]"
    with open(path.with_suffix(".csv"), newline="") as f:
        by_method = {row["method"]: row for row in csv.DictReader(f)}
    assert by_method["zero-shot"][diff_column] == "(reference)"

    def scores(method: str) -> list[float]:
        saved = json.loads((grid.cell_dir(Cell(method, "arc_easy", 0)) / "questions.json").read_text())
        assert len(saved["ids"]) == len(saved["final"]) == 6
        return saved["final"]

    zero = scores("zero-shot")
    for method in ("fedsp", "fedprompt", "sfprompt", "local-only"):
        mine = scores(method)
        expected = 100 * sum(a - b for a, b in zip(mine, zero, strict=True)) / len(zero)
        assert by_method[method][diff_column].startswith(f"{expected:+.1f} [")
        assert by_method[method]["seeds"] == "1 (single seed)"
    # Assert: the federated rows carry the clients' and the server's share, the others none
    fedsp = grid.results[Cell("fedsp", "arc_easy", 0).name]["contributions"]
    assert by_method["fedsp"]["mean clients_gain (nats)"] == f"{fedsp['clients_gain_mean']:+.4f}"
    assert by_method["fedsp"]["rounds the clients lowered the loss"].endswith(
        "of 2 (" + str(round(100 * fedsp["rounds_clients_lowered_loss"] / 2)) + "%)"
    )
    assert by_method["local-only"]["mean clients_gain (nats)"] == "–"
