"""Exporting a trained prefix: fedsp's own prefix file, and a PEFT prefix-tuning adapter folder.

:func:`write_prefix_file` / :func:`read_prefix_file`: one safetensors file of the
prefix's trainable tensors (:meth:`Prefix.wire_state`: ``table``, or
``embedding`` + ``mlp.*`` with projection) whose string metadata holds the
caller's entries plus ``prefix_config`` (JSON: length, projection, dropout, KV
geometry), ``fedsp_version`` and ``positions`` = ``peft``. Reading it back
rebuilds the same prefix, bit for bit.

:func:`write_peft_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors``
that ``PeftModel.from_pretrained(base_model, folder)`` loads without fedsp.
PEFT 0.21.2's conventions for a causal LM's prefix (read in its sources, checked
by ``tests/test_export.py``):
  - the file holds one tensor, ``prompt_embeddings``: the (P, L*2*token_dim)
    table, here always the effective table (``prefix_projection=False``; with
    projection, the MLP's output, :func:`peft_table`);
  - ``PeftModel.get_prompt`` views it as (B, P, L*2, heads, token_dim/heads),
    permutes to (L*2, B, heads, P, head_dim) and splits it in pairs (key,
    value) per layer; with grouped-query attention PEFT sets ``token_dim`` =
    n_kv_heads * head_dim and ``heads`` = n_kv_heads. That is our table's
    layout (:class:`~fedsp.models.prefix.Prefix`), so the table is written as it is;
  - real tokens take positions P..P+T-1: PEFT leaves the positions to the
    model (GPT-2 and Llama count from the cache length, OPT from the attention
    mask that PEFT prefixes with P ones) or adds P to ``position_ids`` it is
    given, as :func:`fedsp.models.forward.real_positions` does.
The test loads each export with PEFT on tiny Llama (GQA), GPT-2 and OPT models,
with and without projection, and finds PEFT's next-token log-probabilities
equal to fedsp's forward within 1e-5.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from transformers import PretrainedConfig

from fedsp.errors import FedSPError
from fedsp.files import atomic_write
from fedsp.models.adapters import KVGeometry, kv_geometry
from fedsp.models.prefix import Prefix, PrefixConfig

POSITIONS = "peft"  # real tokens at P..P+T-1, after the prefix's P positions
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TABLE_KEY = "prompt_embeddings"
ADAPTER_DIR = "adapter"  # a PEFT adapter folder in a results folder (a prefix, or LoRA factors)
_GEOMETRY_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "hidden_size")


def fedsp_version() -> str:
    try:
        return importlib.metadata.version("fedsp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_prefix_file(path: Path, prefix: Prefix, metadata: dict[str, str]) -> None:
    """Write ``prefix``'s trainable tensors to the safetensors file ``path``, atomically.

    Metadata: ``metadata`` (e.g. the model id), then ``prefix_config``, ``fedsp_version``
    and ``positions``, which replace any caller entries of those names.
    """
    config = prefix.config
    described = {
        "num_tokens": config.num_tokens,
        "projection": config.projection,
        "projection_hidden": config.projection_hidden,
        "dropout": config.dropout,
        **{name: getattr(config.geometry, name) for name in _GEOMETRY_FIELDS},
    }
    header = {
        **metadata,
        "format": "pt",
        "prefix_config": json.dumps(described, sort_keys=True),
        "fedsp_version": fedsp_version(),
        "positions": POSITIONS,
    }
    atomic_write(Path(path), canonical_safetensors(st_save(prefix.wire_state(), metadata=header)))


def canonical_safetensors(blob: bytes) -> bytes:
    """The safetensors file ``blob`` with its header's keys sorted, so that identical tensors and metadata
    give identical bytes (safetensors writes the metadata from a hash map, whose order changes from one
    process to the next). The tensors' bytes and offsets are unchanged; readers accept any key order."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


