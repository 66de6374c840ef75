"""Check a written GGUF file with an independent reader against the source model.

Two readers, neither of which shares code with the writers:

* ``transformers``: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``): it parses the file,
  maps llama.cpp's tensor names back, undoes the converters' reorderings, dequantises, and builds the model and
  a tokenizer from the file's metadata. It reads llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3 and more, not
  baichuan; what it cannot express about a model is said by :func:`transformers_reader_problem`.
* ``llama_cpp``: llama.cpp itself through llama-cpp-python (its loader, tokenizer and CPU kernels). Optional:
  ``pip install -r requirements-gguf.txt``.

What is compared:

1. **the file's tokenizer metadata**: every special token of the source (chat markup included) is a control or
   user-defined token in the file, not text to split; BOS/EOS ids and whether BOS is added are the source's;
2. **tokens**: the reader's tokenizer gives the source tokenizer's ids for probe texts (English, Chinese, code);
3. **logits**: on those probes and on a conversation rendered by the model's chat template, the reader's logits
   against the source model's (fp32). The type rounds the weights by design, so the tolerance is the larger of a
   fraction of the probe's largest |logit| (:data:`TOLERANCE`: f16 moves the tiny models' logits by about 1e-3
   of it, bf16 1e-2, q8_0 3e-2) and :data:`ROUNDING_FACTOR` times how far rounding the source's own weights to
   the type moves its logits (weights with outliers round worse; llama.cpp also rounds activations to the
   weights' type, about as much again). A wrong layout, name or hyperparameter is off by the logits' own size;
4. **greedy tokens**: a few greedy steps of the reader from each probe; every token it picks is within the
   tolerance of the source's best at that step (a near tie may flip under rounding, a wrong file would not).

Where the GGUF states a context length shorter than the probes (Mistral's, capped to its sliding window), the
probes are cut to it. Where transformers' reader drops ``rope_type: llama3`` (it ignores the ``rope_freqs``
tensor), its rotary embedding is the source's and the file's ``rope_freqs`` are checked against transformers'
llama3 frequencies instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It was a sunny day",
    "床前明月光，疑是地上霜。举头望明月，",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
)
PROBE_CHAT = [
    {"role": "system", "content": "You are Li Bai, a poet."},
    {"role": "user", "content": "Hello! Who are you? 你好。"},
    {"role": "assistant", "content": "床前明月光。I am a poet."},
    {"role": "user", "content": "Again, please."},
]
# Largest |logit difference| allowed, as a fraction of the probe's largest |logit| (module docstring).
TOLERANCE = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 8e-2}
ROUNDING_FACTOR = 3.0
N_GREEDY = 6
TRANSFORMERS_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def transformers_reader_problem(config: Any, arch: str) -> str | None:
    """Why transformers 5.23's GGUF reader cannot check a faithful file of ``config``'s model written as GGUF
    architecture ``arch`` ("" when not yet known): an architecture it does not read, or one whose file it reads
    into another model (it takes the architecture's defaults for keys it ignores). None when it can."""
    kind = config.model_type.removesuffix("_text")  # gemma3_text
    if arch and arch not in TRANSFORMERS_ARCHITECTURES:
        return f"it cannot read the {arch!r} architecture"
    if kind == "qwen3" and config.head_dim != 128:
        return f"it takes qwen3's head_dim to be 128 (this model's is {config.head_dim})"
    if kind in ("gemma2", "gemma3") and config.query_pre_attn_scalar != 256:
        return f"it takes {kind}'s query_pre_attn_scalar to be 256 (this model's is {config.query_pre_attn_scalar})"
    if kind == "gemma2" and (config.attn_logit_softcapping, config.final_logit_softcapping) != (50.0, 30.0):
        return "it takes gemma2's soft-capping to be 50/30"
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if kind in ("gemma3", "phi3") and rope.get("rope_type", "default") != "default":
        return f"it drops {kind}'s rope scaling ({rope.get('rope_type')})"
    return None


class _TransformersReader:
    name = "transformers"

    def __init__(self, gguf_path: Path, source: torch.nn.Module, source_tokenizer: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, file = str(gguf_path.parent), gguf_path.name
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        rope = dict(getattr(source.config, "rope_parameters", None) or {})
        if rope.get("rope_type") == "llama3":  # dropped by the reader: use the source's (rope_freqs checked)
            self.model.model.rotary_emb = source.model.rotary_emb
        # It builds a `llama` file's SentencePiece vocabulary with a leading-space Metaspace, ignoring
        # tokenizer.ggml.add_space_prefix (Baichuan2's is off), and its added tokens lose rstrip/lstrip (Phi-3's
        # turn tokens): what it cannot rebuild is left to llama.cpp.
        meta = _metadata(gguf_path)
        self.plain = meta["general.architecture"] != "llama" or meta.get(
            "tokenizer.ggml.add_space_prefix", True
        )
        added = source_tokenizer.added_tokens_decoder.values()
        self.chat = self.plain and not any(t.rstrip or t.lstrip for t in added)

    def tokenize(self, text: str, special: bool) -> list[int] | None:
        if not (self.chat if special else self.plain):
            return None
        return self.tokenizer(text, add_special_tokens=not special)["input_ids"]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([ids])).logits[0].float()

    def close(self) -> None:
        del self.model


class _LlamaCppReader:
    name = "llama_cpp"

    def __init__(
        self, gguf_path: Path, source: torch.nn.Module, source_tokenizer: Any, n_ctx: int = 256
    ) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, n_threads=2, n_batch=n_ctx, verbose=False
        )

    def tokenize(self, text: str, special: bool) -> list[int]:
        # Plain text: llama.cpp adds BOS itself when the file says add_bos_token, as the source tokenizer does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=not special, special=special)

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy()).float()

    def close(self) -> None:
        self.llm.close()


