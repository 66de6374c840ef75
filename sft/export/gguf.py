"""Export a plain (or merged) model directory to one GGUF file for llama.cpp and Ollama.

    export_gguf(model_dir, "out.gguf", out_type="q8_0", modelfile=True) -> ExportReport

What is written, for the two model families the framework trains:

* **Llama** (`model_type` llama): tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...), with the
  rows of q and k reordered per head from transformers' rotate-half RoPE layout to llama.cpp's interleaved pairs;
  no `output.weight` when the head is tied to the embedding (llama.cpp then reuses `token_embd`).
* **Baichuan2** (`model_type` baichuan): the fused `W_pack` split into q/k/v (reordered like Llama's for RoPE), and
  the NormHead's row normalisation baked into `output.weight` (our head normalises its rows in every forward;
  llama.cpp multiplies by the stored matrix). llama.cpp's `baichuan` architecture has no position key: it infers
  7B (RoPE) from 32 layers and 13B (ALiBi, max bias 8) from 40 layers, and runs any other depth *without positions*.
  So: RoPE with 32 layers -> `baichuan`; RoPE with another depth -> `llama` (the same computation, which llama.cpp
  runs for any depth); ALiBi with 40 layers -> `baichuan`; ALiBi with another depth is refused.
* Hyperparameters under `<arch>.*`, the tokenizer (see `sft.export.gguf_vocab`), special ids, the chat template, and the
  sampling defaults of generation_config.json.

Types: `f16`, `bf16` (matrices in that type, norms in f32) and `q8_0` (matrices in llama.cpp's 8-bit blocks of 32
with one f16 scale, quantised by the gguf package; a matrix whose rows are not a multiple of 32 stays f16).

The file is written next to its destination under a temporary name, read back by an independent reader and
compared with the source model (`sft.export.gguf_verify`), and only then renamed: a refused or failed export leaves
nothing at the output path. Weights are read tensor by tensor from the safetensors files, so memory stays at about
one tensor beyond the writer's metadata.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft.core.atomic import replacing_file, write_file_atomic
from sft.export.errors import ExportCheckError, ExportRefused
from sft.export.gguf_plan import (
    OUT_TYPES,
    Q8_BLOCK,
    ExportPlan,
    encode_tensor,
    ggml_type_for,
    load_tokenizer,
    plan_export,
    read_json,
)
from sft.export.gguf_vocab import GGUFVocab, build_vocab

logger = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """Result of `export_gguf` (printed as JSON by export_gguf.py)."""

    gguf_path: str
    arch: str
    out_type: str
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    n_params: int
    file_bytes: int
    tokenizer_model: str
    chat_template: str
    modelfile_path: str | None
    export_seconds: float
    verify_seconds: float
    notes: list[str]
    verification: dict[str, Any] | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


# ---- weights: source tensors -> GGUF tensors ----------------------------------------------------------------


class _SafetensorsSource:
    """Tensor-by-tensor access to a directory's safetensors weights (single file or sharded with an index)."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ExportRefused(
                f"{model_dir}: no model.safetensors(.index.json); save the model with safetensors "
                "(model.save_pretrained(dir), as merge_params.py does)"
            )
        self._handles = {f: safe_open(str(model_dir / f), framework="pt") for f in files}
        self._where = {key: f for f, h in self._handles.items() for key in h.keys()}  # noqa: SIM118

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key).float()


