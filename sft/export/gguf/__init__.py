"""Export a plain (or merged) model directory to one GGUF file for llama.cpp and Ollama, verified before it lands.

    export_gguf(model_dir, "out.gguf", out_type="q8_0", modelfile=True) -> ExportReport

Who writes the file:

* every architecture llama.cpp's converter supports (Qwen2/2.5/3, Llama 2/3.x, Mistral, Gemma 2/3, Phi-3 and
  about 80 more): the converter itself, installed apart and run as a tool on a staged copy of the directory
  (:mod:`sft.export.gguf.converter`);
* Baichuan2: our own writer (:mod:`sft.export.gguf.baichuan`), because the converter's Baichuan path is broken.

What is refused before any work, in one line naming the family and the step: the converter not installed (with
its install command), a pre-tokenizer name it does not know, a Gemma 3 whose sliding/global layer pattern is not
the 5:1 llama.cpp hard-codes, an ALiBi Baichuan2 of a depth llama.cpp runs without positions, an existing output.
A model that attends through a sliding window its GGUF architecture cannot express (Mistral, written as
``llama``) gets the window as its context length: within it, full attention computes the same.

The file is written under a temporary name next to its destination, read back by an independent reader and
compared with the source (:mod:`sft.export.gguf.verify`), and only then renamed into place: a refused or failed
export leaves nothing. Types: ``f16``, ``bf16``, ``q8_0``; Q4_K_M and the other k-quants need llama.cpp's
``llama-quantize`` on the f16 file (:data:`QUANTIZE_HINT`). An Ollama Modelfile (:mod:`sft.export.ollama`) goes
next to the file, named after it, or where ``modelfile`` says.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sft.core.atomic import replacing_file, write_file_atomic
from sft.export.errors import ExportCheckError, ExportRefused
from sft.export.gguf import converter
from sft.export.gguf.baichuan import BaichuanPlan, plan_baichuan, write_baichuan
from sft.export.gguf.converter import OUT_TYPES
from sft.export.gguf.verify import transformers_reader_problem, verify_gguf

logger = logging.getLogger(__name__)

__all__ = ["OUT_TYPES", "QUANTIZE_HINT", "ExportPlan", "ExportReport", "export_gguf", "plan_export"]
QUANTIZE_HINT = (
    "Q4_K_M (and the other k-quants) need llama.cpp: export f16, then "
    "`llama-quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M` (docs/INFERENCE.md)"
)
VERIFY_CHOICES = ("auto", "transformers", "llama_cpp", "none")
GEMMA3_PATTERN = ["sliding_attention"] * 5 + ["full_attention"]  # the one llama.cpp (and the reader) assume


@dataclass
class ExportPlan:
    """What the export will do, decided from config.json before any weight is read."""

    model_type: str
    writer: str  # "converter" | "baichuan"
    config: Any  # the transformers config
    context_length: int | None = None  # written instead of max_position_embeddings (a sliding window)
    baichuan: BaichuanPlan | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportReport:
    """Result of `export_gguf` (printed as JSON by export_gguf.py)."""

    gguf_path: str
    arch: str
    writer: str
    out_type: str
    tensor_types: dict[str, int]
    file_bytes: int
    chat_template: str
    modelfile_path: str | None
    export_seconds: float
    verify_seconds: float
    notes: list[str]
    verification: dict[str, Any] | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def plan_export(
    model_dir: str | Path, *, pre_tokenizer: str | None = None, converter_dir: Path = converter.DEFAULT_DIR
) -> ExportPlan:
    """Decide who writes the file and what it holds; raise ExportRefused for what llama.cpp cannot run."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportRefused(f"{model_dir / 'config.json'} not found: --model_dir must be a model directory")
    config = AutoConfig.from_pretrained(str(model_dir))  # our BaichuanConfig after models.register_models()
    kind = config.model_type.removesuffix("_text")  # gemma3_text
    if kind == "baichuan":
        plan = plan_baichuan(model_dir)
        return ExportPlan(kind, "baichuan", config, baichuan=plan, notes=[plan.note] if plan.note else [])
    converter.require_converter(converter_dir)
    if pre_tokenizer is not None:
        converter.check_pre_tokenizer(pre_tokenizer, converter_dir)
    plan = ExportPlan(kind, "converter", config)
    layer_types = getattr(config, "layer_types", None) or []
    if kind == "gemma3" and layer_types != (GEMMA3_PATTERN * len(layer_types))[: len(layer_types)]:
        raise ExportRefused(
            f"gemma3: export: llama.cpp runs every Gemma 3 as 5 sliding-window layers then 1 global one; "
            f"this model's layers are {layer_types[:8]}..."
        )
    window, context = getattr(config, "sliding_window", None), config.max_position_embeddings
    if kind in ("mistral", "mixtral") and window and window < context:
        plan.context_length = window
        plan.notes.append(
            f"{kind}: GGUF has no sliding window for this architecture (llama.cpp runs it as llama, with full "
            f"attention); the file's context length is the window, {window} tokens, within which the two agree"
        )
    return plan


def _resolve_verify(verify: str, plan: ExportPlan, arch: str) -> str:
    """The reader that checks the file: transformers where it reads the architecture faithfully, else llama.cpp
    where installed, else none (with a warning)."""
    if verify not in VERIFY_CHOICES:
        raise ExportRefused(f"--verify {verify!r} is not one of {', '.join(VERIFY_CHOICES)}")
    problem = transformers_reader_problem(plan.config, arch)
    if verify == "transformers" and problem:
        raise ExportRefused(
            f"--verify transformers: transformers' GGUF reader {problem}; use --verify llama_cpp"
        )
    if verify != "auto":
        return verify
    if problem is None:
        return "transformers"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        logger.warning(
            "no reader can verify this file here (transformers' GGUF reader %s; llama_cpp is not installed: "
            "pip install -r requirements-gguf.txt); writing it unverified",
            problem,
        )
        return "none"
    return "llama_cpp"


