"""Packed batches of several rows: no document attends to another, under every attention implementation.

transformers 5.23 separates packed documents from ``position_ids`` for eager and SDPA attention, but its
FlashAttention path only does so for a batch of one row, unless the batch's sequence boundaries are passed
(``cu_seq_lens_q/k``, ``max_length_q/k``). The collators compute them on the host and
``sft.train.inputs.model_inputs`` passes them. flash-attn needs CUDA, so the FlashAttention case runs transformers'
own FlashAttention dispatch (``_flash_attention_forward``) with PyTorch reference kernels in place of the
flash-attn package: that checks which kernel transformers picks and the tensors it hands it.

Our Baichuan2 builds its attention layout from the same boundaries without reading anything back from the
device (checked with meta tensors, on which any read-back raises); the logits are the same with and without.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.baichuan.modeling_baichuan import _flash_alibi_slopes, alibi_slopes, build_attention_layout
from sft.data.batching import PackedCollator, PackedRows, PaddedCollator, sequence_boundaries
from sft.data.dataset import SFTDataset
from sft.data.formats import IGNORE_INDEX
from sft.modeling.loading import load_base_model
from sft.train.inputs import model_inputs
from sft.train.objectives.sft import batch_loss_sums
from tests.test_baichuan_model import HIDDEN, tiny_config, tiny_model

CPU = torch.device("cpu")
DOC_LENGTHS = (9, 5, 12, 7, 4, 10, 6)


def _documents(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random documents whose first tokens are a prompt (labels -100)."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in DOC_LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        docs.append((ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return docs


def _packed_batch(
    docs: list[tuple[list[int], list[int]]], row_size: int = 24
) -> tuple[dict, list[list[int]]]:
    """One batch of every packed row (at least 2 rows, at least 2 documents in some row) and the rows' documents."""
    rows = PackedRows(SFTDataset.from_samples(docs, {}), row_size)
    assert len(rows) >= 2 and max(len(r) for r in rows.rows) >= 2
    batch = PackedCollator(pad_token_id=0, max_len=row_size)([rows[r] for r in range(len(rows))])
    return batch, rows.rows


def _padded_batch(docs: list[tuple[list[int], list[int]]]) -> dict:
    items = [{"input_ids": np.array(ids), "labels": np.array(labels)} for ids, labels in docs]
    return PaddedCollator(pad_token_id=0)(items)


def _check_against_documents(model, batch: dict, rows: list[list[int]], docs) -> None:
    """Per-token logits and the loss of the packed batch equal those of the documents run one by one."""
    with torch.no_grad():
        packed = model(**model_inputs(model, batch, CPU), use_cache=False).logits
        nll, tokens = batch_loss_sums(model, batch, CPU)
        reference_nll, reference_tokens = 0.0, 0
        for r, row in enumerate(rows):
            start = 0
            for d in row:
                ids, labels = docs[d]
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start : start + len(ids)], alone, atol=2e-5, rtol=1e-4)
                target = torch.tensor(labels[1:])
                reference_nll += F.cross_entropy(
                    alone[:-1], target, ignore_index=IGNORE_INDEX, reduction="sum"
                )
                reference_tokens += int((target != IGNORE_INDEX).sum())
                start += len(ids)
    assert int(tokens) == reference_tokens
    assert float(nll) == pytest.approx(float(reference_nll), rel=1e-5)


