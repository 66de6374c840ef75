"""Preference alignment (--objective dpo|orpo|simpo) on a tiny Llama, in process.

- the losses equal a hand computation from log-probs computed separately, one sequence at a time with full
  fp32 logits;
- a fresh LoRA (B = 0) makes the first DPO loss ln 2 and every reward 0, on a 4-bit base too;
- packed and padded batches of the same pairs give the same losses and gradients;
- precomputed reference log-probs equal the live reference;
- preference records: both forms read alike, bad records fail with file:line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sft.data.batching import build_dataloader, build_eval_dataloader
from sft.data.formats import IGNORE_INDEX, DataFormatError
from sft.data.preference import load_preference_dataset, normalize_preference
from sft.data.templates import get_template
from sft.modeling.loading import load_base_model, load_tokenizer
from sft.train.attention import shares_prompts, use_document_sdpa
from sft.train.objectives.preference import (
    PreferenceObjective,
    dpo_loss,
    orpo_loss,
    reference_mode,
    sequence_logps,
    simpo_loss,
)
from sft.train.reference import pair_logps

CPU = torch.device("cpu")

PAIRS = [
    ("你叫什么名字？", "俺老孙便是齐天大圣孙悟空！", "我不知道。"),
    ("你的兵器是什么？", "如意金箍棒，重一万三千五百斤。", "一把剑。"),
    ("What is your name?", "I am the Monkey King.", "Nobody."),
    ("Where do you live?", "On the Mountain of Flowers and Fruit.", "In a house."),
    ("你住在哪里？", "花果山水帘洞，俺的老家。", "城里。"),
]


def write_pairs(path, n: int = len(PAIRS)) -> None:
    """TRL-form records with a system field; the first one has a two-round history."""
    lines = []
    for i in range(n):
        q, chosen, rejected = PAIRS[i % len(PAIRS)]
        prompt = [{"role": "user", "content": q}]
        if i == 0:
            prompt = [
                {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "俺老孙来也。"},
                *prompt,
            ]
        lines.append({"system": "你是孙悟空。", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")


@pytest.fixture(scope="module")
def pairs_setup(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    write_pairs(root / "pairs.jsonl")
    tokenizer = load_tokenizer(tiny_llama_dir)
    template = get_template("llama2", tokenizer)
    dataset = load_preference_dataset(
        root / "pairs.jsonl", template, tokenizer, max_len=96, max_src_len=64, is_skip=False
    )
    return {"root": root, "tokenizer": tokenizer, "dataset": dataset}


def lora_model(
    model_dir, *, quantization: str = "none", init_b: bool = True, seed: int = 0, document_sdpa: bool = False
):
    """The tiny model with a LoRA adapter; ``init_b`` gives B random values (a trained-looking adapter);
    ``document_sdpa``: attending as train.py's CPU path does (what reads shared prompts)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_base_model(model_dir, quantization, torch.float32)
    if document_sdpa:
        assert use_document_sdpa(base)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    model = get_peft_model(base, config)
    if init_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return model


def test_every_pair_skipped_names_the_file_the_reasons_and_the_fix(pairs_setup):
    path = pairs_setup["root"] / "pairs.jsonl"
    template = get_template("llama2", pairs_setup["tokenizer"])
    with pytest.raises(ValueError) as caught:
        load_preference_dataset(
            path, template, pairs_setup["tokenizer"], max_len=12, max_src_len=8, is_skip=True
        )
    message = str(caught.value)
    assert message.startswith(f"no pairs left from {path}: every pair was skipped ({len(PAIRS)} "), message
    assert "system prompt alone longer than --max_src_len" in message, message
    assert message.endswith("raise --max_src_len (or shorten the system prompts)"), message


def one_batch(dataset, pad_id: int, *, packing: bool, max_len: int = 96) -> dict:
    loader = build_eval_dataloader(
        dataset,
        batch_size=len(dataset),
        rank=0,
        world_size=1,
        pad_token_id=pad_id,
        packing=packing,
        max_len=max_len,
    )
    (batch,) = list(loader)
    return batch


