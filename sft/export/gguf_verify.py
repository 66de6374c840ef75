"""Check a written GGUF file with an independent reader against the source model.

Two readers, neither of which shares code with the writer (`sft.export.gguf`):

* `transformers`: transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`), which parses the file,
  maps llama.cpp's tensor names back, undoes the q/k reordering, dequantises, and builds a `LlamaForCausalLM` and a
  tokenizer from the file's metadata. Reads the `llama` architecture.
* `llama_cpp`: llama.cpp itself through llama-cpp-python (its loader, tokenizer and CPU kernels). Reads `llama`
  and `baichuan`. Optional: `pip install -r requirements-gguf.txt`.

What is compared, on probe texts (English, Chinese, code):

1. **tokens**: the reader's tokenizer (built from the file's metadata) gives the source tokenizer's ids;
2. **logits**: the reader's logits against the *reference*: the source model computing in fp32 with every weight
   rounded as the file stores it (f16, bf16 or Q8_0 round trip) and, for Baichuan2, the NormHead's normalised head.
   This isolates what the file must get exactly right (layout, names, permutations, hyperparameters, tokenizer)
   from the rounding the chosen type costs by design. Tolerances (max |logit difference|): transformers 1e-3 (it
   computes in fp32 like the reference). llama.cpp's CPU kernels also round the *activations* to the weights'
   dot-product type (f16, bf16, 8-bit blocks for Q8_0), an error of the same order as the weight rounding itself,
   and both grow with the model's logit scale. So its tolerance is `LLAMA_CPP_FACTOR` times the weight rounding's
   own effect on the same probes (`rounding_max_abs`), at least `LLAMA_CPP_FLOOR`. Measured ratios llama.cpp diff /
   rounding effect: 0.6-0.96 on the tiny models, 1.4-1.5 on SmolLM2-135M; a file with a wrong layout is off by
   the size of the logits themselves;
3. **greedy tokens**: a few greedy steps of the reader from each probe. transformers must pick the reference's
   tokens; for llama.cpp every chosen token must be within the tolerance of the reference's best (a near tie may
   flip under activation rounding, a wrong layout would not come close).

Also reported, not checked: how far the rounding moves the logits from the unrounded source model
(`rounding_max_abs`) and whether the unrounded source picks the reader's greedy tokens (`source_greedy_equal`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sft.export.gguf_plan import ExportPlan, ggml_type_for, load_tokenizer, round_trip

logger = logging.getLogger(__name__)

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It was a sunny day",
    "床前明月光，疑是地上霜。举头望明月，",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
)
TRANSFORMERS_TOLERANCE = 1e-3
LLAMA_CPP_FACTOR = 3.0  # x the weight rounding's effect on the logits (see the module docstring)
LLAMA_CPP_FLOOR = 1e-2
N_GREEDY = 8


def _load_source(model_dir: Path, plan: ExportPlan) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # Our Baichuan2 for model_type baichuan: the entry point has called models.register_models().
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


class _Reference:
    """The source model in fp32, and its logits with weights as stored in the file (`rounded=True`) or as saved.

    Memory: the model plus one copy of its original weights; the rounded weights are computed from that copy when
    switching, which happens twice per verification (all rounded passes first, then all original ones).
    """

    def __init__(self, model_dir: Path, plan: ExportPlan, out_type: str) -> None:
        self.model = _load_source(model_dir, plan)
        self.plan, self.out_type = plan, out_type
        self.original = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.rounded_head: torch.Tensor | None = None
        if plan.model_type == "baichuan":
            # The file stores normalize(W) rounded; the reference multiplies by exactly that (see logits()).
            head = torch.nn.functional.normalize(self.original["lm_head.weight"], dim=-1)
            self.rounded_head = round_trip(head, ggml_type_for(tuple(head.shape), out_type))
        self.state = False  # the model holds the original weights

    @torch.no_grad()
    def logits(self, ids: list[int], rounded: bool) -> torch.Tensor:
        if self.state != rounded:
            for name, param in self.model.named_parameters():
                weight = self.original[name]
                param.copy_(
                    round_trip(weight, ggml_type_for(tuple(weight.shape), self.out_type))
                    if rounded
                    else weight
                )
            self.state = rounded
        input_ids = torch.tensor([ids])
        if self.rounded_head is not None and rounded:
            # The NormHead would normalise the file's (already normalised, rounded) head again.
            hidden = self.model.model(input_ids=input_ids).last_hidden_state
            return (hidden @ self.rounded_head.T)[0]
        return self.model(input_ids=input_ids).logits[0]


class _TransformersReader:
    name = "transformers"

    def __init__(self, gguf_path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, file = str(gguf_path.parent), gguf_path.name
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)

        # transformers builds every SentencePiece ("llama") vocabulary with a leading-space Metaspace and ignores
        # tokenizer.ggml.add_space_prefix, so it cannot reproduce a tokenizer without one (Baichuan2's): there the
        # token check is left to llama.cpp.
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path)).get_field("tokenizer.ggml.add_space_prefix")
        self.can_tokenize = field is None or bool(field.contents())

    def tokenize(self, text: str) -> list[int] | None:
        return self.tokenizer(text)["input_ids"] if self.can_tokenize else None

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([ids])).logits[0].float()

    def close(self) -> None:
        del self.model


class _LlamaCppReader:
    name = "llama_cpp"

    def __init__(self, gguf_path: Path, n_ctx: int = 256) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, n_threads=2, n_batch=n_ctx, verbose=False
        )

    def tokenize(self, text: str) -> list[int]:
        # llama.cpp adds BOS itself when the file says add_bos_token, as the source tokenizer does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy()).float()

    def close(self) -> None:
        self.llm.close()


def open_reader(gguf_path: Path, reader: str) -> Any:
    """A reader of `gguf_path`: "transformers" or "llama_cpp"."""
    return _TransformersReader(gguf_path) if reader == "transformers" else _LlamaCppReader(gguf_path)


def verify_gguf(
    model_dir: str | Path,
    gguf_path: str | Path,
    plan: ExportPlan,
    out_type: str,
    *,
    reader: str = "transformers",
    tolerance: float | None = None,  # None: the reader's default (module docstring)
    n_greedy: int = N_GREEDY,
) -> dict[str, Any]:
    """Compare the file, read by `reader`, with the source model (see the module docstring).

    Returns a JSON-able dict: passed, failure (the first failed check or None), the tolerance, per probe the
    max |logit diff| against the rounded reference and the rounding's own effect, token and greedy agreement.
    """
    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    tokenizer = load_tokenizer(model_dir)
    reference = _Reference(model_dir, plan, out_type)
    file_reader = open_reader(gguf_path, reader)
    # The reader first (prompt logits, then greedy steps), then the reference along the reader's sequences: a
    # teacher-forced forward per probe tells whether the reference would have chosen the same tokens (if it picks
    # the reader's token at every step, its own greedy sequence is the reader's).
    runs = []
    try:
        for text in PROBE_TEXTS:
            ids = tokenizer(text)["input_ids"]
            reader_ids = file_reader.tokenize(text)  # None: this reader cannot check the tokenizer
            got = file_reader.logits(ids)
            seq = list(ids)
            for _ in range(n_greedy):
                seq.append(int(file_reader.logits(seq)[-1].argmax()))
            runs.append((text, ids, reader_ids, got, seq))
    finally:
        file_reader.close()
    along = {rounded: [reference.logits(run[4], rounded) for run in runs] for rounded in (True, False)}
    rounding = max(float((r - o).abs().max()) for r, o in zip(along[True], along[False]))
    if tolerance is None:
        tolerance = (
            TRANSFORMERS_TOLERANCE
            if reader == "transformers"
            else max(LLAMA_CPP_FLOOR, LLAMA_CPP_FACTOR * rounding)
        )

    probes, failure = [], None
    for i, (text, ids, reader_ids, got, seq) in enumerate(runs):
        n, chosen = len(ids), torch.tensor(seq[len(ids) :])
        want, source = along[True][i], along[False][i]
        diff = float((got - want[:n]).abs().max())
        steps = want[n - 1 : -1]  # the reference's logits at each greedy step
        gap = float((steps.max(dim=1).values - steps.gather(1, chosen[:, None])[:, 0]).max())
        probe = {
            "text": text[:24],
            "n_tokens": n,
            "tokens_equal": None if reader_ids is None else reader_ids == ids,
            "max_abs_logit_diff": diff,
            "rounding_max_abs": float((want - source).abs().max()),
            "greedy_equal": bool((steps.argmax(dim=1) == chosen).all()),
            "greedy_worst_gap": gap,
            "source_greedy_equal": bool((source[n - 1 : -1].argmax(dim=1) == chosen).all()),
        }
        probes.append(probe)
        if failure is None:
            if probe["tokens_equal"] is False:
                failure = f"tokenizer: {text[:24]!r} -> {reader_ids[:12]} instead of {ids[:12]}"
            elif diff > tolerance:
                failure = f"max |logit diff| {diff:.3g} > {tolerance:g} on {text[:24]!r}"
            elif reader == "transformers" and not probe["greedy_equal"]:
                failure = f"greedy tokens differ from the reference's on {text[:24]!r}"
            elif gap > tolerance:
                failure = f"a greedy token is {gap:.3g} below the reference's best on {text[:24]!r}"
    result = {
        "reader": reader,
        "passed": failure is None,
        "failure": failure,
        "tolerance": tolerance,
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in probes),
        "rounding_max_abs": max(p["rounding_max_abs"] for p in probes),
        "probes": probes,
    }
    logger.info(
        "%s reader: max |logit diff| %.3g vs the rounded source (tolerance %g); rounding to %s moves logits by %.3g",
        reader,
        result["max_abs_logit_diff"],
        tolerance,
        out_type,
        result["rounding_max_abs"],
    )
    return result
