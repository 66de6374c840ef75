"""ROUGE-1/2/L on predictions, with Google's ``rouge-score`` package doing the counting.

Tokenisation decides what ROUGE measures, so it is explicit and reported with every score:

* ``en``: rouge-score's own tokenizer (lower-case, non-alphanumerics dropped) with its Porter
  stemmer -- the standard English setting of the summarisation literature.
* ``zh-char``: Chinese at character level: every CJK character is one token, runs of Latin letters
  or digits are one (lower-cased) token each, punctuation and spaces are dropped. rouge-score's
  default tokenizer would delete every Chinese character, so Chinese needs this.
* ``zh-jieba``: Chinese words segmented by ``jieba`` (optional package), punctuation dropped.

Several references per sample (DialogSum test has three): by default the sample's score is the
**mean** over its references, then samples are averaged. The mean is the expected score against
one human reference, so it stays comparable with single-reference test sets and does not rise
just because more references exist; the max (rouge-score's ``score_multi``) rewards matching any
one of them and grows with their number. ``reduce="max"`` is available for comparison with papers
that use it.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MODES = ("en", "zh-char", "zh-jieba")
REDUCTIONS = ("mean", "max")
MODE_DESCRIPTIONS = {
    "en": "English, word level, Porter stemming (rouge-score tokenizer)",
    "zh-char": "Chinese, character level (CJK characters one token each, Latin words/numbers whole, punctuation dropped)",
    "zh-jieba": "Chinese, jieba word level (punctuation dropped)",
}

# CJK ideographs (BMP + extensions), kana and hangul: scripts written without spaces between words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")


def is_punctuation_or_space(token: str) -> bool:
    """True for tokens made only of punctuation, symbols and whitespace."""
    return all(unicodedata.category(ch)[0] in "PSZ" or ch.isspace() for ch in token)


class CharTokenizer:
    """Chinese character-level tokens (the interface rouge-score expects: ``tokenize(text)``)."""

    def tokenize(self, text: str) -> list[str]:
        """One token per CJK character, one per run of other letters/digits (lower-cased)."""
        return _TOKEN.findall(text.lower())


class JiebaTokenizer:
    """Chinese word-level tokens from jieba (imported on first use: it is an optional package)."""

    def __init__(self) -> None:
        try:
            import jieba
        except ImportError as err:
            raise ImportError("--zh_tokenizer jieba needs the jieba package: pip install jieba") from err
        jieba.setLogLevel(60)  # its dictionary-loading chatter goes to stderr otherwise
        self._jieba = jieba

    def tokenize(self, text: str) -> list[str]:
        """jieba's words, lower-cased, without punctuation and spaces."""
        return [w.lower() for w in self._jieba.lcut(text) if not is_punctuation_or_space(w)]


def detect_mode(texts: Sequence[str], zh_tokenizer: str = "char") -> str:
    """``zh-char``/``zh-jieba`` when more than 30% of the non-space characters are CJK, else ``en``."""
    chars = sum(len(t) - t.count(" ") for t in texts)
    cjk = sum(len(_CJK_CHAR.findall(t)) for t in texts)
    if chars and cjk / chars > 0.3:
        return f"zh-{zh_tokenizer}"
    return "en"


def make_scorer(mode: str):  # -> rouge_score.rouge_scorer.RougeScorer
    """A rouge-score scorer for ROUGE-1/2/L in ``mode`` (see the module docstring)."""
    from rouge_score import rouge_scorer

    if mode == "en":
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    if mode == "zh-char":
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CharTokenizer())
    if mode == "zh-jieba":
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=JiebaTokenizer())
    raise ValueError(f"unknown ROUGE mode {mode!r}; use one of {', '.join(MODES)}")


@dataclass
class RougeResult:
    """Averages over samples, in percent: ``scores[rouge_type][precision|recall|f1]``."""

    mode: str
    reduce: str
    samples: int
    skipped_no_reference: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict, with the tokenisation and multi-reference rule spelled out."""
        return {
            "mode": self.mode,
            "tokenization": MODE_DESCRIPTIONS[self.mode],
            "multi_reference": f"{self.reduce} over each sample's references, then mean over samples",
            "samples": self.samples,
            "skipped_no_reference": self.skipped_no_reference,
            "scores": self.scores,
        }


def read_f1(path: str | os.PathLike) -> dict[str, float]:
    """ROUGE-1/2/L F1 (percent) from a file holding :meth:`RougeResult.to_dict` (``evaluate.py rouge
    --output_json``)."""
    with open(path, encoding="utf-8") as fh:
        scores = json.load(fh)["scores"]
    return {kind: scores[kind]["f1"] for kind in ROUGE_TYPES}


def sample_scores(
    scorer, prediction: str, references: Sequence[str], reduce: str = "mean"
) -> dict[str, tuple]:
    """ROUGE of one prediction against its references: ``{type: (precision, recall, f1)}`` in [0, 1].

    With ``reduce="mean"`` each of precision, recall and F1 is averaged over the references; with
    ``"max"`` the reference with the best F1 is taken per ROUGE type (as rouge-score's score_multi).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; use mean or max")
    # rouge-score's argument order is (target, prediction).
    per_ref = [scorer.score(ref, prediction) for ref in references]
    out = {}
    for kind in ROUGE_TYPES:
        scores = [s[kind] for s in per_ref]
        if reduce == "max":
            best = max(scores, key=lambda s: s.fmeasure)
            out[kind] = (best.precision, best.recall, best.fmeasure)
        else:
            n = len(scores)
            out[kind] = (
                sum(s.precision for s in scores) / n,
                sum(s.recall for s in scores) / n,
                sum(s.fmeasure for s in scores) / n,
            )
    return out


def corpus_rouge(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    mode: str = "auto",
    zh_tokenizer: str = "char",
    reduce: str = "mean",
) -> RougeResult:
    """Mean ROUGE-1/2/L over samples (percent).

    Args:
        predictions: one generated text per sample.
        references: the reference texts of each sample (samples without any are skipped and counted).
        mode: ``en``, ``zh-char``, ``zh-jieba`` or ``auto`` (decided from the references' script).
        zh_tokenizer: ``char`` or ``jieba``, used when ``mode="auto"`` detects Chinese.
        reduce: ``mean`` or ``max`` over a sample's references.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if zh_tokenizer not in ("char", "jieba"):
        raise ValueError(f"unknown Chinese tokenizer {zh_tokenizer!r}; use char or jieba")
    if mode == "auto":
        mode = detect_mode([r for refs in references for r in refs], zh_tokenizer)
    scorer = make_scorer(mode)
    totals = {kind: [0.0, 0.0, 0.0] for kind in ROUGE_TYPES}
    scored = skipped = 0
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [r for r in refs if r.strip()]
        if not refs:
            skipped += 1
            continue
        for kind, values in sample_scores(scorer, prediction, refs, reduce).items():
            for i, v in enumerate(values):
                totals[kind][i] += v
        scored += 1
    if scored == 0:
        raise ValueError("no sample has a reference to score against")
    scores = {
        kind: {name: 100 * total / scored for name, total in zip(("precision", "recall", "f1"), values)}
        for kind, values in totals.items()
    }
    return RougeResult(mode=mode, reduce=reduce, samples=scored, skipped_no_reference=skipped, scores=scores)
