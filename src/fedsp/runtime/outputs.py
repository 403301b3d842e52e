"""What a finished run leaves for use outside a run: its best prefix, and reading a finished run back.

Every run that trains a prefix writes, beside ``results.json``:

* ``prefix.safetensors``: the best prefix's trainable tensors, with the
  model, task, method, best round, prefix configuration and fedsp version in
  its metadata (:func:`fedsp.models.export.write_prefix_file`);
* ``adapter/``: a PEFT prefix-tuning adapter that
  ``PeftModel.from_pretrained(base_model, "RUN/adapter")`` loads with no
  fedsp installed (:func:`fedsp.models.export.write_peft_adapter`).

``fedsp eval``, ``fedsp generate`` and ``fedsp export`` open a finished run
with :func:`open_run` and take its prefix with :func:`run_prefix`. A run made
before this file was written has no ``prefix.safetensors``: its best prefix is
read from ``checkpoint.pt``. A checkpoint without the ``positions`` mark was
written when fedsp placed real tokens at positions 0..T-1 after the prefix
(today: P..P+T-1, PEFT's convention); on rotary models that prefix's keys are
turned by P positions, which gives the same attention scores under today's
convention (:func:`shift_rotary_keys`); on models with absolute positions
there is no such conversion and the export is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedsp.config import RunConfig, load_config_file
from fedsp.errors import FedSPError
from fedsp.methods.base import TunesModelWeights
from fedsp.models import export
from fedsp.models.adapters import adapter_for, kv_geometry, model_device
from fedsp.models.export import ADAPTER_DIR
from fedsp.models.layer_export import load_layer_weights, load_peft_lora
from fedsp.models.loading import TINY_MODELS, LoadedModel, load_global_model
from fedsp.models.prefix import Prefix, prefix_for
from fedsp.runtime.checkpoint import CHECKPOINT, POSITIONS

PREFIX_FILE = "prefix.safetensors"
BASE_DIR = "base-model"  # a tiny model saved for PEFT (it cannot be downloaded)
# the Hugging Face id of a bundled model, written into the adapter's base_model_name_or_path
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
QUESTIONS_FILE = "questions.json"  # each evaluated question's score, zero-shot and final (paired comparisons)
NOTHING_TRAINED = "nothing trained"  # results.json's export.why of a run that trained nothing (zero-shot)


def base_model_id(model: str) -> str:
    return HUB_IDS.get(model, model)


def adapter_base(out_dir: Path, config: RunConfig, loaded: LoadedModel, as_built: bool = False) -> str:
    """The base model an adapter of this run names: the model's Hugging Face id; for a tiny model (built
    from a config, no one can download it) the absolute path of ``base-model/`` in ``out_dir``, where it
    is saved once so that PEFT can load it offline. ``as_built``: save the model as built from the run's
    seed, not ``loaded`` (whose layers a run may have tuned in place)."""
    if config.model not in TINY_MODELS:
        return base_model_id(config.model)
    folder = (Path(out_dir) / BASE_DIR).resolve()
    if not (folder / "config.json").is_file():
        model = load_global_model(config.model, config.dtype, config.seed, "cpu") if as_built else loaded
        model.model.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
    return str(folder)


def write_run_outputs(
    out_dir: Path, prefix: Prefix, loaded: LoadedModel, config: RunConfig, best_round: int
) -> dict[str, Any]:
    """Write ``prefix.safetensors`` and ``adapter/`` into a results folder; what results.json records.

    A tiny model's adapter names the model saved beside it (``base-model/``) as its base."""
    base = adapter_base(out_dir, config, loaded)
    export.write_prefix_file(out_dir / PREFIX_FILE, prefix, prefix_metadata(config, best_round))
    export.write_peft_adapter(out_dir / ADAPTER_DIR, prefix, loaded.model.config, base, overwrite=True)
    return {"prefix": PREFIX_FILE, "adapter": ADAPTER_DIR, "base_model": base, "best_round": best_round}


def write_run_weights(
    out_dir: Path, server: TunesModelWeights, loaded: LoadedModel, config: RunConfig, best_round: int
) -> dict[str, Any]:
    """Write the best tuned weights of a method that tunes the global model's own layers (no prefix) into
    a results folder; what results.json records."""
    base = adapter_base(out_dir, config, loaded, as_built=True)  # the run's model holds the tuned layers
    written = server.write_weights(out_dir, base, prefix_metadata(config, best_round))
    why = f"--method {config.method} tunes the global model's own layers, not a prefix"
    return {"prefix": None, "why": why, **written, "base_model": base, "best_round": best_round}


def run_weights_kind(run: FinishedRun) -> str | None:
    """``layers`` or ``adapter`` (LoRA) when the run tuned the global model's own layers; None when it
    tuned a prefix or nothing."""
    exported = run.results.get("export") or {}
    if exported.get("layers"):
        return "layers"
    if exported.get("adapter") and exported.get("prefix") is None:
        return "adapter"
    return None


def run_weights(run: FinishedRun, model: PreTrainedModel) -> str | None:
    """Put the run's tuned weights into ``model`` (in place) when the run tuned the global model's own
    layers: the layers file, or the LoRA adapter; where they came from, for the user (None: the run tuned
    a prefix, or nothing)."""
    kind, exported = run_weights_kind(run), run.results.get("export") or {}
    if kind is None:
        return None
    path = run.folder / exported[kind]
    (load_layer_weights if kind == "layers" else load_peft_lora)(path, model)
    return (
        f"{path} ({'whole layers' if kind == 'layers' else 'LoRA'}, best round {exported.get('best_round')})"
    )


