"""Sampling and the token loop: replies to many prompts in batches, and one streamed reply.

Prompts are token id lists (built by a chat template); replies are decoded text with special tokens dropped.
Used by predict.py, the web demo, ``data_helper.py synthesize`` and ``data_helper.py preference`` (through
:mod:`sft.inference.engines`).

Two ways to generate a batch, chosen per call by :func:`loop_problem`:

* **our greedy loop** (:func:`greedy_batch`) for greedy decoding, with or without a repetition penalty: one
  ``forward -> argmax`` per step over the model's forward, a KV cache written in place
  (:mod:`sft.inference.kv_cache`), finished rows leaving the batch (``generate`` keeps computing them, padded,
  until the longest answer ends) and, on a CPU, each prompt prefilled on its own (no compute spent on padding)
  and decode steps through :mod:`sft.inference.cpu_decode` (the output head in slices, attention in groups of
  rows over their own columns).
  Its tokens are ``generate``'s: the same forward, the same masks and positions, the same float32 argmax. What
  changes is which rows share a matrix multiply; CPU GEMM libraries (MKL) pick their blocking from the shape,
  so a row's logits may differ in the last bits between batch shapes, as they already differ today between
  ``batch_size=1`` and ``batch_size=8``. Greedy tokens move only where two logits tie to the last bits:
  tests/test_generate.py checks equality with ``generate`` on the tiny models and SmolLM2, and
  docs/PERFORMANCE.md counts identical answers on DialogSum.
* **``model.generate``** for everything else (sampling, beam search, other logits processors), batches
  left-padded as before.

Both sort prompts longest first (similar lengths share a batch) and return the answers in the input order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from sft.inference.cpu_decode import column_groups, faster_decoding
from sft.inference.kv_cache import decoder_layers, preallocated_cache, prefill_alone, shared_start

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer


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


def stop_ids(config: GenerationConfig) -> list[int]:
    """The ids that end a reply (``eos_token_id``: one id or a list)."""
    eos = config.eos_token_id
    return [] if eos is None else sorted(set(eos if isinstance(eos, list) else [eos]))


def cut_at_stop(ids: list[int], stops: list[int] | set[int]) -> list[int]:
    """``ids`` up to and including the first stop id (``generate`` pads a finished row after it)."""
    end = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))
    return ids[:end]


# generate() settings, at the values where they change nothing.
NEUTRAL_SETTINGS = {
    "do_sample": (False, None),
    "num_beams": (1, None),
    "no_repeat_ngram_size": (0, None),
    "encoder_repetition_penalty": (1.0, None),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "min_new_tokens": (0, None),
    "min_length": (0, None),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "num_return_sequences": (1, None),
    "renormalize_logits": (False, None),
    "guidance_scale": (1.0, None),
    "stop_strings": (None,),
    "exponential_decay_length_penalty": (None,),
    "remove_invalid_values": (False, None),
    "min_p": (None,),
    "typical_p": (1.0, None),
    "epsilon_cutoff": (0.0, None),
    "eta_cutoff": (0.0, None),
    "top_h": (None,),
}
# What our greedy loop does not do: everything beyond (penalised) argmax. Sampling's own warpers (min_p, ...) are
# inert without do_sample.
_LOOP_CANNOT = tuple(
    k for k in NEUTRAL_SETTINGS if k not in ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
)


def settings_in_use(config: GenerationConfig, names: tuple[str, ...]) -> list[str]:
    """``name=value`` for each of ``names`` (keys of :data:`NEUTRAL_SETTINGS`) that ``config`` sets to a value that
    changes what ``generate`` computes."""
    return [
        f"{k}={getattr(config, k, None)!r}"
        for k in names
        if getattr(config, k, None) not in NEUTRAL_SETTINGS[k]
    ]


def loop_problem(model: PreTrainedModel, config: GenerationConfig) -> str | None:
    """Why :func:`greedy_batch` cannot compute what ``generate`` would (None: it can).

    It does greedy decoding with an optional repetition penalty, for decoder-only models, with a known length.
    """
    if model.config.get_text_config().is_encoder_decoder:
        return "an encoder-decoder model"
    set_ = settings_in_use(config, _LOOP_CANNOT)
    if set_:
        return f"the generation config sets {', '.join(set_)}"
    if config.max_new_tokens is None:
        return "generation_config.max_new_tokens is not set"
    return None


def _penalised(
    scores: torch.Tensor, history: torch.Tensor, pads: torch.Tensor, penalty: float
) -> torch.Tensor:
    """``generate``'s repetition penalty: every id of a row's prompt and answer (not its padding) penalised once."""
    if penalty == 1.0:
        return scores
    return RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pads)(history, scores)


@torch.inference_mode()
def greedy_batch(
    model: PreTrainedModel,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    prefill: str = "rows",
    on_first_token: Callable[[], None] | None = None,
) -> list[list[int]]:
    """Greedy-decode one batch of prompts together (left-padded); finished rows leave the batch.

    Args:
        config: greedy (see :func:`loop_problem`); its ``eos_token_id`` ends a reply, ``max_new_tokens`` bounds it,
            ``repetition_penalty`` applies as in ``generate``.
        prefill: ``"batch"``: one forward over the left-padded prompts (``generate``'s way, best on a GPU);
            ``"rows"``: one forward per prompt, unpadded (no compute on padding; each prompt's numbers are a
            batch-1 prefill's), its keys/values then placed right-aligned in the batch cache.
        on_first_token: called once the first new tokens exist (time to first token).

    Returns the generated ids of each prompt (the stop token included when one was produced), in order.
    """
    with faster_decoding(model) as grouped:
        return _greedy(model, prompts, config, prefill, on_first_token, grouped)


def _greedy(
    model: PreTrainedModel,
    prompts: list[list[int]],
    config: GenerationConfig,
    prefill: str,
    on_first_token: Callable[[], None] | None,
    grouped: bool,
) -> list[list[int]]:
    """:func:`greedy_batch`'s loop; ``grouped``: decode steps may pass ``decode_groups``
    (:func:`sft.inference.cpu_decode.grouped_decode_attention`)."""
    device = next(model.parameters()).device
    max_new = config.max_new_tokens
    penalty = float(config.repetition_penalty or 1.0)
    pad_id = config.pad_token_id if config.pad_token_id is not None else stop_ids(config)[0]
    input_ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    padded = bool((mask == 0).any())  # generate() drops an all-ones mask; so do we (same SDPA path)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    width = input_ids.shape[1]
    cache = preallocated_cache(decoder_layers(model), width + max_new)
    if prefill == "rows" and padded:
        rows_logits = []
        for row, prompt in enumerate(prompts):
            # A start shared with an earlier row (the template's system prompt and headers) is not computed again:
            # its keys/values are that row's own, already in the batch cache (right-aligned).
            shared = shared_start(prompts, row)
            prefix = None
            if shared is not None:
                other, count = shared
                begin = width - len(prompts[other])
                prefix = [layer.row_columns(other, begin, count) for layer in cache.layers]
            own, logits = prefill_alone(model, prompt, prefix=prefix)
            rows_logits.append(logits)
            for layer, own_layer in zip(cache.layers, own.layers, strict=True):
                if row == 0:
                    layer.allocate(own_layer.keys, len(prompts))
                layer.write_row(row, own_layer.keys, own_layer.values, width)
        logits = torch.cat(rows_logits)  # (B, V)
    elif prefill in ("batch", "rows"):
        logits = (
            model(
                input_ids=input_ids,
                attention_mask=mask if padded else None,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1, :]
            .float()
        )  # (B, V)
    else:
        raise ValueError(f"prefill={prefill!r}: expected 'batch' or 'rows'")
    pads = (mask == 0).sum(-1)  # (B,) padding of each row: not penalised
    history = input_ids  # (B, T + step): what generate's logits processors see
    next_ids = _penalised(logits, history, pads, penalty).argmax(-1)  # (B,)
    if on_first_token is not None:
        on_first_token()
    stops = torch.tensor(stop_ids(config), dtype=torch.long, device=device)
    rows = list(range(len(prompts)))  # prompt index of each live batch row
    answers: list[list[int]] = [[] for _ in prompts]
    last_pos = positions[:, -1]
    groups = column_groups(pads.tolist()) if grouped and padded else None
    for step in range(max_new):
        for row, token in zip(rows, next_ids.tolist(), strict=True):  # one host sync per step, not per row
            answers[row].append(token)
        if step == max_new - 1:
            break
        done = torch.isin(next_ids, stops)
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            rows = [rows[k] for k in keep.tolist()]
            next_ids, mask, last_pos = next_ids[keep], mask[keep], last_pos[keep]
            history, pads = history[keep], pads[keep]
            groups = column_groups(pads.tolist()) if grouped and padded else None
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        history = torch.cat([history, next_ids[:, None]], dim=-1) if penalty != 1.0 else history
        last_pos = last_pos + 1
        logits = (
            model(
                input_ids=next_ids[:, None],
                attention_mask=mask if padded else None,
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **({"decode_groups": groups} if groups else {}),
            )
            .logits[:, -1, :]
            .float()
        )
        next_ids = _penalised(logits, history, pads, penalty).argmax(-1)
    return answers


@torch.inference_mode()
def hf_generate_ids(
    model: PreTrainedModel,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """``model.generate`` over left-padded batches, longest prompts first; each reply's ids up to its stop."""
    device = next(model.parameters()).device
    stops = set(stop_ids(config))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in idx], config.pad_token_id)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        new_tokens = output[:, input_ids.shape[1] :].tolist()  # padding is on the left: one cut fits all
        for row, i in enumerate(idx):
            replies[i] = cut_at_stop(new_tokens[row], stops)
        if progress is not None:
            progress(len(idx))
    return replies


