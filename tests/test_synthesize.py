"""data_helper.py synthesize (sft/inference/synthesize.py): the reverse prompt equals training's, each filter on a
hand-made case, bad inputs, determinism, and the whole back-translation loop of docs/DATA.md on the tiny model."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import data_helper
from sft.data.converters import ConvertStats, clean_text, convert_dolly
from sft.data.templates import get_template
from sft.inference.synthesize import (
    NearDuplicateIndex,
    SourceText,
    SynthesisFilters,
    _lsh_rows,
    copy_overlap,
    instruction_problem,
    jaccard,
    ngrams,
    read_texts,
    select_texts,
    synthesis_record,
    words,
)
from sft.modeling.loading import load_tokenizer
from tests.test_merge import make_adapter

REPO_ROOT = Path(__file__).resolve().parent.parent

DOLLY = [
    {"instruction": "Write a thank-you note to Anna.", "context": "", "response": "Dear Anna, thank you!"},
    {
        "instruction": "告诉大家会议改期。",
        "context": "",
        "response": "  各位，周会改到周五上午十点。\r\n谢谢！ ",
    },
    {"instruction": "Say hi.", "context": "Greet people.", "response": "Hello there, everyone."},
]


def dolly_file(tmp_path: Path) -> Path:
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in DOLLY), encoding="utf-8")
    return path


def training_prompts(path: Path, tokenizer, template) -> list[list[int]]:
    """The prompt part of each training sample of ``path`` as train.py encodes it (ids before the first label)."""
    from sft.data.dataset import load_sft_dataset

    dataset = load_sft_dataset(path, tokenizer, template, max_len=512, max_src_len=448, is_skip=False)
    prompts = []
    for sample in dataset:
        first_learned = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        prompts.append(sample["input_ids"][:first_learned])
    return prompts


# ---- the prompt --------------------------------------------------------------------------------------


def test_synthesis_prompt_equals_the_reverse_training_prompt(tiny_baichuan_dir, tiny_llama_dir, tmp_path):
    """Token ids: build_prompt of the synthesis record == the prompt part of the reverse training sample, for
    every text without a reference text; a sample with one (never synthesised) differs."""
    records, _ = convert_dolly(dolly_file(tmp_path), reverse=True)
    reverse = tmp_path / "reverse.jsonl"
    reverse.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    cases = [(tiny_baichuan_dir, "baichuan2"), *((tiny_llama_dir, n) for n in ("llama2", "chatml", "alpaca"))]
    for model_dir, name in cases:
        tokenizer = load_tokenizer(model_dir)
        template = get_template(name, tokenizer, model_dir)
        trained = training_prompts(reverse, tokenizer, template)
        synthesis = [template.build_prompt(synthesis_record(clean_text(r["response"]))) for r in DOLLY]
        assert synthesis[:2] == trained[:2], name
        assert synthesis[2] != trained[2], name  # with a reference text the training prompt has it too
        assert len(trained[1]) > 10
    # The record itself: what convert_dolly writes, minus the answer and the meta no template renders.
    assert synthesis_record(clean_text(DOLLY[1]["response"])) == {
        "conversations": records[1]["conversations"][:1]
    }
    assert records[1]["conversations"][0]["content"].endswith("各位，周会改到周五上午十点。\n谢谢！")


# ---- the similarity measures and the filters ------------------------------------------------------------


def test_words_ngrams_and_copy_overlap_by_hand():
    assert words("Hello,  WORLD!! It's 10am.") == ["hello", "world", "it", "s", "10am"]
    assert words("Ｆｕｌｌ-width 你好，世界") == ["full", "width", "你", "好", "世", "界"]
    assert ngrams(["a", "b", "c", "d"], 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert ngrams(["a", "b"], 3) == {("a", "b")} and ngrams([], 3) == set()

    text = "Dear Maria, thank you for the dinner on Friday. The soup was wonderful."
    # 8 trigrams, of which only "for the dinner" occurs in the text: 1/8.
    assert copy_overlap("Write a thank-you email to Maria for the dinner", text) == pytest.approx(1 / 8)
    assert copy_overlap(text, text) == 1.0
    # "Rewrite this:" adds 2 of 13 trigrams ("rewrite this dear", "this dear maria"): 11/13 copied.
    assert copy_overlap("Rewrite this: " + text, text) == pytest.approx(11 / 13)
    assert copy_overlap("the soup", text) == 1.0  # shorter than 3 words: one bigram, found in order
    assert copy_overlap("soup the", text) == 0.0
    assert copy_overlap("???", text) == 0.0


def test_near_duplicate_index_verifies_exactly_and_keeps_the_first():
    assert _lsh_rows(0.8) == 4 and _lsh_rows(1.0) == 8 and _lsh_rows(0.3) == 1
    base = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "near",
        "the",
        "river",
        "bank",
        "today",
    ]
    one_word_changed = [*base[:7], "sleepy", *base[8:]]
    a, b = ngrams(base, 3), ngrams(one_word_changed, 3)
    assert len(a) == 12 and len(a & b) == 9 and jaccard(a, b) == pytest.approx(9 / 15)
    other = ngrams(
        ["a", "completely", "different", "sentence", "about", "cooking", "rice", "and", "beans"], 3
    )

    index = NearDuplicateIndex(0.6)
    assert index.add(a) is None and index.add(other) is None
    assert index.add(b) == 0  # Jaccard 0.6 >= 0.6: a near duplicate of the first text
    strict = NearDuplicateIndex(0.61)
    assert strict.add(a) is None and strict.add(b) is None  # 0.6 < 0.61: kept
    # Signatures do not depend on the process (no salted hash()): the same set, the same signature.
    assert (index.signature(a) == NearDuplicateIndex(0.6).signature(a)).all()
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateIndex(0.0)


def test_text_filters_count_each_drop(tiny_baichuan_dir):
    tokenizer = load_tokenizer(tiny_baichuan_dir)
    template = get_template("baichuan2", tokenizer, tiny_baichuan_dir)
    long_text = " ".join(["word"] * 40 + [str(i) for i in range(40)])
    long_len = len(template.build_prompt(synthesis_record(long_text)))
    near = "the quick brown fox jumps over the lazy dog near the river bank today"
    texts = [
        SourceText(1, near),
        SourceText(2, ""),
        SourceText(3, long_text),
        SourceText(4, "THE QUICK brown fox -- jumps over the lazy dog, near the river bank today!"),
        SourceText(5, near.replace("lazy", "sleepy")),  # Jaccard 9/15 = 0.6 with line 1
        SourceText(6, "你好，世界。"),
        SourceText(7, "???"),
        SourceText(8, "!!!"),
        SourceText(9, "???"),
    ]
    filters = SynthesisFilters(max_src_len=long_len - 1, near_dup_threshold=0.6)
    stats = ConvertStats(read=len(texts), unit="texts")
    kept = select_texts(texts, template, filters, stats)
    assert [c.source.line for c in kept] == [1, 6, 7, 8]
    assert kept[0].prompt == template.build_prompt(synthesis_record(near))
    assert dict(stats.skipped) == {
        "empty text": 1,
        f"prompt over --max_src_len={long_len - 1} tokens": 1,
        "duplicate text (same normalised words)": 2,  # line 4 (case, punctuation), line 9 (verbatim)
        "near-duplicate text (word 3-gram Jaccard >= 0.6)": 1,
    }
    # At the limit the long text is kept; a higher threshold keeps the near duplicate.
    kept = select_texts(texts, template, SynthesisFilters(max_src_len=long_len), ConvertStats())
    assert [c.source.line for c in kept] == [1, 3, 5, 6, 7, 8]


def test_instruction_filters(tiny_baichuan_dir):
    tokenizer = load_tokenizer(tiny_baichuan_dir)
    text = "Dear Maria, thank you for the dinner on Friday. The soup was wonderful."
    ok = "Write a thank-you email to Maria for the dinner"
    limit = len(tokenizer.encode(ok, add_special_tokens=False))  # at the limit: kept
    filters = SynthesisFilters(max_src_len=256, max_instruction_len=limit, max_copy_overlap=0.5)
    assert instruction_problem(ok, text, tokenizer, filters) is None
    assert instruction_problem("  \n", text, tokenizer, filters) == "empty instruction"
    longer = ok + " and soup"
    assert len(tokenizer.encode(longer, add_special_tokens=False)) > limit
    assert instruction_problem(longer, text, tokenizer, filters) == (
        f"instruction over --max_instruction_len={limit} tokens"
    )
    copied = "Maria, thank you for the dinner on Friday"  # 6 of 6 trigrams in the text
    assert instruction_problem(copied, text, tokenizer, filters) == (
        "instruction copies the text (3-gram overlap > 0.5)"
    )
    at_limit = "Invite Maria: the dinner on Friday"  # 2 of 4 trigrams copied: 0.5 is not above 0.5
    assert copy_overlap(at_limit, text) == 0.5
    assert instruction_problem(at_limit, text, tokenizer, filters) is None
    off = SynthesisFilters(max_src_len=256, max_copy_overlap=1.0)
    assert instruction_problem(copied, text, tokenizer, off) is None


# ---- reading texts and bad input -------------------------------------------------------------------------


def test_read_texts_from_each_kind(tmp_path):
    txt = tmp_path / "texts.txt"
    txt.write_bytes("\ufeffFirst text.\r\n\n  Second text, indented.  \n第三个文本。".encode())
    assert read_texts(txt) == [
        SourceText(1, "First text."),
        SourceText(3, "Second text, indented."),
        SourceText(4, "第三个文本。"),
    ]
    jsonl = tmp_path / "posts.jsonl"
    jsonl.write_text('{"body": "Line one.\\r\\nLine two.", "id": 1}\n\n{"body": ""}\n', encoding="utf-8")
    assert read_texts(jsonl, text_field="body") == [SourceText(1, "Line one.\nLine two."), SourceText(3, "")]
    array = tmp_path / "posts.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    assert [t.text for t in read_texts(array)] == ["a", "b"]
    stats = ConvertStats(unit="texts")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "ok"}\n{"title": "no text"}\n[1]\n', encoding="utf-8")
    assert read_texts(mixed, skip_invalid=True, stats=stats) == [SourceText(1, "ok")]
    assert stats.read == 3 and dict(stats.skipped) == {"record without a string 'text' field": 2}


def synthesize_argv(model_dir: Path, input_path: Path, output: Path, *flags: str) -> list[str]:
    return [
        "synthesize", "--model_path", str(model_dir), "--input", str(input_path), "--output", str(output),
        "--device", "cpu", *flags,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "flags", "message", "status"),
    [
        ("missing.txt", None, [], "file not found: {path}", 1),
        ("empty.txt", b"\n  \n", [], "{path}: file is empty", 1),
        ("empty.jsonl", b"", [], "{path}: file is empty", 1),
        ("latin1.txt", "ok\ncaf\u00e9\n".encode("latin-1"), [], "{path}:2: not UTF-8 text (byte 0xe9", 1),
        (
            "nofield.jsonl",
            b'{"text": "a"}\n{"body": "b"}\n',
            [],
            "{path}:2: no field 'text' (keys: ['body'])",
            1,
        ),
        ("nostr.jsonl", b'{"text": 3}\n', [], "{path}:1: field 'text' must be a string, got int", 1),
        (
            "list.jsonl",
            b'{"text": "a"}\n["b"]\n',
            [],
            "{path}:2: expected a JSON object with a 'text' field",
            1,
        ),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', [], "{path}:2: invalid JSON", 1),
        ("texts.csv", b"a,b\n", [], "--input={path}: unknown kind '.csv'", 1),
        ("texts.txt", b"a\n", ["--text_field", "body"], "--text_field=body applies to JSONL input only", 1),
        ("texts.txt", b"a\n", ["--near_dup_threshold", "0"], "--near_dup_threshold=0.0 must be in (0, 1]", 2),
        ("texts.txt", b"a\n", ["--max_src_len", "0"], "--max_src_len=0 must be >= 1", 2),
        ("texts.txt", b"a\n", ["--no-do_sample", "--top_k", "3"], "--top_k only applies when sampling", 2),
    ],
)
def test_bad_input_is_one_line(tiny_baichuan_dir, tmp_path, capsys, name, content, flags, message, status):
    """Bad input exits 1, a bad flag 2 (README: "When things go wrong"), each with one line."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    output = tmp_path / "out" / "alpaca.jsonl"
    code = data_helper.main(synthesize_argv(tiny_baichuan_dir, path, output, *flags))
    err = capsys.readouterr().err
    assert code == status, err
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert message.format(path=path) in errors[0]
    assert "sft.modeling.loading: loaded" not in err  # refused before any weight was loaded
    assert not output.parent.exists()


