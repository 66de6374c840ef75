"""predict.py (batch + --chat) and evaluate.py ppl on the tiny Baichuan2 with a real LoRA adapter."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models.baichuan  # noqa: F401  (Auto-class registration)
from sft.merge import merge_lora
from tests.test_merge import make_adapter

REPO_ROOT = Path(__file__).resolve().parent.parent

RECORDS = [
    {
        "system": "你是李白，一位豪放的诗人。",
        "conversations": [
            {"role": "user", "content": "你最喜欢喝什么酒？"},
            {"role": "assistant", "content": "当然是美酒！"},
        ],
        "references": ["当然是美酒！", "兰陵美酒郁金香。"],
    },
    {"conversations": [{"role": "user", "content": "Tell me a story about the moon, please."}]},
    {
        "conversations": [
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好呀"},
            {"role": "user", "content": "今天天气怎么样？"},
            {"role": "assistant", "content": "晴天。"},
        ]
    },
]


@pytest.fixture(scope="module")
def setup(tiny_baichuan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA adapter (trained 'without quantisation'), its merged model and a small test file."""
    root = tmp_path_factory.mktemp("predict")
    adapter = make_adapter(tiny_baichuan_dir, root / "adapter", quantization="none")
    merged = root / "merged"
    merge_lora(tiny_baichuan_dir, adapter, merged, dtype=torch.float32)
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return {"base": tiny_baichuan_dir, "adapter": adapter, "merged": merged, "data": data, "root": root}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_predict(setup: dict[str, Path], output: str, *flags: str) -> list[dict]:
    """predict.py on the CPU over the test file, written to root/<output>; returns the rows."""
    import predict

    out = setup["root"] / output
    common = ["--data_path", str(setup["data"]), "--output_path", str(out), "--device", "cpu"]
    assert predict.main([*common, *flags]) == 0
    return read_jsonl(out)


def test_greedy_merged_equals_base_plus_adapter(setup):
    greedy = ["--no-do_sample", "--max_new_tokens", "12", "--batch_size", "2"]
    merged_rows = run_predict(setup, "merged.jsonl", "--model_path", str(setup["merged"]), *greedy)
    adapter_rows = run_predict(
        setup,
        "adapter.jsonl",
        "--model_path",
        str(setup["base"]),
        "--adapter_dir",
        str(setup["adapter"]),
        *greedy,
    )
    assert [r["prediction"] for r in merged_rows] == [r["prediction"] for r in adapter_rows]
    assert all(r["prediction"] for r in merged_rows)


def test_output_rows_and_left_padding(setup):
    """Rows keep prompt, prediction, references, record; batching (left padding) changes no answer."""
    greedy = ["--no-do_sample", "--max_new_tokens", "10", "--model_path", str(setup["merged"])]
    rows = run_predict(setup, "b.jsonl", *greedy, "--batch_size", "3")
    single = run_predict(setup, "s.jsonl", *greedy, "--batch_size", "1")
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in single]
    assert rows[0]["references"] == RECORDS[0]["references"]
    assert rows[1]["references"] == []  # a bare prompt has nothing to compare with
    assert rows[2]["references"] == ["晴天。"]  # the last assistant turn is the reference...
    assert (
        "今天天气怎么样" in rows[2]["prompt"] and "晴天" not in rows[2]["prompt"]
    )  # ...and not in the prompt
    assert "你好呀" in rows[2]["prompt"]  # earlier rounds are context
    assert rows[0]["record"] == RECORDS[0]


