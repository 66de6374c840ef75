"""predict.py (batch + --chat) and evaluate.py ppl on the tiny Baichuan2 with a real LoRA adapter."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.export.merge import merge_lora
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
    from sft.inference.loading import load_for_inference
    from sft.inference.settings import GenerationArgs, build_generation_config

    model, tokenizer = load_for_inference(setup["merged"])
    config = build_generation_config(
        model,
        tokenizer,
        GenerationArgs(max_new_tokens=3, do_sample=False, repetition_penalty=1.3, num_beams=2),
    )
    assert (config.max_new_tokens, config.do_sample, config.repetition_penalty, config.num_beams) == (
        3,
        False,
        1.3,
        2,
    )
    sampled = build_generation_config(model, tokenizer, GenerationArgs(temperature=0.7, top_p=0.5, top_k=7))
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
    assert code == 2 and not (setup["root"] / "x.jsonl").exists()  # a flag problem: exit status 2


CHAT_SYSTEM = "你是李白，唐代诗人，字太白，号青莲居士。"  # long enough for a start worth reading from a cache


def test_chat_mode_keeps_history_and_streams(setup):
    """Two turns through stdin; the second answer is the greedy answer to the whole conversation, computed after
    the first turn's prompt."""
    from sft.data.templates import get_template
    from sft.inference.generate import generate_batch
    from sft.inference.loading import load_for_inference
    from sft.inference.settings import GenerationArgs, build_generation_config

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
            CHAT_SYSTEM,
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
    # The second turn read the first turn's prompt (and the reply's ids the text encodes back to) from the cache
    # the chat kept: it computed only what follows.
    joined = [tuple(map(int, m)) for m in re.findall(r"prompt (\d+) tokens, (\d+) of them read", proc.stderr)]
    assert len(joined) == 2 and joined[0][1] == 0 and joined[1][1] >= joined[0][0], joined

    model, tokenizer = load_for_inference(setup["merged"])
    template = get_template("baichuan2", tokenizer, setup["merged"])
    config = build_generation_config(model, tokenizer, GenerationArgs(do_sample=False, max_new_tokens=8))
    history = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "你是谁？"},
    ]
    first = template.build_prompt({"system": CHAT_SYSTEM, "conversations": history[:1]})
    second = template.build_prompt({"system": CHAT_SYSTEM, "conversations": history})
    expected = generate_batch(model, tokenizer, [first, second], config)
    assert replies == expected


def test_ppl_equals_hand_computed_perplexity(setup, tmp_path):
    """evaluate.py ppl = exp(sum NLL / learned tokens), computed here by hand from full logits."""
    import evaluate
    from sft.data.templates import get_template
    from sft.inference.loading import load_for_inference

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


# ---- refusals: before any model is loaded, one line naming the flag/file, exit status 1 ----------------


def predict_flags(setup: dict[str, Path], *flags: str, output: str = "x.jsonl") -> list[str]:
    return [
        "--data_path", str(setup["data"]), "--output_path", str(setup["root"] / output), "--device", "cpu",
        *flags,
    ]  # fmt: skip


