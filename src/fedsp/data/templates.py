"""Prompt templates: a task's Hugging Face schema row -> its example's texts, and the bundled OLMES
documents -> those rows (see :mod:`fedsp.data.tasks` for the templates of each task).

Each builder takes ``(row, where)`` and checks the fields it reads, naming ``where`` (file and row) in
its one-line error.
"""

from __future__ import annotations

import re

from fedsp.errors import FedSPError

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


def arc(row: dict, where: str) -> Built:
    question = _text(row, "question", where)
    choices, gold = _labelled(row, where)
    return f"Question: {question}\nAnswer:", choices, gold


def openbookqa(row: dict, where: str) -> Built:
    stem = _text(row, "question_stem", where)
    choices, gold = _labelled(row, where)
    return stem, choices, gold


def piqa(row: dict, where: str) -> Built:
    goal = _text(row, "goal", where)
    choices = _choices([_text(row, "sol1", where), _text(row, "sol2", where)], where)
    return f"Question: {goal}\nAnswer:", choices, _index(row, "label", 2, where)


def hellaswag(row: dict, where: str) -> Built:
    label, ctx_a, ctx_b = (_text(row, k, where) for k in ("activity_label", "ctx_a", "ctx_b"))
    if "endings" not in row:
        raise FedSPError(f"{where}: missing field 'endings'")
    endings = [hellaswag_clean(e) for e in _text_list(row["endings"], "endings", where)]
    context = hellaswag_clean(f"{label}: {ctx_a} {ctx_b.capitalize()}")
    return context, _choices(endings, where), _index(row, "label", len(endings), where)


def sciq(row: dict, where: str) -> Built:
    support, question = _text(row, "support", where), _text(row, "question", where)
    names = ("distractor1", "distractor2", "distractor3", "correct_answer")
    choices = _choices([_text(row, k, where) for k in names], where)
    return f"{support}\nQuestion: {question}\nAnswer:", choices, 3


def race(row: dict, where: str) -> Built:
    article, question = _text(row, "article", where), _text(row, "question", where)
    if "options" not in row:
        raise FedSPError(f"{where}: missing field 'options'")
    choices = _choices(_text_list(row["options"], "options", where), where)
    answer = _text(row, "answer", where)
    letters = "ABCDEFGHIJ"[: len(choices)]
    if len(answer) != 1 or answer not in letters:
        raise FedSPError(f"{where}: answer {answer!r} out of range, allowed {', '.join(letters)}")
    return f"Article: {article}\n\nQuestion: {question}\n\nAnswer:", choices, letters.index(answer)


def medmcqa(row: dict, where: str) -> Built:
    question = _text(row, "question", where)
    choices = _choices([_text(row, k, where) for k in ("opa", "opb", "opc", "opd")], where)
    return f"Question: {question}\nAnswer:", choices, _index(row, "cop", 4, where)


Generated = tuple[str, str, tuple[str, ...]]  # prompt, completion, references


def squad(row: dict, where: str) -> Generated:
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


def from_query(doc: dict, where: str, field: str) -> dict:
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


def hellaswag_doc(doc: dict, where: str) -> dict:
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


def squad_doc(doc: dict, where: str) -> dict:
    match = _SQUAD_QUERY.fullmatch(str(doc.get("query", "")))
    if match is None:
        raise FedSPError(f"{where}: query is not 'Title: ...\\nBackground: ...\\nQuestion: ...\\nAnswer:'")
    title, context, question = match.groups()
    answers = {"text": list(doc["answers_text"])}
    return {"id": doc["id"], "title": title, "context": context, "question": question, "answers": answers}
