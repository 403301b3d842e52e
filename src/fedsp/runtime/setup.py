"""Building the parties of a run from its configuration: data shards, prefix, auxiliary model.

Shared by every runtime (in-process today, Flower later), so that all of them
start from identical shards, prefix and distilled auxiliary model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedsp.config import RunConfig
from fedsp.data.batching import Encoded, encode_gold
from fedsp.data.partition import partition_dirichlet, partition_iid
from fedsp.data.tasks import MCExample, eval_split, load_task, task_splits
from fedsp.errors import FedSPError
from fedsp.methods import kd
from fedsp.models.auxiliary import build_auxiliary_model, select_layers
from fedsp.models.loading import LoadedModel, cache_dir
from fedsp.models.prefix import Prefix, init_prefix_from_tokens, prefix_for


@dataclass
class RunData:
    server_rows: list[Encoded]
    client_rows: list[list[Encoded]]
    val_rows: list[Encoded]
    eval_examples: list[MCExample]
    eval_split: str


def prepare_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> RunData:
    """Train split -> K+1 shards (shard 0 the server's); validation rows; the fixed evaluation examples."""
    train = load_task(config.task, "train", config.data_dir)
    num_shards = config.clients + 1
    if len(train) < num_shards:
        raise FedSPError(
            f"task {config.task!r} has {len(train)} training examples, fewer than {num_shards} shards"
        )
    if config.partition == "iid":
        shards = partition_iid(len(train), num_shards, config.data_seed)
    else:
        shards = partition_dirichlet([ex.gold for ex in train], num_shards, config.alpha, config.data_seed)
    encoded = [encode_gold(tokenizer, ex, config.max_length) for ex in train]
    split = eval_split(config.task, config.data_dir)
    eval_examples = load_task(config.task, split, config.data_dir)
    val_source = "validation" if "validation" in task_splits(config.task, config.data_dir) else split
    val_examples = load_task(config.task, val_source, config.data_dir)
    if split == "validation":  # no labelled test split: keep the evaluated examples out of validation
        val_examples = val_examples[config.eval_limit or len(val_examples) :] or val_examples
    val_examples = val_examples[: config.val_limit] if config.val_limit else val_examples
    return RunData(
        server_rows=[encoded[i] for i in shards[0]],
        client_rows=[[encoded[i] for i in shard] for shard in shards[1:]],
        val_rows=[encode_gold(tokenizer, ex, config.max_length) for ex in val_examples],
        eval_examples=eval_examples[: config.eval_limit] if config.eval_limit else eval_examples,
        eval_split=split,
    )


def initial_prefix(config: RunConfig, loaded: LoadedModel, server_rows: list[Encoded]) -> Prefix:
    """The round-0 prefix, made by the server from its global model."""
    prefix = prefix_for(loaded.model, config.prefix_len, config.prefix_projection, config.prefix_dropout)
    if config.prefix_init == "random":
        with torch.no_grad():
            target = prefix.embedding if config.prefix_projection else prefix.table
            target.normal_(0.0, 1.0)
        return prefix
    tokens = demonstration_tokens(server_rows, config.prefix_len, loaded.tokenizer)
    init_prefix_from_tokens(prefix, loaded.model, torch.tensor(tokens))
    return prefix


def demonstration_tokens(rows: list[Encoded], length: int, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Exactly ``length`` tokens of whole training examples (context + answer), each followed by a blank line.

    Examples are taken in shard order while they fit; the rest is left-filled
    with newline tokens. If not even the first example fits, its last ``length`` tokens.
    """
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    filler = tokenizer("\n", add_special_tokens=False)["input_ids"] or separator
    tokens: list[int] = []
    for row in rows:
        if len(tokens) + len(row.ids) + len(separator) > length:
            break
        tokens += list(row.ids) + separator
    if not tokens:
        return (
            list(rows[0].ids)[-length:]
            if len(rows[0].ids) >= length
            else (filler * length + list(rows[0].ids))[-length:]
        )
    return (filler * length + tokens)[-length:]


def distilled_auxiliary_model(
    config: RunConfig,
    loaded: LoadedModel,
    server_rows: list[Encoded],
    share: bool = True,
    kd_steps: int | None = None,
    layers: list[int] | None = None,
):
    """Build the auxiliary model and run (or reuse from the cache) its KD initialisation.

    ``share=False`` keeps the selected layers unshared (one pass each); ``kd_steps``
    overrides the configuration (0: the raw layers); ``layers`` overrides the layer choice.
    Returns (aux_model, selected_layers, kd_losses); ``kd_losses`` is empty when the cache was used.
    """
    num_layers = loaded.model.config.num_hidden_layers
    selected = layers or select_layers(num_layers, config.aux_layers, config.aux_layer_choice)
    aux = build_auxiliary_model(loaded.model, selected, share=share)
    steps = config.kd_steps if kd_steps is None else kd_steps
    if steps == 0:
        return aux, selected, []
    kd_config = kd.KDConfig(steps, config.kd_lr, config.weight_decay, config.warmup_ratio,
                            config.kd_batch_size, config.kd_projection)  # fmt: skip
    model_config = {**loaded.model.config.to_dict(), "weights_dtype": str(loaded.model.dtype)}
    key = kd.cache_key(loaded.name, model_config, selected, share, kd_config, server_rows, config.seed)
    path = cache_dir() / "aux" / f"{key}.safetensors"
    if path.is_file():
        kd.load_student(aux, path)
        return aux, selected, []
    losses = kd.distill(loaded.model, aux, server_rows, kd_config, loaded.tokenizer.pad_token_id, config.seed,
                        progress=config.progress)  # fmt: skip
    kd.save_student(aux, path)
    return aux, selected, losses
