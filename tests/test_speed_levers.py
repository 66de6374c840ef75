"""Speed levers that must not change the numbers (CPU): each one gives the same logits / loss / gradients on and off.

- the fused linear + cross-entropy loss (`sft.train.objectives.sft.linear_loss_sums`, the default head loss of `batch_loss_sums`);
- right-padded batches sent without their attention mask, so SDPA runs plain causal attention;
- the cached normalised weight of Baichuan2's NormHead while it is frozen.

`--liger` and `--torch_compile` have their own tests (tests/test_kernels.py); their GPU runs are in tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sft.data.formats import IGNORE_INDEX
from sft.modeling.loading import load_base_model
from sft.train.inputs import padding_mask_needed, right_padded_only
from sft.train.objectives.sft import batch_loss_sums, flat_loss_sums, linear_loss_sums, token_loss_sums

CPU = torch.device("cpu")


def _targets(n: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::3] = IGNORE_INDEX
    return targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_loss_weight", [0.0, 0.3])
def test_linear_loss_sums_equals_the_logits_loss(dtype: torch.dtype, z_loss_weight: float) -> None:
    """Same sum, count and gradient with respect to the head's input as F.linear + flat_loss_sums, in any chunking."""
    gen = torch.Generator().manual_seed(0)
    n, hidden_size, vocab = 37, 16, 300
    hidden = torch.randn(n, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.3).to(dtype)
    targets = _targets(n, vocab, 1)

    ref_in = hidden.clone().requires_grad_(True)
    ref_sum, ref_n = flat_loss_sums(F.linear(ref_in, weight), targets, z_loss_weight=z_loss_weight)
    (ref_sum * 0.7).backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for chunk_rows in (1, 8, 1024):
        got_in = hidden.clone().requires_grad_(True)
        got_sum, got_n = linear_loss_sums(
            got_in, weight, targets, z_loss_weight=z_loss_weight, chunk_rows=chunk_rows
        )
        (got_sum * 0.7).backward()
        assert got_n.item() == ref_n.item() == n - len(range(0, n, 3))
        assert got_sum.dtype == torch.float32
        torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_in.grad.float(), ref_in.grad.float(), **tol)
        assert torch.all(got_in.grad[::3] == 0)  # ignored rows get no gradient
    with torch.no_grad():  # evaluation: the same sum, no gradient buffers
        torch.testing.assert_close(linear_loss_sums(hidden, weight, targets)[0], flat_loss_sums(
            F.linear(hidden, weight), targets)[0], rtol=1e-5, atol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="frozen"):
        linear_loss_sums(hidden, weight.clone().requires_grad_(True), targets)


def _lora(model_dir, *, z_loss_weight: float = 0.0, attn: str = "sdpa"):
    from peft import LoraConfig, get_peft_model

    from sft.train.model import find_lora_targets

    base = load_base_model(model_dir, "none", torch.float32, attn_implementation=attn)
    if z_loss_weight:
        base.config.z_loss_weight = z_loss_weight
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=find_lora_targets(base), init_lora_weights=False, lora_dropout=0.0
    )
    return get_peft_model(base, config).train()


