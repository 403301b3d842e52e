"""Scoring a model (with a prefix or without) on a run's evaluation examples, whatever their kind.

Multiple-choice examples are scored by log-likelihood
(:mod:`fedsp.evaluation.multiple_choice`: ``acc``, ``acc_norm``); generative
ones by greedy generation (:mod:`fedsp.evaluation.generative`:
``exact_match``, ``f1``, ``rouge_l``, and the completions' ``loss`` and
``perplexity``). :func:`headline` names the one figure a run is judged by.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsp.data.tasks import Example, GenExample, MCExample, is_generative
from fedsp.evaluation.generative import GenResult, evaluate_generative
from fedsp.evaluation.multiple_choice import MCResult, evaluate_multiple_choice
from fedsp.models.prefix import Prefix

EvalResult = MCResult | GenResult
# what a summary table shows of a result, and how (x 100)
METRIC_COLUMNS = {"acc": "acc", "acc_norm": "acc_norm", "exact_match": "EM", "f1": "F1", "rouge_l": "ROUGE-L"}


def evaluate_examples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    prefix: Prefix | None,
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    stop: tuple[str, ...],
    desc: str = "eval",
    progress: bool = True,
) -> EvalResult:
    """Score ``examples`` (all of one kind) with the model and the prefix."""
    if is_generative(examples):
        return evaluate_generative(
            model,
            tokenizer,
            [ex for ex in examples if isinstance(ex, GenExample)],
            prefix,
            max_new_tokens=max_new_tokens,
            stop=stop,
            batch_size=max(1, batch_size // 8),  # sequences that grow token by token: fewer at a time
            max_length=max_length,
            progress=progress,
            desc=desc,
        )
    return evaluate_multiple_choice(
        model,
        tokenizer,
        [ex for ex in examples if isinstance(ex, MCExample)],
        prefix,
        batch_size,
        max_length,
        desc=desc,
        progress=progress,
    )


def headline(summary: Mapping[str, Any]) -> tuple[str, float]:
    """The figure a result is judged by: ``acc`` (multiple choice) or ``f1`` (generative)."""
    name = "acc" if "acc" in summary else "f1"
    return name, float(summary[name])


def metric_figures(summary: Mapping[str, Any]) -> dict[str, float]:
    """The per-round figures of a result (what metrics.jsonl records): everything but the count; a
    generative result's completion loss and perplexity as ``eval_loss`` / ``eval_perplexity``."""
    renamed = {"loss": "eval_loss", "perplexity": "eval_perplexity"}
    return {renamed.get(k, k): float(v) for k, v in summary.items() if k != "n"}


def describe(summary: Mapping[str, Any]) -> str:
    """``acc 52.0  acc_norm 50.5`` or ``EM 31.0  F1 45.2  ROUGE-L 44.9``."""
    return "  ".join(f"{label} {100 * summary[k]:.1f}" for k, label in METRIC_COLUMNS.items() if k in summary)
