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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _module_imports(name: str, path: Path) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its file (under TYPE_CHECKING and
    inside functions included): ``from fedsp.x import y`` is module fedsp.x.y when that is a module, else
    fedsp.x; relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                above = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(above + ([node.module] if node.module else []))
            if base not in MODULES:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found - {name}


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (first and last the same), None if it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_module_imports_itself_through_others():
    # Prepare: every module of the package, top-level ones and each folder's __init__ included
    graph = {name: _module_imports(name, path) for name, path in MODULES.items()}
    assert {"fedsp", "fedsp.config", "fedsp.wire", "fedsp.cli", "fedsp.methods.table"} <= set(graph)
    # Execute: a circle of imports, counting those under TYPE_CHECKING and inside functions
    cycle = _a_cycle(graph)
    # Assert
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle_and_the_import_reader_resolves_names():
    # the check above can fail: a circle two modules away is found, and a submodule named in `from` counts
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b"}, "b": set()}) is None
    imported = _module_imports("fedsp.runtime.flower.client_app", MODULES["fedsp.runtime.flower.client_app"])
    assert {"fedsp.runtime.flower.worker", "fedsp.runtime.flower.jobs"} <= imported


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
    assert all(m in driver for m in ("aggregate_train(", "sample_clients(", "finish_round("))
    # the round's aggregation (check, cap, combine) is one object, which the driver calls once
    assert driver.count("aggregate_train(") == 1 and "check_updates(" not in driver
    aggregation = (PACKAGE / "runtime" / "privacy.py").read_text()
    assert all(m in aggregation for m in ("check_updates(", "cap_weights(", "check_enough("))


def test_every_engine_declares_what_the_round_driver_calls():
    # Prepare: the members of the engine protocol, and every name the driver reads from its engine
    from fedsp.errors import FedSPError
    from fedsp.runtime.flower.server_app import FlowerEngine
    from fedsp.runtime.messages import Engine
    from fedsp.runtime.rounds import InProcessEngine

    declared = {n for n in vars(Engine) if not n.startswith("_")}
    driver = ast.parse((PACKAGE / "runtime" / "rounds.py").read_text())
    called = {
        node.attr
        for node in ast.walk(driver)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "engine"
    }
    # Assert: the protocol lists each; both engines have each; no engine member is looked up by name
    assert called == declared == {"concurrent", "exchange", "exchange_summed", "converse"}
    for engine in (InProcessEngine, FlowerEngine):
        assert all(hasattr(engine, name) for name in declared), engine.__name__
    assert (InProcessEngine.concurrent, FlowerEngine.concurrent) == (False, True)
    assert "getattr(self.engine" not in (PACKAGE / "runtime" / "rounds.py").read_text()
    # the in-process engine cannot sum securely: one line, as before
    with pytest.raises(FedSPError) as refused:
        InProcessEngine.exchange_summed(object.__new__(InProcessEngine), [], b"")
    assert str(refused.value) == "this engine cannot aggregate securely (secure_aggregation needs Flower)"


def test_no_module_tests_a_method_by_name_outside_the_table():
    # Which methods exist and what they do is the method table's (its data in table.py, its functions bound
    # to the same names in builders.py); other modules read its fields
    names = [
        f'"{name}"' for name in ("fedsp-no-kd", "fedsp-no-cs", "fedprompt-single", "zero-shot", "sfprompt")
    ]
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "methods" and path.name in ("table.py", "builders.py"):
            continue
        offenders += [f"{path.name}: {n}" for n in names if n in path.read_text()]
    assert offenders == []


# What a method's client holds and how it trains (the method table's ClientShape): only methods/ reads it
SHAPE_NAMES = {"ClientShape", "AUXILIARY", "GLOBAL", "SPLIT_HEAD", "EMULATOR", "ALTERNATE", "JOINT"}
SHAPE_NAMES |= {"PROMPT_ONLY", "ADAPTER"}


