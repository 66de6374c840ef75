"""Numerical tests of our Baichuan2 implementation (models/baichuan), on tiny configs built here, CPU only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from models.baichuan import BaichuanConfig, BaichuanForCausalLM, BaichuanTokenizer
from models.baichuan.modeling_baichuan import (
    BaichuanModel,
    alibi_slopes,
    build_attention_layout,
    rope_cos_sin,
)

VOCAB = 96
HIDDEN = 32
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
ATOL = 1e-5


def tiny_config(position: str, attn: str = "sdpa", **overrides) -> BaichuanConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        position_embedding_type=position,
        eos_token_id=None,  # random weights: greedy decoding must not stop early on an EOS
        attn_implementation=attn,
    )
    kwargs.update(overrides)
    return BaichuanConfig(**kwargs)


def tiny_model(position: str, attn: str = "sdpa", seed: int = 0, **overrides) -> BaichuanForCausalLM:
    torch.manual_seed(seed)
    return BaichuanForCausalLM(tiny_config(position, attn, **overrides)).eval()


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# Attention against references written out here
# ----------------------------------------------------------------------------------------------------------------------


def hand_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes written out: 2^(-8i/n) for a power of two n; 40 heads = 32 + 8 interleaved from 64."""
    if num_heads == 40:
        return [2 ** (-(i + 1) / 4) for i in range(32)] + [2 ** (-(2 * j + 1) / 8) for j in range(8)]
    return [2 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)]


def naive_attention(attn: torch.nn.Module, x: torch.Tensor, position: str) -> torch.Tensor:
    """Separate q/k/v projections from W_pack's row blocks, explicit rotation, explicit bias, explicit softmax."""
    batch, length, _ = x.shape
    q_w, k_w, v_w = attn.W_pack.weight.detach().split(HIDDEN, dim=0)
    q_proj, k_proj, v_proj = (torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(3))
    with torch.no_grad():
        q_proj.weight.copy_(q_w)
        k_proj.weight.copy_(k_w)
        v_proj.weight.copy_(v_w)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)  # (B, nh, T, hs)

    q, k, v = heads(q_proj(x)), heads(k_proj(x)), heads(v_proj(x))
    if position == "rope":
        half = HEAD_DIM // 2
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        angle = pos / (10000.0 ** (torch.arange(half, dtype=torch.float64) * 2 / HEAD_DIM))  # (T, hs/2)
        cos, sin = angle.cos().float(), angle.sin().float()

        def rotate(t: torch.Tensor) -> torch.Tensor:
            first, second = t[..., :half], t[..., half:]
            return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

        q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)  # (B, nh, T, T)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    if position == "alibi":
        slopes = torch.tensor(hand_slopes(HEADS))[:, None, None]
        scores = scores - slopes * (i - j)
    scores = scores.masked_fill(j > i, float("-inf"))
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, HIDDEN)
    return attn.o_proj(out)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_attention_matches_naive_reference(position: str, attn_impl: str) -> None:
    model = tiny_model(position, attn_impl)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(3))
    position_ids = torch.arange(7)[None]
    layout = build_attention_layout(model.config, x, None, position_ids, past_length=0)
    cos_sin = rope_cos_sin(position_ids, HEAD_DIM, 10000.0, x.device) if position == "rope" else None
    with torch.no_grad():
        ours = attn(x, layout, cos_sin)
        reference = naive_attention(attn, x, position)
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


def test_w_pack_is_q_k_v_in_that_order() -> None:
    attn = tiny_model("rope").model.layers[0].self_attn
    x = torch.randn(3, HIDDEN)
    fused = attn.W_pack(x)
    q_w, k_w, v_w = attn.W_pack.weight.split(HIDDEN, dim=0)
    torch.testing.assert_close(fused, torch.cat([x @ q_w.T, x @ k_w.T, x @ v_w.T], dim=-1))
    assert attn.W_pack.weight.shape == (3 * HIDDEN, HIDDEN) and attn.W_pack.bias is None


@pytest.mark.parametrize("num_heads", [40, 8, 4])
def test_alibi_slopes_match_hand_computed(num_heads: int) -> None:
    assert alibi_slopes(num_heads) == pytest.approx(hand_slopes(num_heads), rel=1e-12)


