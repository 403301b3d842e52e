"""The README and the documentation site: short, generated where they describe the code, and runnable."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from fedsp.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _options_module():
    spec = importlib.util.spec_from_file_location("docs_options", ROOT / "scripts" / "docs_options.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_options_page_lists_every_configuration_key_with_its_default():
    # Execute: the table the MkDocs hook puts into docs/options.md
    options = _options_module()
    table = options.options_markdown()
    page = options.on_page_markdown((ROOT / "docs" / "options.md").read_text(), page=None)
    # Assert: one row per field, section by section (fedsp.config.SECTIONS, each under its heading),
    # each with its flag, its default and a help text
    from fedsp.config import SECTIONS

    rows = [line for line in table.splitlines() if line.startswith("| `")]
    by_name = {f.name: f for f in dataclasses.fields(RunConfig)}
    fields = [by_name[name] for names in SECTIONS.values() for name in names]
    assert len(rows) == len(fields) == len(by_name)
    assert [line[4:] for line in table.splitlines() if line.startswith("### ")] == [
        title.capitalize() for title in SECTIONS
    ]
    defaults = RunConfig()
    for row, f in zip(rows, fields, strict=True):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert cells[0] == f"`{f.name}`"
        assert cells[2] == f"`{options._cell(options._default(getattr(defaults, f.name)))}`"
        assert len(cells[3]) > 10, f.name
    assert "| `clients` | `--clients` | `10` | number of clients K" in table
    assert "| `eval_limit` | `--eval-limit` | `200` |" in table
    assert "| `dp_clip` | `--dp-clip` | `unset` |" in table
    assert options.MARKER not in page and table in page


def test_the_own_data_page_prints_the_templates_the_code_uses():
    from fedsp.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, CHATML

    page = _options_module().on_page_markdown((ROOT / "docs" / "own-data.md").read_text(), page=None)
    for template in (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, CHATML):
        assert "```text\n" + template + "\n```" in page
    assert "<!-- template:" not in page


def test_the_readme_is_short_and_keeps_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "bash scripts/install.sh --test && .venv/bin/python -m pytest" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh --test\n" in ci and ci.endswith(".venv/bin/python -m pytest\n")
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):  # every link into the site points at a page
        assert (ROOT / link).is_file(), link


def test_every_page_is_in_the_site_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages_of(entries) -> set[str]:  # a nav entry is a page, {title: page} or {title: [entries]}
        found: set[str] = set()
        for entry in entries:
            values = [entry] if isinstance(entry, str) else list(entry.values())
            for value in values:
                found |= pages_of(value) if isinstance(value, list) else {value}
        return found

    docs = ROOT / "docs"
    pages = {str(p.relative_to(docs)) for p in docs.rglob("*.md")}
    assert pages_of(config["nav"]) == pages


def test_the_readmes_python_quick_start_runs(tmp_path):
    # Prepare: the README's Python block, as a user would paste it, run in an empty folder
    readme = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"## Quick start: Python\n\n```python\n(.*?)```", readme, re.S)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    # Assert: it ran, wrote the run and the adapter where it said
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "api-demo" / "results.json").is_file()
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    assert "'n': 9" in proc.stdout
