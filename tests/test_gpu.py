"""Checks that need a CUDA GPU (pytest marker ``gpu``): skipped without one, run by benchmarks/gpu_check.sh.

- QLoRA in bf16 with an NF4 base under DeepSpeed: the loss falls, a resumed run continues the curve, the
  merged model generates greedily what base + adapter generate;
- a right-padded batch without its mask runs on SDPA's FlashAttention backend and gives the masked loss;
- FlashAttention-2 equals SDPA (where flash-attn is importable);
- Liger Kernel equals the plain path (where liger-kernel and Triton are importable);
- torch.compile (inductor) of the decoder layers gives the eager loss;
- our greedy decoding loop gives model.generate's tokens on the GPU, and so do the web demo's live replies, whose
  kept caches let a chat's next prompt compute only its new message; --engine vllm gives the torch engine's greedy
  answers (where vLLM is installed: the device image may lack it, and its wheel is too big to carry).

Tolerances are bf16's where the computation is bf16 (relative 1e-2 on losses, per the method in
docs/PERFORMANCE.md), fp32's where it is fp32.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sft.data.formats import IGNORE_INDEX
from sft.modeling.loading import load_base_model
from sft.train.kernels import liger_problem
from sft.train.objectives.sft import batch_loss_sums, token_loss_sums
from tests.test_train_single import (
    checkpoint_state,
    run,
    scalars,
    train_command,
    write_overfit_data,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)"
    ),
]

CUDA = torch.device("cuda", 0)


def _checkpoint_at(output_dir: Path, step: int) -> Path:
    from sft.checkpoint.layout import list_checkpoints

    (found,) = [c for c in list_checkpoints(output_dir) if checkpoint_state(c)["step"] == step]
    return found


def test_qlora_bf16_under_deepspeed_resume_merge_and_greedy(tiny_baichuan_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    write_overfit_data(data_dir)
    out = tmp_path / "out"
    command = [
        sys.executable,
        *train_command(
            tiny_baichuan_dir, data_dir, out,
            "--precision", "bf16", "--quantization", "nf4", "--gradient_accumulation_steps", "2",
            "--max_steps", "12", "--save_model_step", "6", "--lora_dropout", "0",
        ),
    ]  # fmt: skip
    run(command)
    series = scalars(out)
    losses = dict(series["train/loss"])
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < 0.75 * losses[1], losses
    assert "train/gpu_mem_gb" in series  # the GPU-only metric

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    mid = _checkpoint_at(out, 6)
    shutil.copytree(mid, resumed / mid.name)
    run([*command, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    resumed_losses = dict(scalars(resumed)["train/loss"])
    assert sorted(resumed_losses) == list(range(7, 13))
    for step in range(7, 13):  # bf16 kernels on a GPU need not be bitwise deterministic
        assert resumed_losses[step] == pytest.approx(losses[step], rel=2e-2), step

    final = _checkpoint_at(out, 12)
    merged = tmp_path / "merged"
    run([sys.executable, "merge_params.py", "--ori_model_dir", str(tiny_baichuan_dir), "--model_dir", str(final),
         "--save_model_dir", str(merged), "--dtype", "fp32", "--device", "cuda"])  # fmt: skip
    records = data_dir / "test.jsonl"

    def greedy(name: str, *model: str) -> list[str]:
        path = tmp_path / f"{name}.jsonl"
        run([sys.executable, "predict.py", *model, "--data_path", str(records), "--output_path", str(path),
             "--device", "cuda", "--dtype", "fp32", "--no-do_sample", "--max_new_tokens", "16"])  # fmt: skip
        return [json.loads(line)["prediction"] for line in path.read_text(encoding="utf-8").splitlines()]

    from_merged = greedy("merged", "--model_path", str(merged))
    from_adapter = greedy("adapter", "--model_path", str(tiny_baichuan_dir), "--adapter_dir", str(final))
    assert from_merged == from_adapter and all(from_merged), (from_merged, from_adapter)


def _lora(model_dir: Path, *, attn: str = "sdpa", dtype: torch.dtype = torch.bfloat16):
    from peft import LoraConfig, get_peft_model

    from sft.train.model import find_lora_targets

    base = load_base_model(model_dir, "none", dtype, attn_implementation=attn).to(CUDA)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=find_lora_targets(base), init_lora_weights=False, lora_dropout=0.0
    )
    return get_peft_model(base, config).train()


def _padded_batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, vocab, (3, 48), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX
    for row, length in enumerate((48, 33, 17)):
        attention_mask[row, length:] = 0
        labels[row, length:] = IGNORE_INDEX
        input_ids[row, length:] = 0
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(48).expand(3, 48).clone(),
    }


def _loss_and_grads(model, batch: dict, head_loss: str = "fused") -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total, tokens = batch_loss_sums(model, batch, CUDA, head_loss=head_loss)
    (total / tokens).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return (total / tokens).item(), grads


def _close_grads(got: dict, want: dict, rel: float) -> None:
    for name, grad in want.items():
        error = (got[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < rel, (name, float(error))


@pytest.mark.parametrize("family", ["baichuan", "llama"])
def test_right_padded_batch_runs_on_flash_attention_without_mask(
    family, tiny_baichuan_dir, tiny_llama_dir
) -> None:
    """With SDPA limited to its FlashAttention backend, the masked forward has no kernel; batch_loss_sums, which
    drops the mask of a right-padded batch, runs and gives the masked forward's loss."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _lora(tiny_baichuan_dir if family == "baichuan" else tiny_llama_dir)
    batch = _padded_batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"].to(CUDA), attention_mask=batch["attention_mask"].to(CUDA)
        ).logits
        ref_sum, ref_n = token_loss_sums(logits, batch["labels"].to(CUDA))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        with pytest.raises(RuntimeError), torch.no_grad():  # a mask rules FlashAttention out
            model(input_ids=batch["input_ids"].to(CUDA), attention_mask=batch["attention_mask"].to(CUDA))
        loss, _ = _loss_and_grads(model, batch)
    assert loss == pytest.approx((ref_sum / ref_n).item(), rel=1e-2)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_flash_attention_2_equals_sdpa(position, tiny_baichuan_dir, tiny_baichuan_alibi_dir) -> None:
    model_dir = tiny_baichuan_dir if position == "rope" else tiny_baichuan_alibi_dir
    sdpa, fa2 = _lora(model_dir), _lora(model_dir, attn="flash_attention_2")
    for batch in (_padded_batch(sdpa.config.vocab_size), _packed_batch(sdpa.config.vocab_size)):
        want_loss, want_grads = _loss_and_grads(sdpa, batch)
        got_loss, got_grads = _loss_and_grads(fa2, batch)
        assert got_loss == pytest.approx(want_loss, rel=1e-2)
        _close_grads(got_grads, want_grads, rel=5e-2)


