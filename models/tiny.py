"""Tiny random model directories (Baichuan2 and Llama) for tests and smoke runs.

Each builder writes a complete, self-contained model directory that the real loaders read:

    config.json              model config (Baichuan2: the official layout, incl. `model_max_length`)
    model.safetensors        random weights (seeded)
    tokenizer.model          a SentencePiece BPE model trained here, on the repo's data/corpus_*.txt
    tokenizer_config.json    (+ tokenizer.json for Llama, which transformers 5.x loads as a fast tokenizer)
    generation_config.json   special ids, sampling defaults and (Baichuan2) the turn tokens

The Baichuan2 vocabulary follows the official layout: `<unk>`, `<s>`, `</s>` at ids 0, 1, 2, then reserved
symbols `<reserved_3>` .. `<reserved_199>` at ids 3..199, so the user/assistant turn tokens sit at 195/196 as in
the official `generation_config.json`; then the 256 byte-fallback pieces and the learned pieces.

Training is deterministic (fixed seed, one thread) and takes a fraction of a second; nothing is cached outside
`out_dir`.

CLI:  python -m models.tiny --out DIR [--arch baichuan|baichuan-alibi|llama]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from sft.core.flags import REQUIRED, add_arguments, flag, parse_flags

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS_FILES = (REPO_ROOT / "data" / "corpus_zh_en.txt",)

# Official Baichuan2 ids: reserved symbols fill 3..199 so that these land where the official files put them.
USER_TOKEN_ID = 195
ASSISTANT_TOKEN_ID = 196
NUM_RESERVED_IDS = 200  # ids 0..199: <unk>, <s>, </s>, <reserved_3> .. <reserved_199>
MODEL_MAX_LENGTH = 4096

# Sampling defaults of the official Baichuan2-Chat generation_config.json; max_new_tokens kept tiny-model sized.
SAMPLING_DEFAULTS = {
    "do_sample": True,
    "max_new_tokens": 64,
    "temperature": 0.3,
    "top_p": 0.85,
    "top_k": 5,
    "repetition_penalty": 1.05,
}
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def train_sentencepiece(
    corpus_files: Sequence[str | Path] | None,
    *,
    vocab_size: int,
    reserved_symbols: bool,
    add_dummy_prefix: bool,
    seed: int = 0,
) -> bytes:
    """Train a SentencePiece BPE model with byte fallback and return its serialized proto.

    Args:
        corpus_files: Plain-text files, one sentence a line; None uses the repo's data/corpus_zh_en.txt.
        vocab_size: Requested vocabulary size (an upper bound: a small corpus may yield fewer pieces).
        reserved_symbols: Put `<reserved_3>` .. `<reserved_199>` at ids 3..199 (the Baichuan2 layout).
        add_dummy_prefix: Prepend "▁" to every text (Llama) or not (Baichuan2).
        seed: Seed of SentencePiece's random generator.
    """
    files = [Path(f) for f in (corpus_files or DEFAULT_CORPUS_FILES)]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer corpus file {file} does not exist; pass existing text files.")
    spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files],
        model_writer=proto,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support the full size; take what it gives
        character_coverage=1.0,  # keep every Chinese character seen; unseen ones fall back to bytes
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,  # padding reuses <unk>, as in Baichuan2
        user_defined_symbols=[f"<reserved_{i}>" for i in range(3, NUM_RESERVED_IDS)]
        if reserved_symbols
        else [],
        # Identity normalisation, no whitespace squeezing: text round-trips exactly (Baichuan2's settings).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        num_threads=1,  # determinism
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return proto.getvalue()


def _check_reserved_ids(proto: bytes) -> int:
    """Verify the special/reserved ids of a trained Baichuan2-layout model; return its vocabulary size."""
    sp = spm.SentencePieceProcessor(model_proto=proto)
    expected = {0: "<unk>", 1: "<s>", 2: "</s>"}
    expected.update(
        {i: f"<reserved_{i}>" for i in (3, USER_TOKEN_ID, ASSISTANT_TOKEN_ID, NUM_RESERVED_IDS - 1)}
    )
    for token_id, piece in expected.items():
        if sp.id_to_piece(token_id) != piece:
            raise RuntimeError(
                f"tiny tokenizer: id {token_id} is {sp.id_to_piece(token_id)!r}, expected {piece!r}"
            )
    return sp.get_piece_size()


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter from a seeded generator so the weights depend on `seed` only."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.fill_(1.0)
            elif name == "lm_head.weight":
                # A plain linear head at std 0.02 gives near-uniform logits in a 64-wide model, and LoRA (which
                # never touches the head) then barely moves the loss. Unit-scale logits keep tiny models trainable.
                # (Baichuan's NormHead normalises its rows, so this scale does not change its logits.)
                std = param.shape[1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_baichuan(
    out_dir: str | Path,
    *,
    position: str = "rope",
    vocab_size: int = 3000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    corpus_files: Sequence[str | Path] | None = None,
) -> Path:
    """Write a tiny random Baichuan2 model directory and return its path.

    Args:
        out_dir: Directory to write (created; existing files with the same names are overwritten).
        position: "rope" (the Baichuan2-7B layout: config has max_position_embeddings) or "alibi" (the 13B
            layout: no max_position_embeddings).
        vocab_size: Requested SentencePiece vocabulary size; the model's vocab_size is the trained size.
        hidden_size, num_layers, num_heads: Model size.
        intermediate_size: MLP width; default 2 * hidden_size.
        seed: Seed of the weights and of the tokenizer training.
        corpus_files: Tokenizer training text; default the repo's data/corpus_zh_en.txt.
    """
    if position not in ("rope", "alibi"):
        raise ValueError(f"build_tiny_baichuan: position must be 'rope' or 'alibi', got {position!r}")
    # Imported here: the tokenizer/Llama parts of this module must work without the modeling file.
    from models.baichuan.configuration_baichuan import BaichuanConfig
    from models.baichuan.modeling_baichuan import BaichuanForCausalLM
    from models.baichuan.tokenization_baichuan import BaichuanTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    proto = train_sentencepiece(
        corpus_files, vocab_size=vocab_size, reserved_symbols=True, add_dummy_prefix=False, seed=seed
    )
    n_pieces = _check_reserved_ids(proto)
    (out / "tokenizer.model").write_bytes(proto)
    tokenizer = BaichuanTokenizer(str(out / "tokenizer.model"), model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(out)

    # config.json in the layout of the official files (7B: rope, 13B: alibi).
    config_dict = {
        "architectures": ["BaichuanForCausalLM"],
        "model_type": "baichuan",
        "vocab_size": n_pieces,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "model_max_length": MODEL_MAX_LENGTH,
        "use_cache": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "z_loss_weight": 0,
        **SPECIAL_IDS,
    }
    if position == "rope":
        config_dict["max_position_embeddings"] = MODEL_MAX_LENGTH
    config = BaichuanConfig(**config_dict)
    if config.position_embedding_type != position:
        raise RuntimeError(
            f"tiny Baichuan: config resolved to {config.position_embedding_type}, wanted {position}"
        )

    model = BaichuanForCausalLM(config)
    _init_weights(model, seed)
    model.save_pretrained(out)
    # save_pretrained wrote transformers' own layout; replace it by the official one (what users' files look like).
    _write_json(out / "config.json", dict(sorted(config_dict.items())))
    _write_json(
        out / "generation_config.json",
        {
            **SPECIAL_IDS,
            "user_token_id": USER_TOKEN_ID,
            "assistant_token_id": ASSISTANT_TOKEN_ID,
            **SAMPLING_DEFAULTS,
        },
    )
    logger.info("wrote tiny Baichuan2 (%s, vocab %d) to %s", position, n_pieces, out)
    return out


def build_tiny_llama(
    out_dir: str | Path,
    *,
    vocab_size: int = 3000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    seed: int = 0,
    corpus_files: Sequence[str | Path] | None = None,
) -> Path:
    """Write a tiny random Llama model directory (transformers' LlamaForCausalLM) and return its path.

    The tokenizer is a Llama-style SentencePiece BPE model (dummy prefix, byte fallback, BOS added, padding
    with `<unk>`) trained on the same corpus, saved by transformers' `LlamaTokenizer`, which 5.x converts to a
    fast tokenizer (`tokenizer.json`).

    Args:
        out_dir: Directory to write.
        vocab_size: Requested SentencePiece vocabulary size; the model's vocab_size is the trained size.
        hidden_size, num_layers, num_heads: Model size.
        num_kv_heads: Key/value heads (grouped-query attention); default num_heads.
        intermediate_size: MLP width; default 2 * hidden_size.
        seed: Seed of the weights and of the tokenizer training.
        corpus_files: Tokenizer training text; default the repo's data/corpus_zh_en.txt.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    proto = train_sentencepiece(
        corpus_files, vocab_size=vocab_size, reserved_symbols=False, add_dummy_prefix=True, seed=seed
    )
    n_pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    (out / "tokenizer.model").write_bytes(proto)

    config = LlamaConfig(
        vocab_size=n_pieces,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-06,
        tie_word_embeddings=False,
        **SPECIAL_IDS,
    )
    config.save_pretrained(out)
    # From the directory so the conversion to a fast tokenizer sees tokenizer.model (and the config).
    tokenizer = LlamaTokenizer.from_pretrained(
        str(out), add_bos_token=True, pad_token="<unk>", model_max_length=MODEL_MAX_LENGTH
    )
    tokenizer.save_pretrained(out)
    # transformers 5.23 saves its own loading flags among the init kwargs; they describe this run, not the files.
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    _write_json(out / "tokenizer_config.json", tokenizer_config)

    model = LlamaForCausalLM(config)
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(**SPECIAL_IDS, **SAMPLING_DEFAULTS)
    model.save_pretrained(out)
    logger.info("wrote tiny Llama (vocab %d) to %s", n_pieces, out)
    return out