@torch.no_grad()
def _round_weights(model: torch.nn.Module, out_type: str) -> None:
    """Round the matrices in place as the file stores them (vectors stay f32; q8_0 where rows are blocks of 32)."""
    from gguf import GGMLQuantizationType, quants

    q8 = GGMLQuantizationType.Q8_0
    for param in model.parameters():
        w = param.data
        if w.dim() < 2:
            continue
        if out_type == "q8_0" and w.shape[-1] % 32 == 0:
            stored = quants.dequantize(quants.quantize(w.numpy(), q8), q8)
            param.data = torch.from_numpy(stored.copy()).reshape(w.shape)
        else:
            param.data = w.to(torch.bfloat16 if out_type == "bf16" else torch.float16).float()


def _metadata(gguf_path: Path) -> dict[str, Any]:
    """The file's key-value metadata (arrays as lists), read with the gguf package."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _metadata_problems(gguf_path: Path, tokenizer: Any, source: torch.nn.Module) -> list[str]:
    """What the file's tokenizer metadata or rope_freqs get wrong about the source (module docstring)."""
    meta = _metadata(gguf_path)
    arch = meta["general.architecture"]
    types = meta.get("tokenizer.ggml.token_type", [])
    problems = []
    specials = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    specials.update(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens))
    for token_id, token in sorted(specials.items()):
        if token_id < len(types) and types[token_id] not in (2, 3, 4):  # unknown, control, user-defined
            problems.append(f"special token {token!r} (id {token_id}) is plain text in the file")
    probe = tokenizer("a")["input_ids"]
    for key, want in (
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
        ("add_bos_token", bool(probe) and probe[0] == tokenizer.bos_token_id),
    ):
        got = meta.get(f"tokenizer.ggml.{key}")
        if want is not None and got is not None and got != want and not (key == "bos_token_id" and not probe):
            problems.append(f"tokenizer.ggml.{key} is {got}, the source's {want}")
    rope = dict(getattr(source.config, "rope_parameters", None) or {})
    if rope.get("rope_type") == "llama3":
        from gguf import GGUFReader

        stored = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}.get("rope_freqs.weight")
        inv_freq = source.model.rotary_emb.inv_freq.double()
        dim = 2 * len(inv_freq)
        base = float(rope["rope_theta"])
        plain = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        factors = torch.as_tensor(stored.data.copy(), dtype=torch.float64) if stored is not None else None
        if factors is None or not torch.allclose(factors, plain / inv_freq, rtol=1e-3):
            problems.append(f"{arch}: rope_freqs does not hold the llama3 rope scaling")
    return problems


