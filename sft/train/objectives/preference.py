"""Preference alignment: DPO (with its IPO and hinge variants), ORPO and SimPO (``--objective dpo|orpo|simpo``).

The losses are small functions of per-sequence log-probs (policy chosen/rejected, and for DPO the
reference's), in the manner of torchtune's ``rlhf/loss``: nothing about models or batches inside. Each
returns per-pair losses and the chosen/rejected rewards; :class:`PreferenceObjective` gets the log-probs
with one forward over the chosen and rejected sequences of a batch together (padded or packed,
:mod:`sft.data.preference`), sums over pairs, and gives the loop in train.py what every objective gives.

Log-probs are sums over a reply's learned tokens (its answer and end-of-turn, as SFT learns them); ORPO,
SimPO and IPO use their per-token mean, as TRL computes them. With a reference (DPO), the reward of a
reply is ``beta * (policy - reference)`` log-prob; without one (ORPO, SimPO), ``beta`` times the mean
log-prob. Reward accuracy counts pairs whose chosen reward is above the rejected one.

The reference is the model at the start of training, evaluated without dropout or NEFTune noise:
``disable_adapter()`` live in every step for a fresh LoRA (whose B = 0 makes the starting policy the
base), or log-probs computed once before training (``--precompute_ref``, :mod:`sft.train.reference`),
which is what ``--init_adapter`` and PiSSA/OLoRA (whose adapter-free model is not the starting policy)
always use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from sft.train.args import PREF_LOSSES, PREFERENCE_OBJECTIVES, PreferenceArgs, TrainArgs
from sft.train.inputs import to_device, unwrap_model
from sft.train.objectives.sft import learned_token_nll

# ---------------------------------------------------------------------------------------------
# The losses (per pair), from per-sequence log-probs
# ---------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's per-pair losses and the (chosen, rejected) rewards ``beta * (policy - reference)``.

    With ``h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)``:
    ``sigmoid``: ``-(1 - e) log s(beta h) - e log s(-beta h)`` (conservative DPO with label smoothing e);
    ``ipo``: ``(h - 1 / (2 beta))^2`` (pass per-token mean log-probs, as TRL does);
    ``hinge``: ``max(0, 1 - beta h)`` (SLiC).
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"--pref_loss {kind!r}: choose one of {', '.join(PREF_LOSSES)}")
    return (
        losses,
        beta * (policy_chosen - ref_chosen).detach(),
        beta * (policy_rejected - ref_rejected).detach(),
    )


def simpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: ``-log s(beta (mean_chosen - mean_rejected) - gamma)`` over per-token mean log-probs; rewards
    ``beta * mean``."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def orpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO: the chosen reply's NLL (per-token mean) minus ``beta * log s(log odds ratio)``, where the odds of
    a reply are ``p / (1 - p)`` with ``p = exp(mean log-prob)``; rewards ``beta * mean``."""
    log_odds = (chosen_mean - rejected_mean) - (
        torch.log1p(-torch.exp(chosen_mean).clamp(max=1 - 1e-7))
        - torch.log1p(-torch.exp(rejected_mean).clamp(max=1 - 1e-7))
    )
    losses = -chosen_mean - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


