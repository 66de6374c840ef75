"""What a GGUF export will write, decided from the config alone: architecture, hyperparameters, and the type
each tensor is stored in (with the exact round trip a reader will see). Shared by the writer
(:mod:`sft.export.gguf`) and the independent check (:mod:`sft.export.gguf_verify`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft.export.errors import ExportRefused

OUT_TYPES = ("f16", "bf16", "q8_0")
Q8_BLOCK = 32  # values per Q8_0 block (one f16 scale + 32 int8)
BAICHUAN_ROPE_LAYERS = 32  # llama.cpp: LLM_TYPE_7B -> RoPE
BAICHUAN_ALIBI_LAYERS = 40  # llama.cpp: LLM_TYPE_13B -> ALiBi with max bias 8
SUPPORTED_MODEL_TYPES = ("llama", "baichuan")


@dataclass
class ExportPlan:
    """What the export will write, decided from config.json before any weight is read."""

    model_type: str  # source: llama | baichuan
    arch: str  # GGUF general.architecture: llama | baichuan
    position: str  # rope | alibi
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    tied_head: bool
    notes: list[str] = field(default_factory=list)


# ---- planning: refuse before reading weights ----------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportRefused(
            f"{path} not found: --model_dir must be a model directory (config.json, weights)"
        ) from None
    except json.JSONDecodeError as err:
        raise ExportRefused(f"{path}:{err.lineno}: not valid JSON ({err.msg}); copy the file again") from None


def plan_export(model_dir: str | Path) -> ExportPlan:
    """Read config.json and decide architecture and hyperparameters; raise ExportRefused for what llama.cpp
    cannot represent (nothing is read beyond the config)."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportRefused(
            f"{model_dir / 'config.json'}: model_type {model_type!r} cannot be exported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "baichuan":
        return _plan_baichuan(model_dir, config)
    return _plan_llama(model_dir, config)


def _plan_llama(model_dir: Path, raw: dict[str, Any]) -> ExportPlan:
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(str(model_dir))
    where = model_dir / "config.json"
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ExportRefused(
            f"{where}: rope_type {rope_type!r} (RoPE scaling) is not supported by this exporter; only plain RoPE"
        )
    if config.attention_bias or config.mlp_bias:
        raise ExportRefused(f"{where}: attention_bias/mlp_bias models are not supported by this exporter")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ExportPlan(
        model_type="llama",
        arch="llama",
        position="rope",
        n_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        tied_head=bool(raw.get("tie_word_embeddings", config.tie_word_embeddings)),
    )


def _plan_baichuan(model_dir: Path, raw: dict[str, Any]) -> ExportPlan:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))  # our BaichuanConfig (models.register_models())
    where = model_dir / "config.json"
    n_layers = config.num_hidden_layers
    notes = []
    if config.position_embedding_type == "alibi":
        if n_layers != BAICHUAN_ALIBI_LAYERS:
            raise ExportRefused(
                f"{where}: an ALiBi Baichuan2 with {n_layers} layers cannot be exported: llama.cpp's baichuan "
                f"architecture applies ALiBi only to {BAICHUAN_ALIBI_LAYERS}-layer (13B) models and would run this "
                "one without any positions"
            )
        arch = "baichuan"
    elif n_layers == BAICHUAN_ROPE_LAYERS:
        arch = "baichuan"
    else:
        arch = "llama"
        notes.append(
            f"RoPE Baichuan2 with {n_layers} layers written as architecture 'llama': llama.cpp's 'baichuan' applies "
            f"RoPE only to {BAICHUAN_ROPE_LAYERS}-layer models; the Llama decoder computes the same function"
        )
    return ExportPlan(
        model_type="baichuan",
        arch=arch,
        position=config.position_embedding_type,
        n_layers=n_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings or config.model_max_length or 4096,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=float(config.rope_theta),
        tied_head=False,
        notes=notes,
    )


def ggml_type_for(shape: tuple[int, ...], out_type: str) -> str:
    """GGML type of one tensor: vectors stay F32 (llama.cpp computes norms in f32), matrices take `out_type`."""
    if len(shape) == 1:
        return "F32"
    if out_type == "q8_0":
        return "Q8_0" if shape[-1] % Q8_BLOCK == 0 else "F16"
    return out_type.upper()


def encode_tensor(tensor: torch.Tensor, ggml_type: str) -> np.ndarray:
    """The bytes of `tensor` (fp32) in `ggml_type`, as the numpy array the writer stores."""
    if ggml_type == "F32":
        return tensor.contiguous().numpy().astype(np.float32)
    if ggml_type == "F16":
        return tensor.to(torch.float16).contiguous().numpy()
    if ggml_type == "BF16":
        # numpy has no bfloat16: round in torch (nearest-even, as llama.cpp's converter) and keep the bits.
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(tensor.contiguous().numpy(), GGMLQuantizationType.Q8_0)


def round_trip(tensor: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """`tensor` as it reads back from the file (fp32): the reference the verification compares against."""
    if ggml_type == "F32":
        return tensor.float()
    if ggml_type in ("F16", "BF16"):
        return tensor.to(torch.float16 if ggml_type == "F16" else torch.bfloat16).float()
    from gguf import GGMLQuantizationType, quants

    data = encode_tensor(tensor, ggml_type)
    return torch.from_numpy(quants.dequantize(data, GGMLQuantizationType.Q8_0).copy()).reshape(tensor.shape)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The directory's transformers tokenizer (our Baichuan2 class for model_type baichuan)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))  # Baichuan2's after models.register_models()
