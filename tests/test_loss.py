"""sft.train.objectives.sft: chunked loss sums equal a full-logits reference, and logits_to_keep gives the same loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sft.data.formats import IGNORE_INDEX
from sft.modeling.loading import load_base_model
from sft.train.inputs import kept_targets, learned_positions
from sft.train.objectives.sft import batch_loss_sums, flat_loss_sums, token_loss_sums


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The textbook loss: shift, upcast everything, cross-entropy summed over learned tokens."""
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll.item(), int((targets != IGNORE_INDEX).sum())


def _labels(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :7] = IGNORE_INDEX  # a prompt
    labels[1, :3] = IGNORE_INDEX
    labels[1, 20:] = IGNORE_INDEX  # right padding
    labels[:, 25:27] = IGNORE_INDEX  # a column nobody learns: skipped by logits_to_keep
    return labels


def test_token_loss_sums_matches_reference_in_every_chunking():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 32, 50, generator=gen).to(torch.bfloat16)
    labels = _labels(3, 32, 50)
    ref_nll, ref_tokens = _reference(logits, labels)
    for chunk in (1, 5, 31, 1024):
        nll, tokens = token_loss_sums(logits, labels, chunk_rows=chunk)
        assert tokens.item() == ref_tokens
        assert abs(nll.item() - ref_nll) < 1e-3 * abs(ref_nll)
        assert nll.dtype == torch.float32


def test_kept_positions_give_the_same_loss():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 32, 50, generator=gen)
    labels = _labels(3, 32, 50)
    positions = learned_positions(labels)
    assert 24 not in positions.tolist() and 25 not in positions.tolist()  # predicting labels 25, 26
    kept = logits[:, positions]
    nll, tokens = flat_loss_sums(
        kept.reshape(-1, kept.shape[-1]), kept_targets(labels, positions).reshape(-1)
    )
    ref_nll, ref_tokens = _reference(logits, labels)
    assert tokens.item() == ref_tokens
    assert abs(nll.item() - ref_nll) < 1e-4 * abs(ref_nll)


def test_no_learned_token_gives_zero():
    labels = torch.full((2, 8), IGNORE_INDEX)
    positions = learned_positions(labels)
    assert positions.tolist() == [0]
    nll, tokens = flat_loss_sums(torch.randn(2, 10), kept_targets(labels, positions).reshape(-1))
    assert tokens.item() == 0 and nll.item() == 0.0


def test_model_loss_with_logits_to_keep_equals_full_logits(tiny_llama_dir, tiny_baichuan_dir):
    """Both model families accept a position tensor as logits_to_keep and give the full-logits loss."""
    for model_dir in (tiny_llama_dir, tiny_baichuan_dir):
        model = load_base_model(model_dir, "none", torch.float32)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(2)
        input_ids = torch.randint(3, vocab, (3, 32), generator=gen)
        labels = _labels(3, 32, vocab)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 20:] = 0
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        with torch.no_grad():
            full = model(input_ids=input_ids, attention_mask=attention_mask).logits
            ref_nll, ref_tokens = _reference(full, labels)
            nll, tokens = batch_loss_sums(model, batch, torch.device("cpu"))
        assert tokens.item() == ref_tokens
        assert abs(nll.item() - ref_nll) < 1e-4 * abs(ref_nll), model_dir


def test_peft_methods_loss_matches_the_models_own_loss(tiny_llama_dir, tiny_baichuan_dir):
    """Prompt/p-tuning prepend virtual positions and prefix tuning adds keys/values: our kept-position
    loss must still equal the mean loss the model computes itself from full logits."""
    from peft import get_peft_model

    from sft.train.args import parse_args
    from sft.train.model import build_peft_config

    for model_dir in (tiny_llama_dir, tiny_baichuan_dir):
        for method in ("prompt_tuning", "p_tuning", "prefix_tuning", "lora"):
            args = parse_args(["--peft", method, "--num_virtual_tokens", "3"])
            base = load_base_model(model_dir, "none", torch.float32)
            torch.manual_seed(0)
            model = get_peft_model(base, build_peft_config(args, base)).eval()
            vocab = base.config.vocab_size
            gen = torch.Generator().manual_seed(3)
            input_ids = torch.randint(3, vocab, (2, 16), generator=gen)
            labels = input_ids.clone()
            labels[:, :5] = IGNORE_INDEX
            attention_mask = torch.ones_like(input_ids)
            attention_mask[1, 12:] = 0
            labels[1, 12:] = IGNORE_INDEX
            batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
            with torch.no_grad():
                reference = model(
                    input_ids=input_ids, attention_mask=attention_mask, labels=labels
                ).loss.item()
                nll, tokens = batch_loss_sums(model, batch, torch.device("cpu"))
            assert abs(nll.item() / tokens.item() - reference) < 1e-5, (model_dir.name, method)


def test_flat_loss_with_z_loss_equals_the_baichuan_model_loss(tiny_baichuan_dir):
    """In training, batch_loss_sums takes the z-loss weight from the model's config and gives the model's own
    loss (CE + z-loss); the head-on-learned-pairs path yields gradients equal to the full-logits loss's
    gradients. In evaluation it is pure NLL."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(tiny_baichuan_dir, "none", torch.float32)
    base.config.z_loss_weight = 0.5
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["W_pack", "o_proj"], init_lora_weights=False)
    ).train()
    vocab = base.config.vocab_size
    input_ids = torch.randint(3, vocab, (3, 32), generator=torch.Generator().manual_seed(4))
    labels = _labels(3, 32, vocab)
    batch = {"input_ids": input_ids, "labels": labels}

    reference = model(input_ids=input_ids, labels=labels).loss
    reference.backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    total, tokens = batch_loss_sums(model, batch, torch.device("cpu"))
    (total / tokens).backward()
    assert abs((total / tokens).item() - reference.item()) < 1e-5
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    model.eval()
    with torch.no_grad():
        nll, n = batch_loss_sums(model, batch, torch.device("cpu"))
        plain = torch.nn.functional.cross_entropy(
            model(input_ids=input_ids).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
        )
    assert n == tokens and abs(nll.item() - plain.item()) < 1e-3 and nll.item() < total.item()
