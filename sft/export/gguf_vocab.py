"""Tokenizer metadata for a GGUF file: the `tokenizer.ggml.*` keys llama.cpp reads.

Two tokenizer families are written, each the way llama.cpp's own tokenizers expect them:

* SentencePiece (`tokenizer.ggml.model = "llama"`): pieces, scores and piece types straight from the
  directory's `tokenizer.model` proto (our tiny models, Baichuan2, Llama-2), plus any added tokens the
  transformers tokenizer carries beyond the proto; `add_space_prefix` from the proto's normaliser.
* Byte-level BPE (`"gpt2"`): the vocabulary and merges of `tokenizer.json` (SmolLM2, Llama-3, Qwen2, ...)
  and `tokenizer.ggml.pre`, the name of llama.cpp's pre-tokeniser (the regex split before BPE). The name is
  recognised from the `pre_tokenizer` section of `tokenizer.json`; an unknown pre-tokeniser is refused
  rather than guessed, because llama.cpp would then split text differently from the trained tokenizer.

Token types are llama.cpp's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft.export.errors import ExportRefused

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's regex split for the GPT-2 family (also what a bare ByteLevel pre-tokeniser with use_regex does).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass
class GGUFVocab:
    """Everything `tokenizer.ggml.*` holds, ready to write."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] | None = None  # BPE only
    pre: str | None = None  # BPE only: llama.cpp's pre-tokeniser name
    add_space_prefix: bool | None = None  # SentencePiece only
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/padding/eot -> id
    add_bos: bool = False
    add_eos: bool = False


def build_vocab(model_dir: Path, tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """Read the directory's tokenizer into GGUF vocabulary metadata of exactly `vocab_size` tokens.

    Args:
        model_dir: The model directory (holds `tokenizer.model` and/or `tokenizer.json`).
        tokenizer: The directory's transformers tokenizer (for added tokens and special ids).
        vocab_size: Rows of the embedding; the token list is padded to it with unused `[PAD<i>]` entries
            (llama.cpp requires one token per embedding row).
    """
    sp_path = model_dir / "tokenizer.model"
    json_path = model_dir / "tokenizer.json"
    if sp_path.is_file():
        vocab = _sentencepiece_vocab(sp_path, tokenizer)
    elif json_path.is_file():
        vocab = _bpe_vocab(json_path)
    else:
        raise ExportRefused(
            f"{model_dir}: no tokenizer.model (SentencePiece) or tokenizer.json (BPE); copy the base model's "
            "tokenizer files into it"
        )
    if len(vocab.tokens) > vocab_size:
        raise ExportRefused(
            f"{model_dir}: the tokenizer has {len(vocab.tokens)} tokens but the embedding only {vocab_size} rows; "
            "resize the model's embeddings to the tokenizer (model.resize_token_embeddings) and save it again"
        )
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.token_types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)

    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            vocab.special_ids[key] = int(value)
    if tokenizer.pad_token_id is not None:
        vocab.special_ids["padding"] = int(tokenizer.pad_token_id)
    # Whether the tokenizer adds BOS/EOS is read from what it does, not from flags that differ per class.
    probe = tokenizer("a")["input_ids"]
    vocab.add_bos = bool(probe) and probe[0] == tokenizer.bos_token_id
    vocab.add_eos = bool(probe) and probe[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id is not None
    return vocab


def _sentencepiece_vocab(sp_path: Path, tokenizer: Any) -> GGUFVocab:
    """Pieces, scores and types from a SentencePiece proto, then the tokenizer's added tokens after it."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(sp_path.read_bytes())
    if proto.trainer_spec.model_type not in (
        1,
        2,
    ):  # 1 unigram, 2 BPE: the two llama.cpp's SPM tokenizer runs
        raise ExportRefused(
            f"{sp_path}: SentencePiece model type {proto.trainer_spec.model_type} is neither unigram nor BPE; "
            "llama.cpp cannot run it"
        )
    tokens = [piece.piece for piece in proto.pieces]
    scores = [float(piece.score) for piece in proto.pieces]
    # The proto's piece types are numbered as llama.cpp's token types.
    types = [int(piece.type) for piece in proto.pieces]

    hf_vocab = tokenizer.get_vocab()
    for i, piece in enumerate(tokens):
        if hf_vocab.get(piece, i) != i:
            raise ExportRefused(
                f"{sp_path}: piece {piece!r} is id {i} in tokenizer.model but {hf_vocab[piece]} in the "
                "transformers tokenizer; the tokenizer files disagree, copy them from one source"
            )
    extra = sorted((idx, tok) for tok, idx in hf_vocab.items() if idx >= len(tokens))
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for expected, (idx, tok) in enumerate(extra, start=len(tokens)):
        if idx != expected:
            raise ExportRefused(
                f"{sp_path.parent}: added token {tok!r} has id {idx}, expected {expected} (ids must be contiguous)"
            )
        tokens.append(tok)
        scores.append(0.0)
        types.append(CONTROL if tok in special else USER_DEFINED)
    return GGUFVocab(
        model="llama",
        tokens=tokens,
        token_types=types,
        scores=scores,
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
    )


def _bpe_vocab(json_path: Path) -> GGUFVocab:
    """Vocabulary, merges and pre-tokeniser name of a byte-level BPE `tokenizer.json`."""
    data = json.loads(json_path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportRefused(
            f"{json_path}: only byte-level BPE tokenizers (GPT-2 style) or a SentencePiece tokenizer.model can be "
            f"exported, this one is {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}); "
            "add the SentencePiece tokenizer.model it was converted from"
        )
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"), json_path)

    id_to_token: dict[int, str] = {int(i): tok for tok, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    for i, t in added.items():
        id_to_token[i] = t["content"]
    n = max(id_to_token) + 1
    tokens, types = [], []
    for i in range(n):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(id_to_token[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(id_to_token[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab(model="gpt2", tokens=tokens, token_types=types, merges=merges, pre=pre)


def _pre_tokenizer_name(pre: dict | None, json_path: Path) -> str:
    """llama.cpp's name for the regex split that `tokenizer.json`'s pre_tokenizer describes."""

    def is_byte_level(p: dict, use_regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == use_regex

    def split_regex(p: dict) -> str | None:
        if p.get("type") != "Split":
            return None
        pattern = p.get("pattern") or {}
        return pattern.get("Regex")

    if pre is not None:
        if is_byte_level(pre, True):
            return "gpt-2"
        parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
        if parts and len(parts) == 2:
            first, second = parts
            if (
                first.get("type") == "Digits"
                and first.get("individual_digits")
                and is_byte_level(second, True)
            ):
                return "smollm"  # digits one by one, then the GPT-2 split
            regex = split_regex(first)
            if regex is not None and is_byte_level(second, False):
                if regex == _LLAMA3_REGEX:
                    return "llama-bpe"
                if regex == _QWEN2_REGEX:
                    return "qwen2"
                if regex == _GPT2_REGEX:
                    return "gpt-2"
    raise ExportRefused(
        f"{json_path}: pre_tokenizer {json.dumps(pre)[:200]} is not one this exporter recognises (GPT-2, SmolLM, "
        "Llama-3, Qwen2 splits); llama.cpp would split text differently from this tokenizer"
    )
