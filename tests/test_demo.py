"""demo.py (`make demo`): the real-model pipeline at toy sizes (`--smoke`), every stage a CLI run as a user runs it.

SmolLM2 from the cached fixture, DialogSum from the shared data: convert, score the base model, QLoRA-train one step
under DeepSpeed, merge, score the merged model, print the first test dialogue's summaries side by side. The full
sizes and their numbers are in README.md (measured by hand: tens of seconds here would be minutes there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_pipeline_on_smollm2(smollm2_dir, shared_data_dir, tmp_path):
    out = tmp_path / "demo"
    extensions = (
        tmp_path / "torch_extensions"
    )  # empty: a one-rank CPU run must not compile DeepSpeed's shm op
    env = {
        **os.environ,
        # Both cores: demo.py's stages let idle OpenMP threads spin only briefly (sft.core.runner.OPENMP_SPINS), not
        # against a busy machine (the reason other subprocess tests pin one thread); 85 s against 105 s on one.
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": str(extensions),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    command = [
        sys.executable, "demo.py", "--smoke",
        "--model_dir", str(smollm2_dir),
        "--dialogsum_dir", str(shared_data_dir / "dialogsum"),
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == {"data", "before", "train", "merge", "after"}
    for scores in (summary["rouge_before"], summary["rouge_after"]):
        assert set(scores) == {"rouge1", "rouge2", "rougeL"} and all(0 <= v <= 100 for v in scores.values())
    before = [json.loads(line) for line in (out / "predictions_before.jsonl").read_text().splitlines()]
    after = [json.loads(line) for line in (out / "predictions_after.jsonl").read_text().splitlines()]
    assert len(before) == len(after) == 2  # the first two test dialogues, scored against their 3 references
    assert [r["references"] for r in before] == [r["references"] for r in after] and len(
        after[0]["references"]
    ) == 3
    assert (out / "merged" / "config.json").is_file() and Path(summary["training"]["adapter"]).is_dir()

    # The product: the first test dialogue, its summaries before and after side by side, the reference, the scores.
    printed = proc.stdout
    assert "Ms. Dawson, I need you to take a dictation for me." in printed
    assert "BEFORE training" in printed and "AFTER training" in printed and "REFERENCE" in printed
    assert after[0]["references"][0].split()[0] in printed and "ROUGE-L" in printed
    assert not (extensions / "deepspeed_shm_comm").exists()
