"""LoRA variants (DoRA, rsLoRA, PiSSA/OLoRA/gaussian init, LoRA+) and NEFTune: each changes what it should.

- the flags reach peft's config and the adapter_config.json; impossible combinations are refused at once;
- PiSSA/OLoRA: the init differs from the default one and keeps the model's function (the initial adapter is
  subtracted from the base); the checkpoint is plain LoRA relative to the *original* base: loaded there,
  and merged into it, it reproduces the model training computed (DoRA and rsLoRA included);
- NEFTune: noise on the input embeddings in training mode, within alpha / sqrt(L * d), none in eval mode;
- in a real DeepSpeed engine (ZeRO-2 on an NF4 base, ZeRO-3 with every weight partitioned): LoRA+ group
  learning rates after warm-up, DoRA magnitude vectors trained and saved, the checkpoint accepted by
  check_adapter_fits_base and merged (DoRA on NF4) to base + adapter by logits.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from sft.checkpoint.adapters import check_adapter_fits_base, read_adapter
from sft.checkpoint.save import save_adapter
from sft.core.errors import ArgsError
from sft.export.merge import merge_lora
from sft.modeling.loading import load_base_model
from sft.train.args import TrainArgs
from sft.train.model import build_peft_config, load_model_for_training
from sft.train.validate import validate_args

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE = torch.tensor([[5, 17, 300, 42, 8, 999, 250, 61], [1, 2, 3, 400, 77, 12, 13, 14]])


@torch.no_grad()
def logits_of(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=PROBE, use_cache=False).logits.float()


def lora_module(model: torch.nn.Module) -> torch.nn.Module:
    """The first LoRA-wrapped linear layer of a peft model."""
    return next(m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)


def variant_args(model_dir: Path, **kw) -> TrainArgs:
    defaults = {"model_name_or_path": str(model_dir), "precision": "fp32", "lora_dim": 4, "lora_alpha": 8}
    return TrainArgs(**{**defaults, **kw})


# --------------------------------------------------------------------------------------------------
def test_flags_reach_peft_and_impossible_combinations_are_refused(tiny_llama_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"conversations": []}\n', encoding="utf-8")
    zero3 = str(REPO_ROOT / "ds_configs" / "zero3.json")

    def problems(**kw) -> list[str]:
        args = variant_args(tiny_llama_dir, train_path=str(train), output_dir=str(tmp_path / "out"), **kw)
        try:
            validate_args(args, cuda_available=False)
        except ArgsError as err:
            return err.problems
        return []

    assert problems(use_dora=True, use_rslora=True, loraplus_lr_ratio=16, neftune_alpha=5) == []
    assert problems(lora_init="pissa", quantization="none", ds_config=zero3) == []
    for init in ("pissa", "olora"):
        (found,) = problems(lora_init=init, quantization="nf4")
        assert f"--lora_init {init} cannot train on a --quantization nf4 base" in found
        assert "pass --quantization none" in found
    (found,) = problems(use_dora=True, quantization="nf4", ds_config=zero3)
    assert "--use_dora with a 4-bit base under ZeRO-3" in found and "zero2.json" in found
    assert problems(use_dora=True, quantization="none", ds_config=zero3) == []
    (found,) = problems(peft="prompt_tuning", use_dora=True, lora_init="gaussian", loraplus_lr_ratio=4)
    assert found.startswith(
        "--use_dora, --lora_init gaussian, --loraplus_lr_ratio 4 only apply to --peft lora"
    )
    assert len(problems(loraplus_lr_ratio=-1, neftune_alpha=-1, pissa_niter=-1)) == 3

    model = load_base_model(tiny_llama_dir, "none", torch.float32)
    config = build_peft_config(
        variant_args(tiny_llama_dir, use_dora=True, use_rslora=True, lora_init="pissa", pissa_niter=4), model
    )
    assert (config.use_dora, config.use_rslora, config.init_lora_weights) == (True, True, "pissa_niter_4")
    exact = build_peft_config(variant_args(tiny_llama_dir, lora_init="pissa", pissa_niter=0), model)
    assert exact.init_lora_weights == "pissa"
    assert build_peft_config(variant_args(tiny_llama_dir), model).init_lora_weights is True


def test_rslora_scaling_and_gaussian_init(tiny_llama_dir):
    torch.manual_seed(0)
    model = load_model_for_training(
        variant_args(tiny_llama_dir, quantization="nf4", use_rslora=True, lora_dim=16, lora_alpha=8,
                     lora_init="gaussian"),
        torch.device("cpu"),
    )  # fmt: skip
    layer = lora_module(model)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))  # not 8 / 16
    a = layer.lora_A["default"].weight
    assert a.std().item() == pytest.approx(1 / 16, rel=0.1)  # gaussian: A ~ N(0, 1/r); default is Kaiming
    assert layer.lora_B["default"].weight.abs().max().item() == 0


@pytest.mark.parametrize(
    "init, dora, rslora", [("pissa", False, False), ("olora", True, True)], ids=["pissa", "olora-dora-rslora"]
)
def test_base_changing_init_saves_plain_lora_for_the_original_base(
    tiny_llama_dir, tmp_path, init, dora, rslora
):
    from peft import PeftModel

    base = load_base_model(tiny_llama_dir, "none", torch.float32).eval()
    base_logits = logits_of(base)
    args = variant_args(
        tiny_llama_dir, quantization="none", lora_init=init, pissa_niter=0, use_dora=dora, use_rslora=rslora,
        lora_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = load_model_for_training(args, torch.device("cpu")).eval()
    layer = lora_module(model)
    name = next(n for n, m in model.named_modules() if m is layer).removeprefix("base_model.model.")
    # The init is not the default one (B = 0): B0 @ A0 is the top of W, subtracted from the base ...
    b0, a0 = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
    assert b0.abs().max().item() > 0.01
    original = base.get_submodule(name).weight
    subtracted = original - layer.get_base_layer().weight
    torch.testing.assert_close(subtracted, layer.scaling["default"] * b0 @ a0, atol=1e-5, rtol=1e-4)
    assert subtracted.abs().max().item() > 0.01
    # ... so that the model still computes the base's function.
    torch.testing.assert_close(logits_of(model), base_logits, atol=1e-4, rtol=0)

    # "Training": move every trainable tensor (factors, DoRA magnitudes).
    gen = torch.Generator().manual_seed(1)
    for param in (p for p in model.parameters() if p.requires_grad):
        param.data += 0.05 * torch.randn(param.shape, generator=gen)
    trained = logits_of(model)
    assert (trained - base_logits).abs().max().item() > 0.5

    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)
    (adapter / "train_args.json").write_text(json.dumps(args.to_dict()), encoding="utf-8")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)  # plain LoRA of rank 2r
    assert config["lora_alpha"] == pytest.approx(8 * math.sqrt(2) if rslora else 16)  # same scaling
    assert (config["use_dora"], config["use_rslora"]) == (dora, rslora)

    # The original base + the saved adapter is the model training computed; so is the merge.
    on_original = PeftModel.from_pretrained(
        load_base_model(tiny_llama_dir, "none", torch.float32), str(adapter)
    )
    torch.testing.assert_close(logits_of(on_original.eval()), trained, atol=1e-4, rtol=0)
    report = merge_lora(tiny_llama_dir, adapter, tmp_path / "merged", dtype=torch.float32)
    assert report.max_abs_diff < 1e-4
    merged = load_base_model(tmp_path / "merged", "none", torch.float32).eval()
    torch.testing.assert_close(logits_of(merged), trained, atol=1e-4, rtol=0)

    # An adapter saved without the conversion is refused by every loader (read_adapter), naming the fix.
    raw = tmp_path / "raw"
    model.save_pretrained(str(raw))
    with pytest.raises(
        ValueError, match=f"init_lora_weights={init}.*path_initial_model_for_weight_conversion"
    ):
        read_adapter(raw)


def test_resume_refuses_other_variant_flags(tmp_path, caplog):
    from sft.checkpoint.layout import CheckpointError
    from sft.checkpoint.resume import check_resume_args

    saved = TrainArgs(lora_init="pissa", pissa_niter=16, use_dora=True, neftune_alpha=5.0, seed=1).to_dict()
    (tmp_path / "train_args.json").write_text(json.dumps(saved))
    for changed, shown in (
        ({"use_dora": False}, "--use_dora True there, False now"),
        ({"lora_init": "olora"}, "--lora_init 'pissa' there, 'olora' now"),
        ({"loraplus_lr_ratio": 16.0}, "--loraplus_lr_ratio 0.0 there, 16.0 now"),
        ({"seed": 2}, "--seed 1 there, 2 now"),  # the randomised SVD rebuilds another residual base
    ):
        with pytest.raises(CheckpointError, match=re.escape(shown)):
            check_resume_args(tmp_path, {**saved, **changed})
    with caplog.at_level("WARNING", logger="sft.checkpoint"):
        check_resume_args(tmp_path, {**saved, "neftune_alpha": 10.0})
    assert "--neftune_alpha 5.0 there, 10.0 now" in caplog.text


def test_neftune_noise_in_training_mode_only(tiny_llama_dir):
    from sft.train.neftune import add_neftune_hook, neftune_noise_bound

    model = load_base_model(tiny_llama_dir, "none", torch.float32)
    embeddings = model.get_input_embeddings()
    clean = embeddings(PROBE).detach()
    handle = add_neftune_hook(model, alpha=5.0)
    bound = neftune_noise_bound(5.0, PROBE.shape[1], clean.shape[-1])
    assert bound == pytest.approx(5.0 / math.sqrt(8 * 64))

    model.train()
    torch.manual_seed(0)
    noisy, noisy_again = embeddings(PROBE).detach(), embeddings(PROBE).detach()
    noise = noisy - clean
    assert noise.abs().max().item() <= bound * (1 + 1e-6)
    assert noise.abs().max().item() > 0.95 * bound  # uniform in [-bound, bound]: the extremes are reached
    assert noise.abs().mean().item() == pytest.approx(bound / 2, rel=0.1)  # E|U(-b, b)| = b / 2
    assert not torch.equal(noisy, noisy_again)  # fresh noise every forward

    model.eval()
    assert torch.equal(embeddings(PROBE), clean)
    handle.remove()
    model.train()
    assert torch.equal(embeddings(PROBE), clean)


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank_world():
    """A one-rank gloo process group in this process (as ``python train.py`` makes), for the module's tests.

    Module-scoped: DeepSpeed keeps its own handle on the first process group, so the group is created
    once and destroyed after the last test here.
    """

    import sft.core.distributed

    with pytest.MonkeyPatch.context() as patch:
        # init_distributed writes these: set-then-deleted through monkeypatch, they get their old values back.
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            patch.setenv(name, "")
            patch.delenv(name)
        patch.setattr(sft.core.distributed, "_DEVICE", None)
        yield sft.core.distributed.init_distributed()
        # Through DeepSpeed, which drops the groups it cached: a later run in this process starts clean.
        sft.core.distributed.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_loraplus_dora_and_neftune_in_a_deepspeed_engine(one_rank_world, tiny_llama_dir, tmp_path, stage):
    """ZeRO-2 on an NF4 base, ZeRO-3 on a full-precision one with every parameter partitioned."""
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    import train
    from sft.checkpoint.save import save_checkpoint
    from sft.checkpoint.state import TrainProgress
    from sft.modeling.loading import load_tokenizer
    from sft.train.objectives.sft import batch_loss_sums

    ds_config = json.loads((REPO_ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    if stage == 3:  # tiny tensors would otherwise stay whole (persistence threshold): partition them all
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    lr, ratio, total, warmup = 1e-2, 16.0, 8, 1
    args = variant_args(
        tiny_llama_dir, ds_config=str(tmp_path / "ds.json"), quantization="nf4" if stage == 2 else "none",
        use_dora=True, use_rslora=True, loraplus_lr_ratio=ratio, neftune_alpha=5.0, lora_dropout=0.0,
        learning_rate=lr, weight_decay=0.0, warmup_ratio=warmup / total, lr_scheduler="linear",
        per_device_train_batch_size=2, gradient_accumulation_steps=1, output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    torch.manual_seed(0)
    engine = train.setup_engine(args, one_rank_world, total)
    model = engine.module
    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes
    before = {n: safe_get_full_fp32_param(p).clone() for n, p in magnitudes.items()}
    assert lora_module(model).scaling["default"] == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(4)

    batch = {"input_ids": PROBE, "labels": PROBE.clone()}
    engine.train()
    for _ in range(2):  # the warm-up step, then one on the linear decay
        nll, tokens = batch_loss_sums(engine, batch, one_rank_world)
        engine.backward(nll / tokens)
        engine.step()
    factor = (total - 2) / (total - warmup)
    expected = [pytest.approx(lr * factor), pytest.approx(lr * ratio * factor)]
    assert engine.get_lr() == expected
    assert [group["lr"] for group in engine.optimizer.param_groups] == expected

    if stage == 2:  # NEFTune through the engine: another loss for the same batch in training mode only
        with torch.no_grad():
            train_losses = [batch_loss_sums(engine, batch, one_rank_world)[0].item() for _ in range(2)]
            engine.eval()
            eval_losses = [batch_loss_sums(engine, batch, one_rank_world)[0].item() for _ in range(2)]
        assert train_losses[0] != train_losses[1]
        assert eval_losses[0] == eval_losses[1]

    # DoRA magnitudes moved, and the checkpoint holds the trained values under names the base accepts.
    after = {n: safe_get_full_fp32_param(p).clone() for n, p in magnitudes.items()}
    assert all((after[n] - before[n]).abs().max().item() > 1e-4 for n in magnitudes)
    path = save_checkpoint(
        engine, load_tokenizer(tiny_llama_dir), args.to_dict(), TrainProgress(step=2), args.output_dir
    )
    saved = load_file(str(path / "adapter_model.safetensors"))
    for name, value in after.items():
        key = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
        torch.testing.assert_close(saved[key], value)
    info = read_adapter(path)
    assert (info.config["use_dora"], info.config["use_rslora"]) == (True, True)
    assert (info.train_args["loraplus_lr_ratio"], info.train_args["neftune_alpha"]) == (ratio, 5.0)
    check_adapter_fits_base(tiny_llama_dir, info, base_flag="--model_path")

    if stage == 2:  # DoRA on NF4: merged into the dequantised base, checked against the 4-bit base + adapter
        report = merge_lora(tiny_llama_dir, path, tmp_path / "merged", dtype=torch.float32)
        assert report.quantization == "nf4"
        assert report.max_abs_diff < 1e-3
