"""What computes the replies: one interface, three engines (``--engine``; docs/INFERENCE.md#engines).

Every engine takes prompts as token ids built by our chat template from our tokenizer, and gives decoded text
back, so prompts, stop ids and answers mean the same thing whichever computes them:

* ``torch`` (default): the model as :func:`sft.inference.loading.load_from_flags` loads it (adapter, 4-bit base,
  any device). Greedy replies go through our decoding loop, the rest through ``model.generate``
  (:mod:`sft.inference.generate`); the web demo decodes its live replies together (:mod:`sft.inference.serving`).
  The reference numerics: greedy tokens are ``generate``'s.
* ``llama_cpp``: llama-cpp-python (CPU) over a GGUF file exported from ``--model_path`` by our verified exporter
  (``--gguf``; a missing file is exported first, f16). **Its own numerics**: the file's weight type (f16, q8_0)
  and ggml's kernels, which also round activations; sampling and the repetition penalty are llama.cpp's
  (the penalty looks back 64 tokens). One prompt at a time, one stream at a time.
* ``vllm``: vLLM on a CUDA GPU, batch generation only (no streaming here). **Its own numerics and sampling**
  (its kernels and scheduler). Needs ``pip install vllm`` and a GPU; otherwise refused before any work.

Both optional engines run a plain (merged) model: an adapter is merged first with merge_params.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sft.core.errors import UserError
from sft.inference.chat import context_window
from sft.inference.generate import (
    cut_at_stop,
    generate_batch,
    loop_problem,
    reply_streamer,
    stop_ids,
    stream_reply,
)
from sft.inference.loading import LoadedModel, inference_template, load_from_flags
from sft.inference.serving import LiveBatcher, live_problem

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

    from sft.checkpoint.adapters import AdapterInfo
    from sft.data.templates import Template

logger = logging.getLogger(__name__)

CPU_LOOP_BATCH = 32  # our greedy loop on a CPU: less CPU per token than 8 or 16 (docs/PERFORMANCE.md)
DEFAULT_BATCH = 8  # model.generate (sampling, beams) and GPUs: today's size; larger batches pad more
VLLM_BATCH = 256  # vLLM schedules its own batches; this only sets how often progress is reported
LLAMA_CPP_INSTALL = (
    "pip install -r requirements-gguf.txt (builds llama-cpp-python; docs/INFERENCE.md#engines)"
)


class Engine:
    """What every engine offers (see the module docstring).

    Attributes:
        name: the ``--engine`` value.
        tokenizer, template, template_name: build the prompts and decode the answers (the model directory's, or
            the adapter's).
        generation_config: the model's own generation settings (``build_generation_config`` starts from them).
        context_window: positions the model attends over.
        adapter: the adapter on the model (torch only; the others run merged models).
    """

    name = "engine"
    adapter: AdapterInfo | None = None

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: Template,
        template_name: str,
        generation_config: Any,
        window: int,
    ) -> None:
        self.tokenizer, self.template, self.template_name = tokenizer, template, template_name
        self.generation_config, self.context_window = generation_config, window

    def batch_size_for(self, config: GenerationConfig) -> int:
        """The batch size used when the flag is left unset."""
        return DEFAULT_BATCH

    def generate(
        self,
        prompts: list[list[int]],
        config: GenerationConfig,
        *,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """One reply per prompt, in order, decoded with special tokens dropped and stripped."""
        raise NotImplementedError

    def stream(self, prompt: list[int], config: GenerationConfig) -> Iterator[str]:
        """The reply to one prompt in final text pieces; closing the iterator stops the generation."""
        raise NotImplementedError(f"--engine {self.name} does not stream replies: use --engine torch")

    def live(self, max_live: int, seed: int, prompt_cache_mb: int | None = None) -> Any:
        """Something with ``stream(prompt, config)`` that serves ``max_live`` readers at once (the web demo);
        ``prompt_cache_mb``: memory for recent prompts' caches, where the engine keeps them itself (None: its
        default)."""
        if max_live != 1:
            raise ValueError(f"--engine {self.name} streams one reply at a time")
        return self

    def session(self, config: GenerationConfig, seed: int, prompt_cache_mb: int | None = None) -> Any:
        """Something with ``stream(prompt, config)`` for the turns of one conversation (a terminal chat); it may
        keep what the conversation computed between turns (within ``prompt_cache_mb``, None: the default)."""
        return self

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class TorchEngine(Engine):
    """The model in this process (the default): transformers' numerics, greedy through our loop."""

    name = "torch"

    def __init__(
        self, model: Any, tokenizer: PreTrainedTokenizerBase, template: Template, template_name: str = ""
    ) -> None:
        super().__init__(tokenizer, template, template_name, model.generation_config, context_window(model))
        self.model = model

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> TorchEngine:
        engine = cls(loaded.model, loaded.tokenizer, loaded.template, loaded.template_name)
        engine.adapter = loaded.adapter
        return engine

    def batch_size_for(self, config: GenerationConfig) -> int:
        on_cpu = next(self.model.parameters()).device.type == "cpu"
        return CPU_LOOP_BATCH if on_cpu and loop_problem(self.model, config) is None else DEFAULT_BATCH

    def generate(self, prompts, config, *, batch_size=None, progress=None) -> list[str]:
        size = batch_size or self.batch_size_for(config)
        return generate_batch(self.model, self.tokenizer, prompts, config, batch_size=size, progress=progress)

    def stream(self, prompt, config) -> Iterator[str]:
        return stream_reply(self.model, self.tokenizer, prompt, config)

    def live(self, max_live: int, seed: int, prompt_cache_mb: int | None = None) -> LiveBatcher:
        return LiveBatcher(
            self.model, self.tokenizer, max_live=max_live, seed=seed, prompt_cache_mb=prompt_cache_mb
        )

    def session(
        self, config: GenerationConfig, seed: int, prompt_cache_mb: int | None = None
    ) -> LiveBatcher | TorchEngine:
        """A live batcher of one reply, whose kept caches make each turn compute only its new message; this
        engine (``generate`` in a thread) for settings a live reply does not follow."""
        return self if live_problem(config) is not None else self.live(1, seed, prompt_cache_mb)


