"""Self-play preference pairs (``data_helper.py preference``): the data set's own reply is chosen, the model's
own generation for the same prompt is rejected.

For a conversation file (e.g. RoleBench or DialogSum converted by data_helper.py) and a model (the SFT
adapter on its base), every record ending with an assistant turn gives a prompt (everything before that
turn) and a chosen reply (that turn). The model answers each prompt (batched, by the engine); its
answer is the rejected reply. A pair whose generation equals or nearly equals the reference (ROUGE-L F1 at
least ``max_similarity``) teaches nothing and is dropped, and so is an empty generation; both are counted.
The pairs are preference records in this project's form (docs/DATA.md): ``system``/``tools`` as in the
source, ``conversations`` = the prompt turns, ``chosen``, ``rejected``. Training on them with DPO from the
SFT adapter (``--init_adapter``) pushes the model from what it says now towards the data set's replies: the
SFT then self-play DPO loop (SPIN) for keeping a role-play model in character.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sft.data.converters import ConvertStats
from sft.data.formats import split_prompt
from sft.inference.rouge import detect_mode, make_scorer

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from sft.inference.engines import Engine


def self_play_pairs(
    records: list[dict[str, Any]],
    engine: Engine,
    config: GenerationConfig,
    *,
    max_src_len: int | None = None,
    max_similarity: float = 0.9,
    batch_size: int | None = None,
    stats: ConvertStats | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Preference records from conversation ``records`` (see the module docstring), in input order.

    Args:
        records: conversation records (:func:`sft.data.formats.read_conversations`).
        engine: the model as :func:`sft.inference.engines.load_engine` loads it.
        config: generation settings; seed the RNGs first for repeatable sampling.
        max_src_len: prompts cut as in training (None = whole).
        max_similarity: drop a pair whose generation reaches this ROUGE-L F1 against the chosen reply.
        batch_size: prompts generated for together (None: the engine's default).
        stats: receives the counts (``read`` is the caller's; ``written`` is set here).
        progress: called with the number of prompts finished after each batch.
    """
    stats = stats if stats is not None else ConvertStats(read=len(records), unit="records")
    prompts, chosen = [], []
    for record in records:
        if record["conversations"][-1]["role"] != "assistant":
            stats.skipped["no assistant reply to prefer"] += 1
            continue
        prompt, _ = split_prompt(record)
        prompts.append(prompt)
        chosen.append(record["conversations"][-1]["content"])
    ids = [engine.template.build_prompt(p, max_src_len=max_src_len) for p in prompts]
    generated = engine.generate(ids, config, batch_size=batch_size, progress=progress)
    scorer = make_scorer(detect_mode(chosen))
    pairs = []
    for prompt, reply, generation in zip(prompts, chosen, generated, strict=True):
        if not generation.strip():
            stats.skipped["empty generation"] += 1
            continue
        similarity = scorer.score(reply, generation)["rougeL"].fmeasure
        if similarity >= max_similarity:
            stats.skipped[f"generation as good as the reply (ROUGE-L >= {max_similarity})"] += 1
            continue
        pairs.append({**prompt, "chosen": reply, "rejected": generation})
    stats.notes["replies generated"] += len(generated)
    stats.written = len(pairs)
    return pairs
