"""BaichuanTokenizer: behaviour of the official Baichuan2 tokenizer on real Chinese and English text."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from models.baichuan.tokenization_baichuan import BaichuanTokenizer
from models.tiny import train_sentencepiece


def _added_token(content: str) -> dict:
    # The exact dict layout of the official Baichuan2 tokenizer_config.json.
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": True,
    }


OFFICIAL_TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_eos_token": False,
    "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
    "bos_token": _added_token("<s>"),
    "clean_up_tokenization_spaces": False,
    "eos_token": _added_token("</s>"),
    "model_max_length": 4096,
    "pad_token": _added_token("<unk>"),
    "sp_model_kwargs": {},
    "tokenizer_class": "BaichuanTokenizer",
    "unk_token": _added_token("<unk>"),
}
OFFICIAL_SPECIAL_TOKENS_MAP = {
    "bos_token": {
        "content": "<s>",
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": True,
    },
    "eos_token": {
        "content": "</s>",
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": True,
    },
    "pad_token": {
        "content": "<unk>",
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": True,
    },
    "unk_token": {
        "content": "<unk>",
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": True,
    },
}
# The 7B config.json layout, auto_map included (pointing at remote code we must not need).
OFFICIAL_MODEL_CONFIG = {
    "architectures": ["BaichuanForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    },
    "model_type": "baichuan",
    "vocab_size": 3000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "model_max_length": 4096,
    "rms_norm_eps": 1e-06,
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "z_loss_weight": 0,
}


@pytest.fixture(scope="module")
def sp_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Baichuan2-layout SentencePiece model trained on the repo corpus (as the tiny models use)."""
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(
        train_sentencepiece(None, vocab_size=3000, reserved_symbols=True, add_dummy_prefix=False)
    )
    return path


@pytest.fixture(scope="module")
def sp(sp_model_file: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_model_file))


@pytest.fixture(scope="module")
def tokenizer(sp_model_file: Path) -> BaichuanTokenizer:
    return BaichuanTokenizer(str(sp_model_file))


@pytest.fixture(scope="module")
def chinese_texts(shared_data_dir: Path) -> list[str]:
    """Questions and answers of RoleBench-zh, unchanged (leading/trailing spaces and newlines included)."""
    texts: list[str] = []
    with open(
        shared_data_dir / "rolebench-zh" / "rolebench-zh_role_specific_test.jsonl", encoding="utf-8"
    ) as f:
        for line in f:
            record = json.loads(line)
            texts.append(record["question"])
            texts.extend(record["generated"])
    return texts


@pytest.fixture(scope="module")
def english_texts(shared_data_dir: Path) -> list[str]:
    """DialogSum dialogues (multi-line, `#Person1#:` prefixes) and summaries."""
    texts: list[str] = []
    with open(shared_data_dir / "dialogsum" / "dialogsum.dev.jsonl", encoding="utf-8") as f:
        for line in list(f)[:200]:
            record = json.loads(line)
            texts.extend([record["dialogue"], record["summary"]])
    return texts


def test_special_token_ids(tokenizer: BaichuanTokenizer) -> None:
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == "<unk>"
    assert tokenizer.pad_token_id == 0
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (
        len(tokenizer) == tokenizer.vocab_size == 3000
    )  # special tokens are in the vocabulary, none appended


def test_no_bos_eos_by_default(tokenizer: BaichuanTokenizer, sp: spm.SentencePieceProcessor) -> None:
    text = "你好，我是你的助手。Hello there!"
    ids = tokenizer(text)["input_ids"]
    assert ids == sp.encode(text)  # exactly SentencePiece's ids: nothing added, nothing changed
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.num_special_tokens_to_add() == 0


def test_bos_eos_when_enabled(sp_model_file: Path, sp: spm.SentencePieceProcessor, tmp_path: Path) -> None:
    tokenizer = BaichuanTokenizer(str(sp_model_file), add_bos_token=True, add_eos_token=True)
    encoded = tokenizer("你好", return_special_tokens_mask=True)
    assert encoded["input_ids"] == [1, *sp.encode("你好"), 2]
    assert encoded["special_tokens_mask"] == [1] + [0] * len(sp.encode("你好")) + [1]
    # transformers 5.x drops add_bos_token/add_eos_token on save; ours writes them back.
    tokenizer.save_pretrained(tmp_path)
    reloaded = BaichuanTokenizer.from_pretrained(tmp_path)
    assert (reloaded.add_bos_token, reloaded.add_eos_token) == (True, True)
    assert reloaded.encode("你好") == encoded["input_ids"]


