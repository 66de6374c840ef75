"""What the benchmarks against TRL share (bench_quality.py, bench_dpo.py): stages run as subprocesses and measured,
workers of the calling script, peak memory, result files, the TRL requirement and train.py's AdamW settings."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sft.core.flags import HelpFormatter
from sft.core.runner import stage_environment

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = "benchmarks/requirements-quality.txt"  # TRL and what it needs: not installed by CI
DS_CONFIG = "ds_configs/zero2.json"  # what train.py runs with; TRL gets its AdamW betas and eps

logger = logging.getLogger(__name__)


class DescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """--help: the module docstring as written, and each flag's default."""


def require_trl(script: str) -> None:
    """Stop with one line when TRL is missing: CI does not install it, the benchmark ``script`` needs it."""
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(f"{script} needs TRL, which is not installed: pip install -r {REQUIREMENTS}")


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's high-water mark into a child over fork and exec.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON in ``path`` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def adam_settings() -> tuple[list[float], float]:
    """AdamW betas and eps of the DeepSpeed config train.py runs with."""
    params = json.loads((REPO_ROOT / DS_CONFIG).read_text(encoding="utf-8"))["optimizer"]["params"]
    return list(params["betas"]), float(params["eps"])


@dataclass
class Cost:
    """Wall and CPU (user + system) seconds of one subprocess."""

    wall_s: float
    cpu_s: float


class Stages:
    """Runs each stage as a subprocess and measures it; ``script`` is the benchmark whose workers it starts."""

    def __init__(self, script: str) -> None:
        self.script = str(Path(script).resolve())
        self.env = stage_environment()  # as demo.py's: idle OpenMP threads spin briefly, then sleep
        self.costs: dict[str, Cost] = {}

    def run(self, stage: str, cmd: list[str]) -> Cost:
        logger.info("[%s] $ %s", stage, shlex.join(cmd))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=self.env)
        wall = time.perf_counter() - start
        # RUSAGE_CHILDREN grows by exactly this child (and what it waited for): the stages run one at a time.
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(f"stage '{stage}' failed (exit {result.returncode}): {shlex.join(cmd)}")
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        self.costs[stage] = Cost(round(wall, 1), round(cpu, 1))
        logger.info("[%s] done: %.0f s wall, %.0f s CPU", stage, wall, cpu)
        return self.costs[stage]

    def worker(self, stage: str, worker: str, spec: dict, spec_file: Path) -> tuple[Cost, dict]:
        """Run one worker of the benchmark script on ``spec``; its cost and its result file."""
        write_json(spec_file, spec)
        cost = self.run(stage, [sys.executable, self.script, "--worker", worker, "--spec", str(spec_file)])
        return cost, json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
