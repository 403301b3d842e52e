"""What a run holds on the server side between its rounds, shared by its life
(:mod:`fedsp.runtime.session`), its checkpoint (:mod:`fedsp.runtime.checkpoint`) and its results
writer (:mod:`fedsp.runtime.report`); and how the run scores a model on its evaluation questions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsp.config import RunConfig
from fedsp.data.shards import RunData, generation_stop
from fedsp.data.tasks import MCExample
from fedsp.evaluation import EvalResult, evaluate_examples
from fedsp.evaluation.multiple_choice import MCResult
from fedsp.methods.base import Course
from fedsp.methods.table import MethodSpec
from fedsp.models.loading import LoadedModel
from fedsp.runtime import results
from fedsp.runtime.audit import Audit
from fedsp.runtime.privacy import Aggregator


@dataclass
class RunState:
    config: RunConfig
    spec: MethodSpec
    out_dir: Path
    loaded: LoadedModel
    data: RunData
    zero_shot: EvalResult | None
    course: Course | None  # None for methods that train nothing
    started: float
    history: list[dict[str, Any]] = field(default_factory=list)
    last_eval: EvalResult | None = None
    once_bytes: int = 0
    ignored: dict[str, Any] = field(default_factory=dict)
    first_round: int = 1  # > 1 when resumed
    audit: Audit | None = None
    runtime_state: dict[str, Any] = field(default_factory=dict)  # what a runtime checkpoints with the server
    lock: results.RunLock | None = None  # held while this process runs in out_dir
    created: bool = False  # out_dir was made by this session (removed if the run fails before round 1)
    aggregator: Aggregator | None = None  # the round's aggregate: rule or DP, adaptive clip, accountant
    # held while a round is recorded; a stopped run's clean-up takes it, then sets ``closed``
    recording: threading.Lock = field(default_factory=threading.Lock, repr=False)
    closed: bool = False
    final_scores: list[float] | None = None  # per evaluated question, the final result's (questions.json)

    def say(self, text: str) -> None:
        if self.config.progress:
            print(text)

    def evaluate(self, model, prefix, desc: str) -> EvalResult:
        c = self.config
        return evaluate_examples(
            model,
            self.loaded.tokenizer,
            self.data.eval_examples,
            prefix,
            batch_size=c.eval_batch_size,
            max_length=c.max_length,
            max_new_tokens=c.max_new_tokens,
            stop=generation_stop(c),
            desc=desc,
            progress=c.progress,
        )

    def question_scores(self, result: EvalResult) -> list[float] | None:
        """Per evaluated question, 1.0 when the prediction is right and 0.0 when not (multiple choice;
        None for generated answers, which have no single right choice)."""
        if not isinstance(result, MCResult):
            return None
        golds = [ex.gold for ex in self.data.eval_examples if isinstance(ex, MCExample)]
        return [float(p == g) for p, g in zip(result.predictions, golds, strict=True)]
