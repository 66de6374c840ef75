"""Training objectives: what a batch's loss is. The loop in train.py asks an objective for its loss sums and
metrics (:class:`sft.train.objectives.base.Objective`); a new objective is one module here plus its name in
:func:`build_objective` (and its data, where it reads another record format).
"""

from __future__ import annotations

from sft.train.objectives.base import Objective
from sft.train.objectives.sft import SFTObjective

OBJECTIVES = ("sft",)


def build_objective(name: str, *, head_loss: str = "fused") -> Objective:
    """The objective ``--objective name`` trains with."""
    if name == "sft":
        return SFTObjective(head_loss=head_loss)
    raise ValueError(f"--objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
