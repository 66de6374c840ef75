"""ROUGE on hand-made predictions against values counted by hand (sft.inference.rouge and evaluate.py rouge)."""

from __future__ import annotations

import json

import pytest

from sft.inference.rouge import CharTokenizer, corpus_rouge, detect_mode, make_scorer, sample_scores


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


def test_english_word_level_by_hand():
    # pred: the cat sat on the mat          (6 tokens)
    # ref:  the cat was sitting on the mat  (7 tokens; "sitting" stems to "sit")
    # unigrams in common (clipped): the x2, cat, on, mat = 5      -> P 5/6, R 5/7
    # bigrams: pred the-cat cat-sat sat-on on-the the-mat (5), ref has the-cat, on-the, the-mat of them = 3
    #          ref bigrams: the-cat cat-was was-sit sit-on on-the the-mat (6) -> P 3/5, R 3/6
    # LCS: the cat on the mat = 5                                 -> P 5/6, R 5/7
    scores = sample_scores(make_scorer("en"), "the cat sat on the mat", ["the cat was sitting on the mat"])
    assert scores["rouge1"] == pytest.approx((5 / 6, 5 / 7, f1(5 / 6, 5 / 7)))
    assert scores["rouge2"] == pytest.approx((3 / 5, 3 / 6, f1(3 / 5, 3 / 6)))
    assert scores["rougeL"] == pytest.approx((5 / 6, 5 / 7, f1(5 / 6, 5 / 7)))


def test_english_stemming_and_case():
    # "Cats running." -> cat run ; "the cat runs" -> the cat run: 2 of 2 pred unigrams, 2 of 3 ref unigrams.
    scores = sample_scores(make_scorer("en"), "Cats running.", ["the cat runs"])
    assert scores["rouge1"] == pytest.approx((1.0, 2 / 3, f1(1.0, 2 / 3)))


def test_chinese_character_level_by_hand():
    # pred 今天天气很好。 -> 今 天 天 气 很 好 ; ref 今天天气不错！ -> 今 天 天 气 不 错 (punctuation dropped)
    # unigrams in common: 今, 天 x2, 气 = 4 of 6 each side
    # bigrams: 今天 天天 天气 气很 很好 vs 今天 天天 天气 气不 不错: 3 of 5 each side
    # LCS: 今天天气 = 4
    scores = sample_scores(make_scorer("zh-char"), "今天天气很好。", ["今天天气不错！"])
    assert scores["rouge1"] == pytest.approx((4 / 6, 4 / 6, 4 / 6))
    assert scores["rouge2"] == pytest.approx((3 / 5, 3 / 5, 3 / 5))
    assert scores["rougeL"] == pytest.approx((4 / 6, 4 / 6, 4 / 6))


def test_char_tokenizer_keeps_latin_words_whole():
    assert CharTokenizer().tokenize("用GPT4模型, 写 Hello World！") == [
        "用",
        "gpt4",
        "模",
        "型",
        "写",
        "hello",
        "world",
    ]


def test_jieba_word_level_by_hand():
    pytest.importorskip("jieba")
    # 我爱北京天安门 -> 我 爱 北京 天安门 ; 我爱北京 -> 我 爱 北京 : 3 in common -> P 3/4, R 3/3
    scores = sample_scores(make_scorer("zh-jieba"), "我爱北京天安门", ["我爱北京"])
    assert scores["rouge1"] == pytest.approx((3 / 4, 1.0, f1(3 / 4, 1.0)))


def test_several_references_mean_or_max():
    # pred matches the first reference exactly (F 1) and shares nothing with the second (F 0).
    refs = ["cat dog bird", "fish horse cow"]
    mean = corpus_rouge(["cat dog bird"], [refs], mode="en", reduce="mean")
    best = corpus_rouge(["cat dog bird"], [refs], mode="en", reduce="max")
    assert mean.scores["rouge1"]["f1"] == pytest.approx(50.0)
    assert best.scores["rouge1"]["f1"] == pytest.approx(100.0)


def test_corpus_average_skips_samples_without_reference():
    # sample 1: F1 = 1; sample 2: pred "a cat" vs ref "the cat": rouge1 P 1/2 R 1/2 -> 0.5; sample 3 has no reference.
    result = corpus_rouge(["cat", "a cat", "x"], [["cat"], ["the cat"], []], mode="en")
    assert result.samples == 2 and result.skipped_no_reference == 1
    assert result.scores["rouge1"]["f1"] == pytest.approx(75.0)


def test_language_detection():
    assert detect_mode(["今天天气很好", "你好"]) == "zh-char"
    assert detect_mode(["今天天气很好"], "jieba") == "zh-jieba"
    assert detect_mode(["The weather is nice today.", "OK 好"]) == "en"


def test_evaluate_rouge_cli(tmp_path, capsys):
    import evaluate

    rows = [
        {"prediction": "今天天气很好。", "references": ["今天天气不错！"]},
        {"prediction": "今天天气不错", "references": ["今天天气不错", "明天下雨"]},
    ]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "rouge.json"
    assert evaluate.main(["rouge", "--pred_path", str(pred), "--output_json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "zh-char" and "character level" in result["tokenization"]
    assert result["multi_reference"].startswith("mean")
    # rouge-1 F: sample 1 = 4/6 (see the character-level test). Sample 2: the first reference is equal (F 1);
    # 明天下雨 shares only 天 with 今天天气不错 (P 1/6, R 1/4, F 0.2); mean over references = 0.6.
    assert result["scores"]["rouge1"]["f1"] == pytest.approx((4 / 6 + (1 + f1(1 / 6, 1 / 4)) / 2) / 2 * 100)
    table = capsys.readouterr().out
    assert "character level" in table and "rouge1" in table and "rougeL" in table


def test_evaluate_rouge_rejects_bad_rows(tmp_path, capsys):
    import evaluate

    pred = tmp_path / "pred.jsonl"
    pred.write_text('{"prediction": "x", "references": ["y"]}\n{"references": ["y"]}\n', encoding="utf-8")
    assert evaluate.main(["rouge", "--pred_path", str(pred)]) == 1
    assert "pred.jsonl:2" in capsys.readouterr().err