def _method_talk(name: str, path: Path, methods: set[str]) -> list[str]:
    """Where module ``name`` tests a client shape (imports a shape's names, reads ``holds``) or names a
    method in a string."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "fedsp.methods.table":
            found += [f"{name} imports {a.name}" for a in node.names if a.name in SHAPE_NAMES]
        elif isinstance(node, ast.Attribute) and node.attr == "holds":
            found.append(f"{name} reads .holds")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in methods:
            found.append(f"{name} names {node.value!r}")
    return found


def test_no_module_outside_methods_tests_a_client_shape_or_names_a_method():
    # Prepare: every method's name but "fedsp", which is also the package's (prog, cache folder, record key)
    from fedsp.methods.table import METHODS

    methods = set(METHODS) - {"fedsp"}
    # Execute
    offenders = [
        line
        for name, path in MODULES.items()
        if not name.startswith("fedsp.methods.")
        for line in _method_talk(name, path, methods)
    ]
    # Assert: none but the run summary's label of results.json's zero_shot accuracy (and the reader finds
    # what it looks for: the table names methods)
    assert offenders == ["fedsp.cli names 'zero-shot'"]
    table = _method_talk("table", MODULES["fedsp.methods.table"], methods)
    assert "table names 'sfprompt'" in table


def test_client_level_dp_is_refused_for_the_methods_whose_clients_send_more_than_their_update():
    # The table says which (split learning's activations and gradients cross outside the aggregate)
    from fedsp.errors import FedSPError
    from fedsp.methods.table import METHOD_SPECS

    assert [name for name, spec in METHOD_SPECS.items() if not spec.client_dp] == ["sfprompt"]
    with pytest.raises(FedSPError) as refused:
        RunConfig(method="sfprompt", dp_noise_multiplier=1.0, dp_clip=0.5)
    assert str(refused.value) == (
        "method sfprompt sends activations and gradients to the server at every split step, outside the "
        "aggregate; client-level DP of the aggregate would not cover them"
    )
    assert RunConfig(method="fedsp", dp_noise_multiplier=1.0, dp_clip=0.5).dp


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
    # config, errors, files, wire and protection are read by every layer: they may import each other, the
    # configuration's own modules (options, config_input), the spellings of the options and two leaf
    # modules (the method table, pure data; the dtype rules), nothing else of the package
    allowed = {
        "fedsp",
        "fedsp.errors",
        "fedsp.files",
        "fedsp.wire",
        "fedsp.spellings",
        "fedsp.options",
        "fedsp.config_input",
        "fedsp.config",
        "fedsp.protection",
        "fedsp.methods.table",
        "fedsp.models.precision",
    }
    for name in ("config", "errors", "files", "wire", "protection"):
        imported = {m for m in _imports(PACKAGE / f"{name}.py") if m.count(".") <= 2}
        assert {m.rsplit(".", 1)[0] if m not in allowed else m for m in imported} <= allowed, name
    for leaf in ("methods/table.py", "models/precision.py", "spellings.py", "version.py"):
        tree = ast.parse((PACKAGE / leaf).read_text())
        runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = {n.module for n in runtime if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in modules if m.startswith("fedsp") and m != "fedsp.errors"}, leaf


def test_every_option_is_in_one_section_and_the_help_shows_the_sections(capsys):
    from fedsp.cli import build_parser
    from fedsp.config import SECTIONS

    # Prepare
    listed = [name for names in SECTIONS.values() for name in names]
    # Assert: each field once, no name that is not a field
    assert sorted(listed) == sorted(f.name for f in fields(RunConfig))
    # Execute: fedsp run --help
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    # Assert: every section a group of its own, its flags under it, in the sections' order
    starts = [text.index(f"\n{title} options:") for title in SECTIONS]
    assert starts == sorted(starts)
    federation = text[starts[1] : starts[2]]
    assert "--clients" in federation and "--kd-steps" not in federation


def test_each_section_is_a_typed_class_that_checks_its_own_values():
    from fedsp import config as cfg
    from fedsp.errors import FedSPError
    from fedsp.methods import table

    # Assert: RunConfig is every section's fields, flat; a function may ask for one section's type
    assert all(issubclass(RunConfig, section) for section in cfg.SECTION_TYPES)
    assert [s.TITLE for s in cfg.SECTION_TYPES] == list(cfg.SECTIONS)
    assert isinstance(RunConfig(), cfg.PrefixOptions) and RunConfig().prefix_len == 40
    # the method table's option groups (plain data: it cannot import this module) are the same lists
    groups = {
        "auxiliary model and KD": table.AUX_OPTIONS + table.KD_OPTIONS,
        "split learning (sfprompt)": table.SPLIT_OPTIONS,
        "emulator (offsite-tuning)": table.OFFSITE_OPTIONS,
        "wire": table.WIRE_OPTIONS,
        "protection": table.PROTECTION_OPTIONS,
    }
    assert all(cfg.SECTIONS[title] == names for title, names in groups.items())
    # Execute + Assert: a section's own check sees its own fields only; one across sections is RunConfig's
    with pytest.raises(FedSPError, match="'zeros' is not valid; choose one of: tokens, random"):
        cfg.PrefixOptions.check_section(replace_unchecked(RunConfig(), prefix_init="zeros"))
    with pytest.raises(FedSPError, match="go together: an attack and the partitions"):
        cfg.ProtectionOptions.check_section(replace_unchecked(RunConfig(), attack="scale:0"))
    across = replace_unchecked(RunConfig(), attackers=(12,), attack="scale:0")
    cfg.ProtectionOptions.check_section(across)  # within the section, partition 12 is fine
    with pytest.raises(FedSPError, match="are not partitions of this run"):
        across._check_across()  # ... but not with 10 clients


def replace_unchecked(config: RunConfig, **changes) -> RunConfig:
    """A copy of ``config`` with ``changes`` set and no checks run (to call one section's check alone)."""
    copy = object.__new__(RunConfig)
    for f in fields(RunConfig):
        object.__setattr__(copy, f.name, changes.get(f.name, getattr(config, f.name)))
    return copy