def prefix_metadata(config: RunConfig, best_round: int) -> dict[str, str]:
    """What ``prefix.safetensors`` records of the run its prefix comes from."""
    return {
        "model": config.model,
        "base_model": base_model_id(config.model),
        "task": config.task,
        "method": config.method,
        "best_round": str(best_round),
        "dtype": config.dtype,
    }


@dataclass(frozen=True)
class FinishedRun:
    folder: Path
    config: RunConfig
    results: dict[str, Any]


def open_run(folder: str | Path) -> FinishedRun:
    """A finished results folder (``config.json`` and ``results.json``), or a one-line error naming it."""
    path = Path(folder)
    if not path.is_dir():
        raise FedSPError(f"{str(path)!r} is not a results folder (no such directory)")
    for name in ("config.json", "results.json"):
        if not (path / name).is_file():
            what = "an unfinished run" if (path / "config.json").is_file() else "not a results folder"
            raise FedSPError(f"{str(path)!r} is {what}: it has no {name}")
    config = RunConfig.from_dict(load_config_file(path / "config.json"), strict=False, source=str(path))
    results = load_config_file(path / "results.json")
    return FinishedRun(path, config, results)


def run_prefix(run: FinishedRun, model: PreTrainedModel) -> tuple[Prefix | None, str]:
    """The run's best prefix on ``model``'s device (None for a run that trained none), and where it came
    from, for the user."""
    path = run.folder / PREFIX_FILE
    if path.is_file():
        prefix = export.read_prefix_file(path)
        if prefix.config.geometry != kv_geometry(model.config):
            raise FedSPError(f"{path} holds a prefix for another model than {run.config.model!r}")
        return prefix.follow(
            model
        ), f"{path} (best round {export.read_prefix_metadata(path).get('best_round')})"
    exported = run.results.get("export") or {}
    if "export" in run.results and exported.get("prefix") is None:
        return None, f"no prefix: {exported.get('why', 'the run trained none')}"
    return _prefix_from_checkpoint(run, model)


def _prefix_from_checkpoint(run: FinishedRun, model: PreTrainedModel) -> tuple[Prefix | None, str]:
    """An older run's best prefix, from its checkpoint, moved to today's position convention."""
    path = run.folder / CHECKPOINT
    if not path.is_file():
        raise FedSPError(f"{str(run.folder)!r} has neither {PREFIX_FILE} nor {CHECKPOINT}: no prefix to use")
    try:
        saved = torch.load(path, weights_only=False, map_location="cpu")
        best = saved["server"]["best_state"]
    except Exception as err:  # a truncated or foreign file
        raise FedSPError(f"{path} cannot be read ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(best, dict) or not ({"table"} <= set(best) or {"embedding"} <= set(best)):
        return None, f"no prefix: --method {run.config.method} trains none"
    c = run.config
    old = prefix_for(model, c.prefix_len, projection="embedding" in best, dropout=c.prefix_dropout)
    old.load_wire_state(best)
    if saved.get("positions") == POSITIONS:  # today's convention, only the prefix file is missing
        return old.eval(), f"{path} (best prefix)"
    if adapter_for(model.config).positions is not None:
        raise FedSPError(
            f"{path}: this run was made by an older fedsp that placed the input at positions 0..T-1 after "
            f"the prefix; on {model.config.model_type} (absolute positions) that prefix has no exact form "
            "under PEFT's convention. Re-run it with this version"
        )
    prefix = prefix_for(model, c.prefix_len, projection=False, dropout=c.prefix_dropout)
    with torch.no_grad():
        prefix.table.copy_(shift_rotary_keys(old.values().detach(), prefix, model, c.prefix_len))
    return prefix.eval(), f"{path} (an older run: best prefix moved to PEFT's positions)"


@torch.no_grad()
def shift_rotary_keys(table: torch.Tensor, prefix: Prefix, model: PreTrainedModel, by: int) -> torch.Tensor:
    """A rotary model's prefix table with every key turned forward by ``by`` positions (values unchanged).

    Under the older convention real token t sat at position t; under today's at P + t. A key turned by
    P gives the same query-key products: R(P + t)q . R(P)k = R(t)q . k (``by`` = -P turns back).
    """
    g = prefix.config.geometry
    P = prefix.config.num_tokens
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None:
        raise FedSPError(f"{model.config.model_type} has no rotary embedding to turn the prefix's keys with")
    kv = table.float().cpu().view(P, g.num_layers, 2, g.num_kv_heads, g.head_dim).clone()
    keys = kv[:, :, 0]  # (P, L, n_kv, hd)
    probe = torch.zeros(1, 1, g.head_dim, device=model_device(model))
    cos, sin = rotary(probe, torch.tensor([[by]], device=probe.device))  # (1, 1, hd) each
    cos, sin = (t.float().cpu().view(g.head_dim) for t in (cos, sin))
    half = g.head_dim // 2
    turned = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)  # rotate_half
    kv[:, :, 0] = keys * cos + turned * sin
    return kv.view(P, -1)
