"""Weight files written by the framework follow the umask, as the JSON files next to them do.

safetensors 0.8 creates its files 0600 (safetensors issue #782): without the reset an adapter or merged model
could not be served by another user.
"""

from __future__ import annotations

import os

import pytest
import torch

from sft.core.atomic import plain_file_mode, restore_default_modes


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_default_mode_follows_the_umask(umask_022, tmp_path):
    assert plain_file_mode() == 0o644
    weights, config = tmp_path / "a.safetensors", tmp_path / "config.json"
    for path in (weights, config):
        path.write_text("x")
    weights.chmod(0o600)
    assert restore_default_modes(tmp_path) == [weights]
    assert (weights.stat().st_mode & 0o777) == 0o644 and (config.stat().st_mode & 0o777) == 0o644
    assert restore_default_modes(tmp_path) == []


def test_adapter_and_merged_weights_are_readable_by_others(umask_022, tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.checkpoint.save import save_adapter
    from sft.export.merge import merge_lora
    from tests.test_merge import make_adapter

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    save_adapter(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644

    adapter = make_adapter(tiny_llama_dir, tmp_path / "lora", quantization="none")
    out = tmp_path / "merged"
    merge_lora(tiny_llama_dir, adapter, out, dtype=torch.float32)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes), modes
    assert set(modes.values()) == {0o644}, modes
