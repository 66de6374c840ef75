"""Instruction back-translation, last step: turn a user's own texts into an Alpaca instruction data set.

A reverse model (trained on ``data_helper.py dolly --reverse`` samples) reads a text and writes the
instruction that could have produced it. :func:`synthesize` runs it over texts a user already has (emails,
posts, documents) and keeps the pairs that pass the quality filters as Alpaca records
``{"instruction": generated, "input": "", "output": text}``, which train.py reads directly.

Pipeline; every text that does not reach the output is counted under one reason:

1. read the texts (:func:`read_texts`: a ``.txt`` file, one text a line, or a field of a JSONL file) and
   clean each one as ``convert_dolly`` cleans a response (:func:`sft.data.converters.clean_text`);
   empty texts are skipped;
2. prompt: :func:`synthesis_record` -- the record ``convert_dolly --reverse`` builds, minus its answer --
   rendered by the reverse model's chat template; a prompt over ``max_src_len`` tokens is skipped (reverse
   training cut such prompts, so the model never saw them whole), never truncated;
3. duplicates: a text whose normalised words (:func:`words`) equal those of an earlier kept text is an
   exact duplicate; one whose word 3-gram shingle set has Jaccard similarity >= ``near_dup_threshold``
   with an earlier kept text is a near duplicate (:class:`NearDuplicateIndex`). The first one is kept;
4. generate one instruction per remaining text (batched, by the engine: :mod:`sft.inference.engines`);
5. instruction filters: empty; over ``max_instruction_len`` tokens; copies the text
   (:func:`copy_overlap` > ``max_copy_overlap``).

Everything is deterministic: the filters involve no randomness, and generation is seeded by the caller.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sft.data.converters import ConvertStats, clean_text, reverse_prompt
from sft.data.formats import DataFormatError, iter_json_records

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

    from sft.data.templates.base import Template
    from sft.inference.engines import Engine

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
DEFAULT_TEXT_FIELD = "text"

COPY_NGRAM = 3  # word n-grams compared by the copy filter
SHINGLE_NGRAM = 3  # word n-grams whose sets the near-duplicate filter compares
NUM_PERM = 128  # MinHash signature length
MINHASH_SEED = 20240501  # fixed: which texts are duplicates must not depend on the generation --seed
LSH_MISS_PROBABILITY = 1e-6  # the banding is chosen so a pair at the threshold is missed less often than this

# One "word" is a run of letters/digits, or a single CJK/kana/hangul character (Chinese has no spaces, so a
# character is the unit that n-grams are made of).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


# ---------------------------------------------------------------------------------------------
# Reading texts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceText:
    """One text of the input file and where it came from (line: 1-based line, or JSON array item)."""

    line: int
    text: str


def read_texts(
    path: str | Path,
    *,
    text_field: str | None = None,
    skip_invalid: bool = False,
    stats: ConvertStats | None = None,
) -> list[SourceText]:
    """Read the texts to synthesise instructions for, cleaned (line endings, outer whitespace).

    ``.txt``: one text a line (blank lines are not texts). ``.jsonl`` (or a ``.json`` array): the string
    field ``text_field`` (default ``text``) of every record. Empty texts are kept here (counted later).

    Raises:
        DataFormatError: missing or empty file, not UTF-8, a line that is not JSON, a record without the
            field (unless ``skip_invalid``: then counted in ``stats.skipped``), an unknown file kind.
    """
    path = Path(path)
    stats = stats if stats is not None else ConvertStats(unit="texts")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        if text_field is not None:
            raise ValueError(
                f"--text_field={text_field} applies to JSONL input only; {path} is read as one text a line"
            )
        texts = [SourceText(line, clean_text(raw)) for line, raw in _text_lines(path) if raw.strip()]
        stats.read += len(texts)
    elif suffix in JSON_SUFFIXES:
        field = text_field or DEFAULT_TEXT_FIELD
        texts = []
        for line, obj in iter_json_records(path):
            stats.read += 1
            value = obj.get(field) if isinstance(obj, dict) else None
            if isinstance(value, str):
                texts.append(SourceText(line, clean_text(value)))
                continue
            if not isinstance(obj, dict):
                problem = f"expected a JSON object with a {field!r} field, got {type(obj).__name__}"
            elif field not in obj:
                problem = f"no field {field!r} (keys: {sorted(obj)}); choose the text field with --text_field"
            else:
                problem = f"field {field!r} must be a string, got {type(value).__name__}"
            if not skip_invalid:
                raise DataFormatError(problem, source=str(path), line=line)
            stats.skipped[f"record without a string {field!r} field"] += 1
    else:
        raise ValueError(
            f"--input={path}: unknown kind {path.suffix or '(no suffix)'!r}; pass a .txt file (one text a "
            "line) or a .jsonl/.json file (the text in the field named by --text_field)"
        )
    if not texts and not stats.read:
        raise DataFormatError("no texts in the file", source=str(path))
    return texts


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file; errors name the file and the line."""
    if not path.is_file():
        raise DataFormatError(f"file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}): re-save the file as UTF-8",
            source=str(path),
            line=data[: err.start].count(b"\n") + 1,
        ) from err
    text = text.removeprefix("\ufeff")  # a BOM is an encoding marker, not part of the first text
    if not text.strip():
        raise DataFormatError("file is empty (no texts)", source=str(path))
    # split("\n"), not splitlines(): a form feed or U+2028 inside a text must not start a new text.
    return [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), start=1)]


