"""``--aux-embedding pruned:V``: a client model that keeps V tokens, every client text still written."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fedsp import wire
from fedsp.config import RunConfig, parse_embedding
from fedsp.data.batching import Encoded
from fedsp.data.shards import prepare_data
from fedsp.errors import FedSPError
from fedsp.methods.builders import build_course
from fedsp.models.auxiliary import build_auxiliary_model
from fedsp.models.loading import LoadedModel, byte_tokenizer, load_global_model
from fedsp.models.vocabulary import PrunedVocabulary, choose_vocabulary, prune_embedding
from fedsp.runtime.flower.client_side import build_client

CORPUS = [
    "Which of these is a source of energy for plants? The sun gives light.",
    "def add(a, b):\n    return a + b  # a small function\n",
    "Water freezes at zero degrees Celsius and boils at one hundred.",
    "The students measured the mass of the rock with a balance.",
    "for i in range(10): print(i ** 2)",
] * 20
STRINGS = [
    "",
    " ",
    "Photosynthesis makes sugar from light.",
    "naïve café, Ünïcödé — “quotes” ‘and’ dashes…",
    "emoji: 🌍🔥👩‍👩‍👧‍👦 🇫🇷 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "中文、日本語、한국어 and العربية",
    'if x != None:\n\treturn {"key": [1, 2.5e-3]}  # \\n stays\r\n',
    "   leading and trailing spaces   ",
    "\x00\x01 control \x7f bytes",
]


def _random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [
        [chr(c) for c in range(32, 127)],
        [chr(c) for c in range(0xA0, 0x2FF)],
        ["🙂", "🚀", "👍🏽", "\u200d", "\n", "\t", "中", "Ω", "€"],
    ]
    out = []
    for _ in range(count):
        pool = [c for p in rng.sample(pools, k=rng.randint(1, 3)) for c in p]
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
    return out


def bpe_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on a few lines (no download)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def bpe() -> LoadedModel:
    """A tiny Llama over the BPE tokenizer (tied embeddings)."""
    tokenizer = bpe_tokenizer()
    config = copy.deepcopy(load_global_model("tiny-llama", seed=0).model.config)  # tiny-llama's shape
    config.vocab_size = len(tokenizer)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, "tiny-llama-bpe")


def _rows(tokenizer, texts) -> list[Encoded]:
    return [Encoded(tuple(tokenizer(t, add_special_tokens=False).input_ids), 1) for t in texts if t]


def _round_trips(tokenizer, vocabulary: PrunedVocabulary, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    client = vocabulary.client_ids(ids)
    assert all(0 <= c < len(vocabulary) for c in client)
    back = [vocabulary.kept[c] for c in client]
    decoded = tokenizer.decode(back, clean_up_tokenization_spaces=False)
    assert decoded == tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text, repr(text)


@pytest.mark.parametrize("size", [257, 300, 380])
def test_every_text_is_written_in_the_kept_tokens_and_decodes_back(bpe, size):
    # Prepare: a vocabulary of `size` ids chosen from a few rows (bytes + <eos> are 257)
    vocabulary = choose_vocabulary(bpe.tokenizer, _rows(bpe.tokenizer, CORPUS[:3]), size, len(bpe.tokenizer))
    assert len(vocabulary) == size
    # Assert: random strings (mixed scripts, emoji, joiners), code and hand-picked ones round-trip exactly
    for text in STRINGS + _random_strings(300) + CORPUS[:5]:
        _round_trips(bpe.tokenizer, vocabulary, text)


@pytest.mark.slow
def test_smollm2s_tokenizer_round_trips_through_a_pruned_vocabulary():
    # Prepare: SmolLM2's tokenizer (49,152 tokens), 4,096 kept from a few lines
    from fedsp.runtime.flower.client_side import tokenizer_for

    tokenizer = tokenizer_for("smollm2")
    vocabulary = choose_vocabulary(tokenizer, _rows(tokenizer, CORPUS[:5]), 4096, 49152)
    rewritten = vocabulary.out_of_vocabulary(_rows(tokenizer, STRINGS + _random_strings(100, seed=1)))
    # Assert: exact round trips, and the rate of rewritten tokens is a fraction
    for text in STRINGS + _random_strings(300, seed=1):
        _round_trips(tokenizer, vocabulary, text)
    assert 0 < rewritten < 1


def test_the_vocabulary_keeps_bytes_specials_the_servers_tokens_then_early_merges(bpe):
    # Prepare: one line the server holds
    rows = _rows(bpe.tokenizer, ["def add(a, b):"])
    # Act
    vocabulary = choose_vocabulary(bpe.tokenizer, rows, 300, len(bpe.tokenizer))
    # Assert: every byte and <eos>, every token of the server's row, then the lowest-ranked merges
    kept = set(vocabulary.kept)
    byte_ids = {bpe.tokenizer.convert_tokens_to_ids(c) for c in pre_tokenizers.ByteLevel.alphabet()}
    assert byte_ids <= kept and bpe.tokenizer.eos_token_id in kept
    assert set(rows[0].ids) <= kept
    assert len(kept - byte_ids - {bpe.tokenizer.eos_token_id} - set(rows[0].ids)) == 300 - 257 - len(
        set(rows[0].ids) - byte_ids
    )
    # Assert: the rate of rewritten tokens of a row is computed, and a kept row is unchanged but for ids
    assert vocabulary.out_of_vocabulary(rows) == 0
    assert 0 < vocabulary.out_of_vocabulary(_rows(bpe.tokenizer, ["The sun gives light to water."])) < 1


def test_a_rewritten_answer_token_stays_an_answer_token(bpe):
    # Prepare: only the bytes and <eos> kept: every merged token is rewritten into bytes
    vocabulary = choose_vocabulary(bpe.tokenizer, [], 257, len(bpe.tokenizer))
    context, answer = "Water freezes", " at zero"
    ids = bpe.tokenizer(context + answer, add_special_tokens=False).input_ids
    answer_ids = bpe.tokenizer(answer, add_special_tokens=False).input_ids
    row = Encoded(tuple(ids), len(answer_ids))
    # Act
    written = vocabulary.encode_row(row)
    # Assert: one client token per byte, and the answer is the bytes of " at zero"
    assert len(written.ids) == len((context + answer).encode())
    assert written.num_answer == len(answer.encode())
    tail = [vocabulary.kept[c] for c in written.ids[-written.num_answer :]]
    assert bpe.tokenizer.decode(tail) == answer


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_the_pruned_model_gives_the_kept_columns_of_the_full_models_logits(name):
    # Prepare: an auxiliary model and a third of its vocabulary kept (tied and untied heads)
    loaded = load_global_model(name, seed=0, device="cpu")
    aux = build_auxiliary_model(loaded.model, [0]).eval()
    kept = sorted(random.Random(0).sample(range(257), 90))
    small = prune_embedding(copy.deepcopy(aux), kept).eval()
    ids = torch.tensor([kept[3:20], kept[40:57]])
    position = {k: i for i, k in enumerate(kept)}
    client_ids = torch.tensor([[position[int(t)] for t in row] for row in ids])
    # Act
    with torch.no_grad():
        full = aux(input_ids=ids).logits
        pruned = small(input_ids=client_ids).logits
    # Assert: exactly the kept columns; fewer parameters; the tie (or its absence) is kept
    assert pruned.shape[-1] == 90
    torch.testing.assert_close(pruned, full[..., kept], rtol=1e-5, atol=1e-5)
    tied = aux.get_output_embeddings().weight is aux.get_input_embeddings().weight
    assert (small.get_output_embeddings().weight is small.get_input_embeddings().weight) == tied
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in aux.parameters())


def test_bad_pruned_vocabularies_get_one_line_errors(bpe):
    # Assert: the option's form, a size below the bytes and specials or above the model's vocabulary
    assert parse_embedding("pruned:300") == ("pruned", 300)
    for text in ("pruned:0", "pruned", "pruned:-2", "pruned:1e3"):
        with pytest.raises(FedSPError, match=r"aux_embedding .* or pruned:V"):
            RunConfig(aux_embedding=text)
    vocab = len(bpe.tokenizer)
    with pytest.raises(FedSPError, match=rf"pruned:256: the vocabulary size must be between 257 .* {vocab}"):
        choose_vocabulary(bpe.tokenizer, [], 256, vocab)
    with pytest.raises(FedSPError, match=rf"between 257 .* and the model's vocabulary, {vocab}"):
        choose_vocabulary(bpe.tokenizer, [], vocab + 1, vocab)
    # Assert: a tokenizer that is not byte-level BPE is refused
    word = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(FedSPError, match=r"needs a byte-level BPE tokenizer .* WordLevel"):
        choose_vocabulary(PreTrainedTokenizerFast(tokenizer_object=word), [], 300, 2)
    # Assert: the byte tokenizer of the tiny models keeps all of its 257 tokens, and no fewer
    assert len(choose_vocabulary(byte_tokenizer(), [], 257, 257)) == 257
    # Assert: methods whose clients hold no distilled auxiliary model refuse it
    with pytest.raises(FedSPError, match=r"aux_embedding pruned:300 shrinks a distilled"):
        RunConfig(method="fedprompt", aux_embedding="pruned:300")


def test_a_client_on_a_pruned_vocabulary_trains_the_global_models_prefix_in_both_engines(bpe, tmp_path):
    # Prepare: FedSP with 330 of 400 tokens kept, its course on real ARC-Easy rows
    config = RunConfig(
        model="tiny-llama",
        clients=2,
        rounds=2,
        local_steps=2,
        kd_steps=2,
        eval_limit=8,
        val_limit=8,
        prefix_len=4,
        max_length=128,
        progress=False,
        dtype="float32",
        aux_embedding="pruned:330",
        wire_dtype="int8",
    )
    data = prepare_data(config, bpe.tokenizer)
    course = build_course(config, bpe, data)
    client = course.make_client(0)
    # Assert: the client holds 330 rows of width 64; the parameter count says so
    assert client.aux_model.get_input_embeddings().weight.shape == (330, 64)
    assert course.client_model.params < sum(p.numel() for p in bpe.model.parameters()) - 70 * 64
    # Act: a round in process, and the same client built as a Flower node builds it from the message
    broadcast = course.server.broadcast()
    torch.manual_seed(5)  # as the engines seed each client's round
    update = client.fit({k: v.clone() for k, v in broadcast.items()})
    message = wire.decode(wire.encode(course.shipped_once))
    node = build_client(
        config,
        bpe.model.config.to_json_string(use_diff=False),
        course.client_model.global_layers,
        wire.decode_shipped(message, config.wire_dtype),
        data.client_rows[0],
        0,
        bpe.tokenizer.pad_token_id,
        bpe.tokenizer,
    )
    torch.manual_seed(5)
    node_update = node.fit({k: v.clone() for k, v in broadcast.items()})
    # Assert: the prefix has the global model's shape and plugs into the server; both engines agree
    assert {k: v.shape for k, v in update.state.items()} == {k: v.shape for k, v in broadcast.items()}
    for name, value in update.state.items():
        torch.testing.assert_close(node_update.state[name], value, rtol=1e-4, atol=1e-6)
    course.server.aggregate(update.state, [update])
    # Assert: the client said how many of its tokens were rewritten (a rate, nothing else)
    assert 0 < update.metrics["oov_rate"] < 1
    assert node_update.metrics["oov_rate"] == update.metrics["oov_rate"]
    # Assert: the kept ids travelled with the client model
    assert any(name.endswith("kept_ids") for name in course.shipped_once)
    assert replace(config, aux_embedding="full").aux_embedding == "full"
