"""Live replies for many users at once: one decode loop over every reply being streamed (the web demo).

Gradio runs each chat request in its own worker thread and cannot batch generators (``batch=True`` is refused for
them). So the batching happens here: :class:`LiveBatcher` owns one scheduler thread that decodes all live replies
together, one forward per step for all of them. A decode step of a small model on a CPU costs about the same for
one row as for several (it is the weights' memory traffic), so several users share a step almost for free.

Between two steps, requests join and leave:

* a new request is prefilled on its own (its numbers are a batch-1 prefill's) and joins the batch, right-aligned
  with the others (:meth:`~sft.inference.kv_cache.PreallocatedLayer.join`); while it prefills, the others wait.
  The longest start it shares with a recent prompt or ended reply (the system prompt and headers; the chat's
  own history and last reply, whoever was served since) is not computed again: its keys/values are read from
  theirs (:class:`~sft.inference.kv_cache.PromptCaches`, within ``prompt_cache_mb``);
* a reply leaves when it produces a stop id, reaches its ``max_new_tokens``, or its reader closes the stream
  (a cancelled request or a closed browser tab: gradio closes the generator, ``GeneratorExit`` reaches
  :meth:`LiveBatcher.stream`'s ``finally``): generation for it stops at the next step.

Each reply keeps its own settings: greedy, or sampling with its temperature / top-p / top-k, and the repetition
penalty, through transformers' own logits processors in ``generate``'s order. A reply decoded alone is the
greedy loop at batch 1, i.e. ``generate``'s tokens (tests/test_serving.py); in a batch with others a row's logits
can differ in the last bits (CPU GEMM blocking depends on the batch shape), as in batch prediction. Sampled
replies draw from one seeded generator shared by all rows, so they are repeatable only for the same sequence of
requests.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sft.inference.cpu_decode import column_groups, faster_decoding
from sft.inference.generate import reply_streamer, settings_in_use, stop_ids
from sft.inference.kv_cache import PromptCaches, decoder_layers, preallocated_cache, prefill_alone
from sft.inference.settings import PROMPT_CACHE_MB

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

logger = logging.getLogger(__name__)

# What a live reply does not do: it honours greedy or temperature/top-k/top-p sampling, with a repetition penalty.
_LIVE_CANNOT = (
    "num_beams",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "min_new_tokens",
    "min_length",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "guidance_scale",
    "stop_strings",
    "forced_bos_token_id",
    "forced_eos_token_id",
)


def live_problem(config: GenerationConfig) -> str | None:
    """Why a live reply cannot follow ``config``, or None when it can."""
    bad = settings_in_use(config, _LIVE_CANNOT)
    if bad:
        return f"live replies support greedy and temperature/top-p/top-k sampling; {', '.join(bad)} is not"
    if config.max_new_tokens is None:
        return "live replies need generation_config.max_new_tokens (build_generation_config sets it)"
    return None


def choose_processors(config: GenerationConfig) -> LogitsProcessorList:
    """The logits processors ``generate`` would run for ``config`` (repetition penalty; with sampling:
    temperature, top-k, top-p), or ValueError naming the settings a live reply does not support."""
    problem = live_problem(config)
    if problem is not None:
        raise ValueError(problem)
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return processors


@dataclass(eq=False)
class _Reply:
    """One live reply: its prompt and settings, what it produced, and how it is read."""

    number: int
    prompt: list[int]
    config: GenerationConfig
    processors: LogitsProcessorList
    streamer: TextIteratorStreamer
    stops: set[int]
    closed: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    failure: BaseException | None = None
    next_id: int = -1  # chosen, not yet fed to the model
    length: int = 0  # real positions in the cache (prompt + fed tokens)
    ended: str = ""  # why it left the batch: stop, length, closed, error


class LiveBatcher:
    """Streams replies for many readers at once through one decode loop (see the module docstring).

    Args:
        model, tokenizer: a loaded decoder-only model and its tokenizer.
        max_live: the most replies decoded together; more requests wait (in arrival order) until one ends.
        seed: seeds the generator that sampled replies draw from.
        prompt_cache_mb: the most memory that recent prompts' and replies' caches may hold (0: none kept; None:
            :data:`~sft.inference.settings.PROMPT_CACHE_MB`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_live: int = 4,
        seed: int = 0,
        prompt_cache_mb: int | None = None,
    ) -> None:
        if max_live < 1:
            raise ValueError(f"max_live={max_live} must be >= 1")
        self.model, self.tokenizer, self.max_live = model, tokenizer, max_live
        self.device = next(model.parameters()).device
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self._waiting: collections.deque[_Reply] = collections.deque()
        self._live: list[_Reply] = []
        self._wake = threading.Condition()
        self._count = 0
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, width): 1 = a real position
        # Recent prompts' and ended replies' caches: a new prompt computes only what follows the longest start it
        # shares with one (the system prompt and headers every chat begins with; the chat's history and last reply).
        self.prompt_caches = PromptCaches(
            (PROMPT_CACHE_MB if prompt_cache_mb is None else prompt_cache_mb) * 2**20
        )
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-batcher")
        self._thread.start()
        # The loop thread ran torch ops (and owns their OpenMP workers): left running into interpreter shutdown,
        # the process can abort ("terminate called without an active exception"). Stopped first, it cannot.
        atexit.register(self.close)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the decode loop after its current step and wait for it (at exit, or when a server is done).
        Replies still live or waiting end as closed; a stream asked for afterwards is refused."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- the readers' side ----------------------------------------------------------------------------------
    def stream(self, prompt: list[int], config: GenerationConfig) -> Iterator[str]:
        """Yield the reply to ``prompt`` in final text pieces (:func:`~sft.inference.generate.reply_streamer`).

        Closing the iterator before the end (``GeneratorExit`` in the reader) takes the reply out of the batch
        before the next step. An error in the decode loop is re-raised here.
        """
        processors = choose_processors(config)
        streamer = reply_streamer(self.tokenizer)
        streamer.put(torch.tensor([prompt]))  # the prompt: the streamer skips it
        with self._wake:
            if self._stopping:
                raise RuntimeError("this LiveBatcher is closed: make a new one")
            self._count += 1
            reply = _Reply(self._count, list(prompt), config, processors, streamer, set(stop_ids(config)))
            self._waiting.append(reply)
            self._wake.notify()
        try:
            yield from streamer
        finally:
            reply.closed.set()
            with self._wake:
                self._wake.notify()
        reply.finished.wait()
        if reply.failure is not None:
            raise reply.failure

    def live(self) -> int:
        """How many replies are being decoded now."""
        return len(self._live)

    # ---- the scheduler thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        with faster_decoding(self.model) as self._grouped:  # for the thread's life: only it uses the model
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._live and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    for reply in [*self._live, *self._waiting]:
                        self._end(reply, "closed")
                    self._live, self._waiting, self._cache, self._mask = [], collections.deque(), None, None
                    self.prompt_caches.clear()
                    return
            try:
                with torch.inference_mode():
                    self._admit()
                    if self._live:
                        self._emit_and_step()
            except Exception as err:  # a failed forward ends every live reply with it; the loop goes on
                logger.exception("live batcher: decode step failed")
                for reply in self._live:
                    self._end(reply, "error", failure=err)
                self._live, self._cache, self._mask = [], None, None

    def _admit(self) -> None:
        """Move waiting requests into the batch while there is room (each prefilled on its own)."""
        while len(self._live) < self.max_live:
            with self._wake:
                if not self._waiting:
                    return
                reply = self._waiting.popleft()
            if reply.closed.is_set():
                self._end(reply, "closed")
                continue
            start = time.perf_counter()
            try:
                prefix = self.prompt_caches.prefix_for(reply.prompt)
                own, logits = prefill_alone(self.model, reply.prompt, prefix=prefix)
            except Exception as err:
                self._end(reply, "error", failure=err)
                continue
            self.prompt_caches.add(reply.prompt, own)
            reply.length = len(reply.prompt)
            reply.next_id = self._choose(reply, logits)
            self._join(reply, own)
            logger.info(
                "reply %d: joined %d live (prompt %d tokens, %d of them read from a recent prompt's cache; "
                "prefill %.2f s)",
                reply.number,
                len(self._live) - 1,
                len(reply.prompt),
                prefix[0][0].shape[-2] if prefix else 0,
                time.perf_counter() - start,
            )

    def _join(self, reply: _Reply, own) -> None:
        rest = max(
            [reply.config.max_new_tokens, *(r.config.max_new_tokens - len(r.generated) for r in self._live)]
        )
        if self._cache is None:
            self._cache = preallocated_cache(decoder_layers(self.model), reply.length + rest)
        for layer, own_layer in zip(self._cache.layers, own.layers, strict=True):
            width = max(layer.length, reply.length)
            layer.join(own_layer.keys, own_layer.values, capacity=width + rest)
        width = self._cache.layers[0].length
        mask = torch.zeros((len(self._live) + 1, width), dtype=torch.long, device=self.device)
        if self._mask is not None:
            mask[:-1, width - self._mask.shape[1] :] = self._mask
        mask[-1, width - reply.length :] = 1
        self._mask = mask
        self._live.append(reply)

    def _choose(self, reply: _Reply, logits: torch.Tensor) -> int:
        """The next id of ``reply`` from its float32 logits ``(1, V)``: processors, then argmax or a draw."""
        if not reply.processors and not reply.config.do_sample:
            return int(logits.argmax(-1).item())
        history = torch.tensor([reply.prompt + reply.generated], dtype=torch.long, device=self.device)
        scores = reply.processors(history, logits)
        if reply.config.do_sample:
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self.rng).item())
        return int(scores.argmax(-1).item())

    def _emit_and_step(self) -> None:
        """Hand every live reply its chosen id; drop the finished and closed; one forward for the others."""
        keep = []
        for row, reply in enumerate(self._live):
            why = "closed"
            if not reply.closed.is_set():
                reply.generated.append(reply.next_id)
                reply.streamer.put(torch.tensor([reply.next_id]))
                if reply.next_id in reply.stops:
                    why = "stop"
                elif len(reply.generated) >= reply.config.max_new_tokens:
                    why = "length"
                else:
                    keep.append(row)
                    continue
            self._remember(row, reply)  # before its reader sees the end
            self._end(reply, why)
        if len(keep) < len(self._live):
            self._leave(keep)
        if not self._live:
            return
        for reply in self._live:
            reply.length += 1
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], dim=-1)
        pads = (self._mask == 0).sum(-1).tolist()  # each row's left padding (one host copy)
        padded = any(pads)
        groups = column_groups(pads) if self._grouped and padded else None
        positions = torch.tensor([[r.length - 1] for r in self._live], dtype=torch.long, device=self.device)
        ids = torch.tensor([[r.next_id] for r in self._live], dtype=torch.long, device=self.device)
        logits = (
            self.model(
                input_ids=ids,
                attention_mask=self._mask if padded else None,  # no mask when no row is padded, as generate()
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1,
                **({"decode_groups": groups} if groups else {}),
            )
            .logits[:, -1, :]
            .float()
        )  # (B, V)
        for row, reply in enumerate(self._live):
            reply.next_id = self._choose(reply, logits[row : row + 1])

    def _remember(self, row: int, reply: _Reply) -> None:
        """Keep a reply that leaves as a prompt cache: its prompt and the tokens fed after it (the chat's next prompt
        starts with them when the reply's text encodes back to its ids), from its row of the batch cache."""
        fed = reply.length - len(reply.prompt)
        if fed <= 0:
            return
        width = self._cache.layers[0].length
        try:
            own = preallocated_cache(decoder_layers(self.model), reply.length)
            for layer, own_layer in zip(self._cache.layers, own.layers, strict=True):
                own_layer.update(*layer.row_columns(row, width - reply.length, reply.length))
        except RuntimeError as err:  # no memory for the copy: a cache not kept, never a failed reply
            logger.warning("reply %d: its cache is not kept (%s)", reply.number, err)
            return
        self.prompt_caches.add(reply.prompt + reply.generated[:fed], own)

    def _leave(self, keep: list[int]) -> None:
        """Keep only the batch rows ``keep``; drop the columns that are padding in every remaining row."""
        self._live = [self._live[k] for k in keep]
        if not self._live:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        unused = self._mask.shape[1] - max(r.length for r in self._live)
        if unused > 0:
            for layer in self._cache.layers:
                layer.trim_left(unused)
            self._mask = self._mask[:, unused:]

    def _end(self, reply: _Reply, why: str, failure: BaseException | None = None) -> None:
        reply.ended, reply.failure = why, failure
        reply.streamer.end()
        reply.finished.set()
        logger.info("reply %d: %s after %d tokens", reply.number, why, len(reply.generated))