# ---------------------------------------------------------------------------------------------
# The reverse prompt
# ---------------------------------------------------------------------------------------------


def synthesis_record(text: str) -> dict[str, Any]:
    """The conversation the reverse model is prompted with for ``text`` (already cleaned).

    Exactly what ``convert_dolly(reverse=True)`` writes for a record whose response is ``text`` and whose
    context is empty, without its answer (the instruction) and its ``meta`` (which no template renders).
    """
    return {"conversations": [{"role": "user", "content": reverse_prompt(text)}]}


# ---------------------------------------------------------------------------------------------
# Text similarity: normalised words, n-grams, copy overlap, near duplicates
# ---------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """The text's normalised words: NFKC, case-folded, punctuation and spacing dropped; each CJK character
    is a word of its own."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """The set of ``n``-grams of ``tokens``; a sequence shorter than ``n`` is one n-gram of itself."""
    if len(tokens) <= n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def copy_overlap(instruction: str, text: str, n: int = COPY_NGRAM) -> float:
    """Containment of the instruction in the text: the share of the instruction's word ``n``-grams that
    also occur in the text (0 = nothing in common, 1 = every n-gram of the instruction is copied).

    A real instruction may quote a name or a phrase of its answer ("Write an email to Maria about the
    dinner"), which leaves this low; an instruction that repeats the answer (or a chunk of it, or asks to
    "rewrite: <the text>") scores near 1. An instruction shorter than ``n`` words is one n-gram, so a
    one- or two-word instruction counts as copied when those words appear in that order in the text.
    """
    tokens = words(instruction)
    if not tokens:
        return 0.0
    n = min(n, len(tokens))  # a short instruction is compared as one n-gram of its own length
    own = ngrams(tokens, n)
    return len(own & ngrams(words(text), n)) / len(own)


def jaccard(a: set, b: set) -> float:
    """``|a & b| / |a | b|`` (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _lsh_rows(threshold: float, num_perm: int = NUM_PERM) -> int:
    """Rows per LSH band: the most (fewest candidates to verify) for which a pair with Jaccard similarity
    ``threshold`` still shares a band with probability above 1 - :data:`LSH_MISS_PROBABILITY`."""
    for rows in (8, 4, 2):
        if (1 - threshold**rows) ** (num_perm // rows) < LSH_MISS_PROBABILITY:
            return rows
    return 1


class NearDuplicateIndex:
    """Finds, for each new shingle set, an earlier set with Jaccard similarity >= ``threshold``.

    MinHash signatures (:data:`NUM_PERM` seeded hash functions over blake2b hashes of the shingles, so no
    dependence on Python's per-process hash salt) are split into LSH bands; sets sharing a band are only
    candidates, and each candidate is verified with the exact Jaccard similarity. So every reported pair
    truly is at or above the threshold, and a pair at the threshold is missed with probability below
    :data:`LSH_MISS_PROBABILITY` (the band size is chosen for it). Memory: the shingle sets of kept texts.
    """

    _PRIME = np.uint64((1 << 61) - 1)

    def __init__(self, threshold: float, num_perm: int = NUM_PERM) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.rows = _lsh_rows(threshold, num_perm)
        self.bands = num_perm // self.rows
        rng = np.random.RandomState(MINHASH_SEED)
        # a, b < 2**32 and hashes < 2**32: a*x stays below 2**64 (uint64), the hash family (a*x + b) mod p.
        self._a = rng.randint(1, 2**32, size=num_perm, dtype=np.uint64)
        self._b = rng.randint(0, 2**32, size=num_perm, dtype=np.uint64)
        self._sets: list[set] = []
        self._buckets: dict[tuple[int, bytes], list[int]] = {}

    def signature(self, shingles: set[tuple[str, ...]]) -> np.ndarray:
        """The MinHash signature ``(num_perm,)`` of a non-empty shingle set."""
        hashes = np.fromiter(
            (
                int.from_bytes(hashlib.blake2b("\x1f".join(s).encode(), digest_size=4).digest(), "little")
                for s in sorted(shingles)
            ),
            dtype=np.uint64,
        )
        return ((np.outer(self._a, hashes) + self._b[:, None]) % self._PRIME).min(axis=1)  # (P, S) -> (P,)

    def add(self, shingles: set[tuple[str, ...]]) -> int | None:
        """Return the index of the first earlier set this one near-duplicates; else store it and return None."""
        sig = self.signature(shingles)
        keys = [
            (band, sig[band * self.rows : (band + 1) * self.rows].tobytes()) for band in range(self.bands)
        ]
        candidates = sorted({i for key in keys for i in self._buckets.get(key, ())})
        for i in candidates:
            if jaccard(shingles, self._sets[i]) >= self.threshold:
                return i
        index = len(self._sets)
        self._sets.append(shingles)
        for key in keys:
            self._buckets.setdefault(key, []).append(index)
        return None


# ---------------------------------------------------------------------------------------------
# The filters and the pipeline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesisFilters:
    """The limits of the quality filters (see the module docstring for the order they apply in)."""

    max_src_len: int
    max_instruction_len: int = 128
    max_copy_overlap: float = 0.5
    near_dup_threshold: float = 0.8

    def problems(self) -> list[str]:
        """Out-of-range values, one message per flag."""
        out = []
        if self.max_src_len < 1:
            out.append(f"--max_src_len={self.max_src_len} must be >= 1")
        if self.max_instruction_len < 1:
            out.append(f"--max_instruction_len={self.max_instruction_len} must be >= 1")
        if not 0 <= self.max_copy_overlap <= 1:
            out.append(f"--max_copy_overlap={self.max_copy_overlap} must be in [0, 1] (1 = no copy filter)")
        if not 0 < self.near_dup_threshold <= 1:
            out.append(
                f"--near_dup_threshold={self.near_dup_threshold} must be in (0, 1] (1 = identical word 3-grams only)"
            )
        return out


@dataclass(frozen=True)
class Candidate:
    """A text that passed the text filters, with its prompt ids for the reverse model."""

    source: SourceText
    prompt: list[int]


def select_texts(
    texts: list[SourceText], template: Template, filters: SynthesisFilters, stats: ConvertStats
) -> list[Candidate]:
    """Steps 1-3 of the pipeline: drop empty texts, prompts over ``max_src_len`` and duplicates (counted)."""
    seen: set[str] = set()
    near = NearDuplicateIndex(filters.near_dup_threshold)
    kept = []
    for source in texts:
        if not source.text:
            stats.skipped["empty text"] += 1
            continue
        prompt = template.build_prompt(synthesis_record(source.text))
        if len(prompt) > filters.max_src_len:
            stats.skipped[f"prompt over --max_src_len={filters.max_src_len} tokens"] += 1
            continue
        tokens = words(source.text) or [source.text]  # a text of punctuation only is compared verbatim
        key = " ".join(tokens)
        if key in seen:
            stats.skipped["duplicate text (same normalised words)"] += 1
            continue
        seen.add(key)
        if near.add(ngrams(tokens, SHINGLE_NGRAM)) is not None:
            stats.skipped[
                f"near-duplicate text (word {SHINGLE_NGRAM}-gram Jaccard >= {filters.near_dup_threshold})"
            ] += 1
            continue
        kept.append(Candidate(source, prompt))
    return kept


def instruction_problem(
    instruction: str, text: str, tokenizer: PreTrainedTokenizerBase, filters: SynthesisFilters
) -> str | None:
    """Step 5: why a generated instruction is dropped (the count's reason), or None when it is kept."""
    if not instruction.strip():
        return "empty instruction"
    if len(tokenizer.encode(instruction, add_special_tokens=False)) > filters.max_instruction_len:
        return f"instruction over --max_instruction_len={filters.max_instruction_len} tokens"
    if copy_overlap(instruction, text) > filters.max_copy_overlap:
        return f"instruction copies the text ({COPY_NGRAM}-gram overlap > {filters.max_copy_overlap})"
    return None


def synthesize(
    texts: list[SourceText],
    engine: Engine,
    config: GenerationConfig,
    filters: SynthesisFilters,
    *,
    batch_size: int | None = None,
    stats: ConvertStats | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, str]]:
    """Generate an instruction for every text that passes the text filters; keep the pairs that pass the
    instruction filters, in input order, as Alpaca records.

    Args:
        texts: from :func:`read_texts`.
        engine: the reverse model as :func:`sft.inference.engines.load_engine` loads it (its template = the one
            it was trained with).
        config: generation settings (:func:`sft.inference.settings.build_generation_config`); seed the
            RNGs before calling for repeatable sampling.
        batch_size: texts generated for together (None: the engine's default).
        stats: receives the skip counts (its ``read`` is the caller's); ``written`` is set here.
        progress: called with the number of texts finished after each batch.
    """
    stats = stats if stats is not None else ConvertStats(read=len(texts), unit="texts")
    tokenizer = engine.tokenizer
    candidates = select_texts(texts, engine.template, filters, stats)
    instructions = engine.generate(
        [c.prompt for c in candidates], config, batch_size=batch_size, progress=progress
    )
    records = []
    for candidate, instruction in zip(candidates, instructions, strict=True):
        instruction = instruction.strip()
        problem = instruction_problem(instruction, candidate.source.text, tokenizer, filters)
        if problem is not None:
            stats.skipped[problem] += 1
            continue
        records.append({"instruction": instruction, "input": "", "output": candidate.source.text})
    stats.notes["instructions generated"] += len(candidates)
    stats.written = len(records)
    return records
