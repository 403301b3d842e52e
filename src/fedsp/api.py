"""fedsp from Python: run a federated course on rows held in memory, then use its result.

```python
import fedsp

rows = [{"prompt": f"Say {c}:", "completion": f" {c}"} for c in ("red", "green", "blue") * 4]
config = fedsp.RunConfig(model="tiny-llama", task="custom", clients=2, rounds=2)
run = fedsp.run(config, data={"train": rows, "validation": rows, "test": rows})
print(run.results["final"], run.metrics[-1]["val_loss"])
print(fedsp.load_run(run.folder).generate("Say red:"))
```

``run`` writes the same results folder as ``fedsp run``; ``load_run``
opens any finished one. Every problem with the input raises
``fedsp.FedSPError``, whose message names the
``RunConfig`` field (``clients must be an integer >= 1``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsp.config import RunConfig
from fedsp.data.sources import SPLITS
from fedsp.data.tasks import CUSTOM
from fedsp.errors import FedSPError
from fedsp.models.loading import LoadedModel
from fedsp.runtime import commands
from fedsp.runtime.outputs import PREFIX_FILE, FinishedRun, open_run

Row = Mapping[str, Any]
Data = Mapping[str, Iterable[Row]]

__all__ = ["Run", "load_run", "run"]


@dataclass
class Run:
    """A finished run's results folder, read back: what it recorded, and its best prefix put to use.

    ``evaluate``, ``generate`` and ``export`` load the run's global model once (with the run's own
    model, dtype, device and seed) and keep it for the next call.
    """

    folder: Path
    """The results folder (``config.json``, ``metrics.jsonl``, ``results.json``, ``prefix.safetensors``,
    ``adapter/``)."""
    config: RunConfig
    """The configuration the run was made with (its ``config.json``)."""
    results: dict[str, Any]
    """``results.json``: the final figures (``results["final"]``), best round, traffic, privacy..."""
    _loaded: LoadedModel | None = field(default=None, repr=False)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One record per round of ``metrics.jsonl`` (round 0: before any client trained)."""
        path = self.folder / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    @property
    def prefix(self) -> Path | None:
        """The best prefix's file (``prefix.safetensors``), or None for a run that trained no shared one."""
        path = self.folder / PREFIX_FILE
        return path if path.is_file() else None

    def _finished(self) -> FinishedRun:
        return FinishedRun(self.folder, self.config, self.results)

    def _model(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = commands.load_model(self._finished())
        return self._loaded

    def evaluate(
        self,
        *,
        task: str | None = None,
        data_dir: str | Path | None = None,
        eval_limit: int | None = None,
        split: str | None = None,
    ) -> dict[str, Any]:
        """Score the best prefix, as ``fedsp eval`` does: ``{"task", "split", "n", ...}`` with fractions in
        [0, 1]. With no arguments the run's own evaluation examples (its ``results["final"]`` again);
        ``task`` / ``data_dir`` score another task or folder, ``eval_limit`` 0 every example."""
        return commands.evaluate_run(
            self._finished(),
            task=task,
            data_dir=None if data_dir is None else str(data_dir),
            eval_limit=eval_limit,
            split=split,
            progress=False,
            loaded=self._model(),
            say=False,
        )

    def generate(
        self,
        prompt: str | Row | Sequence[str | Row],
        *,
        max_new_tokens: int | None = None,
        stop: str | None = None,
        chat: bool = False,
        raw: bool = False,
        prefix: bool = True,
    ) -> str | list[str]:
        """Greedy completions with the best prefix, as ``fedsp generate`` prints them.

        ``prompt``: a text, a row in any format the run accepts (its answer left out: ``{"instruction":
        ...}``, ``{"messages": [...]}``...), or a list of them (then a list comes back). A text takes the
        run's own template (an Alpaca run's instruction, a chat run's user turn); ``raw`` continues it as
        it is, ``chat`` makes it a user turn. ``prefix=False``: the global model alone, for comparison.
        """
        single = isinstance(prompt, (str, Mapping))
        items: Sequence[str | Row] = [prompt] if isinstance(prompt, (str, Mapping)) else prompt
        rows = [
            (f"prompt {n}", {"prompt": item} if isinstance(item, str) else dict(item))
            for n, item in enumerate(items, 1)
        ]
        out = commands.generate_texts(
            self._finished(),
            rows,
            chat=chat,
            raw=raw,
            max_new_tokens=max_new_tokens,
            stop=stop,
            no_prefix=not prefix,
            loaded=self._model(),
            say=False,
        )
        texts = [completion for _, completion in out]
        return texts[0] if single else texts

    def export(self, out: str | Path, *, format: str = "peft") -> Path:
        """Write the best prefix to ``out`` (a new path): a PEFT adapter folder (``format="peft"``) that
        ``PeftModel.from_pretrained`` loads without fedsp, or one ``safetensors`` file."""
        return commands.export_run(self._finished(), out, format, loaded=self._model(), say=False)


def load_run(path: str | Path) -> Run:
    """Open a finished results folder (written by ``fedsp run`` or ``fedsp.run``)."""
    finished = open_run(path)
    return Run(finished.folder, finished.config, finished.results)


def run(config: RunConfig, *, data: Data | None = None, resume: str | Path | None = None) -> Run:
    """Run a federated course, as ``fedsp run`` does, and open its results folder.

    ``data``: your own rows, ``{"train": rows, "validation": rows, "test": rows}`` (``validation`` and
    ``test`` may be left out; ``train`` and one of them are needed), each row a mapping in one of the
    formats of ``--task custom`` (prompt/completion, messages, alpaca, multiple-choice), or a
    ``datasets.DatasetDict``. The rows are written once as JSON lines to ``data/<digest>/`` beside the
    results folder (the same rows reuse the same folder), and the run's ``config.json`` records that
    folder as its ``data_dir``, with ``task="custom"``, so ``fedsp eval`` and `Run.evaluate` read
    them again. ``resume``: a results folder to continue after its last completed round.
    """
    if not isinstance(config, RunConfig):
        raise FedSPError(f"config must be a fedsp.RunConfig, got {type(config).__name__}")
    if data is not None:
        if config.task != CUSTOM and config.task != RunConfig().task:
            raise FedSPError(f"task {config.task!r} reads its own bundled data; data= needs task 'custom'")
        if config.data_dir is not None:
            raise FedSPError("give your rows either as data= or as files in data_dir, not both")
        config = replace(config, task=CUSTOM, data_dir=str(write_rows(data, _data_root(config))))
    if config.engine == "flower":
        from fedsp.runtime.flower import simulation

        outcome = simulation.run(config, resume=None if resume is None else Path(resume))
    else:
        from fedsp.runtime import inprocess

        outcome = inprocess.run(config, resume=None if resume is None else Path(resume))
    return load_run(outcome.out_dir)


def _data_root(config: RunConfig) -> Path:
    return (Path(config.out).parent if config.out else Path("runs")) / "data"


def write_rows(data: Data, root: Path) -> Path:
    """``data``'s splits as ``<split>.jsonl`` files in ``root/<digest of their content>/`` (written once,
    atomically); the folder's absolute path."""
    if not isinstance(data, Mapping):
        raise FedSPError(f"data must map split names to rows, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPLITS))
    if unknown:
        raise FedSPError(f"data has unknown splits {unknown}; use {', '.join(SPLITS)}")
    if "train" not in data or not ({"validation", "test"} & set(data)):
        raise FedSPError(f"data needs a 'train' split and a 'validation' or 'test' one, got {sorted(data)}")
    texts: dict[str, str] = {}
    for split, rows in data.items():
        lines = []
        for n, row in enumerate(rows, 1):
            if not isinstance(row, Mapping):
                raise FedSPError(f"data[{split!r}] row {n}: expected a mapping, got {type(row).__name__}")
            try:
                lines.append(json.dumps(dict(row), ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as err:
                raise FedSPError(f"data[{split!r}] row {n}: not JSON-serialisable ({err})") from None
        if not lines:
            raise FedSPError(f"data[{split!r}] has no rows")
        texts[split] = "".join(lines)
    digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16]
    folder = (root / digest).resolve()
    if not folder.is_dir():
        staging = folder.with_name(f".{digest}.partial")
        staging.mkdir(parents=True, exist_ok=True)
        for split, text in texts.items():
            (staging / f"{split}.jsonl").write_text(text, encoding="utf-8")
        staging.replace(folder)
    return folder