def test_alibi_slopes_40_heads_closed_form() -> None:
    slopes = alibi_slopes(40)
    assert slopes[0] == pytest.approx(2**-0.25) and slopes[31] == pytest.approx(2**-8)
    assert slopes[32] == pytest.approx(2**-0.125) and slopes[39] == pytest.approx(2 ** (-15 / 8))


# ----------------------------------------------------------------------------------------------------------------------
# Cache, padding, packing
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_incremental_decoding_matches_full_forward(position: str) -> None:
    model = tiny_model(position)
    ids = random_ids(1, 10)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :4], use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :4], atol=ATOL, rtol=1e-4)
        cache = out.past_key_values
        for t in range(4, 10):
            step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            torch.testing.assert_close(step.logits[:, -1], full[:, t], atol=ATOL, rtol=1e-4)

        generated = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
        expected = ids[:, :5]
        for _ in range(6):  # greedy decoding by full forwards, no cache
            next_token = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=-1)
    assert torch.equal(generated, expected)


def left_pad(sequences: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = seq
        mask[row, length - len(seq) :] = 1
    return ids, mask


@pytest.mark.parametrize("pass_position_ids", [True, False])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_left_padded_batch_matches_single_sequences(
    position: str, attn_impl: str, pass_position_ids: bool
) -> None:
    model = tiny_model(position, attn_impl)
    sequences = [random_ids(5, seed=4), random_ids(8, seed=5), random_ids(2, seed=6)]
    ids, mask = left_pad(sequences)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0) if pass_position_ids else None
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        for row, seq in enumerate(sequences):
            alone = model(seq[None], use_cache=False).logits[0]
            torch.testing.assert_close(batched[row, -len(seq) :], alone, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_left_padded_generate_matches_single_generate(position: str) -> None:
    model = tiny_model(position)
    sequences = [random_ids(6, seed=7), random_ids(3, seed=8)]
    ids, mask = left_pad(sequences)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        for row, seq in enumerate(sequences):
            alone = model.generate(seq[None], max_new_tokens=5, do_sample=False)
            assert torch.equal(batched[row, -5:], alone[0, -5:])


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_packed_rows_match_documents_alone(position: str, attn_impl: str) -> None:
    model = tiny_model(position, attn_impl)
    rows = [
        [random_ids(3, seed=9), random_ids(5, seed=10), random_ids(4, seed=11)],
        [random_ids(12, seed=12)],
    ]
    ids = torch.stack([torch.cat(docs) for docs in rows])
    position_ids = torch.stack([torch.cat([torch.arange(len(d)) for d in docs]) for docs in rows])
    with torch.no_grad():
        packed = model(ids, attention_mask=None, position_ids=position_ids, use_cache=False).logits
        for row, docs in enumerate(rows):
            start = 0
            for doc in docs:
                alone = model(doc[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, start : start + len(doc)], alone, atol=ATOL, rtol=1e-4)
                start += len(doc)
        # Without the restarting position_ids the same row is one long document: the logits must differ.
        unpacked = model(ids, use_cache=False).logits
    assert not torch.allclose(unpacked[0, 3:8], packed[0, 3:8], atol=1e-3)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_flash_attention_varlen_layout(position: str) -> None:
    """flash_attn is not installed here: check the cu_seqlens/indices the FA2 kernel would receive."""
    config = tiny_config(position)
    config._attn_implementation = "flash_attention_2"
    x = torch.zeros(2, 6, HIDDEN)
    packed = build_attention_layout(
        config, x, None, torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]), 0
    )
    assert packed.cu_seqlens_q.tolist() == [0, 2, 5, 6, 12] and packed.max_seqlen_q == 6
    assert torch.equal(packed.query_indices, torch.arange(12))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    padded = build_attention_layout(config, x, mask, (mask.cumsum(-1) - 1).clamp_min(0), 0)
    assert padded.cu_seqlens_q.tolist() == [0, 4, 10] and padded.query_indices.tolist() == [
        2,
        3,
        4,
        5,
        *range(6, 12),
    ]
    decode = build_attention_layout(
        config, x[:, :1], torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), mask[:, :1], 6
    )
    assert decode.cu_seqlens_q.tolist() == [0, 1, 2] and decode.cu_seqlens_k.tolist() == [0, 5, 12]
    assert decode.key_indices.tolist() == [2, 3, 4, 5, 6, *range(7, 14)]
    assert (decode.alibi_slopes is not None) == (position == "alibi")