def generate_ids(
    model: PreTrainedModel,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    on_first_token: Callable[[], None] | None = None,
) -> list[list[int]]:
    """The generated ids of every prompt (up to and including its stop token), ``batch_size`` prompts at a time,
    longest first, in the input order: :func:`greedy_batch` where :func:`loop_problem` allows, else ``generate``.

    Args:
        progress: called with the number of prompts finished after each batch (e.g. tqdm.update).
        on_first_token: called when the first batch's first tokens exist (our loop only).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if loop_problem(model, config) is not None:
        return hf_generate_ids(model, prompts, config, batch_size=batch_size, progress=progress)
    prefill = "rows" if next(model.parameters()).device.type == "cpu" else "batch"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        first = on_first_token if start == 0 else None
        answers = greedy_batch(
            model, [prompts[i] for i in idx], config, prefill=prefill, on_first_token=first
        )
        for i, answer in zip(idx, answers, strict=True):
            replies[i] = answer
        if progress is not None:
            progress(len(idx))
    return replies


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """One reply per prompt (:func:`generate_ids`), decoded with special tokens dropped and stripped."""
    ids = generate_ids(model, prompts, config, batch_size=batch_size, progress=progress)
    return [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in ids]


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


class StopWhenSet(StoppingCriteria):
    """Ends ``generate`` after the step in flight once ``event`` is set (the reader of the stream went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def stream_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[int],
    config: GenerationConfig,
) -> Iterator[str]:
    """Generate a reply to one prompt and yield the text pieces as they are produced.

    ``generate`` runs in a worker thread and feeds a :func:`reply_streamer`. Closing this iterator early (the
    reader stops: a closed browser tab, a cancelled request, Ctrl-C) stops the worker within one token step and
    waits for it, so the next reply starts on free cores. An exception in the worker is re-raised here once the
    stream ends (instead of leaving the caller waiting forever).
    """
    if (config.num_beams or 1) > 1:
        raise ValueError("streaming replies needs num_beams=1 (beam search only knows its answer at the end)")
    device = next(model.parameters()).device
    streamer = reply_streamer(tokenizer)
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    failure: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=config,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([StopWhenSet(stop)]),
                )
        except BaseException as err:  # handed to the consumer thread below, which re-raises it
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True, name="stream_reply")
    worker.start()
    try:
        yield from streamer
    finally:  # GeneratorExit lands here when the reader closes the stream: nobody reads the streamer any more
        stop.set()
        worker.join()
    if failure:
        raise failure[0]