def test_synthesis_is_deterministic_for_a_seed(tiny_baichuan_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_baichuan_dir, tmp_path / "adapter", quantization="none", scale=0.05)
    texts = tmp_path / "texts.jsonl"
    rows = [{"text": t} for t in ("Hello Anna, see you on Friday.", "hello anna -- see you on friday!", "")]
    rows += [{"text": f"Note {i}: buy {n} apples and a loaf of bread."} for i, n in enumerate(["two", "six"])]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.jsonl"
        argv = synthesize_argv(tiny_baichuan_dir, texts, out, "--adapter_dir", str(adapter), "--seed", "7")
        argv += [
            "--do_sample",
            "--temperature",
            "1.5",
            "--top_k",
            "0",
            "--max_new_tokens",
            "8",
            "--batch_size",
            "2",
        ]
        argv += ["--max_copy_overlap", "1", "--max_instruction_len", "200"]
        assert data_helper.main(argv) == 0
        summary = capsys.readouterr().out
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    records = [json.loads(line) for line in outputs[0].decode().splitlines()]
    # Five texts: one empty, one a duplicate; the model wrote something for each of the three others.
    assert "synthesize: texts read 5, kept 3, skipped 2; samples written 3" in summary
    assert "skipped (duplicate text (same normalised words)): 1" in summary
    assert "skipped (empty text): 1" in summary
    assert [r["output"] for r in records] == [rows[0]["text"], rows[3]["text"], rows[4]["text"]]
    assert all(set(r) == {"instruction", "input", "output"} and r["input"] == "" for r in records)
    assert all(r["instruction"] for r in records)

    # Every text filtered out: exit 1, nothing written.
    out = tmp_path / "none.jsonl"
    argv = synthesize_argv(tiny_baichuan_dir, texts, out, "--adapter_dir", str(adapter), "--max_src_len", "5")
    assert data_helper.main(argv) == 1
    assert "nothing to write" in capsys.readouterr().err and not out.exists()


