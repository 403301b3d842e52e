"""Exported prefixes: fedsp's prefix file round trip, and PEFT adapters that PEFT runs like fedsp does."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import save_file

from fedsp.errors import FedSPError
from fedsp.models.export import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    peft_table,
    read_prefix_file,
    read_prefix_metadata,
    write_peft_adapter,
    write_prefix_file,
)
from fedsp.models.forward import hidden_states
from fedsp.models.loading import load_global_model
from fedsp.models.prefix import Prefix, prefix_for

FAMILIES = ("tiny-llama", "tiny-gpt2", "tiny-opt")
TEXTS = ["Question: what colour is the sky?\nAnswer: blue", "Q: 2+2?\nA: 4", "Hello there, world"]
P = 5


def _random_prefix(spec: str, projection: bool, seed: int = 1) -> Prefix:
    model = load_global_model(spec, seed=0, device="cpu").model
    prefix = prefix_for(model, P, projection=projection)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in prefix.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return prefix.eval()


def _batch(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The texts as one right-padded batch (B, T) with its attention mask."""
    tokenizer = load_global_model(spec, seed=0, device="cpu").tokenizer
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right"
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
@pytest.mark.parametrize("spec", FAMILIES)
def test_peft_adapter_runs_like_fedsp(spec: str, projection: bool, tmp_path: Path) -> None:
    # Prepare
    model = load_global_model(spec, seed=0, device="cpu").model
    prefix = _random_prefix(spec, projection)
    ids, mask = _batch(spec)
    folder = tmp_path / "adapter"
    # Execute
    write_peft_adapter(folder, prefix, model.config, base_model=spec)
    with torch.no_grad():
        ours = model.get_output_embeddings()(hidden_states(model, ids, mask, prefix)).log_softmax(-1)
        peft_model = PeftModel.from_pretrained(
            load_global_model(spec, seed=0, device="cpu").model, str(folder)
        )
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        # PEFT adds P to position_ids it is given: the same positions again
        given = peft_model(input_ids=ids, attention_mask=mask, position_ids=mask.cumsum(-1) - 1)
    # Assert
    real = mask.bool()
    assert sorted(p.name for p in folder.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(given.logits.log_softmax(-1)[real], ours[real], rtol=0, atol=1e-5)
    # the prefix changes the predictions, so the agreement above is not that of the bare model
    with torch.no_grad():
        bare = model.get_output_embeddings()(hidden_states(model, ids, mask)).log_softmax(-1)
    assert (bare[real] - ours[real]).abs().max() > 1e-2


@pytest.mark.parametrize("spec", FAMILIES)
def test_peft_adapter_config_is_what_peft_writes(spec: str, tmp_path: Path) -> None:
    # Prepare: PEFT's own adapter for the same model, with the fields it derives from the model config
    model = load_global_model(spec, seed=0, device="cpu").model
    base = load_global_model(spec, seed=0, device="cpu").model
    base.name_or_path = spec  # PEFT names the base model after this attribute
    native = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    native.save_pretrained(str(tmp_path / "native"))
    # Execute
    write_peft_adapter(tmp_path / "ours", _random_prefix(spec, projection=True), model.config, spec)
    # Assert
    ours = json.loads((tmp_path / "ours" / PEFT_CONFIG_FILE).read_text())
    expected = json.loads((tmp_path / "native" / PEFT_CONFIG_FILE).read_text())
    assert ours == expected
    assert ours["prefix_projection"] is False and ours["inference_mode"] is True


def test_peft_table_is_the_effective_table_in_peft_layout() -> None:
    # Prepare: tiny-llama has 4 query heads and 2 key/value heads (grouped-query attention)
    prefix = _random_prefix("tiny-llama", projection=True)
    g = prefix.config.geometry
    assert (g.num_kv_heads, g.head_dim, g.num_layers) == (2, 16, 4)
    # Execute
    table = peft_table(prefix)
    # PEFT's get_prompt: view (B, P, L*2, heads, head_dim), permute (2, 0, 3, 1, 4), split in pairs
    peft_kv = table.unsqueeze(0).view(1, P, g.num_layers * 2, g.num_kv_heads, g.head_dim)
    peft_layers = peft_kv.permute([2, 0, 3, 1, 4]).split(2)
    # Assert
    assert table.dtype == torch.float32 and not table.requires_grad
    assert torch.equal(table, prefix.values().detach())
    for (key, value), peft_pair in zip(prefix.key_values(1), peft_layers, strict=True):
        assert torch.equal(peft_pair[0], key) and torch.equal(peft_pair[1], value)


def test_peft_adapter_folder_is_refused_unless_overwrite(tmp_path: Path) -> None:
    # Prepare
    model = load_global_model("tiny-gpt2", seed=0, device="cpu").model
    prefix = _random_prefix("tiny-gpt2", projection=False)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    # Execute / Assert
    with pytest.raises(FedSPError, match="not empty"):
        write_peft_adapter(folder, prefix, model.config, "tiny-gpt2")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    write_peft_adapter(folder, prefix, model.config, "tiny-gpt2", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left
    llama = load_global_model("tiny-llama", seed=0, device="cpu").model
    with pytest.raises(FedSPError, match="shaped for"):
        write_peft_adapter(tmp_path / "other", prefix, llama.config, "tiny-llama")


@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_prefix_file_round_trip_is_exact(projection: bool, tmp_path: Path) -> None:
    # Prepare
    prefix = _random_prefix("tiny-llama", projection).train()
    path = tmp_path / "prefix.safetensors"
    # Execute
    write_prefix_file(path, prefix, {"model": "tiny-llama", "positions": "caller's"})
    loaded = read_prefix_file(path)
    # Assert
    assert loaded.config == prefix.config and not loaded.training
    assert set(loaded.wire_state()) == set(prefix.wire_state())
    for name, tensor in prefix.wire_state().items():
        assert (
            torch.equal(loaded.wire_state()[name], tensor)
            and loaded.wire_state()[name].dtype == torch.float32
        )
    metadata = read_prefix_metadata(path)
    assert metadata["model"] == "tiny-llama" and metadata["positions"] == "peft"
    assert json.loads(metadata["prefix_config"])["num_kv_heads"] == 2
    assert metadata["fedsp_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["prefix.safetensors"]


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object] | str | None) -> Path:
    metadata = {"positions": "peft"}
    if config is not None:
        metadata["prefix_config"] = config if isinstance(config, str) else json.dumps(config)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _good_config() -> dict[str, object]:
    return {
        "num_tokens": P,
        "projection": False,
        "projection_hidden": 512,
        "dropout": 0.1,
        "num_layers": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "hidden_size": 64,
    }


TABLE = {"table": torch.zeros(P, 4 * 2 * 32)}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("text", "not a safetensors file"),
        ("truncated", "not a safetensors file"),
        ("no_config", "no prefix_config"),
        ("not_json", "not JSON"),
        ("not_object", "not a JSON object"),
        ("huge", "does not match its prefix_config"),
        ("bad_field", "'num_layers' is 'four'"),
        ("missing_field", "'head_dim' is None"),
        ("bad_value", "prefix dropout must be in"),
        ("positions", "places real tokens at positions 'zero'"),
        ("names", "does not match its prefix_config"),
        ("shapes", "does not match its prefix_config"),
        ("nan", "NaN"),
    ],
)
def test_bad_prefix_files_are_refused(case: str, message: str, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "prefix.safetensors"
    config = _good_config()
    if case == "text":
        path.write_text("not tensors")
    elif case == "truncated":
        _write(path, TABLE, config)
        path.write_bytes(path.read_bytes()[:100])
    elif case == "no_config":
        _write(path, TABLE, None)
    elif case == "not_json":
        _write(path, TABLE, "{num_tokens: 5")
    elif case == "not_object":
        _write(path, TABLE, "[5]")
    elif case == "huge":  # a config that would need terabytes, over a small table: refused before allocating
        _write(path, TABLE, {**config, "num_tokens": 10**9, "num_layers": 10**6})
    elif case in ("bad_field", "missing_field", "bad_value"):
        changes = {"bad_field": ("num_layers", "four"), "missing_field": ("head_dim", None)}
        name, value = changes.get(case, ("dropout", 1.5))
        config[name] = value
        _write(path, TABLE, config)
    elif case == "positions":
        save_file(TABLE, str(path), metadata={"positions": "zero", "prefix_config": json.dumps(config)})
    elif case == "names":
        _write(path, {"embedding": TABLE["table"]}, config)
    elif case == "shapes":
        _write(path, {"table": torch.zeros(P, 7)}, config)
    elif case == "nan":
        _write(path, {"table": torch.full_like(TABLE["table"], float("nan"))}, config)
    # Execute / Assert
    with pytest.raises(FedSPError, match=message) as caught:
        read_prefix_file(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_header_length_bomb_is_refused(tmp_path: Path) -> None:
    # Prepare: a header length far beyond the file's size
    path = tmp_path / "prefix.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    # Execute / Assert
    with pytest.raises(FedSPError, match="not a safetensors file"):
        read_prefix_file(path)
