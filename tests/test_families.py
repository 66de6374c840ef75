"""The family matrix: Qwen2.5, Qwen3, Llama 3.x, Mistral, Gemma 2, Gemma 3 and Phi-3 (the tiny models of
models/tiny_families.py, their own chat templates) through every step of the pipeline.

| step | how | checked |
| --- | --- | --- |
| pack | the LoRA model training builds (unquantised), one batch packed and one padded | loss and LoRA gradients equal those of each document alone through transformers' own attention (sliding windows, soft-capping), under the CPU training path (``auto``: document SDPA, Gemma 2 eager), and under ``eager`` for the sliding-window families |
| train, full base | the same model, 6 AdamW steps on the padded batch | the loss falls by more than 1 nat |
| train, 4-bit | train.py in process: NF4 base, LoRA on every linear layer, packing, DeepSpeed ZeRO-2, the tokenizer's template with every answer learned | the logged loss falls by more than 1 nat in 6 steps |
| merge | ``merge_lora`` into the dequantised base | merged logits = 4-bit base + adapter (its own check); tied heads stay tied, q/k/v biases and fused projections merged |
| predict | predict.py in process on the merged model | the prompt is ``apply_chat_template(history, add_generation_prompt=True)``, the answer the model's greedy one, stopped at the template's end token |
| export | ``export_gguf`` f16 through llama.cpp's converter | transformers' GGUF reader agrees with the merged model (tokens, special tokens, logits) |
| round trip | (qwen2, llama3, gemma2) the file imported back by ``models.gguf_import``, also from q8_0 | logits equal the merged model's within the type's rounding |

The 4-bit half of the matrix (train, merge, predict, export, round trip) is marked slow: it runs in ``make test``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.tiny_families import FAMILIES
from sft.data.batching import build_dataloader
from sft.data.dataset import load_sft_dataset
from sft.data.templates import get_template

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CPU = torch.device("cpu")
PRE_TOKENIZER = {
    "qwen2": "qwen2",
    "qwen3": "qwen2",
    "llama3": "llama-bpe",
}  # their split, named (test tokenizers)
ROUND_TRIP = ("qwen2", "llama3", "gemma2")
MAX_LEN = 256


def chat_records(n: int) -> list[dict]:
    """Two-round conversations with a system prompt (every answer learned); longer than the tiny models'
    16-token sliding window; Qwen3-style reasoning on some answers (other templates ignore it)."""
    records = []
    for i in range(n):
        first = {"role": "assistant", "content": f"Answer {i}: 床前明月光，疑是地上霜。The moon is bright."}
        if i % 2:
            first["reasoning_content"] = "The user asks about the moon."
        records.append(
            {
                "system": "You are Li Bai, a poet of the Tang dynasty.",
                "conversations": [
                    {"role": "user", "content": f"Question {i}: tell me about the moon over the river."},
                    first,
                    {"role": "user", "content": "And again?"},
                    {"role": "assistant", "content": "举头望明月，低头思故乡。" * (1 + i % 2)},
                ],
            }
        )
    return records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("family_data")
    for name, n in (("train.jsonl", 8), ("pack.jsonl", 4)):
        lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in chat_records(n))
        (folder / name).write_text("".join(lines), encoding="utf-8")
    test = chat_records(2)
    for record in test:
        record["conversations"] = record["conversations"][:3]  # a question to answer
    (folder / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test))
    return folder


def _loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    from sft.train.objectives.sft import batch_loss_sums

    model.zero_grad(set_to_none=True)
    nll, tokens = batch_loss_sums(model, batch, CPU)
    (nll / tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(nll.detach()) / int(tokens), grads


def _documents_alone(model, dataset) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the documents one at a time, without boundaries: transformers' own attention."""
    from sft.train.objectives.sft import batch_loss_sums

    model.zero_grad(set_to_none=True)
    sums, tokens = [], 0
    for i in range(len(dataset)):
        ids, labels = (torch.tensor([dataset[i][k]]) for k in ("input_ids", "labels"))
        nll, n = batch_loss_sums(model, {"input_ids": ids, "labels": labels}, CPU)
        sums.append(nll)
        tokens += int(n)
    total = sum(sums) / tokens
    total.backward()
    return float(total.detach()), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


# Every family on the CPU training path (auto: document SDPA; Gemma 2: eager), and eager attention too for the
# families with sliding windows (transformers' own masks; Gemma 2's auto is eager already).
PACK_CASES = [(family, "auto") for family in FAMILIES] + [("mistral", "eager"), ("gemma3", "eager")]


