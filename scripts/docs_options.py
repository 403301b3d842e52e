"""The options page of the documentation site, generated from the run configuration itself.

Every :class:`fedsp.config.RunConfig` field becomes one row: its configuration key, its command-line flag,
its default and its help text. The help text is the field's ``metadata["help"]`` where the field has one,
else the CLI's (``fedsp.cli._HELP``), so ``fedsp run --help`` and this page say the same thing, in the
same sections (``fedsp.config.SECTIONS``). Used as an
MkDocs hook (``mkdocs.yml``: ``hooks``): the marker ``<!-- options-table -->`` in ``docs/options.md`` is
replaced at every build, so the page cannot fall behind the code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MARKER = "<!-- options-table -->"


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _cell(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def option_rows() -> list[tuple[str, str, str, str]]:
    """(key, flag, default, help) for every configuration field, in the order RunConfig declares them."""
    from fedsp import cli
    from fedsp.config import RunConfig

    cli_help: dict[str, str] = getattr(cli, "_HELP", {})
    defaults = RunConfig()
    rows = []
    for f in dataclasses.fields(RunConfig):
        text = f.metadata.get("help") or cli_help.get(f.name)
        if f.name == "progress" and not text:
            text = "progress bars and progress lines (the CLI's --quiet sets it false: one line a round)"
        flag = "--quiet" if f.name == "progress" else "--" + f.name.replace("_", "-")
        rows.append((f.name, flag, _default(getattr(defaults, f.name)), text or ""))
    return rows


def options_markdown() -> str:
    """The options tables in Markdown, one per section of the configuration (``fedsp.config.SECTIONS``)."""
    from fedsp.config import SECTIONS

    rows = {row[0]: row for row in option_rows()}
    lines: list[str] = []
    for title, names in SECTIONS.items():
        lines += [
            f"### {title.capitalize()}",
            "",
            "| key | command line | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, flag, default, text in (rows[name] for name in names):
            lines.append(f"| `{key}` | `{flag}` | `{_cell(default)}` | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)


def templates() -> dict[str, str]:
    """The row templates of your own data, as the code holds them (``<!-- template:NAME -->`` markers)."""
    from fedsp.data import formats

    return {name: getattr(formats, name) for name in ("ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "CHATML")}


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: the options table and the templates, generated at every build."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, options_markdown())
    for name, text in templates().items():
        markdown = markdown.replace(f"<!-- template:{name} -->", "```text\n" + text + "\n```")
    return markdown
