"""The package's layout holds: imports point down, one round loop, and configurations cross versions."""

from __future__ import annotations

import ast
import json
import warnings
from dataclasses import fields
from pathlib import Path

import pytest

from fedsp.config import RunConfig

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedsp"
# Each layer may import from the layers before it, never from those after it.
LAYERS = ["data", "models", "evaluation", "methods", "runtime", "experiments"]


def _imports(path: Path) -> set[str]:
    """Every fedsp module a file imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedsp"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fedsp")}
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_imports_point_down():
    # Prepare: every module of every layer
    backward = []
    for layer in LAYERS:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            # Execute: the layers this module imports
            for module in _imports(path):
                target = _layer(module)
                if target is not None and LAYERS.index(target) > LAYERS.index(layer):
                    backward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    # Assert
    assert backward == []


def test_the_round_loop_is_written_once():
    # The engines supply an exchange; only the round driver loops over rounds and checks updates
    for path in [
        PACKAGE / "runtime" / "inprocess.py",
        *sorted((PACKAGE / "runtime" / "flower").glob("*.py")),
    ]:
        text = path.read_text()
        for marker in ("for rnd in", "check_updates(", "sample_clients(", "finish_round("):
            assert marker not in text, f"{path.name} has {marker!r}"
    driver = (PACKAGE / "runtime" / "rounds.py").read_text()
    assert all(m in driver for m in ("check_updates(", "sample_clients(", "finish_round("))


def test_no_module_tests_a_method_by_name_outside_the_table():
    # Which methods exist and what they do is the method table's; other modules read its fields
    names = [
        f'"{name}"' for name in ("fedsp-no-kd", "fedsp-no-cs", "fedprompt-single", "zero-shot", "sfprompt")
    ]
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "table.py":
            continue
        offenders += [f"{path.name}: {n}" for n in names if n in path.read_text()]
    assert offenders == []


def test_a_configuration_from_another_version_loads(tmp_path):
    # Prepare: config.json as another version wrote it: a key this one does not know, one key it lacks
    written = RunConfig(model="tiny-llama", rounds=4).to_dict()
    written["quantum_shards"] = 7  # a newer version's option
    del written["client_timeout"]  # an option this version has and the writer did not
    path = tmp_path / "config.json"
    path.write_text(json.dumps(written))
    # Execute
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = RunConfig.from_dict(json.loads(path.read_text()), strict=False, source="server")
    # Assert: one warning naming the unknown key; the missing one takes its default; the rest as written
    assert [str(w.message) for w in caught] == [
        "server: ignoring unknown keys ['quantum_shards'] (written by another version?)"
    ]
    assert loaded.client_timeout is None and loaded.rounds == 4 and loaded.model == "tiny-llama"
    assert {f.name for f in fields(RunConfig)} - set(written) == {"client_timeout"}


def test_the_same_configuration_with_an_unknown_key_is_refused_where_strict():
    with pytest.raises(Exception, match="unknown keys \\['quantum_shards'\\]"):
        RunConfig.from_dict({"quantum_shards": 7})


def test_a_run_written_by_another_version_resumes(tmp_path, interrupted_run, read_metrics):
    # Prepare: a run killed in round 2, whose config.json and checkpoint another version wrote
    # (a key this version does not know, and without one this version has)
    import torch

    from fedsp.cli import main
    from fedsp.runtime.checkpoint import CHECKPOINT

    out = tmp_path / "run"
    config = RunConfig(
        model="tiny-llama",
        clients=2,
        rounds=2,
        local_steps=1,
        kd_steps=0,
        eval_limit=4,
        val_limit=4,
        prefix_len=4,
        max_length=96,
        progress=False,
        out=str(out),
    )
    interrupted_run(config, 2)
    written = json.loads((out / "config.json").read_text())
    written["quantum_shards"] = 7
    del written["max_client_weight"]
    (out / "config.json").write_text(json.dumps(written))
    state = torch.load(out / CHECKPOINT, weights_only=False)
    state["config"] = written
    torch.save(state, out / CHECKPOINT)
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["run", "--resume", str(out), "--quiet"])
    # Assert: it continued after round 1 and finished
    assert code == 0 and [m["round"] for m in read_metrics(out)] == [0, 1, 2]


def test_shared_top_level_modules_import_only_leaves():
    # config, errors, files, wire and protection are read by every layer: they may import each other and
    # two leaf modules (the method table, pure data; the dtype rules), nothing else of the package
    allowed = {
        "fedsp",
        "fedsp.errors",
        "fedsp.files",
        "fedsp.wire",
        "fedsp.config",
        "fedsp.protection",
        "fedsp.methods.table",
        "fedsp.models.precision",
    }
    for name in ("config", "errors", "files", "wire", "protection"):
        imported = {m for m in _imports(PACKAGE / f"{name}.py") if m.count(".") <= 2}
        assert {m.rsplit(".", 1)[0] if m not in allowed else m for m in imported} <= allowed, name
    for leaf in ("methods/table.py", "models/precision.py"):
        tree = ast.parse((PACKAGE / leaf).read_text())
        runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = {n.module for n in runtime if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in modules if m.startswith("fedsp") and m != "fedsp.errors"}, leaf
