"""Generating with a loaded model: batched, left-padded generation of many prompts, and one streamed reply.

Prompts are token id lists (built by a chat template); replies are decoded text with special tokens
dropped. Used by predict.py, the web demo and ``data_helper.py synthesize``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

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