@pytest.mark.parametrize(("family", "attention"), PACK_CASES)
def test_packed_equals_unpacked_and_lora_trains_the_full_base(family, attention, tiny_family_dirs, data_dir):
    from sft.train.args import TrainArgs
    from sft.train.attention import DOCUMENT_SDPA
    from sft.train.model import load_model_for_training

    model_dir = tiny_family_dirs[family]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template = get_template("tokenizer", tokenizer)
    dataset = load_sft_dataset(
        data_dir / "pack.jsonl", tokenizer, template, max_len=2 * MAX_LEN, max_src_len=200, is_skip=False
    )
    assert min(dataset.lengths) > 3 * 16  # every document crosses the sliding windows (16 tokens)
    args = TrainArgs(
        model_name_or_path=str(model_dir), quantization="none", precision="fp32", lora_dropout=0.0,
        attn_implementation=attention,
    )  # fmt: skip
    torch.manual_seed(0)
    model = load_model_for_training(args, CPU).train()
    kernel = model.get_base_model().config._attn_implementation
    assert kernel == ("eager" if attention == "eager" or family == "gemma2" else DOCUMENT_SDPA)
    with torch.no_grad():  # B = 0 would leave A without gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    reference_loss, reference_grads = _documents_alone(model, dataset)
    row = 2 * int(max(dataset.lengths))  # two documents a packed row
    for packing in (True, False):
        loader = build_dataloader(
            dataset, batch_size=len(dataset), packing=packing, max_len=row, shuffle=False, seed=0,
            group_by_length=False, rank=0, world_size=1, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        (batch,) = list(loader)
        assert batch["input_ids"].shape[0] == (2 if packing else len(dataset))
        loss, grads = _loss_and_grads(model, batch)
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    if attention == "auto":  # LoRA on the full-precision base learns (the 4-bit base: the slow test below)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(6):
            loss, _ = _loss_and_grads(model, batch)
            optimizer.step()
            losses.append(loss)
        assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_loop_reads_shared_starts_and_gives_generates_tokens(family, tiny_family_dirs, monkeypatch):
    """Prompts built by the family's own template share its system prompt and headers: our loop computes that
    start once (later rows read it from the first row's cache and prefill the rest against it: sliding windows
    and soft-capping included), and the tokens are generate()'s, one prompt at a time."""
    from sft.inference import generate as gen
    from sft.inference.kv_cache import prefill_alone
    from sft.inference.settings import GenerationArgs, build_generation_config

    model_dir = tiny_family_dirs[family]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    template = get_template("tokenizer", tokenizer)
    records = chat_records(4)
    prompts = [
        template.build_prompt({**record, "conversations": record["conversations"][:turns]})
        for record, turns in zip(records, (1, 3, 1, 3), strict=True)
    ]
    assert len({len(p) for p in prompts}) > 1  # padded: each row prefilled on its own
    shared = []

    def reading(model, prompt, capacity=None, *, prefix=None):
        shared.append(prefix[0][0].shape[-2] if prefix else 0)
        return prefill_alone(model, prompt, capacity, prefix=prefix)

    monkeypatch.setattr(gen, "prefill_alone", reading)
    settings = GenerationArgs(max_new_tokens=8, do_sample=False)
    config = build_generation_config(model, tokenizer, settings, stop_ids=[template.end_id])
    assert gen.generate_ids(model, prompts, config, batch_size=4) == gen.hf_generate_ids(
        model, prompts, config, batch_size=1
    )
    assert shared[0] == 0 and min(shared[1:]) > 16, shared  # past the tiny models' 16-token sliding window


def test_an_attention_a_family_cannot_use_is_refused_in_one_line(tiny_family_dirs):
    from sft.modeling.loading import load_base_model

    with pytest.raises(
        ValueError, match=r"Gemma2ForCausalLM cannot attend with --attn_implementation sdpa"
    ) as err:
        load_base_model(tiny_family_dirs["gemma2"], "none", torch.float32, attn_implementation="sdpa")
    assert "--attn_implementation eager, or auto" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def pipelines(tiny_family_dirs, data_dir, tmp_path_factory):
    """family -> {"run", "checkpoint", "merged", "merge", "losses"}: train.py on a 4-bit base, then the merge
    (each family once, when a test first asks for it)."""
    import train
    from sft.export.merge import merge_lora
    from sft.train.plotting import read_scalars

    done: dict[str, dict] = {}

    def pipeline(family: str) -> dict:
        if family in done:
            return done[family]
        root = tmp_path_factory.mktemp(f"pipeline_{family}")
        train.main(
            [
                "--model_name_or_path", str(tiny_family_dirs[family]), "--train_path", str(data_dir / "train.jsonl"),
                "--output_dir", str(root / "run"), "--max_len", str(MAX_LEN), "--max_src_len", "200",
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
                "--weight_decay", "0", "--warmup_ratio", "0", "--lr_scheduler", "constant", "--show_loss_step", "1",
                "--lora_dim", "8", "--lora_alpha", "16", "--max_steps", "6", "--save_model_step", "100",
                "--precision", "fp32", "--quantization", "nf4", "--packing",
            ]
        )  # fmt: skip
        checkpoint = max((root / "run").glob("epoch-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
        merge = merge_lora(tiny_family_dirs[family], checkpoint, root / "merged", dtype=torch.float32)
        losses = [value for _, value in read_scalars(root / "run" / "runs")["train/loss"]]
        done[family] = {
            "root": root,
            "checkpoint": checkpoint,
            "merged": root / "merged",
            "merge": merge,
            "losses": losses,
        }
        return done[family]

    return pipeline


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_trains_and_merges(family, pipelines, tiny_family_dirs):
    run = pipelines(family)
    assert len(run["losses"]) == 6 and run["losses"][-1] < run["losses"][0] - 1.0, run["losses"]
    # Merged into the dequantised base, checked against the 4-bit base + adapter computing as in training.
    assert run["merge"].quantization == "nf4" and run["merge"].max_abs_diff < 1e-4
    config = json.loads((run["merged"] / "config.json").read_text())
    base, merged = _tensors(tiny_family_dirs[family]), _tensors(run["merged"])
    targets = json.loads((run["checkpoint"] / "adapter_config.json").read_text())["target_modules"]
    if family == "phi3":  # fused projections are LoRA targets as they are, and merged as they are
        assert {"qkv_proj", "gate_up_proj"} <= set(targets)
        key = "model.layers.0.self_attn.qkv_proj.weight"
        assert merged[key].shape == base[key].shape and not torch.equal(merged[key], base[key])
    if family == "qwen2":  # LoRA adapts the weights; the q/k/v biases stay the base's
        key = "model.layers.0.self_attn.q_proj.bias"
        assert torch.equal(merged[key], base[key]) and bool(base[key].abs().sum() > 0)
    tied = json.loads((tiny_family_dirs[family] / "config.json").read_text()).get(
        "tie_word_embeddings", False
    )
    assert config.get("tie_word_embeddings", False) == tied
    assert ("lm_head.weight" in merged) == ("lm_head.weight" in base)
    # The merged model computes what base + adapter computes: its logits differ from the base's.
    assert not torch.equal(
        merged["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_predict_with_the_tokenizers_template(family, pipelines, data_dir):
    import predict

    merged = pipelines(family)["merged"]
    out = merged.parent / "predictions.jsonl"
    flags = ["--max_new_tokens", "6", "--no-do_sample", "--batch_size", "2"]
    argv = [
        "--model_path",
        str(merged),
        "--data_path",
        str(data_dir / "test.jsonl"),
        "--output_path",
        str(out),
    ]
    assert predict.main([*argv, *flags]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    stop = get_template("tokenizer", tokenizer).end_id
    assert len(rows) == 2
    for row in rows:
        record = row["record"]
        messages = [{"role": "system", "content": record["system"]}, *record["conversations"]]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert row["prompt"] == tokenizer.decode(ids)
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=[stop, tokenizer.eos_token_id],
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )[0, len(ids) :].tolist()  # fmt: skip
        assert row["prediction"] == tokenizer.decode(generated, skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_export_and_round_trip(family, pipelines):
    from models.gguf_import import import_gguf
    from sft.export.gguf import export_gguf
    from sft.export.gguf.verify import PROBE_CHAT

    merged = pipelines(family)["merged"]
    out = merged.parent / "gguf"
    report = export_gguf(
        merged, out / "model-f16.gguf", modelfile=True, pre_tokenizer=PRE_TOKENIZER.get(family)
    )
    v = report.verification
    assert v["reader"] == "transformers" and v["passed"], v
    assert v["max_relative_diff"] < 5e-3, v  # f16 rounding: a few 1e-3 of the logit scale at most
    assert all(p["tokens_equal"] is not False for p in v["probes"])
    assert (out / "model-f16.Modelfile").read_text().splitlines()[2] == "FROM ./model-f16.gguf"
    if family not in ROUND_TRIP:
        return

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    chat = tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(chat, add_special_tokens=False)["input_ids"]])
    source = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        want = source(ids).logits
    export_gguf(merged, out / "model-q8_0.gguf", out_type="q8_0", pre_tokenizer=PRE_TOKENIZER.get(family))
    for out_type, bound in (("f16", 1e-2), ("q8_0", 0.1 * float(want.abs().max()))):
        imported = import_gguf(out / f"model-{out_type}.gguf", out / f"imported-{out_type}")
        model = AutoModelForCausalLM.from_pretrained(str(imported), dtype=torch.float32).eval()
        assert (
            AutoTokenizer.from_pretrained(str(imported))(chat, add_special_tokens=False)["input_ids"]
            == ids[0].tolist()
        )
        with torch.no_grad():
            diff = float((model(ids).logits - want).abs().max())
        assert diff <= bound, (out_type, diff)
    if family == "llama3":  # the rope scaling the reader drops is restored from the file's rope_freqs
        rope = json.loads((out / "imported-f16" / "config.json").read_text())["rope_parameters"]
        assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
