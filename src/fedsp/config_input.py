"""What a user wrote, as RunConfig values: configuration files (TOML, YAML or JSON) and command-line text.

A configuration is a flat table of a few dozen short values, so anything far from that is refused in
one line before it can cost time or memory: files over :data:`MAX_BYTES`, values nested deeper than
:data:`MAX_DEPTH` (100,000 nested ``[`` would exhaust the parsers' recursion), and YAML aliases (a
"billion laughs" file expands a few hundred bytes into gigabytes). Text may start with a UTF-8 byte
order mark, as some editors write it.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

from fedsp.errors import FedSPError
from fedsp.files import io_reason
from fedsp.options import SHOWN_CHARS, flag, shown
from fedsp.protection import parse_partitions

OPTIONS = "options"  # the source of values given on the command line (error lines name them --like-this)

MAX_BYTES = 1 << 20  # 1 MiB: the largest real configuration is a few KB
MAX_DEPTH = 16  # a value's nesting: aux_layer_choice and attackers are lists, nothing is deeper than 1
PARSED_CHARS = 200  # a parser's message is cut to this in the error line


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader with anchors and aliases refused: no entity expansion."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                None, None, f"aliases (*{event.anchor}) are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file of run keys into a dict."""
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise FedSPError(f"config file {name} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise FedSPError(
                f"config file {name} is {size:,} bytes; a configuration is at most {MAX_BYTES:,} bytes"
            )
        text = path.read_text(encoding="utf-8-sig")  # a leading byte order mark is dropped
    except UnicodeDecodeError as err:
        raise FedSPError(
            f"config file {name} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise FedSPError(f"config file {name} cannot be read: {io_reason(err)}") from None
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise FedSPError(f"config file {name} must end in .toml, .yaml, .yml or .json")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.load(text, Loader=_NoAliasLoader) or {}  # noqa: S506 (a safe loader)
    except RecursionError:
        raise FedSPError(f"config file {name} nests values deeper than {MAX_DEPTH} levels") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError, yaml.YAMLError) as err:
        where = " ".join(str(err).split())  # parsers' messages span lines: one line here
        if len(where) > PARSED_CHARS:
            where = where[: PARSED_CHARS - 3] + "..."
        raise FedSPError(f"config file {name} cannot be parsed: {where}") from None
    if not isinstance(data, dict):
        raise FedSPError(f"config file {name} must hold a table of keys, got {type(data).__name__}")
    deep = _too_deep(data)
    if deep is not None:
        raise FedSPError(f"config file {name}: {deep} nests values deeper than {MAX_DEPTH} levels")
    return data


def _too_deep(data: dict[str, Any]) -> str | None:
    """The first top-level key whose value nests deeper than :data:`MAX_DEPTH`, or None (no recursion)."""
    for key, value in data.items():
        stack = [(value, 1)]
        while stack:
            item, depth = stack.pop()
            if depth > MAX_DEPTH:
                return str(key)[:60]
            if isinstance(item, dict):
                stack.extend((v, depth + 1) for v in item.values())
            elif isinstance(item, list):
                stack.extend((v, depth + 1) for v in item)
    return None


def parse_layer_choice(text: str) -> str | tuple[int, ...]:
    """``bottom`` / ``middle`` / ``top``, or comma-separated layer indices such as ``0,15``."""
    if text in ("bottom", "middle", "top"):
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise FedSPError(
            f"--aux-layer-choice {shown(text)} must be bottom, middle, top or indices like 0,15"
        ) from None


def coerce_value(name: str, value: Any, annotation: Any, source: str) -> Any:
    """``value`` (text from a command line, a number or list from a file) as the type of field ``name``
    (annotated ``annotation``), not yet range-checked; a one-line error naming ``source`` else."""
    text = str(annotation)
    if name == "aux_layer_choice":
        if isinstance(value, str):
            return parse_layer_choice(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)  # one layer index
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        raise FedSPError(f"{_where(source, name, value)} is not valid: bottom, middle, top, or layer indices")
    if name == "stop" and isinstance(value, str):  # "\\n" on a command line means a newline
        text = (
            value.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in value else value
        )
        if not text:
            raise FedSPError(f"{source}: stop must be a non-empty text (leave it unset for the task's own)")
        return text
    if name == "attackers":
        return parse_partitions(value) if value not in (None, "", []) else ()
    if value is None:
        return None
    kind = text.split(" ")[0]  # int | None -> int
    if isinstance(value, (list, dict, tuple)) or (isinstance(value, bool) and kind in ("int", "float")):
        raise FedSPError(f"{_where(source, name, value)} is not {_KINDS.get(kind, 'a ' + kind)}")
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if value not in (0, 1):  # 1 and 0 from a file: true and false; 2 or 0.5 are not
                raise ValueError(value)
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str) and len(value) > SHOWN_CHARS:  # int() of 5,000 digits refuses anyway
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise FedSPError(f"{_where(source, name, value)} is not {_KINDS.get(kind, 'a ' + kind)}") from None
    return value


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a text"}


def _where(source: str, name: str, value: Any) -> str:
    """How an error line names a value: ``--rounds 'x'`` from the command line, else ``FILE: rounds = x``."""
    if source == OPTIONS:
        return f"{flag(name)} {shown(value)}"
    return f"{source}: {name} = {shown(value)}"