def test_flash_attention_2_without_package_fails_clearly() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash_attn is installed")
    with pytest.raises(
        ImportError, match=r"(?i)flash.?attention"
    ):  # transformers' own check, at construction
        BaichuanForCausalLM(tiny_config("rope", attn="flash_attention_2"))
    model = tiny_model("rope")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ImportError, match="pip install flash-attn"):
        model(random_ids(1, 4))


# ----------------------------------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------------------------------


def official_config(layout: str) -> dict:
    """An official Baichuan2 config.json, key for key, with tiny sizes."""
    config = {
        "_from_model_config": True,
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "tokenizer_class": "BaichuanTokenizer",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "model_max_length": 4096,
        "model_type": "baichuan",
        "num_attention_heads": HEADS,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.29.2",
        "use_cache": True,
        "vocab_size": VOCAB,
    }
    if layout == "7b":
        config.update(max_position_embeddings=4096, z_loss_weight=0)
    else:
        config["gradient_checkpointing"] = [False]
    return config


def write_official_dir(directory: Path, layout: str, state_dict: dict, weights: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(official_config(layout), indent=2))
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    if weights == "safetensors":
        save_file(state_dict, str(directory / "model.safetensors"), metadata={"format": "pt"})
    elif weights == "bin":
        torch.save(state_dict, directory / "pytorch_model.bin")
    else:  # sharded .bin with an index, as the 13B checkpoints ship
        keys = sorted(state_dict)
        shards = {
            "pytorch_model-00001-of-00002.bin": keys[::2],
            "pytorch_model-00002-of-00002.bin": keys[1::2],
        }
        weight_map = {}
        for name, shard_keys in shards.items():
            torch.save({k: state_dict[k] for k in shard_keys}, directory / name)
            weight_map.update(dict.fromkeys(shard_keys, name))
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize(
    ("layout", "weights", "position"),
    [
        ("7b", "safetensors", "rope"),
        ("7b", "bin", "rope"),
        ("13b", "sharded_bin", "alibi"),
        ("13b", "bin", "alibi"),
    ],
)
def test_official_layout_loads_through_auto_classes(
    tmp_path: Path, layout: str, weights: str, position: str
) -> None:
    source = tiny_model(position)
    directory = write_official_dir(tmp_path / layout, layout, source.state_dict(), weights)

    config = AutoConfig.from_pretrained(directory)
    assert type(config) is BaichuanConfig and config.position_embedding_type == position
    assert not getattr(config, "gradient_checkpointing", False)  # [false] is a truthy list in the 13B files
    # trust_remote_code=True must still pick our registered class: the directory has no remote code to run.
    for trust in (None, True):
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, trust_remote_code=trust
        ).eval()
        assert type(model) is BaichuanForCausalLM and not model.is_gradient_checkpointing
        assert model.config.position_embedding_type == position
        ids = random_ids(2, 6)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=0, rtol=0)
    assert type(AutoModel.from_pretrained(directory, dtype=torch.float32)) is BaichuanModel


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_save_load_round_trip(tmp_path: Path, position: str) -> None:
    model = tiny_model(position, z_loss_weight=0.25)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["position_embedding_type"] == position and saved["model_type"] == "baichuan"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.position_embedding_type == position and loaded.config.z_loss_weight == 0.25
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Saving the loaded model again writes the same scheme (round trips are stable).
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["position_embedding_type"] == position


def test_position_scheme_rule() -> None:
    assert BaichuanConfig(max_position_embeddings=4096).position_embedding_type == "rope"
    assert BaichuanConfig().position_embedding_type == "alibi"
    assert BaichuanConfig(position_embedding_type="rope").position_embedding_type == "rope"
    assert BaichuanConfig(
        max_position_embeddings=4096, position_embedding_type="alibi"
    ).position_embedding_type == ("alibi")
    with pytest.raises(Exception, match="position_embedding_type"):
        BaichuanConfig(position_embedding_type="learned")


def test_tokenizer_class_is_exported() -> None:
    assert BaichuanTokenizer.__name__ == "BaichuanTokenizer"