def test_round_trip_chinese(
    tokenizer: BaichuanTokenizer, sp: spm.SentencePieceProcessor, chinese_texts: list[str]
) -> None:
    assert len(chinese_texts) > 400
    n_tokens = n_chars = 0
    for text in chinese_texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        n_tokens += len(ids)
        n_chars += len(text)
    # Chinese tokenises into roughly a token per character or better (byte fallback for unseen characters).
    assert n_tokens < 2.0 * n_chars
    # No spurious leading "▁" on Chinese text (Baichuan2 has no dummy prefix).
    text = "皇上，臣妾做了一碗莲子羹。"
    tokens = tokenizer.tokenize(text)
    assert not any(token.startswith("▁") for token in tokens)
    assert tokenizer.convert_tokens_to_string(tokens) == text


def test_round_trip_english(tokenizer: BaichuanTokenizer, english_texts: list[str]) -> None:
    for text in english_texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Leading, repeated and trailing whitespace and newlines survive (identity normalisation).
    for text in [
        " leading space",
        "two  spaces\tand tab",
        "trailing \n\n",
        "#Person1#: Hi!\n#Person2#: Hey.",
    ]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_byte_fallback(tokenizer: BaichuanTokenizer, sp: spm.SentencePieceProcessor) -> None:
    for char in ["😀", "龘", "𠀀"]:  # emoji, a rare CJK character, a CJK Extension B character
        assert sp.piece_to_id(char) == sp.unk_id()  # not in the vocabulary
        tokens = tokenizer.tokenize(char)
        assert tokens == [f"<0x{byte:02X}>" for byte in char.encode("utf-8")]
        ids = tokenizer.encode(char)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == char
    text = "你好😀龘 ok"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_skips_special_tokens(tokenizer: BaichuanTokenizer) -> None:
    ids = tokenizer.encode("你好")
    assert tokenizer.decode([1, *ids, 2], skip_special_tokens=True) == "你好"
    assert tokenizer.decode([1, *ids, 2]) == "<s>你好</s>"


def test_save_load_round_trip(tokenizer: BaichuanTokenizer, tmp_path: Path, chinese_texts: list[str]) -> None:
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is BaichuanTokenizer
    for text in chinese_texts[:100]:
        assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.pad_token_id == 0
    assert reloaded.add_bos_token is False and reloaded.add_eos_token is False


def test_pickle_round_trip(tokenizer: BaichuanTokenizer) -> None:
    # DataLoader workers and datasets' map pickle the tokenizer.
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = "李白举杯邀明月。 The moon!"
    assert clone.encode(text) == tokenizer.encode(text)
    assert clone.decode(clone.encode(text)) == text


@pytest.mark.parametrize("with_model_config", [False, True])
def test_loads_official_tokenizer_config(
    sp_model_file: Path, sp: spm.SentencePieceProcessor, tmp_path: Path, with_model_config: bool
) -> None:
    (tmp_path / "tokenizer.model").write_bytes(sp_model_file.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(OFFICIAL_TOKENIZER_CONFIG, indent=2))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(OFFICIAL_SPECIAL_TOKENS_MAP, indent=2))
    if with_model_config:
        (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_MODEL_CONFIG, indent=2))

    tokenizer = AutoTokenizer.from_pretrained(
        tmp_path
    )  # no trust_remote_code: our registered class serves it

    assert type(tokenizer) is BaichuanTokenizer
    assert tokenizer.model_max_length == 4096
    assert (tokenizer.add_bos_token, tokenizer.add_eos_token) == (False, False)
    special = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special == (0, 1, 2, 0)  # unk, bos, eos, pad
    text = "朕今日政务繁忙。 Please wait."
    assert tokenizer.encode(text) == sp.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # The special token in text is still recognised (with a space before it, as single_word=True requires).
    assert tokenizer.encode("你好 </s>")[-1] == 2
