"""Greedy generation without ``generate()``: a plain decoding loop over the model's forward (prototype, issue 19).

Same contract as :func:`sft.inference.generate.generate_batch`, but returns token ids: prompts (token id lists)
in, one list of generated ids per prompt out (up to and including the stop token), in the input order. Greedy
only: anything that would make ``generate()`` run a logits processor is refused.

What makes it faster than ``model.generate`` on a CPU, and what each change does to the numbers:

* **No generate() machinery per step** (logits processors, stopping criteria, streamer hooks, kwargs
  bookkeeping): the loop is ``forward -> argmax -> append``. Same forward calls, same numbers.
* **A KV cache that does not copy itself every step.** ``DynamicCache`` grows by ``torch.cat``, which
  allocates and copies every layer's keys and values on every token (with glibc's allocator each of those
  buffers is a fresh ``mmap``: page faults on every step). :class:`PreallocatedLayer` writes into a buffer sized
  for prompt + answer once and hands attention a view of the filled part: the same values, the same kernels.
* **Finished rows leave the batch** (``generate`` keeps computing them, padded, until the longest answer
  ends). This changes the matrix shapes, and CPU GEMM libraries (MKL) choose their blocking from the shape,
  so a row's logits can differ in the last bits from the same row computed in a bigger batch -- exactly as
  they already differ between ``generate_batch(batch_size=1)`` and ``batch_size=8`` today. Greedy tokens
  are only affected where two logits tie to the last bits; docs/notes_issue19.md lists where that was checked.
* Prompts are sorted longest first (as ``generate_batch`` does), so a batch holds similar lengths and its
  prefill computes little padding; ``logits_to_keep=1`` keeps the head off the prompt positions.

Padding and positions follow ``generate``: left padding, ``position_ids = cumsum(mask) - 1`` (0 on pads), the
2-D attention mask grown by one column per step, and no mask at all for a batch without padding (what
``generate`` does too, so an unpadded batch takes SDPA's unmasked path in both).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sft.inference.generate import left_pad

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once: ``update`` copies the new positions in, no ``cat``.

    ``keys``/``values`` are views ``buffer[:, :, :length]`` (shape ``(B, kv_heads, length, head_dim)``), so every
    reader sees exactly what ``DynamicLayer`` would hold. ``capacity`` is the longest sequence expected (prompt
    width + new tokens); past it the buffer doubles (one copy), so a wrong guess costs time, never correctness.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self._k = key_states.new_empty((batch, heads, self.capacity, dim))
        self._v = value_states.new_empty(
            (batch, value_states.shape[1], self.capacity, value_states.shape[-1])
        )
        self.is_initialized = True

    def allocate(self, like: torch.Tensor, batch: int) -> None:
        """Zeroed buffers for ``batch`` rows shaped like ``like`` (one row's keys): pad slots must hold finite
        values, since a masked score is ``q.k + (-inf)`` and garbage could be NaN."""
        self.dtype, self.device = like.dtype, like.device
        self._k = like.new_zeros((batch, like.shape[1], self.capacity, like.shape[-1]))
        self._v = like.new_zeros((batch, like.shape[1], self.capacity, like.shape[-1]))
        self.is_initialized = True

    def write_row(self, row: int, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Place one prompt's cached keys/values ``(1, kv_heads, n, head_dim)`` right-aligned in the first
        ``width`` slots of batch row ``row`` (left padding, as a left-padded prefill would leave them)."""
        n = keys.shape[-2]
        self._k[row, :, width - n : width] = keys[0]
        self._v[row, :, width - n : width] = values[0]
        self.length = width
        self.keys, self.values = self._k[:, :, :width], self._v[:, :, :width]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices`` (finished rows leave the batch)."""
        if not self.is_initialized:
            return
        self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer is for greedy decoding: nothing is ever cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PreallocatedLayer is for greedy decoding: rows are never repeated")


def preallocated_cache(num_layers: int, capacity: int) -> Cache:
    """A cache of :class:`PreallocatedLayer` for a model of ``num_layers`` decoder layers."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


# generate() settings that would make it do more than argmax; each must be at its neutral value here.
_NEUTRAL = {
    "do_sample": (False, None),
    "num_beams": (1, None),
    "repetition_penalty": (1.0, None),
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
}


def check_greedy(config: GenerationConfig) -> None:
    """Refuse a generation config that is not plain greedy decoding (ValueError naming the settings)."""
    bad = [
        f"{k}={getattr(config, k, None)!r}"
        for k, ok in _NEUTRAL.items()
        if getattr(config, k, None) not in ok
    ]
    if bad:
        raise ValueError(
            f"fast_generate does plain greedy decoding only; this generation config sets {', '.join(bad)}: "
            "use sft.inference.generate.generate_batch for it"
        )
    if config.max_new_tokens is None:
        raise ValueError(
            "fast_generate needs generation_config.max_new_tokens (build_generation_config sets it)"
        )


def _stop_ids(config: GenerationConfig) -> torch.Tensor:
    eos = config.eos_token_id
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return torch.tensor(sorted(set(eos)), dtype=torch.long)


@torch.inference_mode()
def greedy_batch(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: torch.Tensor,
    pad_token_id: int,
    on_first_token: Callable[[], None] | None = None,
    prefill: str = "batch",
) -> list[list[int]]:
    """Greedy-decode one batch of prompts together (left-padded); finished rows leave the batch.

    Args:
        prefill: ``"batch"``: one forward over the left-padded prompts (``generate``'s way);
            ``"rows"``: one forward per prompt, unpadded (no compute on padding; each prompt's numbers are
            those of a batch-1 prefill), its keys/values then placed right-aligned in the batch cache.

    Returns the generated ids of each prompt (the stop token included when one was produced), in order.
    """
    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompts, pad_token_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    padded = bool((mask == 0).any())  # generate() drops an all-ones mask; so do we (same SDPA path)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    num_layers = model.config.get_text_config().num_hidden_layers
    width = input_ids.shape[1]
    cache = preallocated_cache(num_layers, width + max_new_tokens)
    if prefill == "rows" and padded:
        rows_logits = []
        for row, prompt in enumerate(prompts):
            own = preallocated_cache(num_layers, len(prompt))
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            rows_logits.append(
                model(input_ids=ids, past_key_values=own, use_cache=True, logits_to_keep=1).logits[:, -1, :]
            )
            for layer, own_layer in zip(cache.layers, own.layers, strict=True):
                if row == 0:
                    layer.allocate(own_layer.keys, len(prompts))
                layer.write_row(row, own_layer.keys, own_layer.values, width)
        next_ids = torch.cat(rows_logits).float().argmax(-1)  # (B,)
    elif prefill in ("batch", "rows"):
        logits = model(
            input_ids=input_ids,
            attention_mask=mask if padded else None,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits  # (B, 1, V)
        next_ids = logits[:, -1, :].float().argmax(-1)  # (B,)
    else:
        raise ValueError(f"prefill={prefill!r}: expected 'batch' or 'rows'")
    if on_first_token is not None:
        on_first_token()
    stop_ids = stop_ids.to(device)
    rows = list(range(len(prompts)))  # prompt index of each live batch row
    answers: list[list[int]] = [[] for _ in prompts]
    last_pos = positions[:, -1]
    for step in range(max_new_tokens):
        for row, token in zip(rows, next_ids.tolist(), strict=True):  # one sync per step, not per row
            answers[row].append(token)
        if step == max_new_tokens - 1:
            break
        done = torch.isin(next_ids, stop_ids)
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            rows = [rows[k] for k in keep.tolist()]
            next_ids, mask, last_pos = next_ids[keep], mask[keep], last_pos[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        last_pos = last_pos + 1
        logits = model(
            input_ids=next_ids[:, None],
            attention_mask=mask if padded else None,
            position_ids=last_pos[:, None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        next_ids = logits[:, -1, :].float().argmax(-1)
    return answers


def fast_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    on_first_token: Callable[[], None] | None = None,
    prefill: str = "batch",
) -> list[list[int]]:
    """Greedy replies to ``prompts``, ``batch_size`` at a time, longest prompts first; ids in the input order.

    Args:
        config: a greedy generation config (:func:`sft.inference.settings.build_generation_config`); its
            ``eos_token_id`` (one id or a list) ends a reply, ``max_new_tokens`` bounds it.
        progress: called with the number of prompts finished after each batch (e.g. tqdm.update).
        on_first_token: called once, when the first batch's first tokens exist (for time-to-first-token).
        prefill: ``"batch"`` or ``"rows"`` (see :func:`greedy_batch`).
    """
    check_greedy(config)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    pad = config.pad_token_id if config.pad_token_id is not None else _stop_ids(config)[0].item()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        answers = greedy_batch(
            model,
            [prompts[i] for i in idx],
            max_new_tokens=config.max_new_tokens,
            stop_ids=_stop_ids(config),
            pad_token_id=pad,
            on_first_token=on_first_token if start == 0 else None,
            prefill=prefill,
        )
        for i, answer in zip(idx, answers, strict=True):
            replies[i] = answer
        if progress is not None:
            progress(len(idx))
    return replies