# ----------------------------------------------------------------------------------------------------------------------
# Head, loss, training features
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_norm_head_logits_and_parameter_unchanged(position: str) -> None:
    model = tiny_model(position)
    weight_before = model.lm_head.weight.detach().clone()
    ids = random_ids(2, 5)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    expected = hidden @ (weight_before / weight_before.norm(dim=-1, keepdim=True)).T
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=1e-5)
    assert torch.equal(model.lm_head.weight, weight_before)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert torch.equal(model.lm_head.weight, weight_before) and model.lm_head.weight.grad is not None
    assert not isinstance(model.lm_head, torch.nn.Linear)


def test_loss_is_shifted_cross_entropy_plus_z_loss() -> None:
    model = tiny_model("rope", z_loss_weight=0.1)
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    targets = labels[:, 1:].reshape(-1)
    learned = targets != -100
    ce = F.cross_entropy(logits, targets, ignore_index=-100)
    z = torch.logsumexp(logits[learned], dim=-1).pow(2).mean()
    torch.testing.assert_close(out.loss, ce + 0.1 * z, atol=1e-6, rtol=1e-6)


def test_logits_to_keep() -> None:
    model = tiny_model("alibi")
    ids = random_ids(2, 9)
    with torch.no_grad():
        full = model(ids).logits
        positions = torch.tensor([0, 3, 8])
        kept = model(ids, logits_to_keep=positions).logits
        last_two = model(ids, logits_to_keep=2).logits
    # Same values up to BLAS blocking (a 3-row matmul rounds differently from a 9-row one).
    assert kept.shape == (2, 3, VOCAB) and last_two.shape == (2, 2, VOCAB)
    torch.testing.assert_close(kept, full[:, positions], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(last_two, full[:, -2:], atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_gradient_checkpointing_gives_same_gradients(position: str) -> None:
    model = tiny_model(position).train()
    ids = random_ids(2, 7)
    position_ids = torch.tensor(
        [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]
    )  # packed rows go through it too

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(ids, position_ids=position_ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_qlora_4bit_nf4_with_peft(tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import BitsAndBytesConfig

    source = tiny_model("rope", hidden_size=64, intermediate_size=128)
    source.save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
    )
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.W_pack, bnb.nn.Linear4bit) and isinstance(
        layer.mlp.down_proj, bnb.nn.Linear4bit
    )
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    lm_head = model.get_base_model().lm_head
    assert type(lm_head.weight) is torch.nn.Parameter and not isinstance(lm_head.weight, bnb.nn.Params4bit)
    assert lm_head.weight.shape == (VOCAB, 64)

    ids = random_ids(2, 8)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all("lora_" in n for n in with_grad), sorted(with_grad)
        optimizer.step()
    assert losses[-1] < losses[0] - 0.01, losses


ZERO3_SCRIPT = """
import os, socket, sys, torch
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.utils import safe_get_full_grad
from sft.core.distributed import init_distributed
from tests.test_baichuan_model import random_ids, tiny_model

init_distributed()
position = sys.argv[1]
model = tiny_model(position).train()
ids = random_ids(2, 7)
reference = model(ids, labels=ids)
reference.loss.backward()
reference_grad = model.lm_head.weight.grad.clone()
model.zero_grad(set_to_none=True)
config = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "Adam", "params": {"lr": 0.0, "torch_adam": True}},
}
engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
assert model.lm_head.weight.numel() == 0, "lm_head should be partitioned outside its forward"
out = engine(ids, labels=ids)
engine.backward(out.loss)
torch.testing.assert_close(out.logits, reference.logits.detach(), atol=1e-6, rtol=1e-6)
torch.testing.assert_close(safe_get_full_grad(model.lm_head.weight), reference_grad, atol=1e-6, rtol=1e-6)
print("ZERO3_OK")
"""


@pytest.mark.slow
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_norm_head_under_zero3(position: str) -> None:
    """Under ZeRO-3 the NormHead weight is gathered by its own module's hooks: same logits and lm_head gradient."""
    pytest.importorskip("deepspeed")
    repo_root = Path(__file__).resolve().parent.parent
    # CPU even where a GPU is visible: the reference and the inputs live on the CPU.
    env = {**os.environ, "PYTHONPATH": str(repo_root), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", ZERO3_SCRIPT, position],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "ZERO3_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