def rope_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from rotate-half RoPE (per head: all first halves, then all second halves of
    the rotated pairs, as transformers computes it) to llama.cpp's layout, where pair i is rows (2i, 2i+1)."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    # (n_heads, 2 halves, head_dim/2 pairs, cols) -> (n_heads, pairs, halves, cols)
    return weight.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _tensor_plan(
    plan: ExportPlan, keys: set[str], where: Path
) -> list[tuple[str, list[str], Callable[..., torch.Tensor]]]:
    """(gguf name, source keys, function of the source tensors) for every tensor, in llama.cpp's order."""
    h, kv = plan.n_heads, plan.n_kv_heads
    q_rows, kv_rows = h * plan.head_dim, kv * plan.head_dim
    rope = plan.position == "rope"

    def same(w: torch.Tensor) -> torch.Tensor:
        return w

    def normalised_rows(w: torch.Tensor) -> torch.Tensor:
        # NormHead: logits = h @ normalize(W).T in every forward; llama.cpp multiplies by the stored matrix.
        return torch.nn.functional.normalize(w, dim=-1)

    def qkv_part(start: int, stop: int, heads: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
        def part(w: torch.Tensor) -> torch.Tensor:
            w = w[start:stop]
            return rope_to_interleaved(w, heads) if heads else w

        return part

    def permuted(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda w: rope_to_interleaved(w, heads) if rope else w

    items: list[tuple[str, list[str], Callable[..., torch.Tensor]]] = [
        ("token_embd.weight", ["model.embed_tokens.weight"], same)
    ]
    for i in range(plan.n_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        items.append((f"{b}.attn_norm.weight", [f"{p}.input_layernorm.weight"], same))
        if plan.model_type == "baichuan":
            w_pack = [f"{p}.self_attn.W_pack.weight"]
            items += [
                (f"{b}.attn_q.weight", w_pack, qkv_part(0, q_rows, h if rope else None)),
                (f"{b}.attn_k.weight", w_pack, qkv_part(q_rows, q_rows + kv_rows, kv if rope else None)),
                (f"{b}.attn_v.weight", w_pack, qkv_part(q_rows + kv_rows, q_rows + 2 * kv_rows, None)),
            ]
        else:
            items += [
                (f"{b}.attn_q.weight", [f"{p}.self_attn.q_proj.weight"], permuted(h)),
                (f"{b}.attn_k.weight", [f"{p}.self_attn.k_proj.weight"], permuted(kv)),
                (f"{b}.attn_v.weight", [f"{p}.self_attn.v_proj.weight"], same),
            ]
        items += [
            (f"{b}.attn_output.weight", [f"{p}.self_attn.o_proj.weight"], same),
            (f"{b}.ffn_norm.weight", [f"{p}.post_attention_layernorm.weight"], same),
            (f"{b}.ffn_gate.weight", [f"{p}.mlp.gate_proj.weight"], same),
            (f"{b}.ffn_up.weight", [f"{p}.mlp.up_proj.weight"], same),
            (f"{b}.ffn_down.weight", [f"{p}.mlp.down_proj.weight"], same),
        ]
    items.append(("output_norm.weight", ["model.norm.weight"], same))
    if not plan.tied_head:
        items.append(
            ("output.weight", ["lm_head.weight"], normalised_rows if plan.model_type == "baichuan" else same)
        )

    used = {k for _, srcs, _ in items for k in srcs}
    missing = sorted(used - keys)
    if missing:
        raise ExportRefused(
            f"{where}: the weights lack {missing[:3]} ({len(missing)} missing); is this a complete model?"
        )
    # Buffers some checkpoints carry (rotary inv_freq) are recomputed by every reader; anything else is a weight
    # this exporter would drop.
    extra = sorted(k for k in keys - used if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight")
    if extra:
        raise ExportRefused(
            f"{where}: the weights hold tensors llama.cpp's {plan.arch} has no place for: {extra[:3]} "
            f"({len(extra)} in all)"
        )
    return items


def iter_export_tensors(
    model_dir: str | Path, plan: ExportPlan, out_type: str
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(gguf name, fp32 tensor before encoding, GGML type) for every tensor of the export, one at a time."""
    source = _SafetensorsSource(Path(model_dir))
    cache: dict[str, torch.Tensor] = {}
    for gguf_name, keys, fn in _tensor_plan(plan, source.keys(), Path(model_dir)):
        # W_pack feeds three tensors: keep the last source tensor read.
        args = []
        for key in keys:
            if key not in cache:
                cache.clear()
                cache[key] = source.get(key)
            args.append(cache[key])
        tensor = fn(*args)
        yield gguf_name, tensor, ggml_type_for(tuple(tensor.shape), out_type)


# ---- metadata -----------------------------------------------------------------------------------------------


_FILE_TYPE = {"f16": 1, "bf16": 32, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def _add_metadata(
    writer: Any,
    plan: ExportPlan,
    out_type: str,
    name: str,
    vocab: GGUFVocab,
    chat_jinja: str,
    sampling: dict[str, float | int],
) -> None:
    arch = plan.arch
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPE[out_type])
    if out_type == "q8_0":
        from gguf import GGML_QUANT_VERSION

        writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_uint32(f"{arch}.context_length", plan.context_length)
    writer.add_uint32(f"{arch}.embedding_length", plan.hidden_size)
    writer.add_uint32(f"{arch}.block_count", plan.n_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", plan.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", plan.n_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", plan.n_kv_heads)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", plan.rms_norm_eps)
    writer.add_uint32(f"{arch}.vocab_size", plan.vocab_size)
    if plan.head_dim != plan.hidden_size // plan.n_heads:
        writer.add_uint32(f"{arch}.attention.key_length", plan.head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", plan.head_dim)
    if plan.position == "rope":
        writer.add_float32(f"{arch}.rope.freq_base", plan.rope_theta)
        writer.add_uint32(f"{arch}.rope.dimension_count", plan.head_dim)

    writer.add_string("tokenizer.ggml.model", vocab.model)
    if vocab.pre is not None:
        writer.add_string("tokenizer.ggml.pre", vocab.pre)
    writer.add_array("tokenizer.ggml.tokens", vocab.tokens)
    if vocab.scores is not None:
        writer.add_array("tokenizer.ggml.scores", vocab.scores)
    writer.add_array("tokenizer.ggml.token_type", vocab.token_types)
    if vocab.merges is not None:
        writer.add_array("tokenizer.ggml.merges", vocab.merges)
    for key, token_id in vocab.special_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", vocab.add_bos)
    writer.add_bool("tokenizer.ggml.add_eos_token", vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_bool("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix)
    writer.add_string("tokenizer.chat_template", chat_jinja)
    for key, value in sampling.items():
        gguf_key = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k"}.get(key)
        if gguf_key == "top_k":
            writer.add_int32("general.sampling.top_k", int(value))
        elif gguf_key is not None:
            writer.add_float32(f"general.sampling.{gguf_key}", float(value))


# ---- the export ---------------------------------------------------------------------------------------------


def _write_gguf(
    path: Path,
    model_dir: Path,
    plan: ExportPlan,
    out_type: str,
    vocab: GGUFVocab,
    chat_jinja: str,
    sampling: dict[str, float | int],
) -> tuple[dict[str, int], int]:
    """Write the file at `path` in two passes over the weights (shapes, then data); return (type counts, params)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), plan.arch)
    _add_metadata(writer, plan, out_type, model_dir.name, vocab, chat_jinja, sampling)
    type_counts: dict[str, int] = {}
    n_params = 0
    # Pass 1: shapes, types and byte counts for the header, which precedes the data (no encoding needed).
    bytes_per_value = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 34 / Q8_BLOCK}
    for name, tensor, ggml_type in iter_export_tensors(model_dir, plan, out_type):
        nbytes = int(tensor.numel() * bytes_per_value[ggml_type])
        # A non-uint8 dtype tells the writer that the shape is in values, not bytes; raw_dtype sets the type.
        shape = tuple(tensor.shape)
        writer.add_tensor_info(
            name, shape, np.dtype(np.float32), nbytes, raw_dtype=GGMLQuantizationType[ggml_type]
        )
        type_counts[ggml_type] = type_counts.get(ggml_type, 0) + 1
        n_params += tensor.numel()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, tensor, ggml_type in iter_export_tensors(model_dir, plan, out_type):
        writer.write_tensor_data(encode_tensor(tensor, ggml_type))
    writer.close()
    return type_counts, n_params


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    *,
    out_type: str = "f16",
    modelfile: bool = False,
    template: str | None = None,
    verify: str = "auto",
    overwrite: bool = False,
) -> ExportReport:
    """Export a model directory to a GGUF file (and an Ollama Modelfile next to it), verified before it lands.

    Args:
        model_dir: A model directory: config.json, safetensors weights, tokenizer files (e.g. merge_params.py's
            output).
        out_path: The .gguf file to write. Its directory is created.
        out_type: "f16", "bf16" or "q8_0".
        modelfile: Also write `Modelfile` (Ollama) in the output directory.
        template: Force the chat format (chatml, llama2, llama3, baichuan2) instead of recognising it.
        verify: "transformers" (transformers' GGUF loader; Llama-architecture files), "llama_cpp" (llama-cpp-python),
            "auto" (transformers for llama files, llama_cpp for baichuan files when installed, else none, with a
            warning) or "none".
        overwrite: Replace existing output files.

    Raises:
        ExportRefused: the model cannot be exported faithfully, or the output exists; nothing is written.
        ExportCheckError: the written file does not agree with the source model; nothing is left behind.
    """
    from sft.export.ollama import choose_chat_format, render_modelfile, sampling_defaults

    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise ExportRefused(f"--type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    if out_path.suffix != ".gguf":
        raise ExportRefused(f"--out {out_path}: the file name must end in .gguf")
    modelfile_path = out_path.parent / "Modelfile" if modelfile else None
    for target in (out_path, modelfile_path):
        if target is not None and target.exists() and not overwrite:
            raise ExportRefused(f"{target} exists; pass --overwrite to replace it")
    plan = plan_export(model_dir)
    verify = _resolve_verify(verify, plan.arch)

    start = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    vocab = build_vocab(model_dir, tokenizer, plan.vocab_size)
    chat = choose_chat_format(tokenizer, model_dir, plan.model_type, template)
    sampling = sampling_defaults(model_dir)
    # Rendered before anything is written: a template it cannot quote is refused up front.
    modelfile_text = render_modelfile(out_path.name, chat, sampling, model_dir) if modelfile_path else None
    for note in plan.notes:
        logger.info(note)

    with replacing_file(out_path) as tmp:
        type_counts, n_params = _write_gguf(tmp, model_dir, plan, out_type, vocab, chat.jinja, sampling)
        export_seconds = time.perf_counter() - start
        logger.info(
            "wrote %s (%s, %.1f MB) in %.1f s",
            out_path.name,
            out_type,
            tmp.stat().st_size / 1e6,
            export_seconds,
        )
        verification = None
        verify_start = time.perf_counter()
        if verify != "none":
            from sft.export.gguf_verify import verify_gguf

            verification = verify_gguf(model_dir, tmp, plan, out_type, reader=verify)
            if not verification["passed"]:
                raise ExportCheckError(
                    f"{out_path.name}: the {verify} reader disagrees with the source model: "
                    f"{verification['failure']}; nothing written"
                )
        verify_seconds = time.perf_counter() - verify_start
    if modelfile_path is not None:
        write_file_atomic(modelfile_path, lambda fh: fh.write(modelfile_text))
    return ExportReport(
        gguf_path=str(out_path),
        arch=plan.arch,
        out_type=out_type,
        tensor_types=type_counts,
        n_params=n_params,
        file_bytes=out_path.stat().st_size,
        tokenizer_model=vocab.model + (f" (pre {vocab.pre})" if vocab.pre else ""),
        chat_template=f"{chat.name} ({chat.source})",
        modelfile_path=str(modelfile_path) if modelfile_path else None,
        export_seconds=round(export_seconds, 3),
        verify_seconds=round(verify_seconds, 3),
        notes=plan.notes,
        verification=verification,
    )


def _resolve_verify(verify: str, arch: str) -> str:
    """Which reader checks the file: transformers reads llama files only; llama.cpp reads both when installed."""
    choices = ("auto", "transformers", "llama_cpp", "none")
    if verify not in choices:
        raise ExportRefused(f"--verify {verify!r} is not one of {', '.join(choices)}")
    if verify == "transformers" and arch != "llama":
        raise ExportRefused(
            f"--verify transformers: transformers cannot read the {arch!r} architecture; use --verify llama_cpp "
            "(pip install -r requirements-gguf.txt)"
        )
    if verify == "auto":
        if arch == "llama":
            return "transformers"
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            logger.warning(
                "no reader can verify a %r file here (transformers cannot read it, llama_cpp is not installed: "
                "pip install -r requirements-gguf.txt); writing it unverified",
                arch,
            )
            return "none"
        return "llama_cpp"
    return verify
