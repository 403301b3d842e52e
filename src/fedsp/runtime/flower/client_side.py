"""A data owner's side: its client rebuilt from what the server shipped, its rows, its state on disk.

The in-process engine gets clients from ``course.make_client(k)``, which holds
the global model. A Flower client must not: it builds the *skeleton* of the
global architecture (uninitialised weights, from the architecture JSON the server
sends) and hands it, with the weights the server shipped, to the method's own
``node_client`` (:data:`fedsp.methods.builders.PARTS`). FedSP and its relatives
derive the client model's structure from the skeleton
(:func:`~fedsp.methods.fedsp.client_model_from`), load the distilled auxiliary
model and make the client with the same :func:`~fedsp.methods.fedsp.make_client`
as the method's course; SFPrompt loads the head and tail
(:func:`~fedsp.methods.sfprompt.node_client`); Offsite-Tuning the emulator's
frozen part (:func:`~fedsp.methods.offsite.node_client`). Its rows come from its
own data folder (deployment) or from the same partition of the task as the
in-process engine (simulation).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from fedsp.config import RunConfig
from fedsp.data.batching import Encoded
from fedsp.data.shards import encode_training, prepare_data
from fedsp.data.sources import local_file
from fedsp.data.tasks import load_task
from fedsp.errors import FedSPError
from fedsp.methods.base import Client
from fedsp.methods.builders import node_client_for
from fedsp.models.loading import (
    DTYPES,
    TINY_MODELS,
    byte_tokenizer,
    cache_dir,
    load_global_model,
    use_attention,
)
from fedsp.models.precision import pick_attention
from fedsp.runtime.checkpoint import atomic_save


def build_client(
    config: RunConfig,
    model_config: str,
    layers: tuple[int, ...],
    shipped: dict[str, torch.Tensor],
    rows: list[Encoded],
    partition: int,
    pad_id: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Client:
    """The method's client for ``partition``, holding the ``shipped`` weights (``tokenizer``: the global
    model's, for a pruned vocabulary): made by the method's own ``node_client``
    (:data:`fedsp.methods.builders.PARTS`) from the global architecture, uninitialised."""
    node_client = node_client_for(config.method)
    if node_client is None:
        raise FedSPError(f"method {config.method!r} has no clients this node can build")
    client: Client = node_client(
        config, _skeleton(model_config, config.dtype), layers, shipped, rows, partition, pad_id, tokenizer
    )
    return client


def _skeleton(model_config: str, dtype: str) -> PreTrainedModel:
    """The global architecture with uninitialised weights (the shipped ones replace those the client holds;
    it never runs the others): allocating is all it costs, 0.02 s for SmolLM2 against 1.1 s initialised."""
    values = json.loads(model_config)
    arch = AutoConfig.for_model(values.pop("model_type"), **values)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(arch, dtype=DTYPES[dtype])
    model.tie_weights()  # (what the skipped initialisation would have done)
    use_attention(model, pick_attention("auto", dtype, "cpu"))  # Flower clients run on the CPU
    return model.eval()


@functools.lru_cache(maxsize=4)
def tokenizer_for(model: str) -> PreTrainedTokenizerBase:
    """The global model's tokenizer (a client needs it for its rows, not the weights)."""
    if model in TINY_MODELS:
        return byte_tokenizer()
    converted = cache_dir() / "smollm2-135m-instruct"
    folder = converted if model == "smollm2" and (converted / "tokenizer.json").is_file() else Path(model)
    if folder.is_dir():
        from transformers import AutoTokenizer

        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folder)
    else:  # no tokenizer files on disk: the model loader is the only way to it
        tokenizer = load_global_model(model, device="cpu").tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=2)
def _partitioned_rows(config: RunConfig) -> tuple[list[Encoded], ...]:
    return tuple(prepare_data(config, tokenizer_for(config.model)).client_rows)


def client_rows(
    config: RunConfig, partition: int, data_dir: str | None, cache: Path | None = None
) -> list[Encoded]:
    """This client's training rows: ``<data_dir>/train.jsonl`` when the node has its data, else its shard.

    With ``cache`` (a folder of the node's), the encoded rows are kept there after the first message of
    a run, keyed by the run's configuration and the data file's size and time, so a node's later messages
    (each a fresh process in deployment) read them instead of tokenising the data again.
    """
    if cache is None:
        return _encode_rows(config, partition, data_dir)
    source = local_file(Path(data_dir), "train") if data_dir else None
    stat = source.stat() if source is not None else None
    key = json.dumps(
        [config.to_dict(), partition, str(source), stat and (stat.st_size, stat.st_mtime_ns)], sort_keys=True
    )
    path = cache / f"rows-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            return list(torch.load(path, weights_only=False))
        except Exception:  # unreadable: encoded again below
            pass
    rows = _encode_rows(config, partition, data_dir)
    atomic_save(rows, path)
    return rows


def _encode_rows(config: RunConfig, partition: int, data_dir: str | None) -> list[Encoded]:
    tokenizer = tokenizer_for(config.model)
    if data_dir:
        folder = Path(data_dir)
        if local_file(folder, "train") is None:
            raise FedSPError(
                f"client data folder {data_dir!r} has no train file (.jsonl, .json, .csv, .parquet)"
            )
        examples = load_task(config.task, "train", folder, tokenizer)
        if not examples:
            raise FedSPError(f"client data file {str(folder / 'train.jsonl')!r} holds no examples")
        return encode_training(tokenizer, examples, config.max_length)
    # simulation: the same cut of the task as the in-process runner (config.progress does not matter)
    shards = _partitioned_rows(RunConfig.from_dict({**config.to_dict(), "progress": False}))
    if not 0 <= partition < len(shards):
        raise FedSPError(f"partition-id {partition} is outside 0..{len(shards) - 1}")
    return shards[partition]
