"""The flags of every script that generates, their checks, and the model's generation_config with them applied.

:class:`ModelLoadArgs` names the model to load and how (:func:`sft.inference.loading.load_from_flags` loads it);
:func:`engine_problems` lists the flag combinations an engine refuses. :class:`GenerationArgs` holds the seven
settings that decide what is generated (every field left None keeps the model's ``generation_config.json`` value)
and the engine that computes it (``--engine``, ``--gguf``: :mod:`sft.inference.engines`). predict.py and
``data_helper.py synthesize``/``preference`` take them as flags, the web demo its engine flags and the settings
from its sliders.

Nothing here imports torch or transformers at import time: the scripts build their flags from these classes, and
``data_helper.py``'s converters and ``evaluate.py rouge`` start in a fraction of a second because of it.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.core.errors import ArgsError
from sft.core.flags import REQUIRED, flag
from sft.inference import ENGINES
from sft.modeling import PRECISIONS, QUANTIZATIONS
from sft.modeling.files import ModelFileError, weight_files_problem

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512  # used only when the model's generation_config sets no length at all
# The GenerationArgs fields that are generation_config settings (the others choose the engine).
SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams")


@dataclass
class ModelLoadArgs:
    """Model: which model to load, and how."""

    model_path: str = flag(REQUIRED, "Local model directory (a merged model, or the adapter's base).")
    adapter_dir: str | None = flag(None, "A peft adapter to apply on top of --model_path (unmerged).")
    quantization: str | None = flag(
        None,
        "Load the base weights quantised; default: as the adapter was trained (train_args.json), else none.",
        choices=QUANTIZATIONS,
    )
    template: str | None = flag(
        None, "Chat template; default: the one the adapter was trained with, else chosen from the model."
    )
    device: str = flag("auto", "auto (first GPU, else CPU), cpu, cuda or cuda:N.")
    dtype: str = flag("auto", "Compute dtype; auto: bf16 on GPU, fp32 on CPU.", choices=("auto", *PRECISIONS))


@dataclass
class GenerationArgs:
    """Generation (default: the model's generation_config.json)."""

    max_new_tokens: int | None = flag(None, "Most tokens generated per answer.")
    do_sample: bool | None = flag(None, "Sample (or --no-do_sample: greedy).")
    temperature: float | None = flag(None, "Sampling temperature.")
    top_p: float | None = flag(None, "Nucleus sampling: keep the top tokens with this much mass.")
    top_k: int | None = flag(None, "Sample among the k most likely tokens (0 = all).")
    repetition_penalty: float | None = flag(None, "Penalty for repeating tokens (1 = off).")
    num_beams: int | None = flag(None, "Beam search width (1 = no beam search).")
    engine: str = flag(
        "torch",
        "What computes the replies: torch (this model; greedy tokens are transformers' generate()'s), llama_cpp "
        "(llama-cpp-python over --gguf, CPU) or vllm (CUDA GPU); the last two have their own numerics "
        "(docs/INFERENCE.md#engines).",
        choices=ENGINES,
    )
    gguf: str | None = flag(
        None,
        "With --engine llama_cpp: the GGUF export of --model_path (export_gguf.py); a missing file is exported "
        "there first (f16, verified).",
    )

    def overrides(self) -> dict[str, Any]:
        """The settings that were given (None = keep the model's value), also of a subclass (``PredictArgs``)."""
        return {name: v for name in SETTINGS if (v := getattr(self, name)) is not None}

    def check(self, defaults: GenerationConfig) -> None:
        """Refuse impossible settings with one :class:`ArgsError` naming each flag.

        Sampling parameters without sampling (they would be silently ignored) and out-of-range values.
        ``defaults`` is the model's generation config (:func:`read_generation_config` before loading,
        ``model.generation_config`` after): it decides whether sampling is on when ``do_sample`` is None.
        """
        problems = []
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        effective_sample = self.do_sample if self.do_sample is not None else bool(defaults.do_sample)
        given = [f"--{name}" for name, value in sampling.items() if value is not None]
        if given and not effective_sample:
            problems.append(
                f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when sampling, but sampling "
                f"is off ({'--no-do_sample' if self.do_sample is False else 'the generation_config has do_sample=false'}): "
                "add --do_sample or drop them"
            )
        checks = [
            ("max_new_tokens", lambda v: v > 0, "must be > 0"),
            ("temperature", lambda v: v > 0, "must be > 0 (for greedy decoding use --no-do_sample)"),
            ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
            ("top_k", lambda v: v >= 0, "must be >= 0 (0 = off)"),
            ("repetition_penalty", lambda v: v > 0, "must be > 0 (1 = off)"),
            ("num_beams", lambda v: v >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            value = getattr(self, name)
            if value is not None and not ok(value):
                problems.append(f"--{name}={value} {why}")
        if problems:
            raise ArgsError(problems)


# Default memory for recent prompts' and replies' keys/values in live replies: 46 KB a position for SmolLM2 in fp32
# (~11,000 positions), 0.5 MB for a 7B model in bf16 (~1,000: a few chats' system prompts and histories).
PROMPT_CACHE_MB = 512


@dataclass
class LiveArgs:
    """Live replies with --engine torch (the web demo, predict.py --chat)."""

    prompt_cache_mb: int | None = flag(
        None,
        "With --engine torch: memory for recent prompts' and replies' keys/values, so that a chat's next message "
        "computes only its new text (and a system prompt shared by chats is computed once); 0 keeps none. "
        f"Default {PROMPT_CACHE_MB}.",
    )


def engine_problems(args: Any, *, streams: bool = False, batch_size: int | None = None) -> list[str]:
    """The flag combinations ``args.engine`` refuses, found before any work (``problems()`` of the scripts).

    ``args`` holds the :class:`ModelLoadArgs` flags, ``engine`` and ``gguf``;
    ``streams``: the script streams replies (a chat); ``batch_size``: the ``--batch_size`` given (None: unset).
    """
    name, problems = args.engine, []
    if args.gguf is not None and name != "llama_cpp":
        problems.append("--gguf is the llama_cpp engine's model file: add --engine llama_cpp or drop --gguf")
    cache_mb = getattr(args, "prompt_cache_mb", None)
    if cache_mb is not None and cache_mb < 0:
        problems.append(f"--prompt_cache_mb={cache_mb} must be >= 0")
    if cache_mb is not None and name != "torch":
        problems.append(f"--engine {name} keeps its own prompt cache: drop --prompt_cache_mb")
    if name == "torch":
        return problems
    if args.adapter_dir is not None:
        problems.append(
            f"--engine {name} runs a plain model: merge the adapter first (merge_params.py) and pass the merged "
            "directory as --model_path"
        )
    if args.quantization not in (None, "none"):
        problems.append(f"--quantization loads torch weights; --engine {name} does not use it: drop it")
    if (getattr(args, "num_beams", None) or 1) > 1:
        problems.append(f"--engine {name} does not search beams here: drop --num_beams or use --engine torch")
    if name == "llama_cpp":
        if args.gguf is None:
            problems.append(
                "--engine llama_cpp needs --gguf FILE: the GGUF export of --model_path (export_gguf.py; a missing "
                "file is exported there first, f16)"
            )
        if args.device not in ("auto", "cpu"):
            problems.append("--engine llama_cpp runs on the CPU: drop --device")
        if args.dtype != "auto":
            problems.append(
                "--engine llama_cpp computes in the GGUF file's type: drop --dtype (export_gguf.py --type)"
            )
        if batch_size not in (None, 1):
            problems.append("--engine llama_cpp answers one prompt at a time: drop --batch_size")
    if name == "vllm":
        if streams:
            problems.append(
                "--engine vllm serves batch generation here, not streamed chats: use --engine torch"
            )
        if args.device == "cpu":
            problems.append("--engine vllm runs on a CUDA GPU: drop --device cpu or use --engine torch")
    return problems


def read_generation_config(model_path: str | os.PathLike) -> GenerationConfig:
    """The generation settings a model directory loads with, read without loading its weights.

    ``generation_config.json`` if there is one, else what transformers derives from ``config.json``
    (as ``from_pretrained`` does); lets flags be checked against the model's defaults before loading.
    """
    from transformers import AutoConfig, GenerationConfig

    try:
        if (Path(model_path) / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(str(model_path))
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(model_path)))
    except Exception as err:
        if problem := weight_files_problem(model_path):  # a damaged config file: name it and the fix
            raise ModelFileError(problem) from err
        raise


def build_generation_config(
    model: PreTrainedModel | Any,
    tokenizer: PreTrainedTokenizerBase,
    settings: GenerationArgs | None = None,
    *,
    stop_ids: Iterable[int] = (),
) -> GenerationConfig:
    """The model's ``generation_config`` with every given setting applied on top, checked.

    ``model`` is a loaded model or an engine (:mod:`sft.inference.engines`): anything with the model's
    ``generation_config``.
    ``stop_ids`` also end a reply: the chat template's end-of-turn id (``Template.end_id``), which is
    not always the model's EOS (``<|im_end|>`` on a model whose EOS is ``<|endoftext|>``, ``<|eot_id|>``
    on a base Llama-3): the answer ends where training taught it to.
    """
    settings = settings or GenerationArgs()
    config = copy.deepcopy(model.generation_config)
    settings.check(config)
    for name, value in settings.overrides().items():
        setattr(config, name, value)
    if not config.do_sample:
        # Greedy/beam search ignores these. Neutral values (not None: generate() would refill None from
        # the model's generation_config) keep transformers from warning that they are ignored.
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
    if config.max_new_tokens is None and config.max_length is None:
        logger.info("generation_config sets no length: using max_new_tokens=%d", DEFAULT_MAX_NEW_TOKENS)
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    elif config.max_new_tokens is None:
        config.max_length = None  # max_length counts the prompt too: a long prompt would leave no room
        config.max_new_tokens = model.generation_config.max_length
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    extra = [i for i in stop_ids if i not in eos]
    if extra:
        config.eos_token_id = [*eos, *extra]
    return config


def describe(config: GenerationConfig) -> str:
    """One line with the settings that decide what is generated (for logs and output files)."""
    return ", ".join(f"{k}={getattr(config, k)}" for k in SETTINGS if getattr(config, k) is not None)
