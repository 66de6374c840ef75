"""Reference log-probs computed once, before the first step (``--precompute_ref``; always with
``--init_adapter`` and PiSSA/OLoRA).

One pass over the training and evaluation pairs with the starting policy in eval mode (no dropout, no
NEFTune noise) gives every pair's reference (chosen, rejected) log-probs; the batches then carry them and
no step runs a reference forward. They are stored with the run (``<output_dir>/reference_logps.npz``, with
a fingerprint of the pairs' tokens, the base weights, the initial adapter and the numerics), so a resumed
run reuses them and a changed input computes them again. Every rank takes part (the pass is sharded as
evaluation is, and under ZeRO-3 each forward is a collective); rank 0 reads and writes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from sft.checkpoint.identity import base_model_identity
from sft.checkpoint.layout import ADAPTER_WEIGHTS, REFERENCE_LOGPS
from sft.core.atomic import write_file_atomic
from sft.core.distributed import all_reduce_sum, broadcast_object, get_rank, get_world_size, is_main_process
from sft.data.batching import build_eval_dataloader
from sft.data.preference import PreferenceDataset
from sft.train.args import TrainArgs
from sft.train.inputs import to_device
from sft.train.objectives.preference import PreferenceObjective, reference_mode, sequence_logps

logger = logging.getLogger(__name__)


def reference_fingerprint(args: TrainArgs, datasets: dict[str, PreferenceDataset]) -> str:
    """What the stored log-probs depend on: the pairs' tokens, the base weights, the initial adapter and the
    numerics (quantisation, precision, attention kernel)."""
    h = hashlib.sha256()
    for name, dataset in sorted(datasets.items()):
        h.update(f"{name}:{dataset.fingerprint()}".encode())
    weights = base_model_identity(args.model_name_or_path)["weights"]
    h.update(json.dumps(weights, sort_keys=True).encode())
    if args.init_adapter:
        h.update(
            hashlib.sha256((Path(args.init_adapter) / ADAPTER_WEIGHTS).read_bytes()).hexdigest().encode()
        )
    numerics = [
        args.quantization,
        args.double_quant,
        args.precision,
        args.attn_implementation,
        args.lora_init,
    ]
    h.update(json.dumps(numerics).encode())
    return h.hexdigest()


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module,
    dataset: PreferenceDataset,
    *,
    batch_size: int,
    pad_token_id: int,
    packing: bool,
    max_len: int,
    device: torch.device,
    adapter: bool = True,
    head_loss: str = "fused",
) -> np.ndarray:
    """``(pairs, 2)`` float64 summed log-probs of every pair's (chosen, rejected) reply under ``model`` in eval
    mode, its adapter on (the policy as it is now) or off (``adapter=False``: the base); every rank computes
    its shard and gets the whole array."""
    loader = build_eval_dataloader(
        dataset,
        batch_size=batch_size,
        rank=get_rank(),
        world_size=get_world_size(),
        pad_token_id=pad_token_id,
        packing=packing,
        max_len=max_len,
    )
    out = torch.zeros(len(dataset), 2, dtype=torch.float64, device=device)
    with reference_mode(model, adapter=adapter):
        for batch in loader:
            logps, _ = sequence_logps(model, batch, device, head_loss=head_loss)
            out[to_device(batch["pair_index"], device)] = logps.view(-1, 2).double()
    return all_reduce_sum(out).cpu().numpy()


def attach_reference_logps(
    args: TrainArgs,
    model: torch.nn.Module,
    objective: PreferenceObjective,
    datasets: dict[str, PreferenceDataset],
    device: torch.device,
    pad_token_id: int,
) -> None:
    """Give each dataset its ``ref_logps``: from ``<output_dir>/reference_logps.npz`` when its fingerprint
    matches, else computed now (and stored). Call on every rank, before training."""
    path = Path(args.output_dir) / REFERENCE_LOGPS
    fingerprint = reference_fingerprint(args, datasets)
    stored = None
    if is_main_process() and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) == fingerprint:
                    stored = {name: data[name] for name in datasets}
                else:
                    logger.warning(
                        "%s was computed for other pairs or another model: computing it again", path
                    )
        except (OSError, ValueError, KeyError) as err:
            logger.warning("%s is unreadable (%s): computing it again", path, err)
    stored = broadcast_object(stored)
    if stored is not None:
        for name, dataset in datasets.items():
            dataset.ref_logps = stored[name]
        logger.info("reference log-probs of %s read from %s", ", ".join(datasets), path)
        return
    start = time.perf_counter()
    computed = {}
    for name, dataset in datasets.items():
        computed[name] = pair_logps(
            model,
            dataset,
            head_loss=objective.head_loss,
            batch_size=args.per_device_eval_batch_size,
            pad_token_id=pad_token_id,
            packing=args.packing,
            max_len=args.max_len,
            device=device,
        )
        dataset.ref_logps = computed[name]
    logger.info(
        "reference log-probs of %s computed in one pass (%.1f s), stored in %s",
        ", ".join(f"{len(d)} {name} pairs" for name, d in datasets.items()),
        time.perf_counter() - start,
        path,
    )
    if is_main_process():
        write_file_atomic(
            path, lambda fh: np.savez(fh, fingerprint=np.array(fingerprint), **computed), encoding=None
        )


def needs_precomputed_reference(args: TrainArgs) -> bool:
    """Whether DPO's reference comes from one pass before training: asked for (``--precompute_ref``), or the
    only way to have it (``--init_adapter``: the initial adapter is the reference; PiSSA/OLoRA: the model
    without the adapter is a residual base, not the starting policy)."""
    from sft.train.lora_variants import changes_base_weights

    return args.objective == "dpo" and (
        args.precompute_ref or bool(args.init_adapter) or changes_base_weights(args.lora_init)
    )
