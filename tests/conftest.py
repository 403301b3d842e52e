"""Fixtures shared by the test modules: tiny models, a learnable toy task, ARC-style rows, run-folder readers.

Helpers come as fixtures that return a function (``toy_examples(12)``), so a
test asks for what it uses by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedsp.config import RunConfig
from fedsp.data.batching import collate, encode_pair
from fedsp.data.tasks import MCExample
from fedsp.models.loading import LoadedModel, load_global_model
from fedsp.models.prefix import Prefix, prefix_for

COLOURS = ["red", "green", "blue", "black"]

# Contexts of very different lengths, so that length buckets and padding matter.
QA_PAIRS = [
    ("Question: What is red?\nAnswer:", " a colour"),
    (
        "Question: " + "Which of these animals lives in the sea and eats plankton? " * 3 + "\nAnswer:",
        " a whale",
    ),
    ("Q: 2+2?\nA:", " four"),
    ("Question: Where does the sun rise in the morning, every day?\nAnswer:", " in the east"),
    ("Question: " + "What do plants need to make their food from light? " * 2 + "\nAnswer:", " sunlight"),
    ("Q: ice?\nA:", " cold water"),
]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """tiny-llama, random weights from its config (one per test module: tests may not share state)."""
    return load_global_model("tiny-llama", seed=0)


def _toy_examples(n: int, seed: int = 0) -> list[MCExample]:
    """A learnable toy task: the answer is always the colour named in the question."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        gold = int(torch.randint(0, 4, (1,), generator=rng))
        out.append(MCExample(f"toy/{i}", f"Question: say {COLOURS[gold]}\nAnswer:", tuple(COLOURS), gold))
    return out


@pytest.fixture(scope="session")
def toy_examples() -> Callable[..., list[MCExample]]:
    return _toy_examples


def _arc_rows(n: int, start: int = 0) -> str:
    """``n`` ARC-schema JSONL rows of the toy task (ids q<start>..), for a ``--data-dir`` folder."""
    rows = [
        {
            "id": f"q{i}",
            "question": f"Say {COLOURS[i % 4]}.",
            "answerKey": "ABCD"[i % 4],
            "choices": {"text": COLOURS, "label": list("ABCD")},
        }
        for i in range(start, start + n)
    ]
    return "\n".join(json.dumps(r) for r in rows) + "\n"


@pytest.fixture(scope="session")
def arc_rows() -> Callable[..., str]:
    return _arc_rows


def _read_metrics(run_dir: Path) -> list[dict]:
    """The records of a results folder's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def read_metrics() -> Callable[[Path], list[dict]]:
    return _read_metrics


def _qa_batch(tokenizer, pairs=QA_PAIRS, max_length: int = 256) -> dict[str, torch.Tensor]:
    return collate([encode_pair(tokenizer, c, a, max_length) for c, a in pairs], tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def qa_pairs() -> list[tuple[str, str]]:
    return list(QA_PAIRS)


@pytest.fixture(scope="session")
def qa_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """``qa_batch(tokenizer, pairs=QA_PAIRS)``: a right-padded training batch of question/answer pairs."""
    return _qa_batch


def _random_prefix(model, num_tokens: int = 4, seed: int = 0) -> Prefix:
    prefix = prefix_for(model, num_tokens, dropout=0.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        prefix.table.normal_(0.0, 0.5)
    return prefix


@pytest.fixture(scope="session")
def random_prefix() -> Callable[..., Prefix]:
    """``random_prefix(model, num_tokens=4, seed=0)``: a prefix of N(0, 0.5) values, no dropout."""
    return _random_prefix


@pytest.fixture
def interrupt_at(monkeypatch) -> Callable[[int | None], None]:
    """``interrupt_at(rnd)``: from now on, Ctrl-C (KeyboardInterrupt) as round ``rnd`` starts its clients,
    its earlier rounds completed and checkpointed; ``interrupt_at(None)``: no more."""
    from fedsp.runtime import rounds

    fit = rounds.client_round

    def arm(rnd: int | None) -> None:
        def killing(order, *args, **kwargs):
            if order.rnd == rnd:
                raise KeyboardInterrupt
            return fit(order, *args, **kwargs)

        monkeypatch.setattr(rounds, "client_round", fit if rnd is None else killing)

    return arm


@pytest.fixture
def interrupted_run(interrupt_at) -> Callable[[RunConfig, int], Path]:
    """``interrupted_run(config, rnd)``: an in-process run stopped (KeyboardInterrupt) as round ``rnd``
    starts its clients, its earlier rounds checkpointed; the results folder."""
    from fedsp.runtime import inprocess

    def run(config: RunConfig, rnd: int) -> Path:
        interrupt_at(rnd)
        with pytest.raises(KeyboardInterrupt):
            inprocess.run(config)
        interrupt_at(None)
        assert config.out is not None
        return Path(config.out)

    return run