# ---- the whole loop, as docs/DATA.md gives it ------------------------------------------------------------


def docs_loop_commands() -> list[list[str]]:
    """The commands of docs/DATA.md's tiny-model loop block (continuation lines joined)."""
    text = (REPO_ROOT / "docs" / "DATA.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- loop-on-tiny-model -->\n```bash\n(.*?)```", text, re.S)
    assert block, "docs/DATA.md lost its <!-- loop-on-tiny-model --> block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_back_translation_loop_from_the_docs(tiny_baichuan_dir, tmp_path, capsys, monkeypatch):
    """dolly --reverse, reverse training, synthesis, forward training: the docs' commands on the tiny model."""
    from sft.checkpoint.adapters import read_adapter
    from sft.checkpoint.layout import list_checkpoints, read_train_args
    from sft.data.dataset import load_sft_dataset

    monkeypatch.chdir(REPO_ROOT)  # the commands name data/ relative to the repository root
    commands = docs_loop_commands()
    assert [c[:3] for c in commands] == [
        ["python", "-m", "models.tiny"],
        ["python", "data_helper.py", "dolly"],
        ["python", "train.py", "--model_name_or_path"],
        ["python", "data_helper.py", "synthesize"],
        ["python", "train.py", "--model_name_or_path"],
    ]
    tiny_out = commands[0][commands[0].index("--out") + 1]

    def local(arg: str) -> str:
        if arg == tiny_out:
            return str(tiny_baichuan_dir)  # the session's tiny model is what `python -m models.tiny` writes
        return str(tmp_path / arg.removeprefix("output/")) if arg.startswith("output/") else arg

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = {}
    for i, command in enumerate(commands[1:], start=1):
        argv = [local(a) for a in command[2:]]
        if command[1] == "data_helper.py":
            assert data_helper.main(argv) == 0
            logs[i] = capsys.readouterr().out
        else:
            proc = subprocess.run(
                [sys.executable, "train.py", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
            logs[i] = proc.stderr

    reverse_file = tmp_path / "loop" / "reverse.jsonl"
    assert "dolly: records read 5, kept 5, skipped 0; samples written 5" in logs[1]
    adapter = read_adapter(tmp_path / "loop" / "reverse" / "epoch-8-step-40")
    assert adapter.template == "baichuan2"

    # The prompt the synthesis used is the one reverse training learned from, token for token.
    tokenizer = load_tokenizer(adapter.path)
    template = get_template(adapter.template, tokenizer, tiny_baichuan_dir)
    train_args = read_train_args(adapter.path)
    dataset = load_sft_dataset(
        reverse_file, tokenizer, template,
        max_len=train_args["max_len"], max_src_len=train_args["max_src_len"], is_skip=False,
    )  # fmt: skip
    dolly = [
        json.loads(line) for line in (REPO_ROOT / "data" / "example_dolly.jsonl").read_text().splitlines()
    ]
    compared = 0
    for record, sample in zip(dolly, dataset, strict=True):
        if record["context"]:
            continue
        first_learned = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        prompt = template.build_prompt(synthesis_record(clean_text(record["response"])))
        assert prompt == sample["input_ids"][:first_learned]
        compared += 1
    assert compared >= 3

    # Synthesis: the example texts hold one exact and one near duplicate; the rest reach the model.
    summary = logs[3]
    written = int(re.search(r"samples written (\d+)", summary).group(1))
    read, kept, skipped = map(
        int, re.search(r"texts read (\d+), kept (\d+), skipped (\d+)", summary).groups()
    )
    assert (read, kept + skipped, kept) == (8, 8, written)
    assert "skipped (duplicate text (same normalised words)): 1" in summary
    assert "skipped (near-duplicate text (word 3-gram Jaccard >= 0.8)): 1" in summary
    assert "instructions generated: 6" in summary
    assert written >= 1
    texts = (REPO_ROOT / "data" / "example_texts.txt").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in (tmp_path / "loop" / "alpaca.jsonl").read_text().splitlines()]
    assert len(records) == written
    outputs = [r["output"] for r in records]
    assert outputs == [t for t in texts if t in outputs]  # the user's texts, verbatim and in input order
    assert all(r["instruction"].strip() and r["input"] == "" for r in records)

    # Forward training read every synthesised pair.
    assert f"encoded {written} records -> {written} samples" in logs[4]
    forward = list_checkpoints(tmp_path / "loop" / "forward")
    assert forward and forward[-1].name.endswith("step-2")