def test_boundaries_are_the_split_transformers_expects():
    """The collators' cu_seq_lens/max_length are what transformers derives for a one-row packed batch."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    docs = _documents(100)
    packed, _ = _packed_batch(docs)
    for batch in (packed, _padded_batch(docs)):
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(
            batch["position_ids"].flatten()[None]
        )
        assert torch.equal(batch["cu_seq_lens"], cu_q) and torch.equal(batch["cu_seq_lens"], cu_k)
        assert int(batch["max_length"]) == int(max_q) == int(max_k)
    # Packed: one sequence per document plus each row's padding tail; padded: one per row.
    assert packed["cu_seq_lens"].numel() - 1 > packed["input_ids"].shape[0]
    padded = _padded_batch(docs)
    width = padded["input_ids"].shape[1]
    assert padded["cu_seq_lens"].tolist() == list(range(0, padded["input_ids"].numel() + 1, width))
    assert sequence_boundaries(torch.tensor([[0, 1, 0, 1, 2, 0]]))[0].tolist() == [0, 2, 5, 6]


# ----------------------------------------------------------------------------------------------------------------------
# Llama (transformers): eager, SDPA, and FlashAttention's dispatch with reference kernels
# ----------------------------------------------------------------------------------------------------------------------


def _reference_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func in PyTorch: (B, T, H, D) inputs, each row one sequence."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        scale=softmax_scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def _reference_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
):
    """flash_attn_varlen_func in PyTorch: (N, H, D) inputs split into sequences by cu_seqlens (int32, as flash-attn
    requires; max_seqlen a Python int)."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and cu_seqlens_q.device == q.device
    assert isinstance(max_seqlen_q, int) and max_seqlen_q == int(cu_seqlens_q.diff().max())
    assert int(cu_seqlens_q[-1]) == q.shape[0] and torch.equal(cu_seqlens_q, cu_seqlens_k)
    out = torch.empty_like(q)
    for start, end in itertools.pairwise(cu_seqlens_q.tolist()):
        out[start:end] = _reference_flash_attn_func(
            q[None, start:end],
            k[None, start:end],
            v[None, start:end],
            softmax_scale=softmax_scale,
            causal=causal,
        )[0]
    return out


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flash_attention_2"])
def test_packed_llama_rows_equal_documents_one_by_one(tiny_llama_dir, monkeypatch, implementation):
    model = load_base_model(
        tiny_llama_dir,
        "none",
        torch.float32,
        attn_implementation="sdpa" if implementation != "eager" else "eager",
    ).eval()
    if implementation == "flash_attention_2":
        import transformers.modeling_flash_attention_utils as fa_utils

        # transformers' FlashAttention dispatch, with reference kernels in place of the CUDA-only flash-attn package;
        # every global it caches is restored after the test.
        for name in (
            "_loaded_implementation",
            "_flash_fn",
            "_flash_varlen_fn",
            "_flash_with_kvcache_fn",
            "_pad_fn",
            "_unpad_fn",
            "_process_flash_kwargs_fn",
            "_process_with_kvcache_kwargs_fn",
        ):
            monkeypatch.setattr(fa_utils, name, getattr(fa_utils, name))
        monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
        kernels = (
            _reference_flash_attn_func,
            _reference_flash_attn_varlen_func,
            None,
            fa_utils._pad_input,
            fa_utils._unpad_input,
        )
        monkeypatch.setattr(fa_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
        model.config._attn_implementation = "flash_attention_2"
    docs = _documents(model.config.vocab_size)
    batch, rows = _packed_batch(docs)
    _check_against_documents(model, batch, rows, docs)


# ----------------------------------------------------------------------------------------------------------------------
# Baichuan2: layouts from the host's boundaries
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_baichuan_host_boundaries_change_no_logit(position, implementation):
    """Packed rows equal the documents alone, and packed or padded, the logits and loss are the same with the
    host's boundaries as with the ones the model finds itself."""
    model = tiny_model(position, implementation)
    docs = _documents(model.config.vocab_size)
    packed, rows = _packed_batch(docs)
    _check_against_documents(model, packed, rows, docs)
    for batch in (packed, _padded_batch(docs)):
        without = {k: v for k, v in batch.items() if k not in ("cu_seq_lens", "max_length")}
        inputs, inputs_without = model_inputs(model, batch, CPU), model_inputs(model, without, CPU)
        assert "cu_seq_lens_q" in inputs and "cu_seq_lens_q" not in inputs_without
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, model(**inputs_without).logits, atol=0, rtol=0)
            assert batch_loss_sums(model, batch, CPU) == batch_loss_sums(model, without, CPU)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_baichuan_layout_reads_nothing_back_from_the_device(position):
    """With the host's boundaries, building the layout is device work only: it runs on meta tensors, where any
    read-back (`.item()`, `bool()`, `nonzero`) raises. FlashAttention gets the boundaries it would compute itself."""
    config = tiny_config(position)
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])
    cu_seq_lens, max_length = sequence_boundaries(position_ids)
    meta = torch.device("meta")
    x = torch.zeros(2, 6, HIDDEN, device=meta)
    padding = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], device=meta)
    for implementation in ("sdpa", "eager", "flash_attention_2"):
        config._attn_implementation = implementation
        masks = (None, padding) if implementation != "flash_attention_2" else (None,)
        for mask in masks:
            build_attention_layout(
                config,
                x,
                mask,
                position_ids.to(meta),
                0,
                cu_seq_lens=cu_seq_lens.to(meta),
                max_length=max_length,
            )
        with pytest.raises(RuntimeError, match="meta"):  # without them the model must look at the positions
            build_attention_layout(config, x, None, position_ids.to(meta), 0)

    config._attn_implementation = "flash_attention_2"
    x = torch.zeros(2, 6, HIDDEN)
    found = build_attention_layout(config, x, None, position_ids, 0)
    given = build_attention_layout(
        config, x, None, position_ids, 0, cu_seq_lens=cu_seq_lens, max_length=max_length
    )
    assert (
        torch.equal(found.cu_seqlens_q, given.cu_seqlens_q) and found.max_seqlen_q == given.max_seqlen_q == 6
    )
    assert torch.equal(found.query_indices, torch.arange(12)) and given.query_indices is None  # every token
    for heads in (4, 5, 12, 40):  # FlashAttention's ALiBi slopes, made on the device
        slopes = _flash_alibi_slopes(
            tiny_config("alibi", num_attention_heads=heads, hidden_size=8 * heads), CPU
        )
        torch.testing.assert_close(slopes, torch.tensor(alibi_slopes(heads)), atol=0, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# sft.train.attention: SDPA one document at a time
# ----------------------------------------------------------------------------------------------------------------------


def _loss_and_grads(model, batch: dict) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    nll, tokens = batch_loss_sums(model, batch, CPU)
    (nll / tokens).backward()
    return float(nll.detach()), [p.grad.clone() for p in model.parameters()]


def test_document_sdpa_equals_masked_sdpa_and_is_what_training_uses(tmp_path_factory):
    """A packed batch and a right-padded batch: document SDPA gives transformers' masked SDPA's loss and gradients
    (grouped-query attention, so the kernel's GQA path is used too); packed logits equal the documents' run one by
    one; the training loader switches a transformers model to it on the CPU."""
    from models.tiny import build_tiny_llama
    from sft.train.args import TrainArgs
    from sft.train.attention import DOCUMENT_SDPA, use_document_sdpa
    from sft.train.model import load_model_for_training

    model_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_gqa"), num_heads=4, num_kv_heads=2)
    masked = load_base_model(model_dir, "none", torch.float32, attn_implementation="sdpa").train()
    documents = load_base_model(model_dir, "none", torch.float32, attn_implementation="sdpa").train()
    assert use_document_sdpa(documents) and documents.config._attn_implementation == DOCUMENT_SDPA
    docs = _documents(masked.config.vocab_size)
    packed, rows = _packed_batch(docs)
    for batch in (packed, _padded_batch(docs)):
        expected_loss, expected_grads = _loss_and_grads(masked, batch)
        loss, grads = _loss_and_grads(documents, batch)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    _check_against_documents(documents.eval(), packed, rows, docs)

    args = TrainArgs(
        model_name_or_path=str(model_dir), quantization="none", precision="fp32", lora_dropout=0.0
    )
    trained = load_model_for_training(args, CPU)
    assert trained.get_base_model().config._attn_implementation == DOCUMENT_SDPA
    assert not use_document_sdpa(tiny_model("rope"))  # our Baichuan2 keeps its own packed layout
