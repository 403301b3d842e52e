"""The user's own data (``--task custom --data-dir DIR``): the row formats the ecosystem already uses.

Each file's format is detected from its first row's keys, and every row of
the file must have that format's keys (other keys, such as a ``category`` or
``source`` column, are ignored):

* ``prompt-completion``: ``{"prompt": str, "completion": str}`` (TRL's
  prompt-completion form). The training text is ``prompt + completion``,
  appended exactly (a separating space belongs to one of them); the loss is on
  the completion's tokens; generation continues the prompt and is scored
  against the completion.
* ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (TRL's
  conversational form): an optional ``system`` turn, then ``user`` and
  ``assistant`` turns alternating, ending with ``assistant``. Rendered with
  the tokenizer's own chat template, or ChatML (:data:`CHATML`, with a
  one-line note) when it has none; the loss is on every assistant turn (its
  text as the template renders it, end-of-turn marker included); generation
  continues the conversation before the last assistant turn.
* ``alpaca``: ``{"instruction", "input", "output"}`` (the FlowerTune
  convention; ``input`` may be empty or missing), rendered with the Alpaca
  template (:data:`ALPACA_PROMPT` / :data:`ALPACA_PROMPT_NO_INPUT`), then as
  prompt-completion.
* ``multiple-choice``: ``{"question" and/or "context", "choices": [str, ...],
  "answer": index or choice text}``, any number (2+) of choices, scored by
  log-likelihood like the bundled tasks. A JSON integer ``answer`` is an
  index; a text is a choice's text first, else a digit string an index
  (choices ``["1", "2"]`` with answer ``"1"``: the first choice). The context is
  ``{context}\\nQuestion: {question}\\nAnswer:`` (either part alone when only
  one is given; a lone context is used as it is).

Files: ``<split>.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` (see
:mod:`fedsp.data.sources`). Errors name the file, the row and the field.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from fedsp.data.examples import Example, GenExample, MCExample, unique_id
from fedsp.errors import FedSPError

FORMATS: dict[str, frozenset[str]] = {
    "prompt-completion": frozenset({"prompt", "completion"}),
    "messages": frozenset({"messages"}),
    "alpaca": frozenset({"instruction", "output"}),
    "multiple-choice": frozenset({"choices", "answer"}),
}
_OPTIONAL = {"alpaca": {"input"}, "multiple-choice": {"question", "context"}}
_ID_FIELDS = ("id", "example_id")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# ChatML, the chat format chat rows use on a model whose tokenizer has no chat template of its own
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def accepted_formats() -> str:
    return "; ".join(f"{name} ({', '.join(sorted(keys))})" for name, keys in FORMATS.items())


def detect_format(row: dict, where: str) -> str:
    """The format whose required keys ``row`` has; a one-line error listing the keys found otherwise."""
    keys = set(row)
    found = [name for name, needed in FORMATS.items() if needed <= keys]
    if len(found) == 1:
        return found[0]
    listed = ", ".join(sorted(keys)) or "none"
    if not found:
        raise FedSPError(
            f"{where}: unknown row format (keys found: {listed}); accepted: {accepted_formats()}"
        )
    raise FedSPError(f"{where}: the row fits several formats ({', '.join(found)}; keys: {listed})")


def custom_examples(
    rows: Sequence[tuple[int, dict]],
    path: Path,
    split: str,
    tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[list[Example], str]:
    """Every row of ``path`` as an example, and the file's format. ``tokenizer`` renders chat rows."""
    first_no, first = rows[0]
    kind = detect_format(first, f"{path} row {first_no}")
    out: list[Example] = []
    taken: set[str] = set()
    for position, (row_no, row) in enumerate(rows):
        where = f"{path} row {row_no}"
        missing = sorted(FORMATS[kind] - set(row))
        if missing:
            raise FedSPError(f"{where}: missing field '{missing[0]}' (the file's format is {kind})")
        native = next((str(row[k]) for k in _ID_FIELDS if row.get(k) not in (None, "")), str(position))
        example_id = unique_id(f"custom/{split}/{native}", taken)
        if kind == "multiple-choice":
            out.append(_multiple_choice(row, example_id, where))
        elif kind == "messages":
            out.append(_conversation(row["messages"], example_id, where, tokenizer))
        else:
            prompt, completion = _alpaca(row, where) if kind == "alpaca" else _prompt_completion(row, where)
            out.append(GenExample(example_id, prompt, completion, (completion.strip(),)))
    return out, kind