class LlamaCppEngine(Engine):
    """llama-cpp-python over a GGUF export of the model (CPU; its own numerics)."""

    name = "llama_cpp"

    def __init__(self, llm: Any, *parts: Any) -> None:
        super().__init__(*parts)
        self.llm = llm
        self.lock = threading.Lock()  # one llama.cpp context: one sequence at a time

    def batch_size_for(self, config: GenerationConfig) -> int:
        return 1

    def _tokens(self, prompt: list[int], config: GenerationConfig) -> Iterator[int]:
        """The reply's ids, one per llama.cpp decode step, up to a stop id or ``max_new_tokens``."""
        if config.do_sample:
            sampling = {
                "temp": config.temperature or 1.0,
                "top_p": config.top_p or 1.0,
                "top_k": config.top_k or 0,
            }
        else:
            sampling = {"temp": 0.0, "top_p": 1.0, "top_k": 1}  # temp 0: llama.cpp's greedy sampler
        stops = set(stop_ids(config))
        tokens = self.llm.generate(
            prompt,
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=config.repetition_penalty or 1.0,
            reset=True,
            **sampling,
        )
        for count, token in enumerate(tokens, start=1):
            yield int(token)
            if token in stops or count >= config.max_new_tokens:
                return

    def generate(self, prompts, config, *, batch_size=None, progress=None) -> list[str]:
        replies = []
        for prompt in prompts:
            with self.lock:
                replies.append(self._decode(list(self._tokens(prompt, config))))
            if progress is not None:
                progress(1)
        return replies

    def stream(self, prompt, config) -> Iterator[str]:
        streamer = reply_streamer(self.tokenizer)  # the same text pieces as the torch engine's
        streamer.put(torch.tensor([prompt]))  # the prompt: skipped
        with self.lock:  # a closed reader ends this generator at its yield: llama.cpp stops with it
            for token in self._tokens(prompt, config):
                streamer.put(torch.tensor([token]))
                while not streamer.text_queue.empty():
                    yield streamer.text_queue.get()
            streamer.end()
            yield from iter(streamer.text_queue.get, streamer.stop_signal)


