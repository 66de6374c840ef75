"""sft.train.kernels on a CPU: --torch_compile gives the same loss and gradients; --liger is refused with its reason.

Liger's kernels need CUDA: their equality with the plain path is checked in tests/test_gpu.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sft.core.errors import ArgsError
from sft.train.args import parse_args
from sft.train.kernels import compile_decoder_layers, decoder_layers, liger_problem
from sft.train.model import load_model_for_training
from sft.train.objectives.sft import batch_loss_sums
from sft.train.validate import validate_args

CPU = torch.device("cpu")


def _args(model_dir, data_file, *flags: str):
    return parse_args(
        [
            "--model_name_or_path",
            str(model_dir),
            "--train_path",
            str(data_file),
            "--precision",
            "fp32",
            *flags,
        ]
    )


def test_liger_is_refused_where_it_cannot_run(tiny_baichuan_dir, tmp_path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ArgsError, match=r"--liger needs a CUDA GPU .*drop --liger"):
        validate_args(_args(tiny_baichuan_dir, data, "--liger"), cuda_available=False)
    problem = liger_problem(cuda_available=True)  # the real check of this machine's packages
    if importlib.util.find_spec("triton") is None:
        assert problem.startswith("--liger needs Triton")
    elif importlib.util.find_spec("liger_kernel") is None:
        assert "pip install liger-kernel==" in problem
    else:
        assert problem is None
    with pytest.raises(ArgsError, match="--torch_compile cannot be combined with ZeRO-3"):
        validate_args(
            _args(tiny_baichuan_dir, data, "--torch_compile", "--ds_config", "ds_configs/zero3.json"),
            cuda_available=False,
        )


def test_torch_compile_gives_the_same_loss_and_gradients(tiny_baichuan_dir, tmp_path) -> None:
    """The training set-up (NF4 base, LoRA, gradient checkpointing): load_model_for_training compiles every
    decoder layer; run through torch.compile's graph capture (aot_eager: no C++ compiler needed on a CPU),
    the loss and the LoRA gradients are those of the eager model."""
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    flags = ("--quantization", "nf4", "--gradient_checkpointing", "--lora_dropout", "0")
    compiled = load_model_for_training(_args(tiny_baichuan_dir, data, *flags, "--torch_compile"), CPU)
    layers = decoder_layers(compiled)
    assert len(layers) == compiled.config.num_hidden_layers
    assert all(
        layer._compiled_call_impl is not None for layer in layers
    )  # compiled lazily, at the first call

    torch.manual_seed(0)
    model = load_model_for_training(_args(tiny_baichuan_dir, data, *flags), CPU).train()
    for name, param in model.named_parameters():  # LoRA B starts at 0: make the adapter do something
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=gen)
    labels = input_ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(24).expand(2, 24)}

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total, tokens = batch_loss_sums(model, batch, CPU)
        (total / tokens).backward()
        return total.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = step()
    assert compile_decoder_layers(model, backend="aot_eager") == model.config.num_hidden_layers
    compiled_loss, compiled_grads = step()
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
