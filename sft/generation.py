"""Generation helpers shared by predict.py, evaluate.py and web_demo.py.

- :func:`add_model_args` -- the flags that say which model to load and how (--model_path, --adapter_dir, ...).
- :func:`load_from_flags` -- those flags -> model, tokenizer and chat template, ready to generate.
- :func:`load_for_inference` -- a merged model, or a base model plus a peft adapter, with its tokenizer.
- :func:`read_adapter_config` / :func:`check_adapter_fits` -- refuse a damaged adapter, or one of another base.
- :func:`adapter_training_setup` -- how the adapter was trained (quantisation), read from its train_args.json.
- :func:`check_generation_flags` -- refuse impossible generation flags (also before loading the model).
- :func:`build_generation_config` -- the model's generation_config with the user's overrides, validated.
- :func:`split_prompt` -- a conversation record -> (the record to prompt with, its references).
- :func:`generate_batch` -- batched, left-padded generation of many prompts.
- :func:`stream_reply` -- one prompt, the reply streamed as it is generated (terminal chat, web demo).
- :func:`fit_history` -- drop the oldest rounds of a chat until the prompt fits the context window.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

    from sft.data.templates import Template

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
DEFAULT_MAX_NEW_TOKENS = 512  # used only when the model's generation_config sets no length at all
DEVICE_HELP = "auto (first GPU, else CPU), cpu, cuda or cuda:N."


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def add_model_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    dtype_default: str | None = "auto",
    dtype_help: str = "auto: bf16 on GPU, fp32 on CPU.",
    template_help: str = "Chat template; default: the tokenizer's own chat template, else by model type.",
) -> None:
    """Add the model flags of predict.py, web_demo.py and ``evaluate.py ppl`` to a parser or argument group.

    ``--model_path --adapter_dir --quantization --template --device --dtype``, read by
    :func:`load_from_flags`. ``evaluate.py ppl`` defaults ``--dtype`` and ``--template`` to the
    adapter's train_args.json, hence the overridable default and help texts.
    """
    parser.add_argument(
        "--model_path", required=True, help="Local model directory (merged model, or the adapter's base)."
    )
    parser.add_argument(
        "--adapter_dir", default=None, help="A peft adapter to apply on top of --model_path (unmerged)."
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="Load the base weights quantised; default: as the adapter was trained (train_args.json), else none.",
    )
    parser.add_argument("--template", default=None, help=template_help)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--dtype", choices=("auto", "bf16", "fp16", "fp32"), default=dtype_default, help=dtype_help
    )


# ---------------------------------------------------------------------------------------------
# Devices, dtypes, adapters
# ---------------------------------------------------------------------------------------------


def resolve_device(flag: str) -> torch.device:
    """``--device``: ``auto`` (the first GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if flag == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(flag)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(flag: str, device: torch.device) -> torch.dtype:
    """``--dtype``: ``auto`` = bf16 on a GPU that supports it, fp32 otherwise (CPU matmuls are fastest in fp32)."""
    from sft.modeling import DTYPES

    if flag == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPES[flag]


def read_checkpoint_json(path: Path) -> Any:
    """A JSON file of a checkpoint directory; a one-line error naming the file when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON (line {err.lineno} column {err.colno}: {err.msg}): the save was cut "
            "short or the file was edited; repair it or copy the checkpoint again"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason}): copy the checkpoint again") from err


def adapter_tensor_shapes(adapter_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in ``adapter_model.safetensors``, from its header (no data loaded).

    safetensors checks that the header covers the whole file, so a file cut short by an interrupted
    save or copy is found here, before any model is loaded.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is damaged ({err}): the save was cut short or the file was truncated in a copy; "
            "use another checkpoint, or copy this one again"
        ) from err


def read_adapter_config(adapter_dir: str | os.PathLike, flag: str = "--adapter_dir") -> dict[str, Any]:
    """The peft ``adapter_config.json`` of an adapter directory; a one-line error if it is not one.

    Also checks that ``adapter_model.safetensors`` is complete, so a damaged checkpoint is refused
    with the file's name before any model is loaded.
    """
    path = Path(adapter_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{flag}={adapter_dir} does not exist: pass a checkpoint directory written by train.py"
        )
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{flag}={adapter_dir} has no adapter_config.json, so it is not a peft adapter: pass a checkpoint "
            "directory written by train.py (output_dir/epoch-E-step-S)"
        )
    weights = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    if not any(w.is_file() for w in weights):
        raise FileNotFoundError(
            f"{flag}={adapter_dir} has adapter_config.json but no adapter_model.safetensors"
        )
    config = read_checkpoint_json(config_file)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(
            f"{config_file} is not a peft adapter config (no 'peft_type'): copy the checkpoint again"
        )
    if weights[0].is_file():
        adapter_tensor_shapes(path)
    return config


@dataclass(frozen=True)
class TrainingSetup:
    """What the adapter's training run did to the base weights (from its train_args.json, else from flags)."""

    quantization: str | None  # nf4 / fp4 / int8 / none; None = unknown (no train_args.json, no flag)
    double_quant: bool
    source: str  # where the values came from, for log messages


def adapter_training_setup(
    adapter_dir: str | os.PathLike,
    quantization_flag: str | None = None,
    double_quant_flag: bool | None = None,
) -> TrainingSetup:
    """The base-weight quantisation an adapter was trained against.

    train.py saves ``train_args.json`` next to every adapter; its ``quantization`` and ``double_quant``
    are the truth. The flags fill in for adapters without that file; a flag that contradicts the file
    is an error (the adapter was trained one way, so loading its base another way is a mistake).
    """
    args_file = Path(adapter_dir) / "train_args.json"
    if args_file.is_file():
        train_args = read_checkpoint_json(args_file)
        if not isinstance(train_args, dict):
            raise ValueError(
                f"{args_file} holds a JSON {type(train_args).__name__}, not train.py's arguments object: "
                "copy the checkpoint again"
            )
        quantization = train_args.get("quantization")
        double_quant = bool(train_args.get("double_quant", True))
        if quantization is not None:
            if quantization_flag is not None and quantization_flag != quantization:
                raise ValueError(
                    f"--quantization {quantization_flag} contradicts {args_file} (the adapter was trained with "
                    f"quantization={quantization}): drop --quantization"
                )
            if double_quant_flag is not None and double_quant_flag != double_quant:
                raise ValueError(
                    f"--{'' if double_quant_flag else 'no-'}double_quant contradicts {args_file} "
                    f"(double_quant={double_quant}): drop the flag"
                )
            return TrainingSetup(quantization, double_quant, str(args_file))
    double_quant = True if double_quant_flag is None else double_quant_flag
    source = (
        "--quantization"
        if quantization_flag is not None
        else "unknown (no train_args.json, no --quantization)"
    )
    return TrainingSetup(quantization_flag, double_quant, source)


def inference_quantization(adapter_dir: str | os.PathLike | None, flag: str | None) -> tuple[str, bool]:
    """How to load the base for inference: ``--quantization`` if given, else as the adapter was trained.

    Unlike merging, inference may deliberately load the base differently from training (e.g. a QLoRA
    adapter on a bf16 base); that is allowed, with a warning, because the numbers then differ.
    """
    if adapter_dir is None:
        return flag or "none", True
    setup = adapter_training_setup(adapter_dir)
    trained = setup.quantization or "none"
    if flag is not None and flag != trained:
        logger.warning(
            "--quantization %s differs from the adapter's training quantization %s (%s): outputs will differ "
            "from what training measured",
            flag,
            trained,
            setup.source,
        )
    return flag or trained, setup.double_quant


def load_for_inference(
    model_path: str | os.PathLike,
    adapter_dir: str | os.PathLike | None = None,
    *,
    quantization: str = "none",
    double_quant: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model for generation: a merged model, or a base model with a peft adapter on top.

    Args:
        model_path: local model directory (a merged model or the adapter's base).
        adapter_dir: optional peft adapter directory (kept unmerged: the same numbers as in training).
        quantization: how to load the base weights (``nf4``/``fp4``/``int8``/``none``), normally the
            adapter's training quantisation (:func:`adapter_training_setup`).
        double_quant: 4-bit only.
        dtype: dtype of the unquantised weights and of the 4-bit matmuls.
        device: where the model runs.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. The tokenizer comes from the adapter directory
        when it has one (train.py saves it there), else from the model directory. A 4-bit base computes
        exactly as in training (see :func:`sft.modeling.keep_4bit_weights_unpacked`).
    """
    from sft.modeling import keep_4bit_weights_unpacked, load_base_model, load_tokenizer

    device = torch.device(device)
    if adapter_dir is not None:
        read_adapter_config(adapter_dir)
    model = load_base_model(
        model_path,
        quantization,
        dtype,
        device_map={"": device},
        double_quant=double_quant,
    )
    # Compute with 4-bit weights as training does (dequantise, then matmul in `dtype`). On CPUs with
    # AVX512-BF16, bitsandbytes would otherwise repack the weights for a bf16 kernel in eval mode:
    # perplexities would drift from train.py's eval/ppl (~1e-3 in the logits) and answers from those of
    # the `--merge_into dequantized` model. Slower on such CPUs; no effect on GPUs.
    keep_4bit_weights_unpacked(model)
    tokenizer_dir = model_path
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if (Path(adapter_dir) / "tokenizer_config.json").is_file():
            tokenizer_dir = adapter_dir
        logger.info("adapter %s attached (unmerged)", adapter_dir)
    model.eval()
    return model, load_tokenizer(tokenizer_dir)


def check_adapter_fits(model_path: str | os.PathLike, adapter_dir: str | os.PathLike) -> None:
    """Refuse, before loading weights, an adapter that is damaged or was trained on another base model.

    peft only warns when an adapter's module names are missing from the model and then runs the base
    model without the adapter: a LoRA adapter of another architecture would silently do nothing. Its
    tensors are checked against the base architecture built on the meta device (no memory needed).
    """
    from sft.merge import check_adapter_matches_base  # sft.merge imports this module

    config = read_adapter_config(adapter_dir)
    if config.get("peft_type") == "LORA":
        check_adapter_matches_base(Path(model_path), Path(adapter_dir), base_flag="--model_path")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, with what the scripts report about how it was loaded."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: Template
    template_name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str


def load_from_flags(
    args: argparse.Namespace, *, dtype: str | None = None, template: str | None = None
) -> LoadedModel:
    """Load what the :func:`add_model_args` flags name: model (+ adapter), tokenizer and chat template.

    Args:
        args: the parsed flags. ``--quantization`` unset loads the base as the adapter was trained,
            ``--dtype``/``--device`` ``auto`` pick for the hardware, ``--template`` unset picks the
            template from the model type.
        dtype, template: used instead of ``args.dtype``/``args.template`` when given (``evaluate.py ppl``
            fills them in from the adapter's train_args.json).
    """
    from sft.data.templates import get_template, resolve_template_name
    from utils import require_local_dir

    model_path = require_local_dir(args.model_path, "--model_path")
    if args.adapter_dir is not None:
        check_adapter_fits(model_path, args.adapter_dir)
    device = resolve_device(args.device)
    torch_dtype = resolve_dtype(dtype or args.dtype, device)
    quantization, double_quant = inference_quantization(args.adapter_dir, args.quantization)
    model, tokenizer = load_for_inference(
        model_path,
        args.adapter_dir,
        quantization=quantization,
        double_quant=double_quant,
        dtype=torch_dtype,
        device=device,
    )
    template_name = resolve_template_name(template or args.template, tokenizer, model.config.model_type)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=get_template(template_name, tokenizer, model_path),
        template_name=template_name,
        device=device,
        dtype=torch_dtype,
        quantization=quantization,
    )


# ---------------------------------------------------------------------------------------------
# Generation settings
# ---------------------------------------------------------------------------------------------


def read_generation_config(model_path: str | os.PathLike) -> GenerationConfig:
    """The generation settings a model directory loads with, read without loading its weights.

    ``generation_config.json`` if there is one, else what transformers derives from ``config.json``
    (as ``from_pretrained`` does); lets flags be checked against the model's defaults before loading.
    """
    from transformers import AutoConfig, GenerationConfig

    if (Path(model_path) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(model_path))
    return GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(model_path)))


def check_generation_flags(
    defaults: GenerationConfig,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    do_sample: bool | None = None,
    num_beams: int | None = None,
) -> None:
    """Refuse impossible generation settings with a ValueError naming the flag.

    Sampling parameters without sampling (they would be silently ignored) and out-of-range values.
    ``defaults`` is the model's generation config (:func:`read_generation_config` before loading,
    ``model.generation_config`` after): it decides whether sampling is on when ``do_sample`` is None.
    """
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    effective_sample = do_sample if do_sample is not None else bool(defaults.do_sample)
    if not effective_sample:
        given = [f"--{name}" for name, value in sampling.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when sampling, but sampling is off "
                f"({'--no-do_sample' if do_sample is False else 'the generation_config has do_sample=false'}): "
                "add --do_sample or drop them"
            )
    checks = [
        ("--max_new_tokens", max_new_tokens, lambda v: v > 0, "must be > 0"),
        (
            "--temperature",
            temperature,
            lambda v: v > 0,
            "must be > 0 (for greedy decoding use --no-do_sample)",
        ),
        ("--top_p", top_p, lambda v: 0 < v <= 1, "must be in (0, 1]"),
        ("--top_k", top_k, lambda v: v >= 0, "must be >= 0 (0 = off)"),
        ("--repetition_penalty", repetition_penalty, lambda v: v > 0, "must be > 0 (1 = off)"),
        ("--num_beams", num_beams, lambda v: v >= 1, "must be >= 1"),
    ]
    for flag, value, ok, why in checks:
        if value is not None and not ok(value):
            raise ValueError(f"{flag}={value} {why}")


def build_generation_config(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    do_sample: bool | None = None,
    num_beams: int | None = None,
) -> GenerationConfig:
    """The model's ``generation_config`` with every non-None argument applied on top.

    Raises a ValueError naming the flag for impossible settings (:func:`check_generation_flags`).
    """
    import copy

    config = copy.deepcopy(model.generation_config)
    overrides = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "do_sample": do_sample,
        "num_beams": num_beams,
    }
    check_generation_flags(config, **overrides)
    for name, value in overrides.items():
        if value is not None:
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
    return config


def describe(config: GenerationConfig) -> str:
    """One line with the settings that decide what is generated (for logs and output files)."""
    keys = ["max_new_tokens", "do_sample", "num_beams", "temperature", "top_p", "top_k", "repetition_penalty"]
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys if getattr(config, k) is not None)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def split_prompt(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split a conversation record into the part to prompt with and the reference answers.

    A record that ends with an assistant turn is a test example: that turn is the reference and
    everything before it is the prompt. The record's ``references`` (several answers, e.g. DialogSum
    test, RoleBench) replace it when present. A record ending with a user turn is a bare prompt.
    """
    turns = record["conversations"]
    references = record.get("references")
    if turns[-1]["role"] == "assistant":
        if references is None:
            references = [turns[-1]["content"]]
        turns = turns[:-1]
    prompt_record = {k: v for k, v in record.items() if k not in ("conversations", "references")}
    prompt_record["conversations"] = turns
    return prompt_record, [str(r) for r in (references or [])]


def fit_history(
    build: Callable[[list[dict[str, str]]], list[int]],
    history: list[dict[str, str]],
    max_prompt_tokens: int,
) -> tuple[list[int], list[dict[str, str]]]:
    """Drop the oldest rounds of a chat until its prompt fits ``max_prompt_tokens``.

    Args:
        build: turns -> prompt ids (the template, with the system prompt bound).
        history: the conversation so far, ending with the new user turn.
        max_prompt_tokens: the context window minus the room kept for the reply.

    Returns:
        ``(prompt ids, the turns they were built from)``. The newest user turn is always kept, cut
        from the left if it alone is too long.
    """
    turns = list(history)
    ids = build(turns)
    while len(ids) > max_prompt_tokens and len(turns) > 1:
        # Drop one round: the oldest user turn and everything up to the next user turn.
        nxt = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
        turns = turns[nxt:]
        ids = build(turns)
    if len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids, turns


def context_window(model: PreTrainedModel) -> int:
    """Positions the model can attend over (``max_position_embeddings`` or Baichuan's ``model_max_length``)."""
    config = model.config
    for name in ("max_position_embeddings", "model_max_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)`` of shape ``(B, T)``.

    Generation appends on the right, so the padding goes on the left: every row's last real token
    sits in the last column and the new tokens follow it directly.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Generate one reply per prompt, ``batch_size`` prompts at a time, left-padded.

    Prompts are processed longest first (similar lengths share a batch, so little padding) and the
    replies are returned in the input order. Only the new tokens are decoded, special tokens dropped.

    Args:
        progress: called with the number of prompts finished after each batch (e.g. tqdm.update).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in idx], config.pad_token_id)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
        )
        new_tokens = output[
            :, input_ids.shape[1] :
        ]  # (B, new) -- padding is on the left, so one cut fits all
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return replies


def reply_streamer(tokenizer: PreTrainedTokenizerBase) -> TextIteratorStreamer:
    """The streamer :func:`stream_reply` feeds: the reply's text in pieces that are final when emitted.

    * Special tokens (EOS, BOS, pad) are skipped. User-defined symbols that are not special tokens
      (the ``<reserved_N>`` pieces of Baichuan2's vocabulary) are ordinary text and do print, as in
      :func:`generate_batch`'s answers.
    * Text is released only up to a space, after a complete CJK character or at a newline, so a
      character still being assembled from byte tokens (decoded as U+FFFD until its last byte
      arrives) is held back, never printed as ``\ufffd`` and then replaced. A U+FFFD that does get
      through is an invalid byte sequence the model really produced: the full decode has it too.
    """
    from transformers import TextIteratorStreamer

    return TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stream_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[int],
    config: GenerationConfig,
) -> Iterator[str]:
    """Generate a reply to one prompt and yield the text pieces as they are produced.

    ``generate`` runs in a worker thread and feeds a :func:`reply_streamer`; an exception in the
    worker is re-raised here once the stream ends (instead of leaving the caller waiting forever).
    """
    if (config.num_beams or 1) > 1:
        raise ValueError("streaming replies needs num_beams=1 (beam search only knows its answer at the end)")
    device = next(model.parameters()).device
    streamer = reply_streamer(tokenizer)
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=config,
                    streamer=streamer,
                )
        except BaseException as err:  # handed to the consumer thread below, which re-raises it
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if failure:
        raise failure[0]
