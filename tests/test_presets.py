"""The grid's presets: the paper scale follows the reference scripts task by task, and no preset cuts an
evaluated context."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsp.data.shards import truncation_counts
from fedsp.data.tasks import eval_split, load_task
from fedsp.experiments.grid import SCALES, TASKS, Cell


def _config(scale: str, task: str, method: str = "fedsp"):
    return Cell(method, task, 0).config({**SCALES[scale], "model": "smollm2"}, Path("out"))


def test_the_paper_scale_uses_the_reference_scripts_settings_per_task():
    hellaswag, arc_easy, sciq = (_config("paper", t) for t in ("hellaswag", "arc_easy", "sciq"))
    # one learning rate for both client phases, as in the reference scripts
    assert (hellaswag.lr, hellaswag.align_lr) == (1e-4, 1e-4) and (arc_easy.lr, arc_easy.align_lr) == (
        5e-4,
        5e-4,
    )
    assert (hellaswag.rounds, hellaswag.local_steps) == (200, 20)
    assert (arc_easy.rounds, arc_easy.local_steps) == (20, 10)
    assert (_config("paper", "arc_challenge").rounds, _config("paper", "piqa").local_steps) == (100, 10)
    # the prefix MLP where the paper has it
    assert hellaswag.prefix_projection and sciq.prefix_projection and not arc_easy.prefix_projection
    assert arc_easy.eval_limit is None and arc_easy.max_length == 1024 and arc_easy.batch_size == 16
    # a cell's own override still wins over the preset's task settings
    cell = Cell("fedsp", "hellaswag", 0, (("lr", 3e-4),))
    assert cell.config({**SCALES["paper"], "model": "smollm2"}, Path("out")).lr == 3e-4


@pytest.mark.slow
@pytest.mark.parametrize("scale", sorted(SCALES))
def test_no_preset_cuts_an_evaluated_context_on_smollm2(scale):
    from fedsp.models.loading import load_global_model

    tokenizer = load_global_model("smollm2").tokenizer
    for task in TASKS:
        config = _config(scale, task)
        split = eval_split(task, None)
        examples = load_task(task, split, None, tokenizer)
        examples = examples[: config.eval_limit] if config.eval_limit else examples
        counts = truncation_counts(tokenizer, [], examples, config.max_length)
        assert counts["eval_contexts_cut"] == 0, (scale, task, config.max_length)