def _string(row: dict, name: str, where: str, empty_ok: bool = False) -> str:
    value = row.get(name)
    if value is None and empty_ok:
        return ""
    if not isinstance(value, str):
        raise FedSPError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip() and not empty_ok:
        raise FedSPError(f"{where}: field '{name}' is empty")
    return value


def _prompt_completion(row: dict, where: str) -> tuple[str, str]:
    return _string(row, "prompt", where), _string(row, "completion", where)


def _alpaca(row: dict, where: str) -> tuple[str, str]:
    instruction = _string(row, "instruction", where).strip()
    extra = _string(row, "input", where, empty_ok=True).strip()
    output = _string(row, "output", where)
    if extra:
        return ALPACA_PROMPT.format(instruction=instruction, input=extra), output
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction), output


def _multiple_choice(row: dict, example_id: str, where: str) -> MCExample:
    question = _string(row, "question", where, empty_ok=True).strip()
    context = _string(row, "context", where, empty_ok=True).strip()
    if not question and not context:
        raise FedSPError(f"{where}: a multiple-choice row needs a non-empty 'question' or 'context'")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise FedSPError(f"{where}: field 'choices' must be a list of two or more strings")
    texts = []
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise FedSPError(f"{where}: choices[{i}] must be a non-empty string, got {choice!r}")
        texts.append(choice.strip())
    if len(set(texts)) < len(texts):
        twice = sorted({c for c in texts if texts.count(c) > 1})
        raise FedSPError(f"{where}: duplicated choices {twice} (the question could not be answered)")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise FedSPError(f"{where}: field 'answer' must be a choice index or a choice text, got {answer!r}")
    if isinstance(answer, str) and answer.strip() in texts:
        gold = texts.index(answer.strip())
    elif isinstance(answer, int) or answer.strip().isdigit():
        gold = int(answer)
        if not 0 <= gold < len(texts):
            raise FedSPError(f"{where}: answer {answer!r} out of range, allowed 0..{len(texts) - 1}")
    else:
        raise FedSPError(f"{where}: answer {answer!r} is neither a choice index nor one of the choices")
    if question and context:
        prompt = f"{context}\nQuestion: {question}\nAnswer:"
    elif question:
        prompt = f"Question: {question}\nAnswer:"
    else:
        prompt = context
    return MCExample(example_id, prompt, tuple(texts), gold)


def _conversation(
    messages: object, example_id: str, where: str, tokenizer: PreTrainedTokenizerBase | None
) -> GenExample:
    """A chat rendered with the tokenizer's template, as scored (assistant) and unscored pieces."""
    if not isinstance(messages, list) or not messages:
        raise FedSPError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise FedSPError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise FedSPError(f"{where}: messages[{i}].content must be a non-empty string")
        turns.append({"role": message["role"], "content": content})
    body = turns[1:] if turns[0]["role"] == "system" else turns
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            at = i + len(turns) - len(body)
            raise FedSPError(
                f"{where}: messages[{at}].role is {turn['role']!r} where {expected!r} was expected "
                "(roles: an optional system turn, then user and assistant alternating)"
            )
    if not body or body[-1]["role"] != "assistant":
        raise FedSPError(f"{where}: the conversation has no final assistant turn to learn")
    if tokenizer is None:
        raise FedSPError(f"{where}: chat rows need a tokenizer to render them")
    segments: list[tuple[str, bool]] = []
    done = ""
    prompt = ""
    for end, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = render_chat(tokenizer, turns[:end], True, where)
        through = render_chat(tokenizer, turns[: end + 1], False, where)
        if not (before.startswith(done) and through.startswith(before)):
            raise FedSPError(
                f"{where}: the tokenizer's chat template does not render a conversation as a growing text; "
                "cannot tell the assistant turns apart"
            )
        segments += [(before[len(done) :], False), (through[len(before) :], True)]
        done, prompt = through, before
    pieces = tuple((text, scored) for text, scored in segments if text)
    return GenExample(example_id, prompt, segments[-1][0], (turns[-1]["content"].strip(),), pieces)


