"""A KV cache for our decoding loops: buffers allocated once, rows that leave and join between steps.

transformers' ``DynamicCache`` grows by ``torch.cat``: every layer's keys and values are copied on every token
(and with glibc's allocator each new buffer is a fresh ``mmap``, page faults included). :class:`PreallocatedLayer`
writes into a buffer sized for prompt + answer once and hands attention a view of the filled part, so attention
reads exactly the values ``DynamicLayer`` would hold, through the same kernels.

Rows are left-padded, as ``generate`` pads them: each row's last real position is the buffer's last filled
column. A finished row leaves (:meth:`PreallocatedLayer.batch_select_indices`); in the live server a new request
joins (:meth:`PreallocatedLayer.join`), and columns that only padding uses any more are dropped
(:meth:`PreallocatedLayer.trim_left`). Padding slots hold zeros, never garbage: a masked score is
``q.k + (-inf)``, and a NaN in ``k`` would poison it.

A prompt that starts like one prefilled before reads that start's keys/values instead of computing them
(:func:`prefill_alone` with ``prefix``): from an earlier row of the batch (:func:`shared_start`), or in the live
server from recent prompts' and replies' caches (:class:`PromptCaches`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in buffers ``(B, kv_heads, capacity, head_dim)``; ``keys``/``values`` are views of the
    first ``rows`` rows and ``length`` positions, i.e. what ``DynamicLayer`` would hold.

    ``capacity`` is the longest sequence expected (prompt width + new tokens); past it the buffers double (one
    copy), so a wrong guess costs time, never correctness.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        # Live rows: the buffers' first rows (rows that left are overwritten, never reallocated).
        self.rows = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_zeros((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
        self._v = value_states.new_zeros((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
        self.rows = key_states.shape[0]
        self.is_initialized = True

    def _expose(self) -> None:
        self.keys = self._k[: self.rows, :, : self.length]
        self.values = self._v[: self.rows, :, : self.length]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_zeros((self.rows, old.shape[1], capacity, old.shape[-1]))
            new[:, :, : self.length] = old[: self.rows, :, : self.length]
            setattr(self, name, new)
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self._k[: self.rows, :, self.length : end] = key_states
        self._v[: self.rows, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices``, ascending (finished rows leave the batch).

        The kept rows move up in place, filled positions only: no new buffers (a fresh ``index_select`` copy of
        every layer's whole cache, page faults included, cost ~1 s of a 32-row DialogSum batch). Moving rows up
        in ascending order reads each one before anything overwrites it.
        """
        if not self.is_initialized:
            return
        keep = indices.tolist()
        if keep != sorted(keep):
            raise ValueError(f"batch_select_indices needs ascending rows, got {keep}")
        for row, source in enumerate(keep):
            if row != source:
                self._k[row, :, : self.length] = self._k[source, :, : self.length]
                self._v[row, :, : self.length] = self._v[source, :, : self.length]
        self.rows = len(keep)
        self._expose()

    def join(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Add one row whose cache is ``keys``/``values`` ``(1, kv_heads, n, head_dim)`` (a prompt prefilled on its
        own), right-aligned with the others: the batch widens to ``max(length, n)``, the narrower side padded on the
        left. The buffers are rebuilt with room for ``capacity`` positions (one copy of the cache per join)."""
        n = keys.shape[-2]
        width = max(self.length, n)
        capacity = max(capacity, width + 1)
        rows = self.rows if self.is_initialized else 0
        new_k = keys.new_zeros((rows + 1, keys.shape[1], capacity, keys.shape[-1]))
        new_v = values.new_zeros((rows + 1, values.shape[1], capacity, values.shape[-1]))
        if rows:
            new_k[:rows, :, width - self.length : width] = self._k[:rows, :, : self.length]
            new_v[:rows, :, width - self.length : width] = self._v[:rows, :, : self.length]
        new_k[rows, :, width - n : width] = keys[0]
        new_v[rows, :, width - n : width] = values[0]
        self.dtype, self.device = keys.dtype, keys.device
        self._k, self._v, self.capacity, self.length, self.rows = new_k, new_v, capacity, width, rows + 1
        self.is_initialized = True
        self._expose()

    def trim_left(self, columns: int) -> None:
        """Drop the first ``columns`` positions (padding in every row): a view, no copy."""
        self._k, self._v = self._k[:, :, columns:], self._v[:, :, columns:]
        self.capacity -= columns
        self.length -= columns
        self._expose()

    def write_row(self, row: int, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Place one prompt's keys/values ``(1, kv_heads, n, head_dim)`` right-aligned in the first ``width``
        slots of batch row ``row`` (left padding, as a left-padded prefill would leave them). The buffers must
        exist (:meth:`allocate`)."""
        n = keys.shape[-2]
        self._k[row, :, width - n : width] = keys[0]
        self._v[row, :, width - n : width] = values[0]
        self.length = width
        self._expose()

    def row_columns(self, row: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of row ``row``'s keys/values at positions ``start ... start + count - 1``, ``(1, kv_heads, count,
        head_dim)``."""
        columns = slice(start, start + count)
        return self._k[row : row + 1, :, columns], self._v[row : row + 1, :, columns]

    def allocate(self, like: torch.Tensor, batch: int) -> None:
        """Zeroed buffers for ``batch`` rows shaped like ``like`` (one row's keys)."""
        self.dtype, self.device = like.dtype, like.device
        self._k = like.new_zeros((batch, like.shape[1], self.capacity, like.shape[-1]))
        self._v = like.new_zeros((batch, like.shape[1], self.capacity, like.shape[-1]))
        self.rows = batch
        self.is_initialized = True

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer never crops: our loops do not speculate")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PreallocatedLayer never repeats rows: our loops do not search beams")


def preallocated_cache(num_layers: int, capacity: int) -> Cache:
    """A cache of :class:`PreallocatedLayer` for a model of ``num_layers`` decoder layers."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


def decoder_layers(model) -> int:
    """How many KV cache layers a decoder-only model needs."""
    return model.config.get_text_config().num_hidden_layers


def prefill_alone(
    model,
    prompt: list[int],
    capacity: int | None = None,
    *,
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[Cache, torch.Tensor]:
    """One prompt's forward, unpadded: its cache and the float32 logits of its last position ``(1, V)``.

    The numbers are those of a batch-1 prefill, whatever batch the row then decodes in.

    Args:
        prefix: each layer's keys/values ``(1, kv_heads, n, head_dim)`` of the prompt's first ``n`` tokens, taken
            from another prompt's own prefill that starts with the same ``n`` tokens (:func:`shared_start`): only
            the rest of the prompt is computed. A causal model's keys and values at a position depend only on the
            tokens up to it, so these are the ones this prompt's own prefill would compute.
    """
    device = next(model.parameters()).device
    cache = preallocated_cache(decoder_layers(model), capacity or len(prompt))
    start = 0
    if prefix is not None:
        for layer, (keys, values) in zip(cache.layers, prefix, strict=True):
            layer.update(keys, values)
        start = prefix[0][0].shape[-2]
    ids = torch.tensor([prompt[start:]], dtype=torch.long, device=device)
    # No position_ids: the model counts on from the cache's length (start), as a prefill counts from 0.
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1, :].float()


def shared_start(prompts: list[list[int]], row: int, minimum: int = 16) -> tuple[int, int] | None:
    """The earlier prompt (index below ``row``) that starts with the most tokens of ``prompts[row]``, and how many
    (at most all but the row's last token, whose logits its prefill must compute); None below ``minimum`` tokens.

    A batch of prompts built by one chat template shares its system prompt and headers (42 of DialogSum's ~240
    tokens; most of a role-play prompt), which :func:`prefill_alone` then computes once.
    """
    prompt, best = prompts[row], None
    limit = len(prompt) - 1
    for other in range(row):
        candidate, n = prompts[other], 0
        stop = min(limit, len(candidate))
        while n < stop and candidate[n] == prompt[n]:
            n += 1
        if n >= minimum and (best is None or n > best[1]):
            best = (other, n)
    return best


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the keys/values buffers of a cache of :class:`PreallocatedLayer`."""
    return sum(
        (layer._k.numel() + layer._v.numel()) * layer._k.element_size()
        for layer in cache.layers
        if layer.is_initialized
    )


class PromptCaches:
    """The caches of token sequences computed lately (prompts; in the live server also prompts with their
    replies), most recently used first, within ``max_bytes``: a new prompt reads the longest start it shares with
    any of them (:func:`shared_start`) and computes only the rest (:func:`prefill_alone` with ``prefix``).

    The web demo keeps about one per chat this way: a chat's next prompt begins with its last prompt and reply,
    whoever else was served in between, and every chat begins with the system prompt. A sequence that a newer one
    starts with in full (the chat's prompt, once its reply is added) is dropped when the newer one is added, which
    holds the same start; past ``max_bytes`` the least recently used go; a cache larger than ``max_bytes`` on its
    own is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self._entries: list[tuple[list[int], Cache, int]] = []  # (prompt, its own cache, bytes), newest first

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return sum(size for _, _, size in self._entries)

    def prompts(self) -> list[list[int]]:
        """The sequences held, most recently used first."""
        return [prompt for prompt, _, _ in self._entries]

    def caches(self) -> list[Cache]:
        """Their caches, in the same order."""
        return [cache for _, cache, _ in self._entries]

    def prefix_for(self, prompt: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each layer's keys/values of the longest start ``prompt`` shares with a prompt held (views of its cache;
        that prompt becomes the most recently used), or None when no start of at least 16 tokens is shared."""
        found = shared_start([*self.prompts(), prompt], len(self._entries))
        if found is None:
            return None
        index, count = found
        entry = self._entries.pop(index)
        self._entries.insert(0, entry)
        return [(layer.keys[:, :, :count], layer.values[:, :, :count]) for layer in entry[1].layers]

    def add(self, prompt: list[int], cache: Cache) -> None:
        """Hold ``prompt``'s own cache (one row, exactly its positions: :func:`prefill_alone`'s) as the most
        recently used."""
        size = cache_bytes(cache)
        if size > self.max_bytes:
            return
        self._entries = [entry for entry in self._entries if entry[0] != prompt[: len(entry[0])]]
        self._entries.insert(0, (list(prompt), cache, size))
        while self.bytes > self.max_bytes:
            self._entries.pop()

    def clear(self) -> None:
        self._entries = []
