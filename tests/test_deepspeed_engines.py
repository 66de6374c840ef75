"""Every bundled DeepSpeed config builds an engine that needs no compiler and trains in bf16 with accumulation.

One subprocess (DeepSpeed wants its own process group) sets up the real training stack for each config, the way
train.py does (``build_ds_config`` from the flags, ``load_model_for_training``, ``deepspeed.initialize``), on a tiny
Llama with a bf16 LoRA, and checks:

- the optimizer DeepSpeed steps is torch's AdamW, never its FusedAdam or DeepSpeedCPUAdam, which it would compile
  with nvcc/g++ at the first ``deepspeed.initialize`` (offloaded configs included);
- gradients accumulate in fp32 under ZeRO 1-3 (DeepSpeed accumulates in bf16 unless told otherwise);
- under ZeRO-3 the base is partitioned while it is loaded (``zero.Init``) and the adapter is cast to bf16 as the
  engine casts a model loaded whole;
- two micro-batches per step, four steps: the loss falls.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_train_single import CPU_RANKS_ENV, REPO_ROOT

ENGINE_SCRIPT = """
import os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import numpy as np
import torch
import deepspeed
from models import register_models
from sft.train.args import parse_args
from sft.data.batching import PaddedCollator
from sft.core.distributed import init_distributed
from sft.train.ds_config import build_ds_config, zero_stage
from sft.train.objectives.sft import batch_loss_sums
from sft.modeling.loading import is_partitioned
from sft.train.model import load_model_for_training

register_models()
device = init_distributed()
model_dir = sys.argv[1]
generator = torch.Generator().manual_seed(0)
items = [
    {"input_ids": ids, "labels": np.concatenate([[-100, -100], ids[2:]])}
    for ids in (torch.randint(3, 500, (n,), generator=generator).numpy() for n in (12, 9, 15, 7))
]
micro_batches = [PaddedCollator(pad_token_id=0)(items[:2]), PaddedCollator(pad_token_id=0)(items[2:])]
for name in sys.argv[2:]:
    args = parse_args([
        "--model_name_or_path", model_dir, "--ds_config", f"ds_configs/{name}.json", "--precision", "bf16",
        "--quantization", "none", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-2", "--weight_decay", "0", "--lora_dim", "8", "--lora_alpha", "16",
        "--lora_dropout", "0",
    ])
    config = build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=1)
    torch.manual_seed(0)
    model = load_model_for_training(args, device, ds_config=config)
    stage = zero_stage(config)
    assert is_partitioned(model) == (stage == 3), name
    trainable = [p for p in model.parameters() if p.requires_grad]
    if stage == 3:  # cast by load_model_for_training: DeepSpeed leaves a zero.Init model's dtypes alone
        assert {p.dtype for p in trainable} == {torch.bfloat16}, name
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    assert type(engine.basic_optimizer) is torch.optim.AdamW, (name, type(engine.basic_optimizer))
    assert engine.get_data_types() == (torch.bfloat16, torch.float32), name
    accumulation = getattr(engine.optimizer, "gradient_accumulation_dtype", torch.float32)  # BF16_Optimizer: fp32
    assert accumulation == torch.float32, (name, type(engine.optimizer).__name__, accumulation)
    losses = []
    for step in range(4):
        total = 0.0
        for i, batch in enumerate(micro_batches):
            engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            nll, tokens = batch_loss_sums(engine, batch, device)
            engine.backward(nll / tokens)
            total += float(nll / tokens) / len(micro_batches)
        engine.step()
        losses.append(total)
    assert losses[-1] < losses[0] - 0.05, (name, losses)
    print("ENGINE", name, type(engine.optimizer).__name__, [round(x, 4) for x in losses], flush=True)
    engine.destroy()
print("ENGINES_OK")
"""


@pytest.mark.slow
def test_bundled_configs_train_bf16_without_compiled_ops(tiny_llama_dir):
    names = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
    env = {**os.environ, **CPU_RANKS_ENV, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, str(tiny_llama_dir), *names],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "ENGINES_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ENGINE ")] == names
