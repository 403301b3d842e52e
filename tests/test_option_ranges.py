"""Every numeric option refuses what no run can use, in one line, from every door: generated from the fields.

The cases come from ``dataclasses.fields(RunConfig)``: a numeric field added later is covered here
without touching this file (and a numeric field without a declared range fails the first test).
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from fedsp.cli import main, option_help
from fedsp.config import RunConfig
from fedsp.errors import FedSPError
from fedsp.options import Bounds, flag

NUMERIC = [f for f in dataclasses.fields(RunConfig) if f.type.split(" | ")[0] in ("int", "float")]


def _bad_values(spec: dataclasses.Field) -> list[str]:
    """NaN, the infinities, a negative number, 10^30 (as digits and as a float), a boolean, and zero where
    the range excludes it (and 0 does not mean "unset", as ``--eval-limit 0`` does)."""
    values = ["nan", "inf", "-inf", "-1", "1" + "0" * 30, "1e30", "true"]
    bounds = spec.metadata.get("bounds", Bounds(0, 0))
    zero_valid = bounds.low < 0 or (bounds.low == 0 and not bounds.low_open)
    if not zero_valid and not spec.metadata.get("zero_unsets"):
        values.append("0")
    return values


CLI_CASES = [(spec.name, value) for spec in NUMERIC for value in _bad_values(spec)]


def test_every_numeric_option_declares_its_range_and_help():
    # Assert: the range generated cases need, and the help the command line shows
    assert len(NUMERIC) >= 35
    for spec in NUMERIC:
        bounds = spec.metadata.get("bounds")
        assert isinstance(bounds, Bounds), f"{spec.name} declares no range"
        assert bounds.integer == spec.type.startswith("int"), spec.name
        assert math.isfinite(bounds.high) and bounds.low >= 0, spec.name
        default = spec.default
        assert default is None or bounds.admits(default), f"{spec.name}'s default {default} is out of range"
    helped = option_help()
    assert all(spec.name in helped for spec in NUMERIC)
    assert "progress" not in helped  # --quiet sets it


@pytest.mark.parametrize("name,value", CLI_CASES, ids=[f"{n}={v[:8]}" for n, v in CLI_CASES])
def test_a_bad_number_on_the_command_line_gets_one_line_naming_the_option(name, value, tmp_path, capsys):
    # Execute: refused before any model loads or folder is made
    code = main(["run", "--model", "tiny-llama", "--out", str(tmp_path / "run"), f"{flag(name)}={value}"])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("fedsp: error: "), err
    assert flag(name) in err[0] and len(err[0]) < 300, err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec", NUMERIC, ids=[f.name for f in NUMERIC])
@pytest.mark.parametrize(
    "suffix,text", [(".toml", "{name} = {value}\n"), (".yaml", "{name}: {value}\n")], ids=["toml", "yaml"]
)
def test_a_bad_number_in_a_config_file_gets_one_line_naming_the_key(spec, suffix, text, tmp_path, capsys):
    # Prepare: a boolean, NaN and 10^30 where a number is meant, as each format writes them
    nan = "nan" if suffix == ".toml" else ".nan"
    for value in ("true", nan, "1" + "0" * 30):
        path = tmp_path / f"c{suffix}"
        path.write_text(text.format(name=spec.name, value=value))
        # Execute
        code = main(["run", "--model", "tiny-llama", "--config", str(path)])
        # Assert
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("fedsp: error: "), (value, err)
        assert spec.name.replace("_", "-") in err[0].replace("_", "-"), err[0]


@pytest.mark.parametrize("spec", NUMERIC, ids=[f.name for f in NUMERIC])
def test_a_bad_number_in_python_raises_a_fedsp_error_naming_the_option(spec):
    for value in (math.nan, math.inf, -math.inf, -1, 10**30, 1e30, True):
        # from Python the error names the field (the command line says --flag: the tests above)
        with pytest.raises(FedSPError, match=rf"^{re.escape(spec.name)} ") as err:
            RunConfig(**{spec.name: value})
        assert err.value.field == spec.name


def test_the_issues_cases_get_their_one_line(capsys):
    cases = {
        ("--rounds", "99999999999999999999"): "--rounds must be an integer in [1, 1000000], got 9999",
        ("--seed", "1180591620717411303424"): "--seed must be an integer in [0, 9007199254740991], got 11805",
        ("--weight-decay", "nan"): "--weight-decay must be in [0, 100], got nan",
        ("--lr", "inf"): "--lr must be in (0, 100], got inf",
        ("--lr", "1e308"): "--lr must be in (0, 100], got 1e+308",
        ("--align-lr", "inf"): "--align-lr must be in (0, 100], got inf",
        ("--rounds", "9" * 5000): "--rounds '9999",
    }
    for argv, line in cases.items():
        assert main(["run", "--model", "tiny-llama", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"fedsp: error: {line}") and len(err) < 200, err


def test_valid_values_stay_valid_and_are_normalised():
    # Execute: an int where a float is meant, the ends of closed ranges, numbers as a file writes them
    config = RunConfig.from_dict(
        {"lr": 1, "weight-decay": 0, "rounds": 2.0, "prune_gamma": 1, "max_grad_norm": 0, "seed": 2**53 - 1}
    )
    # Assert
    assert (config.lr, config.weight_decay, config.rounds, config.prune_gamma) == (1.0, 0.0, 2, 1.0)
    assert isinstance(config.lr, float) and isinstance(config.rounds, int) and config.seed == 2**53 - 1
    assert RunConfig() == RunConfig.from_dict(RunConfig().to_dict())


def test_booleans_take_only_true_false_1_0():
    assert RunConfig.from_dict({"audit": 1, "zero_shot_eval": "no"}).audit is True
    with pytest.raises(FedSPError, match=r"audit = 2 is not true or false"):
        RunConfig.from_dict({"audit": 2}, source="config file 'c.toml'")