class VllmEngine(Engine):
    """vLLM on a CUDA GPU: batch generation (its own numerics)."""

    name = "vllm"

    def __init__(self, llm: Any, *parts: Any) -> None:
        super().__init__(*parts)
        self.llm = llm

    def batch_size_for(self, config: GenerationConfig) -> int:
        return VLLM_BATCH

    def generate(self, prompts, config, *, batch_size=None, progress=None) -> list[str]:
        from vllm import SamplingParams

        sample = bool(config.do_sample)
        params = SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=(config.temperature or 1.0) if sample else 0.0,
            top_p=(config.top_p or 1.0) if sample else 1.0,
            top_k=(config.top_k or -1) if sample else -1,
            repetition_penalty=config.repetition_penalty or 1.0,
            stop_token_ids=stop_ids(config),
        )
        size, stops, replies = batch_size or VLLM_BATCH, set(stop_ids(config)), []
        for start in range(0, len(prompts), size):
            chunk = [{"prompt_token_ids": p} for p in prompts[start : start + size]]
            for out in self.llm.generate(chunk, params, use_tqdm=False):
                replies.append(self._decode(cut_at_stop(list(out.outputs[0].token_ids), stops)))
            if progress is not None:
                progress(len(chunk))
        return replies


# ---- choosing and loading -------------------------------------------------------------------------------------


def load_engine(args: Any, *, seed: int = 1234) -> Engine:
    """The engine ``args.engine`` names, loaded from the :class:`~sft.inference.settings.ModelLoadArgs` flags
    (checked first by :func:`engine_problems`). A missing optional package or GPU stops with what to install."""
    if args.engine == "torch":
        return TorchEngine.from_loaded(load_from_flags(args))
    from transformers import AutoConfig

    from sft.core.paths import require_local_dir
    from sft.data.templates import get_template
    from sft.inference.settings import read_generation_config
    from sft.modeling.loading import load_tokenizer

    model_path = require_local_dir(args.model_path, "--model_path")
    tokenizer = load_tokenizer(model_path)
    config = AutoConfig.from_pretrained(str(model_path))
    template_name = inference_template(None, args.template, tokenizer, config.model_type)
    template = get_template(template_name, tokenizer, model_path)
    parts = (tokenizer, template, template_name, read_generation_config(model_path), context_window(config))
    if args.engine == "llama_cpp":
        return LlamaCppEngine(_llama(Path(args.gguf), model_path, config, seed), *parts)
    if args.engine == "vllm":
        return VllmEngine(_vllm(model_path, args.dtype, seed), *parts)
    raise ValueError(f"--engine {args.engine!r}: unknown")


def _llama(gguf: Path, model_path: Path, config: Any, seed: int) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise UserError(f"--engine llama_cpp needs llama-cpp-python: {LLAMA_CPP_INSTALL}") from err
    if not gguf.is_file():
        from sft.export.gguf import export_gguf

        logger.info("--gguf %s does not exist: exporting %s to it (f16, verified)", gguf, model_path)
        export_gguf(model_path, gguf, out_type="f16")
    threads = torch.get_num_threads()
    llm = Llama(
        model_path=str(gguf),
        n_ctx=context_window(config),
        n_threads=threads,
        n_threads_batch=threads,
        seed=seed,
        verbose=False,
    )
    vocab = config.get_text_config().vocab_size
    if llm.n_vocab() != vocab:
        raise UserError(
            f"--gguf {gguf}: {llm.n_vocab()} tokens, --model_path {model_path}: {vocab}; export the file from this "
            "model (export_gguf.py --model_dir MODEL --out FILE)"
        )
    logger.info("llama.cpp: %s, %d threads (its own numerics: docs/INFERENCE.md#engines)", gguf.name, threads)
    return llm


def _vllm(model_path: Path, dtype: str, seed: int) -> Any:
    try:
        from vllm import LLM
    except ImportError as err:
        raise UserError("--engine vllm needs vLLM: pip install vllm (on a machine with a CUDA GPU)") from err
    if not torch.cuda.is_available():
        raise UserError("--engine vllm needs a CUDA GPU and none is visible: use --engine torch")
    names = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return LLM(model=str(model_path), tokenizer=str(model_path), dtype=names.get(dtype, dtype), seed=seed)