def modelfile_path_for(out_path: Path, modelfile: bool | str | Path) -> Path | None:
    """Where the Modelfile goes: ``<name>.Modelfile`` next to the GGUF for True, the given path, or nowhere."""
    if modelfile is True:
        return out_path.with_suffix(".Modelfile")
    return Path(modelfile) if modelfile else None


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    *,
    out_type: str = "f16",
    modelfile: bool | str | Path = False,
    template: str | None = None,
    verify: str = "auto",
    overwrite: bool = False,
    pre_tokenizer: str | None = None,
    converter_dir: Path = converter.DEFAULT_DIR,
) -> ExportReport:
    """Export a model directory to a GGUF file (and an Ollama Modelfile), verified before it lands.

    Args:
        model_dir: config.json, safetensors weights, tokenizer files (e.g. merge_params.py's output).
        out_path: the .gguf file to write; its directory is created.
        out_type: "f16", "bf16" or "q8_0" (:data:`QUANTIZE_HINT` for k-quants).
        modelfile: True: an Ollama Modelfile named after the GGUF (``x.gguf`` -> ``x.Modelfile``); a path: there.
        template: force the Modelfile's chat format (sft.export.ollama.NAMED_TEMPLATES) instead of recognising it.
        verify: "transformers", "llama_cpp", "none", or "auto" (see :func:`_resolve_verify`).
        overwrite: replace existing output files.
        pre_tokenizer: name a byte-level BPE pre-tokenizer the converter does not recognise by hash.
        converter_dir: where llama.cpp's converter is installed.

    Raises:
        ExportRefused: the model cannot be exported faithfully, or an output exists; nothing is written.
        ExportCheckError: the written file does not agree with the source model; nothing is left behind.
    """
    from transformers import AutoTokenizer

    from sft.export.ollama import choose_chat_format, render_modelfile, sampling_defaults

    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        hint = f"; {QUANTIZE_HINT}" if out_type.lower().startswith(("q4", "q5", "q6", "q3", "q2")) else ""
        raise ExportRefused(f"--type {out_type!r} is not one of {', '.join(OUT_TYPES)}{hint}")
    if out_path.suffix != ".gguf":
        raise ExportRefused(f"--out {out_path}: the file name must end in .gguf")
    modelfile_path = modelfile_path_for(out_path, modelfile)
    for target in (out_path, modelfile_path):
        if target is not None and target.exists() and not overwrite:
            raise ExportRefused(f"{target} exists; pass --overwrite to replace it")
    plan = plan_export(model_dir, pre_tokenizer=pre_tokenizer, converter_dir=converter_dir)
    arch = plan.baichuan.arch if plan.baichuan else ""
    # The converter's architecture is known once it has written the file: "auto" is resolved then.
    reader = _resolve_verify(verify, plan, arch) if plan.baichuan or verify != "auto" else "auto"

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    chat = choose_chat_format(tokenizer, model_dir, plan.model_type, template)
    sampling = sampling_defaults(model_dir)
    # Rendered before anything is written: a template it cannot quote is refused up front.
    modelfile_text = (
        render_modelfile(out_path, modelfile_path, chat, sampling, model_dir) if modelfile_path else None
    )
    for note in plan.notes:
        logger.info(note)

    with replacing_file(out_path) as tmp:
        if plan.baichuan is not None:
            types = write_baichuan(model_dir, tmp, plan.baichuan, out_type, tokenizer, chat.jinja, sampling)
        else:
            staging = Path(tempfile.mkdtemp(prefix=f".{out_path.stem}.stage-", dir=out_path.parent))
            try:
                converter.stage(
                    model_dir, staging, chat_template=chat.jinja, context_length=plan.context_length
                )
                converter.convert(staging, tmp, out_type, target=converter_dir, pre_tokenizer=pre_tokenizer)
            finally:
                shutil.rmtree(staging)
            types, arch = _tensor_types(tmp)
            reader = _resolve_verify(verify, plan, arch) if reader == "auto" else reader
        export_seconds = time.perf_counter() - start
        logger.info(
            "wrote %s (%s, %.1f MB) in %.1f s",
            out_path.name,
            out_type,
            tmp.stat().st_size / 1e6,
            export_seconds,
        )
        verification, verify_start = None, time.perf_counter()
        if reader != "none":
            verification = verify_gguf(model_dir, tmp, out_type, reader=reader)
            if not verification["passed"]:
                raise ExportCheckError(
                    f"{out_path.name}: the {reader} reader disagrees with the source model: "
                    f"{verification['failure']}; nothing written"
                )
        verify_seconds = time.perf_counter() - verify_start
    if modelfile_path is not None:
        write_file_atomic(modelfile_path, lambda fh: fh.write(modelfile_text))
    return ExportReport(
        gguf_path=str(out_path),
        arch=arch,
        writer="ours (Baichuan2)" if plan.baichuan else f"llama.cpp {converter.NAME} {converter.VERSION}",
        out_type=out_type,
        tensor_types=types,
        file_bytes=out_path.stat().st_size,
        chat_template=f"{chat.name} ({chat.source})",
        modelfile_path=str(modelfile_path) if modelfile_path else None,
        export_seconds=round(export_seconds, 3),
        verify_seconds=round(verify_seconds, 3),
        notes=plan.notes,
        verification=verification,
    )


def _tensor_types(path: Path) -> tuple[dict[str, int], str]:
    """GGML type name -> number of tensors, and the architecture, of a written file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return types, reader.get_field("general.architecture").contents()