# ---------------------------------------------------------------------------------------------
# Log-probs of the sequences of a batch
# ---------------------------------------------------------------------------------------------


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, *, head_loss: str = "fused"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps (S,), tokens (S,))``: each batch sequence's summed log-prob over its learned tokens, on
    ``device`` (with gradient where the forward has one), and its learned-token count (host).

    ``S = 2 P`` for the batch's P pairs; ``batch["seq_ids"]`` says which sequence a token belongs to,
    also in packed rows, so padded and packed batches give the same sums.
    """
    n_seqs = 2 * len(batch["pair_index"])
    nll, positions, flat_index = learned_token_nll(model, batch, device, head_loss=head_loss)
    # The target at position t is token t + 1: it belongs to token t + 1's sequence.
    seq = batch["seq_ids"][:, positions + 1].flatten()[flat_index]  # (N,) host
    logps = torch.zeros(n_seqs, dtype=torch.float32, device=device).index_add(0, to_device(seq, device), -nll)
    return logps, torch.bincount(seq, minlength=n_seqs)


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module, *, adapter: bool) -> Iterator[None]:
    """Compute as the reference: no gradient, eval mode (no dropout, no NEFTune noise), and the adapter
    disabled unless ``adapter`` (the starting policy itself, for a one-pass precomputation)."""
    was_training = model.training
    model.eval()
    peft_model = unwrap_model(model)
    try:
        with torch.no_grad(), contextlib.nullcontext() if adapter else peft_model.disable_adapter():
            yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


class PreferenceObjective:
    """``--objective dpo|orpo|simpo``: the mean per-pair loss over every pair of a step.

    Args:
        name: ``dpo``, ``orpo`` or ``simpo``.
        beta: ``--pref_beta``.
        loss: ``--pref_loss`` (DPO).
        label_smoothing: ``--label_smoothing`` (DPO sigmoid).
        ftx: ``--pref_ftx``: weight of the chosen reply's mean NLL added to each pair's loss.
        gamma: ``--simpo_gamma``.
        head_loss: how the output head's log-probs are computed (``"logits"`` or fused).
    """

    metric_names = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")
    eval_names = ("loss", "reward_accuracy", "reward_margin", "ppl")

    def __init__(
        self,
        name: str,
        *,
        beta: float = 0.1,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        ftx: float = 0.0,
        gamma: float = 0.5,
        head_loss: str = "fused",
    ) -> None:
        self.name = name
        self.beta, self.loss, self.label_smoothing, self.ftx, self.gamma = (
            beta,
            loss,
            label_smoothing,
            ftx,
            gamma,
        )
        self.head_loss = head_loss

    @property
    def uses_reference(self) -> bool:
        return self.name == "dpo"

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["pair_index"])

    def pair_terms(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Per-pair ``losses``, rewards and the chosen replies' NLL sums and token counts."""
        # The reference first: its forward's memory is free again before the policy's activations are held.
        ref = self.reference_logps(model, batch, device) if self.uses_reference else None
        logps, tokens = sequence_logps(model, batch, device, head_loss=self.head_loss)
        tokens = to_device(tokens, device).clamp(min=1).float()
        chosen, rejected = logps[0::2], logps[1::2]
        chosen_mean, rejected_mean = chosen / tokens[0::2], rejected / tokens[1::2]
        if ref is not None:
            if self.loss == "ipo":  # on per-token means, as TRL computes IPO
                policy = (chosen_mean, rejected_mean)
                ref = (ref[:, 0] / tokens[0::2], ref[:, 1] / tokens[1::2])
            else:
                policy, ref = (chosen, rejected), (ref[:, 0], ref[:, 1])
            losses, r_chosen, r_rejected = dpo_loss(
                *policy, *ref, beta=self.beta, kind=self.loss, label_smoothing=self.label_smoothing
            )
        elif self.name == "simpo":
            losses, r_chosen, r_rejected = simpo_loss(
                chosen_mean, rejected_mean, beta=self.beta, gamma=self.gamma
            )
        else:
            losses, r_chosen, r_rejected = orpo_loss(chosen_mean, rejected_mean, beta=self.beta)
        if self.ftx:
            losses = losses - self.ftx * chosen_mean
        return {
            "losses": losses,
            "rewards_chosen": r_chosen,
            "rewards_rejected": r_rejected,
            "chosen_nll": -chosen.detach(),
            "chosen_tokens": tokens[0::2],
        }

    def reference_logps(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """``(P, 2)`` reference log-probs: precomputed ones from the batch, else a forward with the adapter off."""
        if "ref_logps" in batch:
            return to_device(batch["ref_logps"], device).float()
        with reference_mode(model, adapter=False):
            logps, _ = sequence_logps(model, batch, device, head_loss=self.head_loss)
        return logps.view(-1, 2)

    def loss_sums(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.pair_terms(model, batch, device)
        margin = terms["rewards_chosen"] - terms["rewards_rejected"]
        metrics = {
            "rewards_chosen": terms["rewards_chosen"].sum(),
            "rewards_rejected": terms["rewards_rejected"].sum(),
            "reward_accuracy": (margin > 0).float().sum(),
            "reward_margin": margin.sum(),
        }
        return terms["losses"].sum(), metrics

    def eval_sums(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        terms = self.pair_terms(model, batch, device)
        margin = terms["rewards_chosen"] - terms["rewards_rejected"]
        return {
            "loss": terms["losses"].double().sum(),
            "pairs": torch.tensor(self.count(batch), dtype=torch.int64, device=device),
            "correct": (margin > 0).double().sum(),
            "margin": margin.double().sum(),
            "chosen_nll": terms["chosen_nll"].double().sum(),
            "chosen_tokens": terms["chosen_tokens"].double().sum(),
        }

    def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean loss, reward accuracy and margin per pair, and the perplexity of the chosen replies."""
        pairs = int(sums["pairs"])
        if pairs == 0:
            raise ValueError("the evaluation data has no preference pairs: check --test_path")
        return {
            "loss": sums["loss"] / pairs,
            "reward_accuracy": sums["correct"] / pairs,
            "reward_margin": sums["margin"] / pairs,
            "ppl": math.exp(sums["chosen_nll"] / max(sums["chosen_tokens"], 1.0)),
            "pairs": pairs,
        }

    def describe(self, result: dict[str, float]) -> str:
        return (
            f"loss {result['loss']:.4f} reward accuracy {result['reward_accuracy']:.3f} "
            f"margin {result['reward_margin']:.4f} chosen ppl {result['ppl']:.3f} ({result['pairs']} pairs)"
        )


def preference_problems(args: TrainArgs) -> list[str]:
    """The checks of the objective flags (part of :func:`sft.train.validate.validate_args`)."""
    problems: list[str] = []
    defaults = PreferenceArgs()
    preference = args.objective in PREFERENCE_OBJECTIVES
    if not preference:
        changed = [
            f"--{name}"
            for name in (
                "pref_loss",
                "pref_beta",
                "label_smoothing",
                "pref_ftx",
                "simpo_gamma",
                "precompute_ref",
            )
            if getattr(args, name) != getattr(defaults, name)
        ]
        if changed:
            problems.append(
                f"{', '.join(changed)} only apply to --objective dpo/orpo/simpo (got --objective {args.objective}): "
                "drop them or choose a preference objective"
            )
        return problems
    if args.pref_beta <= 0:
        problems.append(f"--pref_beta={args.pref_beta} must be > 0")
    if args.objective != "dpo":
        if args.pref_loss != defaults.pref_loss:
            problems.append(f"--pref_loss applies to --objective dpo only (got --objective {args.objective})")
        if args.precompute_ref:
            problems.append(f"--precompute_ref: --objective {args.objective} has no reference model; drop it")
    if not 0 <= args.label_smoothing < 0.5:
        problems.append(f"--label_smoothing={args.label_smoothing} must be in [0, 0.5)")
    elif args.label_smoothing and not (args.objective == "dpo" and args.pref_loss == "sigmoid"):
        problems.append("--label_smoothing applies to --objective dpo --pref_loss sigmoid only")
    if args.pref_ftx < 0:
        problems.append(f"--pref_ftx={args.pref_ftx} must be >= 0 (0 = off)")
    elif args.pref_ftx and args.objective == "orpo":
        problems.append("--pref_ftx: ORPO's loss already holds the chosen reply's NLL; drop --pref_ftx")
    if args.simpo_gamma < 0:
        problems.append(f"--simpo_gamma={args.simpo_gamma} must be >= 0")
    elif args.simpo_gamma != defaults.simpo_gamma and args.objective != "simpo":
        problems.append(f"--simpo_gamma applies to --objective simpo only (got --objective {args.objective})")
    if args.loss_on != "all":
        problems.append(
            f"--loss_on {args.loss_on}: with --objective {args.objective} only the final reply of each pair is "
            "learned; drop --loss_on"
        )
    return problems