def verify_gguf(
    model_dir: str | Path,
    gguf_path: str | Path,
    out_type: str,
    *,
    reader: str = "transformers",
    n_greedy: int = N_GREEDY,
) -> dict[str, Any]:
    """Compare the file, read by ``reader``, with the source model (module docstring).

    Returns a JSON-able dict: passed, failure (the first failed check or None), the tolerance, and per probe the
    max |logit diff|, the logit scale, token and greedy agreement.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    source = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    problems = _metadata_problems(gguf_path, tokenizer, source)
    meta = _metadata(gguf_path)
    context = int(meta.get(f"{meta['general.architecture']}.context_length", 1 << 30))
    probes = [(text, tokenizer(text)["input_ids"], False) for text in PROBE_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)
        probes.append((chat, tokenizer(chat, add_special_tokens=False)["input_ids"], True))
    reader_class = _TransformersReader if reader == "transformers" else _LlamaCppReader
    file_reader = reader_class(gguf_path, source, tokenizer)
    runs = []
    try:
        for text, ids, special in probes:
            reader_ids = file_reader.tokenize(text, special)
            ids = ids[: max(1, context - n_greedy)]  # (a GGUF context shorter than the probes: the start)
            reader_ids = None if reader_ids is None else reader_ids[: len(ids)]
            got = file_reader.logits(ids)
            seq = list(ids)
            for _ in range(n_greedy):
                seq.append(int(file_reader.logits(seq)[-1].argmax()))
            runs.append((text, ids, reader_ids, got, seq))
    finally:
        file_reader.close()

    report, failure = [], problems[0] if problems else None
    with torch.no_grad():
        wants = [source(input_ids=torch.tensor([seq])).logits[0].float() for *_, seq in runs]
        _round_weights(source, out_type)
        rounded = [source(input_ids=torch.tensor([seq])).logits[0].float() for *_, seq in runs]
    for (text, ids, reader_ids, got, seq), want, want_rounded in zip(runs, wants, rounded):
        n, chosen = len(ids), torch.tensor(seq[len(ids) :])
        scale = float(want[:n].abs().max())
        rounding = float((want_rounded - want).abs().max())
        tolerance = max(TOLERANCE[out_type] * scale, ROUNDING_FACTOR * rounding)
        diff = float((got - want[:n]).abs().max())
        steps = want[n - 1 : -1]
        gap = float((steps.max(dim=1).values - steps.gather(1, chosen[:, None])[:, 0]).max())
        probe = {
            "text": text[:24],
            "n_tokens": n,
            "tokens_equal": None if reader_ids is None else reader_ids == ids,
            "max_abs_logit_diff": diff,
            "logit_scale": scale,
            "rounding_max_abs": rounding,
            "tolerance": tolerance,
            "greedy_equal": bool((steps.argmax(dim=1) == chosen).all()),
            "greedy_worst_gap": gap,
        }
        report.append(probe)
        if failure is None:
            if probe["tokens_equal"] is False:
                failure = f"tokenizer: {text[:24]!r} -> {reader_ids[:12]} instead of {ids[:12]}"
            elif diff > tolerance:
                failure = f"max |logit diff| {diff:.3g} > {tolerance:.3g} on {text[:24]!r}"
            elif gap > tolerance:
                failure = f"a greedy token is {gap:.3g} below the source's best on {text[:24]!r}"
    result = {
        "reader": reader,
        "passed": failure is None,
        "failure": failure,
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in report),
        "max_relative_diff": max(p["max_abs_logit_diff"] / p["logit_scale"] for p in report),
        "rounding_max_abs": max(p["rounding_max_abs"] for p in report),
        "probes": report,
    }
    logger.info(
        "%s reader: max |logit diff| %.3g (%.2g of the logit scale); rounding to %s alone moves them by %.3g",
        reader,
        result["max_abs_logit_diff"],
        result["max_relative_diff"],
        out_type,
        result["rounding_max_abs"],
    )
    return result