def hand_logps(model, dataset) -> torch.Tensor:
    """(pairs, 2) summed log-probs of each reply, one sequence at a time, full fp32 logits."""
    out = torch.zeros(len(dataset), 2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(dataset)):
            arrays = dataset.arrays(i)
            for k in range(2):
                ids = torch.as_tensor(arrays[2 * k], dtype=torch.long)[None]
                labels = torch.as_tensor(arrays[2 * k + 1], dtype=torch.long)[None]
                logits = model(input_ids=ids).logits.float()
                logp = F.log_softmax(logits[0, :-1], dim=-1)
                targets = labels[0, 1:]
                learned = targets != IGNORE_INDEX
                out[i, k] = logp[learned].gather(1, targets[learned][:, None]).sum().double()
    return out


def test_losses_equal_a_hand_computation():
    """The formulas, from log-probs given directly (TRL's definitions)."""
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(6, generator=gen, dtype=torch.float64) * 20 for _ in range(4))
    beta = 0.3
    h = (pc - pr) - (rc - rr)
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert torch.allclose(losses, -torch.log(torch.sigmoid(beta * h)))
    assert torch.allclose(r_c, beta * (pc - rc)) and torch.allclose(r_r, beta * (pr - rr))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.2)
    assert torch.allclose(
        losses, -0.8 * torch.log(torch.sigmoid(beta * h)) - 0.2 * torch.log(torch.sigmoid(-beta * h))
    )
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, kind="ipo")
    assert torch.allclose(losses, (h - 1 / (2 * beta)) ** 2)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, kind="hinge")
    assert torch.allclose(losses, torch.clamp(1 - beta * h, min=0))
    mc, mr = pc / 10, pr / 7
    losses, r_c, _ = simpo_loss(mc, mr, beta=2.0, gamma=0.5)
    assert torch.allclose(losses, -torch.log(torch.sigmoid(2.0 * (mc - mr) - 0.5)))
    assert torch.allclose(r_c, 2.0 * mc)
    losses, _, _ = orpo_loss(mc, mr, beta=beta)
    odds = lambda m: m - torch.log(1 - torch.exp(m))  # noqa: E731 (log odds of p = exp(m))
    assert torch.allclose(losses, -mc - beta * torch.log(torch.sigmoid(odds(mc) - odds(mr))))


