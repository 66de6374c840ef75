"""Training objectives: what a batch's loss is. The loop in train.py asks an objective for its loss sums and
metrics (:class:`sft.train.objectives.base.Objective`); a new objective is one module here plus its name in
:data:`sft.train.args.OBJECTIVES` and :func:`build_objective` (and its data, where it reads another record
format).
"""

from __future__ import annotations

from sft.train.args import OBJECTIVES, PreferenceArgs
from sft.train.objectives.base import Objective
from sft.train.objectives.preference import PreferenceObjective
from sft.train.objectives.sft import SFTObjective


def build_objective(args: PreferenceArgs, *, head_loss: str = "fused") -> Objective:
    """The objective ``--objective`` trains with."""
    if args.objective == "sft":
        return SFTObjective(head_loss=head_loss)
    if args.objective in ("dpo", "orpo", "simpo"):
        return PreferenceObjective(
            args.objective,
            beta=args.pref_beta,
            loss=args.pref_loss,
            label_smoothing=args.label_smoothing,
            ftx=args.pref_ftx,
            gamma=args.simpo_gamma,
            head_loss="logits" if head_loss == "logits" else "fused",
        )
    raise ValueError(f"--objective {args.objective!r}: choose one of {', '.join(OBJECTIVES)}")
