"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps on the CPU at tiny sizes, so that it does not rot
between the rare sessions that are lent a GPU; and what travels to the GPU machine fits its 64 MiB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on the working tree plus carried paths
# ../shared/gpu/fetch_wheels.sh liger-kernel==0.8.5: 63,088,912 bytes (docs/PERFORMANCE.md)
WHEELS = 60.2 * 2**20


@pytest.mark.slow
def test_dry_run_runs_every_step_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_gpu.json",
        "bench_gpu.md",
        "gpu_check.log",
        "gpu_tests.log",
    ]

    # The gpu tests were collected and skipped for want of a GPU, and the summary says so.
    tests_log = (out / "gpu_tests.log").read_text()
    assert "skipped" in tests_log and "needs a CUDA GPU" in tests_log and "error" not in tests_log.lower()
    summary = proc.stdout[proc.stdout.index("== gpu_check done") :]
    assert "install from .whl/ (dry run)" in summary and "test: " in summary and "ours_liger" in summary

    # The benchmark measured every workload through both pipelines.
    report = json.loads((out / "bench_gpu.json").read_text())
    assert report["R"]["recipe/recipe-2"]["samples_per_s"] > 0
    assert {"ours/grouped-4", "ours/packed-2"} <= set(report["R"])
    assert all(report["R"][k]["samples_per_s"] > 0 for k in ("ours/grouped-4", "ours/packed-2"))
    assert {f"{v}/{m}" for v in ("recipe", "ours") for m in (1, 2)} <= set(report["D"])
    assert {f"{v}/{n}" for v in ("recipe", "ours") for n in (32, 64, 128)} <= set(report["L"])
    probe = report["probe_loss"]
    assert probe["ours"] == pytest.approx(probe["recipe"], rel=1e-5)  # same model, same batch, same loss
    table = (out / "bench_gpu.md").read_text()
    assert table.startswith("| measure | recipe | ours |") and "| R samples/s |" in table


def test_what_travels_to_the_gpu_machine_fits() -> None:
    """The repository's tracked files plus the wheels gpu_check.sh installs stay under the carry limit."""
    try:
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, text=True
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    tracked = sum((REPO_ROOT / f).stat().st_size for f in files if f and (REPO_ROOT / f).is_file())
    assert tracked + WHEELS < CARRY_LIMIT, (
        f"tracked files {tracked / 2**20:.1f} MiB + wheels {WHEELS / 2**20:.1f} MiB exceed the 64 MiB the GPU "
        "machine receives: keep large files out of git (or carry fewer wheels, e.g. NO_HF=1 fetch_wheels.sh)"
    )
    lengths = json.loads((REPO_ROOT / "benchmarks" / "data" / "rolebench_zh_lengths.json").read_text())
    assert len(lengths["samples"]) == 4096 and all(p > 0 and a > 0 for p, a in lengths["samples"])
