"""--engine: the flag combinations each engine refuses (before loading), the batch size it picks, a missing
optional engine refused with what to install, and the llama.cpp engine itself where llama-cpp-python is
installed (tiny Llama: exported on first use; SmolLM2: the same greedy answers as torch from its f16 export).
The vLLM engine needs a CUDA GPU: tests/test_gpu.py."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_predict import predict_flags, read_jsonl, refused, setup  # noqa: F401  (setup: a fixture)

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")


def test_engine_flags_are_checked_before_loading(setup, tmp_path, capsys):  # noqa: F811
    import predict
    import web_demo

    model = ["--model_path", str(setup["merged"])]
    gguf = ["--gguf", str(tmp_path / "m.gguf")]
    cases = {
        "--engine llama_cpp needs --gguf FILE": [*model, "--engine", "llama_cpp"],
        "--gguf is the llama_cpp engine's model file": [*model, *gguf],
        "--engine llama_cpp runs a plain model: merge the adapter first": [
            "--model_path", str(setup["base"]), "--adapter_dir", str(setup["adapter"]), "--engine", "llama_cpp", *gguf,
        ],
        "--engine llama_cpp answers one prompt at a time: drop --batch_size": [
            *model, "--engine", "llama_cpp", *gguf, "--batch_size", "4",
        ],
        "--engine llama_cpp does not search beams here": [*model, "--engine", "llama_cpp", *gguf, "--num_beams", "2"],
        "--engine vllm runs on a CUDA GPU": [*model, "--engine", "vllm"],
    }  # fmt: skip
    for message, argv in cases.items():
        assert message in refused(predict.main, predict_flags(setup, *argv), capsys, 2)
    chat = [*model, "--chat", "--engine", "vllm"]
    assert "--engine vllm serves batch generation here, not streamed chats" in refused(
        predict.main, chat, capsys, 2
    )
    demo = [*model, "--engine", "llama_cpp", *gguf, "--max_live_replies", "3"]
    assert "streams one reply at a time: drop --max_live_replies" in refused(web_demo.main, demo, capsys, 2)
    demo = [*model, "--engine", "llama_cpp", *gguf, "--prompt_cache_mb", "64"]
    assert "keeps its own prompt cache: drop --prompt_cache_mb" in refused(web_demo.main, demo, capsys, 2)
    assert "--prompt_cache_mb=-1 must be >= 0" in refused(
        web_demo.main, [*model, "--prompt_cache_mb", "-1"], capsys, 2
    )


@pytest.mark.skipif(HAS_LLAMA_CPP, reason="llama-cpp-python is installed here")
def test_missing_llama_cpp_is_refused_with_the_install_command(setup, tmp_path, capsys):  # noqa: F811
    import predict

    argv = predict_flags(
        setup, "--model_path", str(setup["merged"]), "--engine", "llama_cpp", "--gguf", "x.gguf"
    )
    err = refused(predict.main, argv, capsys, 1)
    assert "--engine llama_cpp needs llama-cpp-python: pip install -r requirements-gguf.txt" in err


def test_missing_vllm_or_gpu_is_refused(setup, capsys):  # noqa: F811
    import torch

    import predict

    argv = predict_flags(setup, "--model_path", str(setup["merged"]), "--engine", "vllm")
    argv.remove("--device"), argv.remove("cpu")
    err = refused(predict.main, argv, capsys, 1)
    if importlib.util.find_spec("vllm") is None:
        assert "--engine vllm needs vLLM: pip install vllm" in err
    else:
        assert not torch.cuda.is_available() and "needs a CUDA GPU and none is visible" in err


def test_default_batch_size_follows_the_measurements(setup):  # noqa: F811
    """32 for our greedy loop on a CPU (docs/PERFORMANCE.md: less CPU per token than 8), 8 where generate() runs."""
    from sft.data.templates import get_template
    from sft.inference.engines import TorchEngine
    from sft.inference.loading import load_for_inference
    from sft.inference.settings import GenerationArgs, build_generation_config

    model, tokenizer = load_for_inference(setup["merged"])
    engine = TorchEngine(model, tokenizer, get_template("baichuan2", tokenizer, setup["merged"]))
    greedy = build_generation_config(
        engine, tokenizer, GenerationArgs(do_sample=False, repetition_penalty=1.05)
    )
    sampling = build_generation_config(engine, tokenizer, GenerationArgs(do_sample=True))
    assert (engine.batch_size_for(greedy), engine.batch_size_for(sampling)) == (32, 8)


def engine_args(model_dir: Path, engine: str, gguf: Path | None = None) -> SimpleNamespace:
    """What load_engine reads: the ModelLoadArgs flags, --engine and --gguf."""
    from sft.inference.settings import ModelLoadArgs

    flags = dataclasses.asdict(ModelLoadArgs(model_path=str(model_dir)))
    return SimpleNamespace(**flags, engine=engine, gguf=None if gguf is None else str(gguf))


# ---- llama.cpp, where installed ----------------------------------------------------------------------------------


@needs_llama_cpp
def test_llama_cpp_engine_exports_on_first_use_and_streams_its_batch_answers(tiny_llama_dir, tmp_path):
    """predict.py --engine llama_cpp on the tiny Llama: the missing --gguf is exported (verified) and used; a streamed
    reply is the batch reply; closing the stream mid-way stops it."""
    import predict
    from sft.inference.engines import load_engine
    from sft.inference.settings import GenerationArgs, build_generation_config

    data = tmp_path / "in.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "Tell me about the moon."}]}\n' * 2)
    gguf, out = tmp_path / "tiny-f16.gguf", tmp_path / "preds.jsonl"
    flags = ["--model_path", str(tiny_llama_dir), "--data_path", str(data), "--output_path", str(out)]
    assert predict.main([*flags, "--engine", "llama_cpp", "--gguf", str(gguf), "--no-do_sample"]) == 0
    assert gguf.is_file()
    rows = read_jsonl(out)
    assert len(rows) == 2 and rows[0]["prediction"] == rows[1]["prediction"]

    engine = load_engine(engine_args(tiny_llama_dir, "llama_cpp", gguf))
    config = build_generation_config(
        engine, engine.tokenizer, GenerationArgs(do_sample=False, max_new_tokens=24)
    )
    prompt = engine.template.build_prompt({"conversations": [{"role": "user", "content": "hello there"}]})
    (batch,) = engine.generate([prompt], config)
    assert "".join(engine.stream(prompt, config)).strip() == batch
    stream = engine.stream(prompt, config)
    next(stream)
    stream.close()  # the generator holds llama.cpp's lock while it runs: closed, the next call gets it at once
    assert engine.generate([prompt], config) == [batch]


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_f16_gives_the_torch_engines_greedy_answers_on_smollm2(smollm2_dir, tmp_path):
    """Its own numerics (f16 weights, ggml kernels), measured, not assumed: on these prompts the answers agree."""
    from sft.export.gguf import export_gguf
    from sft.inference.engines import load_engine
    from sft.inference.settings import GenerationArgs, build_generation_config

    gguf = tmp_path / "smollm2-f16.gguf"
    export_gguf(smollm2_dir, gguf, out_type="f16", verify="none")  # the export's own tests verify it
    answers = {}
    for name in ("torch", "llama_cpp"):
        engine = load_engine(engine_args(smollm2_dir, name, gguf if name == "llama_cpp" else None))
        config = build_generation_config(
            engine,
            engine.tokenizer,
            GenerationArgs(do_sample=False, max_new_tokens=24),
            stop_ids=[engine.template.end_id],
        )
        prompts = [
            engine.template.build_prompt({"conversations": [{"role": "user", "content": q}]})
            for q in ("What is the capital of France?", "Name three colours.", "What is 12 times 12?")
        ]
        answers[name] = engine.generate(prompts, config)
    assert answers["llama_cpp"] == answers["torch"], answers
    assert "Paris" in answers["torch"][0]
