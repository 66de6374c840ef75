"""Choosing among a run's checkpoints: the one to resume (``latest``), the best by evaluation, and
rotation (``--save_total_limit``).
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

from sft.checkpoint.layout import (
    TRAINER_STATE,
    CheckpointError,
    list_checkpoints,
    resume_dir_problem,
)
from sft.checkpoint.state import read_progress
from sft.core.distributed import (
    is_main_process,
)

logger = logging.getLogger(__name__)


def resolve_resume_dir(resume_from: str, output_dir: str | Path) -> Path | None:
    """The checkpoint named by ``--resume_from_checkpoint`` (a path, or "latest" in ``output_dir``).

    "latest" is the newest checkpoint whose ``trainer_state.json`` can be read: a newer one with a
    damaged state (a copy cut short, an edit) is skipped with a warning rather than failing the resume.
    Returns None for "latest" when ``output_dir`` has no complete checkpoint yet (a fresh start,
    so the same command line can be re-submitted to a preemptible queue).
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        for path in reversed(found):
            try:
                read_progress(path)
                return path
            except (OSError, ValueError, TypeError) as err:
                logger.warning(
                    "--resume_from_checkpoint latest: skipping %s, its %s is unreadable (%s)",
                    path,
                    TRAINER_STATE,
                    err,
                )
        if found:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no checkpoint in {output_dir} has a readable {TRAINER_STATE} "
                "(see the warnings above): copy a checkpoint again, or start a new run in another --output_dir"
            )
        logger.warning(
            "--resume_from_checkpoint latest: no checkpoint in %s yet, starting from scratch", output_dir
        )
        return None
    problem = resume_dir_problem(resume_from)
    if problem:
        raise CheckpointError(problem)
    return Path(resume_from)


def _eval_ppl(checkpoint_dir: Path) -> float | None:
    """The evaluation perplexity stored in a checkpoint; None when it has none or its state is unreadable.

    Rotation runs in the middle of training: a damaged old trainer_state.json must not end the run.
    """
    try:
        ppl = read_progress(checkpoint_dir).eval.get("ppl")
    except (OSError, ValueError, TypeError) as err:
        logger.warning(
            "cannot read %s (%s): not considered as the best checkpoint", checkpoint_dir / TRAINER_STATE, err
        )
        return None
    # NaN compares false with everything: a diverged evaluation must never win (or break) the comparison.
    return ppl if isinstance(ppl, (int, float)) and math.isfinite(ppl) else None


def best_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the lowest eval perplexity (None when none was evaluated)."""
    scored = [(ppl, p) for p in list_checkpoints(output_dir) if (ppl := _eval_ppl(p)) is not None]
    return min(scored, key=lambda item: item[0])[1] if scored else None


def rotate_checkpoints(output_dir: str | Path, save_total_limit: int) -> list[Path]:
    """Delete all but the newest ``save_total_limit`` checkpoints, always keeping the best by eval ppl.

    Runs on rank 0 only (other ranks return at once); 0 keeps everything.

    Returns:
        The deleted directories.
    """
    if save_total_limit <= 0 or not is_main_process():
        return []
    checkpoints = list_checkpoints(output_dir)
    keep = set(checkpoints[-save_total_limit:])
    best = best_checkpoint(output_dir)
    if best is not None:
        keep.add(best)
    deleted = [p for p in checkpoints if p not in keep]
    for path in deleted:
        shutil.rmtree(path)
        logger.info("deleted old checkpoint %s (--save_total_limit %d)", path, save_total_limit)
    return deleted
