"""Render the TensorBoard curves of a run to a PNG, for people without TensorBoard at hand.

    python -m sft.train.plotting output/runs --out curves.png

Reads every event file under the run directory (a resumed run writes several; for a step logged
twice the later file wins) and draws train/loss with eval/loss, eval/ppl and train/lr.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sft.core.flags import REQUIRED, add_arguments, flag, parse_flags

logger = logging.getLogger(__name__)

PANELS = (
    ("loss", ("train/loss", "eval/loss")),
    ("eval perplexity", ("eval/ppl",)),
    ("learning rate", ("train/lr",)),
    ("tokens / s", ("train/tokens_per_sec",)),
)


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``run_dir``: ``{tag: [(step, value), ...]}`` sorted by step.

    Event files are read in creation order, so after a resume the values of the resumed run
    replace those the interrupted run logged for the same steps.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}: pass <output_dir>/runs")
    series: dict[str, dict[int, float]] = {}
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("tensor"):
                    number = float(value.tensor.float_val[0]) if value.tensor.float_val else None
                    if number is None:
                        from tensorboard.util import tensor_util

                        number = float(tensor_util.make_ndarray(value.tensor))
                elif value.HasField("simple_value"):
                    number = float(value.simple_value)
                else:
                    continue
                series.setdefault(value.tag, {})[int(event.step)] = number
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """Draw the run's curves into ``out`` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    scalars = read_scalars(run_dir)
    panels = [(title, [t for t in tags if t in scalars]) for title, tags in PANELS]
    panels = [(title, tags) for title, tags in panels if tags]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, tags) in zip(axes[0], panels):
        for tag in tags:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, marker="o" if tag.startswith("eval/") else None, markersize=4, label=tag)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass
class PlotArgs:
    """The flags of ``python -m sft.train.plotting``."""

    run_dir: str = flag(REQUIRED, "TensorBoard directory of the run (<output_dir>/runs).", positional=True)
    out: str = flag("curves.png", "PNG file to write.")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m sft.train.plotting RUN_DIR --out curves.png``."""
    parser = argparse.ArgumentParser(description="Render the train/eval curves of a run to a PNG.")
    add_arguments(parser, PlotArgs)
    args = parse_flags(parser, PlotArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.info("wrote %s", plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main()
