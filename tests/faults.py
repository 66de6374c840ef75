"""Faults injected into a real train.py run, at a chosen optimizer step, for the reliability tests.

A spec is a comma-separated list of ``ACTION@WHEN[:rRANK]``:

- ACTION: ``sigterm``, ``sigint``, ``sigkill`` (a real signal sent to this process) or ``nan`` (a forward
  hook on the output head turns that step's logits, and so its loss, into NaN);
- WHEN: ``N`` = during the first forward pass of optimizer step N; ``evalN`` = during the evaluation at
  step N; ``saveN`` = during the save of step N, after the adapter is written and before the checkpoint
  is complete;
- ``:rR`` limits it to rank R (default: every rank).

Steps are read from the DeepSpeed engine (``global_steps``, restored on resume), so one spec means the
same points in an uninterrupted run and in a resumed one. In-process: ``with injected(spec): train.cli(...)``.
Under a launcher: ``deepspeed --num_gpus 2 tests/faults.py <train.py flags>`` with ``TRAIN_FAULTS=spec``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script by a launcher: sys.path[0] is tests/
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import sft.checkpoint.save  # noqa: E402
import train  # noqa: E402
from sft.core.distributed import get_rank  # noqa: E402

SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}
_SPEC = re.compile(r"^(sigterm|sigint|sigkill|nan)@(eval|save)?(\d+)(?::r(\d+))?$")


@dataclass(frozen=True)
class Fault:
    action: str
    where: str  # "step", "eval" or "save"
    step: int
    rank: int | None

    def due(self, where: str, step: int) -> bool:
        return self.where == where and self.step == step and self.rank in (None, get_rank())


def parse(spec: str) -> list[Fault]:
    """The faults of a spec string (see the module docstring)."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = _SPEC.match(item)
        if match is None:
            raise ValueError(f"bad fault {item!r}: expected ACTION@[eval|save]STEP[:rRANK]")
        action, where, step, rank = match.groups()
        faults.append(Fault(action, where or "step", int(step), None if rank is None else int(rank)))
    return faults


def _send(fault: Fault) -> None:
    os.kill(os.getpid(), SIGNALS[fault.action])


@contextlib.contextmanager
def injected(spec: str) -> Iterator[None]:
    """Patch train.py's objective, evaluation and adapter saving to fire the faults of ``spec``."""
    faults = parse(spec)
    real_build, real_eval, real_save_adapter = (
        train.build_objective,
        train.evaluate,
        sft.checkpoint.save.save_adapter,
    )
    state = {"engine": None, "hooked": set(), "signalled": set()}

    def nan_logits(module, inputs, output):
        engine = state["engine"]
        step = engine.global_steps + 1  # the step being computed
        if engine.training and any(f.action == "nan" and f.due("step", step) for f in faults):
            return output * float("nan")
        return None

    def before_loss(model):
        state["engine"] = model
        head = model.module.get_output_embeddings()
        if id(head) not in state["hooked"]:
            head.register_forward_hook(nan_logits)
            state["hooked"].add(id(head))
        step = model.global_steps + 1
        if model.training and step not in state["signalled"]:  # the step's first micro-batch
            state["signalled"].add(step)
            for fault in faults:
                if fault.action in SIGNALS and fault.due("step", step):
                    _send(fault)

    def build_objective(*args, **kwargs):
        objective = real_build(*args, **kwargs)
        real_loss_sums = objective.loss_sums

        def loss_sums(model, batch, device):
            before_loss(model)
            return real_loss_sums(model, batch, device)

        objective.loss_sums = loss_sums
        return objective

    def evaluate(model, dataloader, objective, **kwargs):
        for fault in faults:
            if fault.action in SIGNALS and fault.due("eval", model.global_steps):
                _send(fault)
        return real_eval(model, dataloader, objective, **kwargs)

    def save_adapter(model, path):
        real_save_adapter(model, path)
        engine = state["engine"]
        for fault in faults:
            if engine is not None and fault.action in SIGNALS and fault.due("save", engine.global_steps):
                _send(fault)

    train.build_objective, train.evaluate, sft.checkpoint.save.save_adapter = (
        build_objective,
        evaluate,
        save_adapter,
    )
    try:
        yield
    finally:
        train.build_objective, train.evaluate, sft.checkpoint.save.save_adapter = (
            real_build,
            real_eval,
            real_save_adapter,
        )


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with injected(os.environ.get("TRAIN_FAULTS", "")):
        sys.exit(train.cli())