@dataclass
class TinyArgs:
    """The flags of ``python -m models.tiny``."""

    out: Path = flag(REQUIRED, "Output directory (created if missing).")
    arch: str = flag(
        "baichuan",
        "baichuan: Baichuan2-7B layout (RoPE); baichuan-alibi: 13B layout (ALiBi); llama: LlamaForCausalLM.",
        choices=("baichuan", "baichuan-alibi", "llama"),
    )
    vocab_size: int = flag(3000, "Requested tokenizer vocabulary size.", option="--vocab-size")
    hidden_size: int = flag(64, "Model width.", option="--hidden-size")
    num_layers: int = flag(2, "Number of decoder layers.", option="--num-layers")
    num_heads: int = flag(4, "Number of attention heads.", option="--num-heads")
    seed: int = flag(0, "Seed of weights and tokenizer training.")
    corpus: list[Path] | None = flag(
        None, "Text files to train the tokenizer on (default: data/corpus_zh_en.txt)."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: write one tiny model directory."""
    parser = argparse.ArgumentParser(
        prog="python -m models.tiny",
        description="Write a tiny random model directory (config, weights, trained tokenizer, generation config).",
    )
    add_arguments(parser, TinyArgs)
    args = parse_flags(parser, TinyArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    sizes = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "num_heads": args.num_heads,
        "seed": args.seed,
        "corpus_files": args.corpus,
    }
    if args.arch == "llama":
        build_tiny_llama(args.out, **sizes)
    else:
        build_tiny_baichuan(args.out, position="alibi" if args.arch == "baichuan-alibi" else "rope", **sizes)


if __name__ == "__main__":
    main()