def test_generation_flags_are_honoured(setup):
    """max_new_tokens bounds the answer; an impossible combination is refused before loading."""
    import predict
    from sft.generation import build_generation_config, load_for_inference

    model, tokenizer = load_for_inference(setup["merged"])
    config = build_generation_config(
        model, tokenizer, max_new_tokens=3, do_sample=False, repetition_penalty=1.3, num_beams=2
    )
    assert (config.max_new_tokens, config.do_sample, config.repetition_penalty, config.num_beams) == (
        3,
        False,
        1.3,
        2,
    )
    sampled = build_generation_config(model, tokenizer, temperature=0.7, top_p=0.5, top_k=7)
    assert sampled.do_sample and (sampled.temperature, sampled.top_p, sampled.top_k) == (
        0.7,
        0.5,
        7,
    )  # sampling from generation_config
    assert sampled.max_new_tokens == model.generation_config.max_new_tokens

    greedy = ["--model_path", str(setup["merged"]), "--no-do_sample"]
    short = run_predict(setup, "short.jsonl", *greedy, "--max_new_tokens", "3")
    long = run_predict(setup, "long.jsonl", *greedy, "--max_new_tokens", "10")
    pairs = [(a["prediction"], b["prediction"]) for a, b in zip(short, long)]
    assert all(b.startswith(a) for a, b in pairs)  # greedy: the short answer is the start of the long one
    assert all(len(a) < len(b) for a, b in pairs)
    code = predict.main(
        [
            "--model_path",
            str(setup["merged"]),
            "--data_path",
            str(setup["data"]),
            "--output_path",
            str(setup["root"] / "x.jsonl"),
            "--no-do_sample",
            "--temperature",
            "0.5",
        ]
    )
    assert code == 1 and not (setup["root"] / "x.jsonl").exists()


def test_chat_mode_keeps_history_and_streams(setup):
    """Two turns through stdin; the second answer is the greedy answer to the whole conversation."""
    from sft.data.templates import get_template
    from sft.generation import build_generation_config, generate_batch, load_for_inference

    proc = subprocess.run(
        [
            sys.executable,
            "predict.py",
            "--model_path",
            str(setup["merged"]),
            "--chat",
            "--device",
            "cpu",
            "--no-do_sample",
            "--max_new_tokens",
            "8",
            "--system",
            "你是李白",
        ],
        input="你好\n你是谁？\nexit\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [
        line.split("Assistant: ", 1)[1].strip() for line in proc.stdout.splitlines() if "Assistant: " in line
    ]
    assert len(replies) == 2 and all(replies)

    model, tokenizer = load_for_inference(setup["merged"])
    template = get_template("baichuan2", tokenizer, setup["merged"])
    config = build_generation_config(model, tokenizer, do_sample=False, max_new_tokens=8)
    history = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "你是谁？"},
    ]
    first = template.build_prompt({"system": "你是李白", "conversations": history[:1]})
    second = template.build_prompt({"system": "你是李白", "conversations": history})
    expected = generate_batch(model, tokenizer, [first, second], config)
    assert replies == expected


def test_ppl_equals_hand_computed_perplexity(setup, tmp_path):
    """evaluate.py ppl = exp(sum NLL / learned tokens), computed here by hand from full logits."""
    import evaluate
    from sft.data.templates import get_template
    from sft.generation import load_for_inference

    answered = [r for r in RECORDS if r["conversations"][-1]["role"] == "assistant"]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answered), encoding="utf-8")
    out = tmp_path / "ppl.json"
    code = evaluate.main(
        [
            "ppl",
            "--model_path",
            str(setup["base"]),
            "--adapter_dir",
            str(setup["adapter"]),
            "--data_path",
            str(data),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--max_len",
            "512",
            "--max_src_len",
            "256",
            "--output_json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())

    model, tokenizer = load_for_inference(setup["base"], setup["adapter"])
    template = get_template("baichuan2", tokenizer, setup["base"])
    nll, tokens = 0.0, 0
    for record in answered:
        for ids, labels in template.encode(record, loss_on="all"):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            targets = torch.tensor(labels[1:])
            mask = targets != -100
            nll += torch.nn.functional.cross_entropy(logits[:-1][mask], targets[mask], reduction="sum").item()
            tokens += int(mask.sum())
    assert result["tokens"] == tokens
    assert result["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