def _packed_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows of two documents each (positions restart at each document)."""
    gen = torch.Generator().manual_seed(6)
    input_ids = torch.randint(3, vocab, (2, 40), generator=gen)
    position_ids = torch.cat([torch.arange(25), torch.arange(15)]).expand(2, 40).clone()
    position_ids[1] = torch.cat([torch.arange(10), torch.arange(30)])
    labels = input_ids.clone()
    labels[position_ids < 4] = IGNORE_INDEX  # each document's prompt
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@pytest.mark.skipif(liger_problem() is not None, reason=f"{liger_problem()}")
@pytest.mark.parametrize("family", ["baichuan", "llama"])
def test_liger_equals_the_plain_path(family, tiny_baichuan_dir, tiny_llama_dir) -> None:
    """Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy: the plain path's logits, loss and LoRA
    gradients (bf16 tolerances), z-loss included for Baichuan2."""
    from sft.train.kernels import apply_liger

    model_dir = tiny_baichuan_dir if family == "baichuan" else tiny_llama_dir
    batch = _padded_batch(1000)
    ids, real = batch["input_ids"].to(CUDA), batch["attention_mask"].bool().to(CUDA)

    def run_model(liger: bool) -> tuple[torch.Tensor, float, dict]:
        # The plain run first: Liger's Llama patch also replaces transformers' module-level RoPE function.
        model = _lora(model_dir)
        if family == "baichuan":
            model.config.z_loss_weight = 0.1
        if liger:
            assert set(apply_liger(model.get_base_model())) == {"rms_norm", "swiglu", "rope"}
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()[real]
        return (logits, *_loss_and_grads(model, batch, "liger" if liger else "fused"))

    want_logits, want_loss, want_grads = run_model(liger=False)
    got_logits, got_loss, got_grads = run_model(liger=True)
    assert ((got_logits - want_logits).norm() / want_logits.norm()).item() < 1e-2
    assert got_loss == pytest.approx(want_loss, rel=1e-2)
    _close_grads(got_grads, want_grads, rel=5e-2)


def test_torch_compile_inductor_gives_the_eager_loss(tiny_baichuan_dir: Path, tmp_path: Path) -> None:
    """The training set-up (NF4 base, bf16, LoRA, gradient checkpointing) with inductor-compiled decoder layers."""
    from sft.train.args import TrainArgs
    from sft.train.kernels import compile_decoder_layers
    from sft.train.model import load_model_for_training

    args = TrainArgs(model_name_or_path=str(tiny_baichuan_dir), quantization="nf4", precision="bf16",
                     gradient_checkpointing=True, lora_dropout=0.0)  # fmt: skip
    model = load_model_for_training(args, CUDA)
    for param in model.parameters():  # as DeepSpeed's bf16 engine casts them
        if param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)
    batch = _padded_batch(model.config.vocab_size)
    eager_loss, eager_grads = _loss_and_grads(model.train(), batch)
    compile_decoder_layers(model)
    compiled_loss, compiled_grads = _loss_and_grads(model, batch)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-2)
    _close_grads(compiled_grads, eager_grads, rel=5e-2)


def test_dpo_bf16_nf4_packed_pairs_start_at_ln2_and_learn(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The GPU path of preference alignment: bf16 compute, an NF4 base, packed pairs, the live reference. A fresh
    LoRA makes the first step's loss ln 2 (the policy is the reference); the loss then falls."""
    import math

    from tests.test_preference import write_pairs

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_pairs(data_dir / "train.jsonl", 16)
    write_pairs(data_dir / "test.jsonl", 5)
    out = tmp_path / "out"
    command = [
        sys.executable,
        *train_command(
            tiny_llama_dir, data_dir, out,
            "--objective", "dpo", "--packing", "--precision", "bf16", "--quantization", "nf4",
            "--gradient_accumulation_steps", "1", "--max_steps", "8", "--save_model_step", "8",
            "--lora_dropout", "0", "--learning_rate", "5e-3",
        ),
    ]  # fmt: skip
    run(command)
    series = scalars(out)
    losses = [v for _, v in series["train/loss"]]
    assert losses[0] == pytest.approx(math.log(2), rel=1e-3)  # bf16 rounding of identical log-probs
    assert losses[-1] < losses[0] - 0.05, losses
    assert "eval/reward_accuracy" in series and "train/gpu_mem_gb" in series


