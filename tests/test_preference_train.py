"""train.py --objective dpo end to end on a tiny Llama: the run learns and logs its rewards, resumes exactly
(with the stored reference log-probs), and two ranks under ZeRO-3 with the live reference follow the
one-rank run step by step."""

from __future__ import annotations

import math
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.test_preference import write_pairs
from tests.test_train_multi import BIN
from tests.test_train_resume import assert_same_as_reference, checkpoints, resume_here, state, train_here
from tests.test_train_single import CPU_RANKS_ENV, REPO_ROOT, scalars, train_command

pytestmark = pytest.mark.slow

# 12 pairs, 2 a step: 6 steps an epoch; checkpoints at 3 and 6. No LoRA dropout: two ranks draw their own masks.
DPO_FLAGS = (
    "--objective", "dpo", "--gradient_accumulation_steps", "1", "--max_steps", "6", "--save_model_step", "3",
    "--precision", "fp32", "--quantization", "none", "--lora_dropout", "0", "--learning_rate", "5e-3",
)  # fmt: skip


def write_pair_data(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    write_pairs(data_dir / "train.jsonl", 12)
    write_pairs(data_dir / "test.jsonl", 5)


@pytest.fixture(scope="module")
def dpo_reference(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One rank, ZeRO-2, reference log-probs precomputed: the run the others are compared with."""
    root = tmp_path_factory.mktemp("dpo")
    data_dir = root / "data"
    write_pair_data(data_dir)
    run = train_here(tiny_llama_dir, data_dir, root / "out", *DPO_FLAGS, "--precompute_ref")
    assert run.code == 0, run.log[-3000:]
    return {"root": root, "data": data_dir, "out": root / "out", "run": run}


def test_dpo_learns_and_logs_rewards(dpo_reference):
    logged = scalars(dpo_reference["out"])
    losses = [v for _, v in logged["train/loss"]]
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6)  # fresh LoRA: the policy is the reference
    assert logged["train/rewards_chosen"][0][1] == 0 and logged["train/reward_margin"][0][1] == 0
    assert losses[-1] < losses[0] - 0.1
    for tag in (
        "train/rewards_rejected",
        "train/reward_accuracy",
        "eval/loss",
        "eval/reward_accuracy",
        "eval/ppl",
    ):
        assert tag in logged
    assert logged["train/reward_margin"][-1][1] > 0
    final = state(checkpoints(dpo_reference["out"])[6])["eval"]
    assert final["pairs"] == 5 and final["reward_accuracy"] > 0.5 and final["loss"] < math.log(2)
    assert (
        "reference log-probs of 12 train pairs, 5 eval pairs computed in one pass" in dpo_reference["run"].log
    )


def test_dpo_resume_is_exact_and_reuses_the_reference(tiny_llama_dir, dpo_reference, tmp_path):
    out = tmp_path / "out"
    stopped = train_here(
        tiny_llama_dir, dpo_reference["data"], out, *DPO_FLAGS, "--precompute_ref", faults="sigterm@4"
    )
    assert stopped.code == 143, stopped.log[-3000:]
    assert sorted(checkpoints(out)) == [3, 4]
    resumed = resume_here(tiny_llama_dir, dpo_reference["data"], out, *DPO_FLAGS, "--precompute_ref")
    assert "reference log-probs of train, eval read from" in resumed.log
    assert "computed in one pass" not in resumed.log
    assert_same_as_reference(out, dpo_reference["out"], after_step=4)


def test_two_ranks_under_zero3_with_the_live_reference_follow_one_rank(
    tiny_llama_dir, dpo_reference, tmp_path
):
    """2 ranks x 1 pair = the one-rank run's 2 pairs a step (the same pairs: global batch j goes to rank
    j % 2); ZeRO-3 partitions the base at load; the reference is computed live with the adapter disabled."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.update(CPU_RANKS_ENV)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    flags = train_command(tiny_llama_dir, dpo_reference["data"], out, *DPO_FLAGS)[1:]
    command = [
        str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "train.py", *flags,
        "--ds_config", "ds_configs/zero3.json", "--per_device_train_batch_size", "1",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "ZeRO-3: the base model was partitioned at load" in proc.stderr
    ours, reference = scalars(out), scalars(dpo_reference["out"])
    for tag in ("train/loss", "train/reward_margin", "eval/loss", "eval/reward_accuracy"):
        got, expected = [v for _, v in ours[tag]], [v for _, v in reference[tag]]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), tag


def test_evaluate_preference_reproduces_the_training_evaluation(tiny_llama_dir, dpo_reference, tmp_path):
    """evaluate.py preference on the last checkpoint: the reward accuracy and margin train.py logged there."""
    import json

    import evaluate

    final = checkpoints(dpo_reference["out"])[6]
    out_json = tmp_path / "pref.json"
    code = evaluate.main(
        [
            "preference", "--model_path", str(tiny_llama_dir), "--adapter_dir", str(final),
            "--data_path", str(dpo_reference["data"] / "test.jsonl"), "--output_json", str(out_json),
        ]
    )  # fmt: skip
    assert code == 0
    result, logged = json.loads(out_json.read_text()), state(final)["eval"]
    assert result["pairs"] == logged["pairs"] == 5
    assert result["reward_accuracy"] == logged["reward_accuracy"]
    assert result["reward_margin"] == pytest.approx(logged["reward_margin"], rel=1e-4)
    assert set(result["logps"]) == {
        "policy_chosen",
        "policy_rejected",
        "reference_chosen",
        "reference_rejected",
    }
    assert (
        result["logps"]["policy_chosen"] > result["logps"]["reference_chosen"]
    )  # DPO raised the chosen replies

    # Packed (on the CPU each pair's prompt computed once, as train.py packs pairs): the same numbers.
    packed_json = tmp_path / "pref_packed.json"
    code = evaluate.main(
        [
            "preference", "--model_path", str(tiny_llama_dir), "--adapter_dir", str(final), "--packing",
            "--data_path", str(dpo_reference["data"] / "test.jsonl"), "--output_json", str(packed_json),
        ]
    )  # fmt: skip
    assert code == 0
    packed = json.loads(packed_json.read_text())
    assert packed["reward_accuracy"] == result["reward_accuracy"]
    assert packed["reward_margin"] == pytest.approx(result["reward_margin"], rel=1e-5, abs=1e-7)
    for key, value in result["logps"].items():
        assert packed["logps"][key] == pytest.approx(value, rel=1e-5)


def test_dpo_from_an_adapter_starts_at_ln2_with_it_as_the_reference(tiny_llama_dir, dpo_reference, tmp_path):
    """--init_adapter: the policy starts as that adapter and the reference is that adapter, frozen (log-probs
    computed once): the first loss is ln 2 although the adapter is far from the base. Flags equal to the
    adapter's own settings are accepted, others refused."""
    from sft.core.errors import ArgsError
    from sft.train.args import parse_args
    from sft.train.validate import validate_args

    start = checkpoints(dpo_reference["out"])[6]
    flags = train_command(tiny_llama_dir, dpo_reference["data"], tmp_path / "out", *DPO_FLAGS)[1:]
    validate_args(
        parse_args([*flags, "--init_adapter", str(start)]), cuda_available=False
    )  # --lora_dim 8 = its r
    with pytest.raises(ArgsError, match=r"--lora_dim 4 \(the adapter's: 8\)"):
        validate_args(
            parse_args([*flags, "--init_adapter", str(start), "--lora_dim", "4"]), cuda_available=False
        )
    run = train_here(
        tiny_llama_dir, dpo_reference["data"], tmp_path / "out", *DPO_FLAGS, "--init_adapter", str(start),
        "--max_steps", "2",
    )  # fmt: skip
    assert run.code == 0, run.log[-3000:]
    assert "computed in one pass" in run.log
    first = scalars(tmp_path / "out")["train/loss"][0][1]
    assert first == pytest.approx(math.log(2), rel=1e-5)
    # evaluate.py preference takes the run's --init_adapter as the reference, as training did.
    import json

    import evaluate

    final, out_json = checkpoints(tmp_path / "out")[2], tmp_path / "pref.json"
    argv = ["preference", "--model_path", str(tiny_llama_dir), "--adapter_dir", str(final)]
    argv += ["--data_path", str(dpo_reference["data"] / "test.jsonl"), "--output_json", str(out_json)]
    assert evaluate.main(argv) == 0
    result, logged = json.loads(out_json.read_text()), state(final)["eval"]
    assert result["reference"] == str(start)
    assert result["reward_accuracy"] == logged["reward_accuracy"]
    assert result["reward_margin"] == pytest.approx(logged["reward_margin"], rel=1e-4, abs=1e-6)