@pytest.mark.parametrize(
    "name,loss", [("dpo", "sigmoid"), ("dpo", "ipo"), ("dpo", "hinge"), ("orpo", ""), ("simpo", "")]
)
def test_objective_equals_hand_computation_from_separate_logps(tiny_llama_dir, pairs_setup, name, loss):
    """The objective's per-pair losses, from one padded forward of all pairs, equal the formulas applied to
    log-probs computed one sequence at a time (the reference: the adapter disabled)."""
    dataset, pad = pairs_setup["dataset"], pairs_setup["tokenizer"].pad_token_id
    model = lora_model(tiny_llama_dir).eval()
    batch = one_batch(dataset, pad, packing=False)
    objective = PreferenceObjective(
        name, beta=0.5, loss=loss or "sigmoid", gamma=0.3, ftx=0.1 if name != "orpo" else 0
    )
    with torch.no_grad():
        terms = objective.pair_terms(model, batch, CPU)
    policy = hand_logps(model, dataset)
    with model.disable_adapter():
        ref = hand_logps(model, dataset)
    tokens = torch.tensor(
        [
            [(dataset.arrays(i)[2 * k + 1][1:] != IGNORE_INDEX).sum() for k in range(2)]
            for i in range(len(dataset))
        ],
        dtype=torch.float64,
    )
    mean = policy / tokens
    if name == "dpo" and loss == "ipo":
        expected, _, _ = dpo_loss(mean[:, 0], mean[:, 1], *(ref / tokens).unbind(1), beta=0.5, kind="ipo")
    elif name == "dpo":
        expected, _, _ = dpo_loss(*policy.unbind(1), *ref.unbind(1), beta=0.5, kind=loss)
    elif name == "simpo":
        expected, _, _ = simpo_loss(mean[:, 0], mean[:, 1], beta=0.5, gamma=0.3)
    else:
        expected, _, _ = orpo_loss(mean[:, 0], mean[:, 1], beta=0.5)
    if name != "orpo":
        expected = expected - 0.1 * mean[:, 0]
    assert torch.allclose(terms["losses"].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_fresh_lora_first_dpo_loss_is_ln2_and_rewards_are_zero(tiny_llama_dir, pairs_setup, quantization):
    """B = 0: the policy is the reference exactly, in training mode too (LoRA dropout multiplies B = 0)."""
    dataset, pad = pairs_setup["dataset"], pairs_setup["tokenizer"].pad_token_id
    model = lora_model(tiny_llama_dir, quantization=quantization, init_b=False).train()
    batch = one_batch(dataset, pad, packing=False)
    objective = PreferenceObjective("dpo")
    loss, metrics = objective.loss_sums(model, batch, CPU)
    n = objective.count(batch)
    assert n == len(dataset)
    assert loss.item() / n == pytest.approx(math.log(2), rel=1e-7)
    assert metrics["rewards_chosen"].item() == 0 and metrics["rewards_rejected"].item() == 0
    assert metrics["reward_accuracy"].item() == 0 and metrics["reward_margin"].item() == 0


def _loss_and_grads(model, objective, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, metrics = objective.loss_sums(model, batch, CPU)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return torch.stack([loss.detach(), *(v.detach() for v in metrics.values())]), grads


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo"])
def test_packed_pairs_equal_padded_pairs(tiny_llama_dir, pairs_setup, name):
    """The same pairs packed into rows of 2 x max_len (several pairs a row) or padded one sequence a row: the
    same loss, metrics and LoRA gradients (1e-6)."""
    dataset, pad = pairs_setup["dataset"], pairs_setup["tokenizer"].pad_token_id
    model = lora_model(tiny_llama_dir).train()
    objective = PreferenceObjective(name, beta=0.5)
    padded = one_batch(dataset, pad, packing=False)
    packed = one_batch(dataset, pad, packing=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # pairs share rows
    assert sorted(packed["pair_index"].tolist()) == sorted(padded["pair_index"].tolist())
    # Same pair order in both batches, so the per-pair sums line up.
    order = packed["pair_index"].tolist()
    padded = one_batch_in_order(dataset, pad, order)
    loss_a, grads_a = _loss_and_grads(model, objective, padded)
    loss_b, grads_b = _loss_and_grads(model, objective, packed)
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_pairs_sharing_their_prompt_equal_padded_pairs(tiny_llama_dir, pairs_setup, name):
    """Packed rows where each pair's rejected reply is a branch of its chosen sequence (the prompt computed once):
    the same loss, metrics and LoRA gradients as padded pairs, for fewer tokens."""
    dataset, pad = pairs_setup["dataset"], pairs_setup["tokenizer"].pad_token_id
    assert shares_prompts(str(tiny_llama_dir), "auto", CPU)
    model = lora_model(tiny_llama_dir, document_sdpa=True).train()
    objective = PreferenceObjective(name, beta=0.5)
    plain = one_batch(dataset, pad, packing=True)
    dataset.share_prompt = True
    try:
        shared = one_batch(dataset, pad, packing=True)
    finally:
        dataset.share_prompt = False
    assert "doc_prefix" in shared and "doc_prefix" not in plain
    assert (shared["labels"] != IGNORE_INDEX).sum() == (plain["labels"] != IGNORE_INDEX).sum()
    prompt = sum(int(n) for n in shared["doc_prefix"])
    assert (shared["input_ids"] != pad).sum() < (plain["input_ids"] != pad).sum() - prompt // 2
    padded = one_batch_in_order(dataset, pad, shared["pair_index"].tolist())
    loss_a, grads_a = _loss_and_grads(model, objective, padded)
    loss_b, grads_b = _loss_and_grads(model, objective, shared)
    # Relative 1e-6: the padded batch attends by SDPA's causal kernel, the branches through an explicit mask.
    assert loss_b[0].item() == pytest.approx(loss_a[0].item(), rel=1e-6)
    assert torch.allclose(loss_a[1:], loss_b[1:], atol=1e-5)  # the rewards' sums
    a, b = torch.cat([g.flatten() for g in grads_a]), torch.cat([g.flatten() for g in grads_b])
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_a_shared_prompt_batch_is_refused_by_another_attention(tiny_llama_dir, pairs_setup):
    dataset, pad = pairs_setup["dataset"], pairs_setup["tokenizer"].pad_token_id
    dataset.share_prompt = True
    try:
        shared = one_batch(dataset, pad, packing=True)
    finally:
        dataset.share_prompt = False
    with pytest.raises(ValueError, match="shares prompts between documents"):
        PreferenceObjective("dpo").loss_sums(lora_model(tiny_llama_dir), shared, CPU)


def one_batch_in_order(dataset, pad: int, order: list[int]) -> dict:
    from sft.data.preference import PairCollator, _Pairs

    items = _Pairs(dataset)
    return PairCollator(dataset, pad, packed=False)([items[i] for i in order])


def test_precomputed_reference_equals_live_reference(tiny_llama_dir, pairs_setup):
    """One pass before training (the starting policy, adapter on: B = 0) gives what the live reference (the
    adapter disabled) gives in the steps, and the loss with either is the same."""
    dataset, pad = pairs_setup["dataset"], pairs_setup["tokenizer"].pad_token_id
    model = lora_model(tiny_llama_dir, init_b=False).train()
    objective = PreferenceObjective("dpo")
    stored = pair_logps(model, dataset, batch_size=2, pad_token_id=pad, packing=True, max_len=96, device=CPU)
    assert model.training  # the pass leaves the model as it found it
    batch = one_batch(dataset, pad, packing=False)
    with reference_mode(model, adapter=False):
        live, _ = sequence_logps(model, batch, CPU)
    live = live.view(-1, 2).double().numpy()
    np.testing.assert_allclose(stored[batch["pair_index"].numpy()], live, rtol=1e-5, atol=1e-5)
    # Now with B != 0 (a trained step later): the stored reference still gives the live reference's loss.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    loss_live, _ = objective.loss_sums(model, batch, CPU)
    dataset.ref_logps = stored
    try:
        loss_stored, _ = objective.loss_sums(model, one_batch(dataset, pad, packing=False), CPU)
    finally:
        dataset.ref_logps = None
    assert loss_stored.item() == pytest.approx(loss_live.item(), rel=1e-5)


def test_training_batches_of_pairs_cover_every_pair_once(pairs_setup):
    dataset, pad = pairs_setup["dataset"], pairs_setup["tokenizer"].pad_token_id
    for packing in (False, True):
        loader = build_dataloader(
            dataset, batch_size=2, packing=packing, max_len=96, shuffle=True, seed=3, group_by_length=False,
            rank=0, world_size=1, pad_token_id=pad,
        )  # fmt: skip
        seen = sorted(i for batch in loader for i in batch["pair_index"].tolist())
        assert seen[: len(dataset)] == list(range(len(dataset))) or set(seen) == set(range(len(dataset)))
        for batch in loader:
            seqs = batch["seq_ids"][batch["seq_ids"] >= 0].unique()
            assert seqs.tolist() == list(range(2 * len(batch["pair_index"])))


def test_both_record_forms_read_alike(tmp_path):
    trl = {
        "system": "S",
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": "B",
    }
    ours = {
        "system": "S",
        "conversations": [{"role": "user", "content": "Q"}],
        "chosen": "A",
        "rejected": {"role": "assistant", "content": "B"},
    }
    in_prompt = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "chosen": "A",
        "rejected": "B",
    }
    results = [normalize_preference(r, source="f", line=1) for r in (trl, ours, in_prompt)]
    assert results[0] == results[1] == results[2]
    assert results[0] == ({"system": "S", "conversations": [{"role": "user", "content": "Q"}]}, "A", "B")
    plain = normalize_preference({"prompt": "Q", "chosen": "A", "rejected": "B"}, source="f", line=1)
    assert plain == ({"conversations": [{"role": "user", "content": "Q"}]}, "A", "B")


@pytest.mark.parametrize(
    "record,message",
    [
        ({"prompt": "Q", "rejected": "B"}, "missing field 'chosen'"),
        ({"prompt": "Q", "chosen": "  ", "rejected": "B"}, "'chosen' is empty"),
        ({"prompt": "Q", "chosen": "A", "rejected": " A"}, "the same reply"),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                "chosen": "A",
                "rejected": "B",
            },
            "the prompt ends with a 'assistant' turn",
        ),
        (
            {"prompt": [{"role": "user", "content": 3}], "chosen": "A", "rejected": "B"},
            "'content' must be a string",
        ),
        (
            {"prompt": "Q", "chosen": {"role": "assistant", "content": 5}, "rejected": "B"},
            "'content' must be a string",
        ),
    ],
)
def test_bad_preference_records_name_file_and_line(record, message):
    with pytest.raises(DataFormatError, match=message) as err:
        normalize_preference(record, source="pairs.jsonl", line=7)
    assert str(err.value).startswith("pairs.jsonl:7: ")