def refused(main, argv: list[str], capsys, status: int = 1) -> str:
    """Run a script's main(), assert it refused (exit ``status``: 2 for flags, 1 for files) before loading a
    model; return its stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert "ERROR" in err and "Traceback" not in err
    assert "sft.modeling.loading: loaded" not in err  # refused before any weight was loaded
    return err


def test_adapter_of_another_base_is_refused(setup, tiny_llama_dir, tmp_path, capsys):
    """A Baichuan2 adapter on the tiny Llama: peft would only warn and run the bare base."""
    import evaluate
    import predict

    expected = "does not match the base model"
    base_flags = ["--model_path", str(tiny_llama_dir), "--adapter_dir", str(setup["adapter"])]
    err = refused(predict.main, predict_flags(setup, *base_flags, "--no-do_sample"), capsys)
    assert expected in err and "pass the base it was trained on as --model_path" in err
    assert not (setup["root"] / "x.jsonl").exists()
    ppl = ["ppl", *base_flags, "--data_path", str(setup["data"]), "--device", "cpu"]
    assert expected in refused(evaluate.main, ppl, capsys)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "train_args.json"])
def test_damaged_adapter_files_are_named(setup, tmp_path, capsys, name):
    import shutil

    import evaluate
    import predict

    adapter = tmp_path / "adapter"
    shutil.copytree(setup["adapter"], adapter)
    path = adapter / name
    if name.endswith(".safetensors"):
        path.write_bytes(path.read_bytes()[:-10])  # a copy cut short
        expected = f"{path} is damaged (Error while deserializing header"
    else:
        path.write_text('{"peft_type": "LORA",')
        expected = f"{path} is not valid JSON (line 1 column 22"
    flags = ["--model_path", str(setup["base"]), "--adapter_dir", str(adapter)]
    assert expected in refused(predict.main, predict_flags(setup, *flags, "--no-do_sample"), capsys)
    ppl = ["ppl", *flags, "--data_path", str(setup["data"]), "--device", "cpu"]
    assert expected in refused(evaluate.main, ppl, capsys)


def test_bad_flags_and_output_paths_are_refused_before_loading(setup, tmp_path, capsys):
    import evaluate
    import predict

    model = ["--model_path", str(setup["merged"])]
    cases = {
        "--temperature only applies when sampling, but sampling is off (--no-do_sample)": (2, predict_flags(
            setup, *model, "--no-do_sample", "--temperature", "0.5"
        )),
        "--max_new_tokens=0 must be > 0": (2, predict_flags(setup, *model, "--max_new_tokens", "0")),
        f"--output_path={tmp_path} is a directory": (1, [
            *model, "--data_path", str(setup["data"]), "--output_path", str(tmp_path),
        ]),
        f"cannot be created: {setup['data']} is a file, not a directory": (1, [
            *model, "--data_path", str(setup["data"]), "--output_path", str(setup["data"] / "preds.jsonl"),
        ]),
    }  # fmt: skip
    for message, (status, argv) in cases.items():
        assert message in refused(predict.main, argv, capsys, status)

    ppl = ["ppl", *model, "--data_path", str(setup["data"]), "--max_src_len", "600", "--max_len", "512"]
    err = refused(evaluate.main, ppl, capsys, 2)
    assert "--max_src_len=600 must be smaller than --max_len=512" in err


def test_prompt_that_cannot_fit_names_file_and_line(setup, tmp_path, capsys):
    data = tmp_path / "long_system.jsonl"
    long_system = {
        "system": "你是李白，一位豪放的诗人。" * 20,
        "conversations": [{"role": "user", "content": "你好"}],
    }
    data.write_text(
        json.dumps(RECORDS[1], ensure_ascii=False)
        + "\n"
        + json.dumps(long_system, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    import predict

    argv = [
        "--model_path",
        str(setup["merged"]),
        "--data_path",
        str(data),
        "--output_path",
        str(tmp_path / "o"),
    ]
    code = predict.main([*argv, "--max_src_len", "16", "--no-do_sample", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and f"{data}:2: the prompt cannot be cut to max_src_len=16 tokens" in err
    assert "raise --max_src_len" in err and not (tmp_path / "o").exists()


def test_output_write_failure_is_one_line(setup, tmp_path, capsys, monkeypatch):
    """An OSError while writing (e.g. a full disk) ends with a one-line error, not a traceback."""
    import predict
    import sft.data.formats

    def disk_full(path, rows):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(sft.data.formats, "write_jsonl_atomic", disk_full)
    code = predict.main(predict_flags(setup, "--model_path", str(setup["merged"]), "--max_new_tokens", "2"))
    err = capsys.readouterr().err
    out = setup["root"] / "x.jsonl"
    assert code == 1 and f"no space left on the device while writing {out}: free some space" in err
    assert "Traceback" not in err


# ---- numerics and streaming ---------------------------------------------------------------------------


def test_ppl_of_a_4bit_adapter_computes_as_training(tiny_baichuan_dir, tmp_path):
    """NF4 base: evaluate.py ppl = the fp32 dequantise-then-matmul path training uses (train.py's eval/ppl).

    On CPUs with AVX512-BF16, bitsandbytes would otherwise switch to a bf16 kernel in eval mode
    (~1e-4 relative in the perplexity of this tiny model, 1e-7 with the training path).
    """
    import evaluate
    from tests.test_train_single import hand_perplexity, write_overfit_data

    adapter = make_adapter(tiny_baichuan_dir, tmp_path / "adapter", quantization="nf4")
    _, test = write_overfit_data(tmp_path / "data")
    out = tmp_path / "ppl.json"
    code = evaluate.main(
        [
            "ppl", "--model_path", str(tiny_baichuan_dir), "--adapter_dir", str(adapter),
            "--data_path", str(test), "--device", "cpu", "--dtype", "fp32",
            "--max_len", "128", "--max_src_len", "96", "--output_json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    expected, tokens = hand_perplexity(tiny_baichuan_dir, adapter, test, "nf4")
    assert result["quantization"] == "nf4" and result["tokens"] == tokens
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)


def test_streamed_pieces_are_final_text(setup):
    """Byte tokens of a character are held back until it is complete; special tokens are skipped;
    user-defined symbols (<reserved_N>, not special) print as in the batch answers."""
    from sft.inference.generate import reply_streamer
    from sft.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(setup["base"])
    nihao = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "你好".encode()]
    hello = tokenizer.encode("hello world", add_special_tokens=False)
    reserved = tokenizer.convert_tokens_to_ids("<reserved_63>")
    reply = [*hello, *nihao, reserved, *nihao[:3], tokenizer.eos_token_id]
    streamer = reply_streamer(tokenizer)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: skipped
    pieces = []
    for token in reply:
        streamer.put(torch.tensor([token]))
        while not streamer.text_queue.empty():
            pieces.append(streamer.text_queue.get())
    streamer.end()
    pieces += [p for p in iter(streamer.text_queue.get, streamer.stop_signal)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(reply, skip_special_tokens=True)
    assert "".join(pieces).endswith("你好<reserved_63>你") and "</s>" not in "".join(pieces)