def _padded_batch(vocab: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """Three right-padded rows (lengths 24, 17, 9), position_ids 0..T-1 as the PaddedCollator sends them."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, 24), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompts
    for row, length in enumerate((24, 17, 9)):
        attention_mask[row, length:] = 0
        labels[row, length:] = IGNORE_INDEX
        input_ids[row, length:] = 0
    position_ids = torch.arange(24).expand(3, 24).clone()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["baichuan", "llama"])
def test_fused_head_loss_equals_the_logits_path(family, tiny_baichuan_dir, tiny_llama_dir) -> None:
    """batch_loss_sums with the fused head loss (default) = the logits path: sums, counts, LoRA gradients.
    Baichuan2 with its z-loss (NormHead: the normalised weight), Llama with a plain linear head."""
    model_dir = tiny_baichuan_dir if family == "baichuan" else tiny_llama_dir
    model = _lora(model_dir, z_loss_weight=0.2 if family == "baichuan" else 0.0)
    batch = _padded_batch(model.config.vocab_size)
    results = {}
    for head_loss in ("logits", "fused"):
        model.zero_grad(set_to_none=True)
        total, tokens = batch_loss_sums(model, batch, CPU, head_loss=head_loss)
        (total / tokens).backward()
        results[head_loss] = (total.item(), tokens.item(), _grads(model))
    assert results["fused"][1] == results["logits"][1] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert results["fused"][0] == pytest.approx(results["logits"][0], rel=1e-6)
    for name, grad in results["logits"][2].items():
        torch.testing.assert_close(results["fused"][2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# Right-padded batches without an attention mask
# ----------------------------------------------------------------------------------------------------------------------


def test_right_padding_rule() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    positions = torch.arange(4).expand(3, 4)
    assert right_padded_only(mask, positions) and right_padded_only(mask, None)
    assert not right_padded_only(torch.tensor([[0, 1, 1, 1]]), None)  # left padding (generation)
    assert not right_padded_only(torch.tensor([[1, 0, 1, 1]]), None)  # a hole
    assert not right_padded_only(torch.ones(1, 4), torch.tensor([[0, 1, 0, 1]]))  # packed documents


class _SdpaSpy:
    """Records what every F.scaled_dot_product_attention call receives, then calls the real function."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool]] = []  # (mask passed, is_causal)
        self.real = F.scaled_dot_product_attention

    def __call__(self, *args, attn_mask=None, is_causal=False, **kwargs):
        self.calls.append((attn_mask is not None, bool(is_causal)))
        return self.real(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)


@pytest.mark.parametrize("family", ["baichuan", "baichuan_alibi", "llama"])
def test_right_padded_batches_need_no_mask(
    family, tiny_baichuan_dir, tiny_baichuan_alibi_dir, tiny_llama_dir, monkeypatch
) -> None:
    """Without the mask, every real token's logits equal those computed with it (pads may differ: no label);
    batch_loss_sums drops it and gives the masked forward's loss and gradients; SDPA then gets no mask and
    is_causal=True (RoPE models; ALiBi always passes its bias). Left-padded batches keep the mask."""
    model_dir = {
        "baichuan": tiny_baichuan_dir,
        "baichuan_alibi": tiny_baichuan_alibi_dir,
        "llama": tiny_llama_dir,
    }
    model = _lora(model_dir[family])
    batch = _padded_batch(model.config.vocab_size)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        unmasked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(unmasked[real], masked[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        unmasked[~real], masked[~real], atol=1e-3
    )  # the pads did change: the mask mattered

    # Reference: the loss of the masked forward's full logits, and its gradients.
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ref_sum, ref_n = token_loss_sums(out.logits, batch["labels"])
    (ref_sum / ref_n).backward()
    ref_grads = _grads(model)

    assert not padding_mask_needed(model, batch)
    spy = _SdpaSpy()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model.zero_grad(set_to_none=True)
    total, tokens = batch_loss_sums(model, batch, CPU)
    (total / tokens).backward()
    assert tokens == ref_n and total.item() == pytest.approx(ref_sum.item(), rel=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    n_layers = model.config.num_hidden_layers
    if family == "baichuan_alibi":
        assert spy.calls[:n_layers] == [(True, False)] * n_layers  # the ALiBi bias is a mask argument
    else:
        assert spy.calls[:n_layers] == [(False, True)] * n_layers  # plain causal: FlashAttention-eligible

    left = dict(batch, attention_mask=batch["attention_mask"].flip(-1))
    assert padding_mask_needed(model, left)
    eager = _lora(model_dir[family], attn="eager")
    assert padding_mask_needed(eager, batch)  # only SDPA drops it


# ----------------------------------------------------------------------------------------------------------------------
# Baichuan2's NormHead: normalised weight cached while frozen
# ----------------------------------------------------------------------------------------------------------------------


def _baichuan(tiny_baichuan_dir):
    return load_base_model(tiny_baichuan_dir, "none", torch.float32).eval()


def test_norm_head_cache_gives_the_uncached_logits_and_follows_the_weight(tiny_baichuan_dir) -> None:
    model = _baichuan(tiny_baichuan_dir)
    model.requires_grad_(False)
    head = model.lm_head
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))

    def uncached_logits() -> torch.Tensor:
        head.cache_normalized_weight = False
        try:
            return model(ids).logits
        finally:
            head.cache_normalized_weight = True

    with torch.no_grad():
        first = model(ids).logits
        cached = head.linear_weight(torch.float32)
        assert head.linear_weight(torch.float32) is cached  # a hit: not recomputed
        torch.testing.assert_close(first, uncached_logits(), rtol=0, atol=0)
        torch.testing.assert_close(cached, F.normalize(head.weight, dim=-1), rtol=0, atol=0)

        head.weight.add_(
            torch.randn_like(head.weight)
        )  # an in-place change (load_state_dict, an optimizer step)
        changed = model(ids).logits
        assert not torch.allclose(changed, first)
        torch.testing.assert_close(changed, uncached_logits(), rtol=0, atol=0)

    assert all("normalized" not in key for key in model.state_dict())
    model.to(torch.bfloat16)  # new storage and dtype
    with torch.no_grad():
        assert head.linear_weight(torch.bfloat16).dtype == torch.bfloat16
        torch.testing.assert_close(model(ids).logits, uncached_logits(), rtol=0, atol=0)


def test_norm_head_is_not_cached_while_trained_or_made_under_inference_mode(tiny_baichuan_dir) -> None:
    model = _baichuan(tiny_baichuan_dir)
    head = model.lm_head
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()  # the head trains: no cache, its gradient flows
    assert head._normalized is None and head.weight.grad is not None and head.weight.grad.abs().sum() > 0

    model.requires_grad_(False)
    with torch.inference_mode():
        model(ids)  # the cache is built here ...
    assert head._normalized is not None and not head._normalized[1].is_inference()
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    model(ids, labels=ids).loss.backward()  # ... and can be saved for a training backward afterwards
    assert embeddings.weight.grad.abs().sum() > 0