def render_chat(
    tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], open_turn: bool, where: str
) -> str:
    """``turns`` as the tokenizer's chat template writes them (``open_turn``: with the generation prompt
    that opens the assistant's turn), or as ChatML (:data:`CHATML`, said once) when the tokenizer has no
    template; a one-line error naming ``where`` if the template fails."""
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        note_chatml(tokenizer)
    try:
        text = tokenizer.apply_chat_template(
            turns, chat_template=own or CHATML, tokenize=False, add_generation_prompt=open_turn
        )
    except (TemplateError, ValueError, TypeError) as err:
        raise FedSPError(f"{where}: the chat template failed: {' '.join(str(err).split())[:200]}") from None
    return str(text)


_NOTED: set[str] = set()


def note_chatml(tokenizer: PreTrainedTokenizerBase) -> None:
    """Say once per tokenizer (by name) that chat rows fall back to ChatML."""
    name = str(getattr(tokenizer, "name_or_path", "") or "this model")
    if name not in _NOTED:
        _NOTED.add(name)
        print(
            f"fedsp: note: {name}'s tokenizer has no chat template; chat rows use ChatML "
            "(<|im_start|>ROLE\\nTEXT<|im_end|>)",
            file=sys.stderr,
        )


def generation_prompt(
    row: dict, where: str, tokenizer: PreTrainedTokenizerBase | None, kind: str | None = None
) -> str:
    """The text a model continues for ``row``, rendered as the run's training rows were.

    ``row`` may be any accepted format with its answer left out: ``{"prompt"}``, ``{"messages"}`` (the
    conversation up to its last user turn; a final assistant turn is dropped), alpaca ``{"instruction",
    "input"?}`` or multiple-choice ``{"question"?, "context"?}``. A bare ``{"prompt"}`` row on a run
    trained on another format (``kind``) is put into that format's template: an alpaca instruction, a
    multiple-choice question, or a user turn.
    """
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise FedSPError(
                f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects"
            )
        if turns[-1].get("role") == "assistant":
            turns = turns[:-1]
        return render_chat(_need(tokenizer, where), turns, True, where)
    if "instruction" in row:
        return _alpaca({**row, "output": "-"}, where)[0]  # the answer is not needed
    if "question" in row or "context" in row:
        return _multiple_choice({**row, "choices": ["a", "b"], "answer": 0}, "", where).context
    if "prompt" not in row:
        keys = ", ".join(sorted(row)) or "none"
        raise FedSPError(
            f'{where}: expected a "prompt", "messages", "instruction" (alpaca) or "question" '
            f"(multiple-choice) row (keys found: {keys})"
        )
    prompt = _string(row, "prompt", where)
    if kind == "alpaca":
        return ALPACA_PROMPT_NO_INPUT.format(instruction=prompt.strip())
    if kind == "multiple-choice":
        return f"Question: {prompt.strip()}\nAnswer:"
    if kind == "messages":
        return render_chat(_need(tokenizer, where), [{"role": "user", "content": prompt}], True, where)
    return prompt


def _need(tokenizer: PreTrainedTokenizerBase | None, where: str) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise FedSPError(f"{where}: chat rows need a tokenizer to render them")
    return tokenizer