def read_prefix_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a prefix file (the caller's entries and fedsp's own)."""
    return _open_prefix_file(Path(path))[1]


def read_prefix_file(path: Path) -> Prefix:
    """The prefix stored in ``path`` by :func:`write_prefix_file`: float32, in eval mode, on the CPU."""
    path = Path(path)
    tensors, metadata = _open_prefix_file(path)
    if metadata.get("positions") != POSITIONS:
        raise FedSPError(
            f"prefix file {str(path)!r} places real tokens at positions {metadata.get('positions')!r}; "
            f"this fedsp reads only {POSITIONS!r} (P..P+T-1)"
        )
    config = _prefix_config(path, metadata.get("prefix_config"))
    with torch.device("meta"):  # the shapes the config implies, before allocating anything it claims
        expected = {name: tuple(param.shape) for name, param in Prefix(config).named_parameters()}
    found = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if found != expected:
        raise FedSPError(
            f"prefix file {str(path)!r} does not match its prefix_config: it holds tensors {found}, "
            f"the config implies {expected}"
        )
    prefix = Prefix(config)
    try:
        prefix.load_wire_state(tensors)
    except FedSPError as err:
        raise FedSPError(f"prefix file {str(path)!r} does not match its prefix_config: {err}") from None
    return prefix.float().eval()


def _open_prefix_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FedSPError(f"prefix file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise FedSPError(f"prefix file {str(path)!r} is not a safetensors file ({reason})") from None
    return tensors, metadata


_FIELD_KINDS: dict[str, type] = {
    "num_tokens": int,
    "projection": bool,
    "projection_hidden": int,
    "dropout": float,
    **{name: int for name in _GEOMETRY_FIELDS},
}
_KIND_WORDS = {int: "a positive integer", float: "a number", bool: "true or false"}


def _is_valid(value: object, kind: type) -> bool:
    if isinstance(value, bool):  # bool is a subclass of int: true/false is no number
        return kind is bool
    if kind is int:
        return isinstance(value, int) and value >= 1
    return kind is float and isinstance(value, int | float)


def _prefix_config(path: Path, text: str | None) -> PrefixConfig:
    """The :class:`PrefixConfig` described by a file's ``prefix_config`` metadata, checked field by field."""
    where = f"prefix file {str(path)!r}"
    if text is None:
        raise FedSPError(f"{where} has no prefix_config metadata (not written by fedsp?)")
    try:
        fields: Any = json.loads(text)
    except json.JSONDecodeError:
        raise FedSPError(f"{where} has prefix_config metadata that is not JSON: {text[:100]!r}") from None
    if not isinstance(fields, dict):
        raise FedSPError(f"{where} has prefix_config metadata that is not a JSON object")
    for name, kind in _FIELD_KINDS.items():
        value = fields.get(name)
        if not _is_valid(value, kind):
            raise FedSPError(
                f"{where}: prefix_config field {name!r} is {value!r}, expected {_KIND_WORDS[kind]}"
            )
    geometry = KVGeometry(*(fields[name] for name in _GEOMETRY_FIELDS))
    try:
        return PrefixConfig(
            fields["num_tokens"],
            geometry,
            projection=fields["projection"],
            projection_hidden=fields["projection_hidden"],
            dropout=float(fields["dropout"]),
        )
    except FedSPError as err:
        raise FedSPError(f"{where}: {err}") from None


@torch.no_grad()
def peft_table(prefix: Prefix) -> torch.Tensor:
    """The effective (P, L*2*kv_dim) float32 table on the CPU, as PEFT stores it in ``prompt_embeddings``."""
    return prefix.values().detach().to("cpu", torch.float32, copy=True).contiguous()


def write_peft_adapter(
    folder: Path,
    prefix: Prefix,
    model_config: PretrainedConfig,
    base_model: str,
    overwrite: bool = False,
) -> None:
    """Write ``prefix`` as a PEFT prefix-tuning adapter of ``base_model`` into ``folder``, atomically.

    The files are written to a temporary folder beside ``folder``, then renamed into
    place. An existing non-empty ``folder`` is refused unless ``overwrite``.
    """
    folder = Path(folder)
    geometry = prefix.config.geometry
    if kv_geometry(model_config) != geometry:
        raise FedSPError(
            f"the prefix is shaped for {geometry}, the model config {kv_geometry(model_config)}: "
            "export the prefix with the model it was trained for"
        )
    check_adapter_folder(folder, overwrite)
    from peft import PrefixTuningConfig  # 1.8 s to import: only an export pays it

    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prefix.config.num_tokens,
        num_layers=geometry.num_layers,
        token_dim=geometry.kv_dim,  # PEFT's grouped-query convention: the width of one layer's key
        num_attention_heads=geometry.num_kv_heads,
        encoder_hidden_size=geometry.kv_dim,  # what PEFT fills in when it derives the config itself
        num_transformer_submodules=1,
        prefix_projection=False,
        inference_mode=True,
        base_model_name_or_path=base_model,
    )
    config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    weights = canonical_safetensors(st_save({PEFT_TABLE_KEY: peft_table(prefix)}, metadata={"format": "pt"}))
    write_adapter_folder(folder, config_json, weights)


def check_adapter_folder(folder: Path, overwrite: bool) -> None:
    """Refuse ``folder`` as a PEFT adapter's destination when it is a file, or a non-empty folder without
    ``overwrite``."""
    if folder.exists() and not folder.is_dir():
        raise FedSPError(f"cannot export a PEFT adapter to {str(folder)!r}: it is a file")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FedSPError(
            f"PEFT adapter folder {str(folder)!r} is not empty; pass overwrite=True to replace it"
        )


def write_adapter_folder(folder: Path, config_json: str, weights: bytes) -> None:
    """A PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) written to a temporary
    folder beside ``folder``, then renamed into place: a failure leaves ``folder`` as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        atomic_write(staging / PEFT_CONFIG_FILE, config_json.encode())
        atomic_write(staging / PEFT_WEIGHTS_FILE, weights)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(staging: Path, folder: Path) -> None:
    """Rename ``staging`` to ``folder``; an existing ``folder`` is moved aside first, removed after."""
    if not folder.exists() or not any(folder.iterdir()):
        os.replace(staging, folder)  # rename(2) replaces an empty folder in one step
        return
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
    os.replace(folder, aside)
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(aside, folder)  # put the old adapter back
        raise
    shutil.rmtree(aside, ignore_errors=True)