def test_greedy_loop_gives_generates_tokens_on_cuda(tiny_llama_dir: Path) -> None:
    """Our greedy loop on the GPU (batched prefill there) against model.generate, fp32: the same tokens."""
    from sft.inference.generate import generate_ids, hf_generate_ids
    from sft.inference.loading import load_for_inference
    from tests.test_generate import greedy_config, random_prompts

    model, tokenizer = load_for_inference(tiny_llama_dir, dtype=torch.float32, device=CUDA)
    config = greedy_config(model, tokenizer, max_new_tokens=16, repetition_penalty=1.1)
    prompts = random_prompts(model, (5, 17, 9, 12))
    assert generate_ids(model, prompts, config, batch_size=4) == hf_generate_ids(
        model, prompts, config, batch_size=4
    )


def test_live_replies_and_their_kept_caches_on_cuda(tiny_llama_dir: Path, monkeypatch) -> None:
    """The web demo's LiveBatcher on the GPU, fp32: replies decoded together are generate()'s, and a chat's next
    prompt computes only its new message from the caches kept on the GPU."""
    import threading

    from sft.inference.generate import hf_generate_ids
    from sft.inference.loading import load_for_inference
    from sft.inference.serving import LiveBatcher
    from tests.test_generate import greedy_config, random_prompts
    from tests.test_serving import counting_prefills

    model, tokenizer = load_for_inference(tiny_llama_dir, dtype=torch.float32, device=CUDA)
    config = greedy_config(model, tokenizer, max_new_tokens=12)
    computed = counting_prefills(monkeypatch)
    batcher = LiveBatcher(model, tokenizer, max_live=3)
    prompts = random_prompts(model, (30, 21, 26), seed=3)
    got = [""] * 3

    def read(i: int) -> None:
        got[i] = "".join(batcher.stream(prompts[i], config))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    answers = hf_generate_ids(model, prompts, config, batch_size=1)
    assert got == [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    follow_up = prompts[0] + answers[0][:-1] + random_prompts(model, [5], seed=4)[0]
    "".join(batcher.stream(follow_up, config))
    kept = batcher.prompt_caches.caches()
    batcher.close()
    assert computed[-1] == 5 and kept and kept[0].layers[0].keys.device == CUDA


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (pip install vllm)"
)
def test_vllm_engine_gives_the_torch_engines_greedy_answers(tmp_path: Path) -> None:
    """--engine vllm (its own kernels) against --engine torch on a random Llama in fp32 (head size 64, which vLLM's
    attention supports): the same greedy answers, since fp32 differences stay far below its logit gaps."""
    from types import SimpleNamespace

    from models.tiny import build_tiny_llama
    from sft.inference.engines import load_engine
    from sft.inference.settings import GenerationArgs, build_generation_config

    model_dir = build_tiny_llama(tmp_path / "llama", hidden_size=256, num_heads=4)
    flags = {"model_path": str(model_dir), "adapter_dir": None, "quantization": None, "template": None}
    answers = {}
    for name, device in (("torch", "cuda"), ("vllm", "auto")):
        engine = load_engine(SimpleNamespace(**flags, device=device, dtype="fp32", engine=name, gguf=None))
        config = build_generation_config(
            engine, engine.tokenizer, GenerationArgs(do_sample=False, max_new_tokens=16)
        )
        prompts = [
            engine.template.build_prompt({"conversations": [{"role": "user", "content": text}]})
            for text in ("hello there", "tell me a story about the moon", "你好", "1 2 3 4")
        ]
        answers[name] = engine.generate(prompts, config)
    assert answers["vllm"] == answers["torch"], answers
