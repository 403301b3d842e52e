"""``fedsp compare --tables partitions``: the methods under IID, Dirichlet and natural partitions."""

from __future__ import annotations

import csv

import pytest

from fedsp.cli import build_parser
from fedsp.experiments import grid as grid_module
from fedsp.experiments.compare import plan, write_tables
from fedsp.experiments.grid import Grid, build_cells, check_comparable, partition_label
from fedsp.runtime.inprocess import run


def test_partitions_cells_cover_iid_dirichlet_and_the_natural_field(tmp_path):
    # Prepare
    argv = ["compare", "--tables", "partitions", "--tasks", "hellaswag,arc_easy", "--seeds", "0,1"]
    args = build_parser().parse_args([*argv, "--methods", "zero-shot,fedsp", "--out", str(tmp_path)])
    # Execute
    grid, by_table = plan(args)
    configs = {c.name: c.config(grid.base, grid.out) for c in by_table["partitions"]}
    # Assert: one zero-shot cell per task; FedSP under 4 federations of HellaSwag (activity_label is its
    # natural field) and 3 of ARC-Easy (none), each seed
    labels = [partition_label(c) for c in by_table["partitions"] if c.seed == 0]
    assert labels == [
        "zero-shot",
        "fedsp, iid",
        "fedsp, dirichlet 1.0",
        "fedsp, dirichlet 0.1",
        "fedsp, by:activity_label",
        "zero-shot",
        "fedsp, iid",
        "fedsp, dirichlet 1.0",
        "fedsp, dirichlet 0.1",
    ]
    assert len(configs) == 2 + 2 * (4 + 3)
    strong = configs["hellaswag__fedsp__partition=dirichlet__alpha=0.1__s1"]
    assert (strong.partition, strong.alpha, strong.seed) == ("dirichlet", 0.1, 1)
    assert configs["hellaswag__fedsp__partition=by:activity_label__s0"].partition == "by:activity_label"
    assert configs["arc_easy__fedsp__s0"].partition == "iid"


def test_partitions_table_reports_each_federation_of_a_tiny_task(tmp_path, arc_rows, monkeypatch):
    # Prepare: a tiny ARC-style task whose rows' answerKey stands in for a natural field
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(arc_rows(32))
    (data / "validation.jsonl").write_text(arc_rows(6, 100))
    (data / "test.jsonl").write_text(arc_rows(6, 200))
    monkeypatch.setitem(grid_module.NATURAL_FIELDS, "arc_easy", "answerKey")
    monkeypatch.setenv("FEDSP_CACHE_DIR", str(tmp_path / "cache"))
    base = dict(
        model="tiny-llama",
        data_dir=str(data),
        clients=2,
        rounds=1,
        local_steps=1,
        kd_steps=2,
        batch_size=4,
        prefix_len=4,
        eval_limit=6,
        val_limit=6,
        max_length=64,
    )
    cells = build_cells("partitions", ["arc_easy"], ["zero-shot", "fedsp", "local-only"], [0])
    grid = Grid(cells, base, tmp_path / "out")
    # Execute
    grid.run(run, say=lambda text: None)
    check_comparable(grid)
    written = write_tables(grid, {"partitions": cells})
    # Assert: one row per federation, the accuracy of its results.json; the server steps stated
    with open(written[0].with_suffix(".csv"), newline="") as f:
        table = {row[""]: row for row in csv.DictReader(f)}
    assert list(table) == [
        "zero-shot",
        "fedsp, iid",
        "fedsp, dirichlet 1.0",
        "fedsp, dirichlet 0.1",
        "fedsp, by:answerKey",
        "local-only, iid",
        "local-only, dirichlet 1.0",
        "local-only, dirichlet 0.1",
        "local-only, by:answerKey",
    ]
    for cell in cells:
        assert (
            table[partition_label(cell)]["arc_easy"] == f"{100 * grid.results[cell.name]['final']['acc']:.1f}"
        )
    text = written[0].read_text()
    assert "Server prefix-tuning steps per round: fedsp 4 (" in text
    # Assert: local-only's row is the mean over owners; the note gives their range under each partition
    for cell in cells[-4:]:
        acc = grid.results[cell.name]["local_only"]["spread"]["acc"]
        told = f"arc_easy {partition_label(cell).split(', ')[1]} seed 0: {100 * acc['min']:.1f}-"
        assert told in text and f"{100 * acc['max']:.1f} (sd " in text
    # Assert: results.json says how the rows were dealt out: under IID every client holds all 4 answers;
    # by answerKey each holds whole groups (as many answers as groups) and they hold them apart
    iid = grid.results["arc_easy__fedsp__s0"]["shards"]
    by_field = grid.results["arc_easy__fedsp__partition=by:answerKey__s0"]["shards"]
    assert iid["partition"] == "iid" and iid["client_gold_choices"] == [4, 4]
    assert by_field["client_groups"] == by_field["client_gold_choices"]
    assert sum(by_field["client_groups"]) == 4 and min(by_field["client_groups"]) >= 1
    assert sum(by_field["client_rows"]) + by_field["server_rows"] == 32  # validation has its own split
    strong = grid.results["arc_easy__fedsp__partition=dirichlet__alpha=0.1__s0"]["shards"]
    assert strong["alpha"] == 0.1 and "client_groups" not in strong


@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_partition_label_names_the_alpha(alpha):
    cell = build_cells("partitions", ["arc_easy"], ["fedprompt"], [3])[1 if alpha == 1.0 else 2]
    assert partition_label(cell) == f"fedprompt, dirichlet {alpha}"
