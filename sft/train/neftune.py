"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, arXiv:2310.05914).

Each training forward adds noise drawn uniformly from [-1, 1] and scaled by alpha / sqrt(L * d) to the
token embeddings, L the sequence length of the batch and d the hidden size. As in transformers' own
implementation, L is the length of the batch's rows (padded or packed), not of each example. The noise is
added by a forward hook on the input embeddings that acts only while the embedding module is in training
mode: ``model.eval()`` (evaluation inside train.py, every inference tool) turns it off. Nothing is saved
with the adapter: NEFTune changes how the adapter is trained, not what it is.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def neftune_noise_bound(alpha: float, seq_len: int, hidden_size: int) -> float:
    """Largest absolute noise value NEFTune adds: alpha / sqrt(L * d)."""
    return alpha / math.sqrt(seq_len * hidden_size)


def add_neftune_hook(model: nn.Module, alpha: float) -> RemovableHandle:
    """Register NEFTune on ``model.get_input_embeddings()``; returns the hook handle (``.remove()`` undoes it).

    Args:
        model: a transformers / peft causal LM.
        alpha: the noise scale (the paper uses 5 to 15); must be > 0.
    """
    if alpha <= 0:
        raise ValueError(f"NEFTune alpha must be > 0, got {alpha}")
    embeddings = model.get_input_embeddings()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        bound = neftune_noise_bound(alpha, output.shape[-2], output.shape[-1])  # output: (B, T, d)
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return embeddings.register_forward_hook(hook)
