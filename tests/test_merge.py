"""merge_params.py / sft.export.merge: merged logits equal base+adapter, both merge modes, reload, refusals.

Adapters are real peft LoRA adapters on the tiny models, with random B matrices (peft starts them
at zero, which would make every merge trivially exact), saved with a train_args.json as train.py does.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from sft.export.merge import MergeReport, merge_lora
from sft.modeling.loading import keep_4bit_weights_unpacked

PROBE_BATCH = torch.tensor([[5, 17, 300, 42, 8, 999, 250, 61], [1, 2, 3, 400, 77, 12, 13, 14]])


def make_adapter(
    base_dir: Path, out_dir: Path, *, quantization: str = "nf4", seed: int = 0, scale: float = 0.2
) -> Path:
    """Save a LoRA adapter for ``base_dir`` on every linear layer, A and B drawn from ``seed``, plus train_args.json.

    Both are drawn here (not by peft's init, which uses the global RNG), so the adapter does not depend on
    which tests ran before.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.train.args import TrainArgs
    from sft.train.model import find_lora_targets

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=find_lora_targets(model), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * scale
    peft_model.save_pretrained(str(out_dir))
    train_args = TrainArgs(model_name_or_path=str(base_dir), quantization=quantization).to_dict()
    (out_dir / "train_args.json").write_text(json.dumps(train_args), encoding="utf-8")
    return out_dir


def dir_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@torch.inference_mode()
def logits_of(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=PROBE_BATCH, use_cache=False).logits.float()


def load_reference(base_dir: Path, adapter_dir: Path, quantization: str) -> torch.nn.Module:
    """Base (quantised as in training, or not) + unmerged adapter, computing in fp32."""
    from peft import PeftModel

    from sft.modeling.loading import load_base_model

    base = load_base_model(base_dir, quantization, torch.float32, device_map={"": "cpu"})
    if quantization != "none":
        keep_4bit_weights_unpacked(base)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def load_merged(out_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def baichuan_adapter(tiny_baichuan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_baichuan_dir, tmp_path_factory.mktemp("adapter_baichuan"))


@pytest.fixture(scope="module")
def base_hashes(tiny_baichuan_dir: Path) -> dict[str, str]:
    return dir_hashes(tiny_baichuan_dir)


@pytest.fixture(scope="module")
def merged_dirs(
    tiny_baichuan_dir: Path,
    baichuan_adapter: Path,
    base_hashes: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, MergeReport]]:
    """Both merge modes of the Baichuan adapter, saved in fp32 so logits compare tightly."""
    out = {}
    for mode in ("dequantized", "original"):
        out_dir = tmp_path_factory.mktemp(f"merged_{mode}") / "model"
        report = merge_lora(
            tiny_baichuan_dir, baichuan_adapter, out_dir, merge_into=mode, dtype=torch.float32
        )
        out[mode] = (out_dir, report)
    return out


def test_dequantized_merge_equals_4bit_base_plus_adapter(tiny_baichuan_dir, baichuan_adapter, merged_dirs):
    out_dir, report = merged_dirs["dequantized"]
    assert report.quantization == "nf4" and report.max_abs_diff < 1e-4 and report.saved_max_abs_diff == 0.0
    reference = logits_of(load_reference(tiny_baichuan_dir, baichuan_adapter, "nf4"))
    merged = logits_of(load_merged(out_dir))
    assert (merged - reference).abs().max().item() < 1e-4


def test_original_merge_equals_base_plus_adapter(tiny_baichuan_dir, baichuan_adapter, merged_dirs):
    out_dir, report = merged_dirs["original"]
    assert report.quantization == "none" and report.max_abs_diff < 1e-4
    reference = logits_of(load_reference(tiny_baichuan_dir, baichuan_adapter, "none"))
    merged = logits_of(load_merged(out_dir))
    assert (merged - reference).abs().max().item() < 1e-4


def test_the_two_modes_differ(merged_dirs):
    """The QLoRA caveat is real: merging into the NF4-dequantised base is a different model."""
    dequantized = logits_of(load_merged(merged_dirs["dequantized"][0]))
    original = logits_of(load_merged(merged_dirs["original"][0]))
    assert (dequantized - original).abs().max().item() > 1e-3


def test_merged_dir_is_a_complete_model(tiny_baichuan_dir, merged_dirs):
    out_dir, report = merged_dirs["dequantized"]
    names = set(report.files)
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "baichuan"
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert generation["user_token_id"] == 195 and generation["assistant_token_id"] == 196
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    base_tokenizer = AutoTokenizer.from_pretrained(str(tiny_baichuan_dir))
    assert tokenizer("你好，世界")["input_ids"] == base_tokenizer("你好，世界")["input_ids"]
    assert not list(out_dir.parent.glob(".*tmp*")), "temporary directory left behind"


def test_base_files_untouched(tiny_baichuan_dir, base_hashes, merged_dirs):
    assert dir_hashes(tiny_baichuan_dir) == base_hashes


def test_llama_sharded_bf16_merge(tiny_llama_dir, tmp_path):
    """Llama, default bf16 output, several shards: reloads through AutoModelForCausalLM to the same logits."""
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    out_dir = tmp_path / "merged"
    report = merge_lora(tiny_llama_dir, adapter, out_dir, max_shard_size="300KB")
    assert report.dtype == "bfloat16" and report.max_abs_diff < 1e-4
    assert (out_dir / "model.safetensors.index.json").is_file()
    assert len(list(out_dir.glob("model-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = logits_of(load_reference(tiny_llama_dir, adapter, "nf4"))
    # bf16 weights: the merged model is the fp32 merge rounded to bf16, so allow bf16-sized error.
    assert (logits_of(model) - reference).abs().max().item() < 0.05 * reference.abs().max().item()


# ---------------------------------------------------------------------------------------------
# Refusals: clear message, nothing written
# ---------------------------------------------------------------------------------------------


def test_refuses_adapter_of_another_base(tiny_llama_dir, baichuan_adapter, tmp_path):
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="does not match the base model") as err:
        merge_lora(tiny_llama_dir, baichuan_adapter, out_dir)
    assert "W_pack" in str(err.value)
    assert not out_dir.exists()


def test_refuses_shape_mismatch(tiny_baichuan_dir, tiny_baichuan_alibi_dir, tmp_path):
    """Same architecture, different sizes: the shapes give it away."""
    from models.tiny import build_tiny_baichuan

    wider = build_tiny_baichuan(tmp_path / "wider", hidden_size=96)
    adapter = make_adapter(tiny_baichuan_dir, tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not fit"):
        merge_lora(wider, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_missing_adapter(tiny_baichuan_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_lora(tiny_baichuan_dir, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
        merge_lora(tiny_baichuan_dir, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_output_without_overwrite(tiny_baichuan_dir, baichuan_adapter, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_lora(tiny_baichuan_dir, baichuan_adapter, out_dir, merge_into="original")
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]
    merge_lora(tiny_baichuan_dir, baichuan_adapter, out_dir, merge_into="original", overwrite=True)
    assert not (out_dir / "keep.txt").exists() and (out_dir / "config.json").is_file()


def test_refuses_to_write_into_an_input(tiny_baichuan_dir, baichuan_adapter):
    with pytest.raises(ValueError, match="would replace the input"):
        merge_lora(tiny_baichuan_dir, baichuan_adapter, baichuan_adapter, overwrite=True)


def test_dequantized_needs_known_training_quantization(tiny_baichuan_dir, baichuan_adapter, tmp_path):
    """An adapter without train_args.json must say how it was trained (or be merged into the original)."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(baichuan_adapter, adapter)
    (adapter / "train_args.json").unlink()
    with pytest.raises(ValueError, match="--quantization"):
        merge_lora(tiny_baichuan_dir, adapter, tmp_path / "out")
    with pytest.raises(ValueError, match="contradicts"):
        merge_lora(tiny_baichuan_dir, baichuan_adapter, tmp_path / "out", quantization="int8")
    assert not (tmp_path / "out").exists()


def test_cli_refusal_exits_1_with_the_reason(tiny_llama_dir, baichuan_adapter, tmp_path, capsys):
    import merge_params

    code = merge_params.main(
        [
            "--ori_model_dir",
            str(tiny_llama_dir),
            "--model_dir",
            str(baichuan_adapter),
            "--save_model_dir",
            str(tmp_path / "o"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "ERROR" in err and "pass the base it was trained on as --ori_model_dir" in err
    assert not (tmp_path / "o").exists()


def test_refuses_damaged_checkpoint_files_naming_them(tiny_baichuan_dir, baichuan_adapter, tmp_path):
    """A truncated adapter file or a broken JSON file stops the merge, naming the file, before any loading."""
    import shutil

    cases = {
        "adapter_model.safetensors": "is damaged (Error while deserializing header",
        "adapter_config.json": "is not valid JSON (line 1 column 2",
        "train_args.json": "is not valid JSON (line 1 column 2",
    }
    for i, (name, message) in enumerate(cases.items()):
        adapter = tmp_path / f"adapter{i}"
        shutil.copytree(baichuan_adapter, adapter)
        path = adapter / name
        if name.endswith(".safetensors"):
            path.write_bytes(path.read_bytes()[:-10])  # a copy cut short
        else:
            path.write_text("{bad")
        with pytest.raises(ValueError, match=re.escape(f"{path} {message}")):
            merge_lora(tiny_baichuan_dir, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_output_below_a_file_before_merging(tiny_baichuan_dir, baichuan_adapter, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"cannot be created: {re.escape(str(blocker))} is a file"):
        merge_lora(tiny_baichuan_dir, baichuan_adapter, blocker / "merged")


def test_merge_with_gguf_export(tiny_llama_dir, tiny_baichuan_alibi_dir, tmp_path, capsys):
    """--gguf: the merged model is also exported (verified by transformers' GGUF reader) with a Modelfile; an
    architecture the export refuses is refused before the merge, with nothing written."""
    import merge_params

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    train_args = json.loads((adapter / "train_args.json").read_text())
    (adapter / "train_args.json").write_text(json.dumps({**train_args, "template": "chatml"}))
    gguf = tmp_path / "gguf" / "model.gguf"
    argv = ["--model_dir", str(adapter), "--save_model_dir", str(tmp_path / "merged"), "--dtype", "fp32"]
    code = merge_params.main(
        ["--ori_model_dir", str(tiny_llama_dir), *argv, "--gguf", str(gguf), "--gguf_type", "q8_0"]
    )
    assert code == 0 and gguf.is_file() and (tmp_path / "merged" / "config.json").is_file()
    report = json.loads(capsys.readouterr().out.split("\n}\n", 1)[1])
    assert report["out_type"] == "q8_0" and report["verification"]["passed"]
    assert all(p["greedy_worst_gap"] <= p["tolerance"] for p in report["verification"]["probes"])
    assert (
        "<|im_start|>" in (gguf.parent / "model.Modelfile").read_text()
    )  # the template the adapter trained with

    alibi_adapter = make_adapter(tiny_baichuan_alibi_dir, tmp_path / "alibi_adapter")
    out = tmp_path / "alibi_merged"
    argv = [
        "--model_dir",
        str(alibi_adapter),
        "--save_model_dir",
        str(out),
        "--gguf",
        str(tmp_path / "a.gguf"),
    ]
    code = merge_params.main(["--ori_model_dir", str(tiny_baichuan_alibi_dir), *argv])
    assert code == 1 and "ALiBi" in capsys.readouterr().err and not out.exists()
