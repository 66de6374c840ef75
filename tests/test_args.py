"""sft.train.args: flag parsing, validation (all problems at once) and ds_config "auto" filling."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sft.core.errors import ArgsError
from sft.train.args import TrainArgs, build_parser, parse_args
from sft.train.ds_config import build_ds_config
from sft.train.validate import validate_args

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    model = tmp_path / "model"
    model.mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text('{"conversations": []}\n', encoding="utf-8")
    return {"model": str(model), "train": str(train)}


def _args(paths: dict[str, str], *extra: str) -> TrainArgs:
    return parse_args(["--model_name_or_path", paths["model"], "--train_path", paths["train"], *extra])


def test_every_field_is_a_flag_with_help():
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(TrainArgs):
        assert f"--{f.name}" in flags
        assert f.metadata["help"]
    recipe = [
        "model_name_or_path",
        "train_path",
        "test_path",
        "max_len",
        "max_src_len",
        "is_skip",
        "per_device_train_batch_size",
        "learning_rate",
        "weight_decay",
        "num_train_epochs",
        "gradient_accumulation_steps",
        "warmup_ratio",
        "seed",
        "show_loss_step",
        "gradient_checkpointing",
        "save_model_step",
        "lora_dim",
        "lora_alpha",
        "lora_dropout",
        "output_dir",
        "ds_file",
        "local_rank",
    ]
    for name in recipe:
        assert f"--{name}" in flags, name


def test_recipe_command_line_parses(paths):
    args = parse_args(
        [
            "--model_name_or_path",
            paths["model"],
            "--train_path",
            paths["train"],
            "--ds_file",
            "ds_configs/zero3.json",
            "--gradient_checkpointing",
            "--is_skip",
            "--local_rank=1",
            "--lora_dim",
            "8",
        ]
    )
    assert args.ds_config == "ds_configs/zero3.json"
    assert args.gradient_checkpointing and args.is_skip
    assert args.local_rank == 1 and args.lora_dim == 8
    assert args.quantization == "nf4" and args.double_quant  # QLoRA defaults


def test_valid_arguments_pass(paths):
    validate_args(_args(paths), cuda_available=False)


def test_all_problems_are_reported_together(paths):
    args = _args(
        paths,
        "--max_src_len",
        "600",
        "--max_len",
        "512",
        "--gradient_accumulation_steps",
        "0",
        "--precision",
        "fp16",
        "--warmup_ratio",
        "1.5",
        "--peft",
        "prompt_tuning",
        "--packing",
        "--lora_target",
        "q_proj",
    )
    with pytest.raises(ArgsError) as info:
        validate_args(args, cuda_available=False)
    text = str(info.value)
    for needle in (
        "--max_src_len=600",
        "--gradient_accumulation_steps=0",
        "--precision fp16 needs a GPU",
        "--warmup_ratio=1.5",
        "--packing cannot be combined",
        "--lora_target only applies",
    ):
        assert needle in text, needle
    assert len(info.value.problems) == 6


def test_missing_model_and_hub_id(paths, tmp_path):
    args = parse_args(
        ["--model_name_or_path", "baichuan-inc/Baichuan2-7B-Chat", "--train_path", str(tmp_path / "no.jsonl")]
    )
    with pytest.raises(ArgsError) as info:
        validate_args(args, cuda_available=False)
    assert "looks like a hub id" in str(info.value)
    assert "--train_path=" in str(info.value)
    with pytest.raises(ArgsError, match="--model_name_or_path is required"):
        validate_args(parse_args(["--train_path", paths["train"]]), cuda_available=False)


def test_gpu_only_options_rejected_on_cpu(paths):
    with pytest.raises(ArgsError) as info:
        validate_args(
            _args(paths, "--quantization", "int8", "--attn_implementation", "flash_attention_2"),
            cuda_available=False,
        )
    assert len(info.value.problems) == 2
    validate_args(_args(paths, "--quantization", "int8", "--precision", "fp16"), cuda_available=True)


def test_flash_attention_needs_a_half_precision(paths):
    """flash-attn has no fp32 kernels: transformers' Llama would fail at the first forward."""
    args = _args(paths, "--attn_implementation", "flash_attention_2", "--precision", "fp32")
    with pytest.raises(ArgsError, match="use --precision bf16") as info:
        validate_args(args, cuda_available=True)
    assert len(info.value.problems) == 1 and "--attn_implementation sdpa" in str(info.value)
    validate_args(_args(paths, "--attn_implementation", "flash_attention_2"), cuda_available=True)  # bf16


def test_resume_path_must_be_a_checkpoint(paths, tmp_path):
    with pytest.raises(ArgsError, match="no training_state"):
        validate_args(_args(paths, "--resume_from_checkpoint", str(tmp_path)), cuda_available=False)
    validate_args(_args(paths, "--resume_from_checkpoint", "latest"), cuda_available=False)


def test_ds_config_auto_values_are_filled(paths):
    args = _args(
        paths,
        "--per_device_train_batch_size",
        "3",
        "--gradient_accumulation_steps",
        "5",
        "--learning_rate",
        "2e-4",
        "--precision",
        "fp32",
        "--max_grad_norm",
        "0.5",
    )
    config = build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 60
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["lr"] == 2e-4
    assert config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_bundled_configs_fill_completely(paths, name):
    args = _args(paths, "--ds_config", str(REPO_ROOT / "ds_configs" / f"{name}.json"))
    config = build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=2)
    assert "auto" not in json.dumps(config)
    assert config["bf16"]["enabled"] is True
    # torch's AdamW (nothing for DeepSpeed to compile, offloaded or not) and fp32 gradient accumulation under bf16.
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}


def test_ds_config_defaults_yield_to_the_config(paths, tmp_path):
    """torch_adam and grad_accum_dtype are defaults: a config that sets them keeps its values; fp32 runs and
    ZeRO-0 (where DeepSpeed refuses a different accumulation dtype) get no grad_accum_dtype."""
    config = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = False
    config["data_types"] = {"grad_accum_dtype": "bf16"}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(config))
    args = _args(paths, "--ds_config", str(path))
    filled = build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=1)
    assert filled["optimizer"]["params"]["torch_adam"] is False
    assert filled["data_types"] == {"grad_accum_dtype": "bf16"}
    args = _args(paths, "--precision", "fp32")
    filled = build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=1)
    assert "data_types" not in filled and filled["optimizer"]["params"]["torch_adam"] is True
    config = {"optimizer": {"type": "Lamb", "params": {"lr": "auto", "weight_decay": "auto"}}}
    path.write_text(json.dumps(config))
    args = _args(
        paths, "--ds_config", str(path), "--max_bad_steps", "0"
    )  # no ZeRO section: stage 0, no guard
    filled = build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=1)
    assert "data_types" not in filled and "torch_adam" not in filled["optimizer"]["params"]


def test_ds_config_disagreement_is_an_error(paths, tmp_path):
    config = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
    config["gradient_accumulation_steps"] = 8
    config["bf16"]["enabled"] = True
    config["scheduler"] = {"type": "WarmupLR"}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(config))
    args = _args(paths, "--ds_config", str(path), "--gradient_accumulation_steps", "4", "--precision", "fp32")
    with pytest.raises(ArgsError) as info:
        validate_args(args, cuda_available=False)
    text = str(info.value)
    assert "gradient_accumulation_steps=8 but --gradient_accumulation_steps gives 4" in text
    assert "bf16.enabled=True but --precision fp32" in text
    assert '"scheduler" section' in text
    # Explicit values that agree with the flags are fine.
    args = _args(paths, "--ds_config", str(path), "--gradient_accumulation_steps", "8")
    config.pop("scheduler")
    path.write_text(json.dumps(config))
    build_ds_config(args, path=args.ds_config, precision=args.precision, world_size=1)


def test_help_renders_every_help_string():
    # A literal % in a help string ("~30% slower") used to make argparse's --help crash or garble.
    text = " ".join(build_parser().format_help().split())
    assert "~30% slower" in text
    assert "option_strings" not in text


def test_ds_config_of_the_wrong_shape_is_an_argument_error(paths, tmp_path):
    cases = {
        "[1, 2]": "must be a JSON object {...}, got list",
        '{"bf16": true}': "bf16 must be a JSON object {...}, got true",
        '{"optimizer": {"type": "AdamW", "params": 3}}': "optimizer.params must be a JSON object",
        '{"zero_optimization": {"stage": "two"}}': "zero_optimization.stage='two' must be 0, 1, 2 or 3",
    }
    for i, (text, needle) in enumerate(cases.items()):
        path = tmp_path / f"conf{i}.json"
        path.write_text(text)
        with pytest.raises(ArgsError) as info:
            validate_args(_args(paths, "--ds_config", str(path)), cuda_available=False)
        assert needle in str(info.value), (text, str(info.value))
    path = tmp_path / "broken.json"
    path.write_text('{"train_batch_size": 3,\n')
    with pytest.raises(ArgsError, match=r"invalid JSON at line 2 column 1"):
        validate_args(_args(paths, "--ds_config", str(path)), cuda_available=False)


def test_explicit_train_batch_size_is_checked_against_the_launcher_world_size(paths, tmp_path, monkeypatch):
    config = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
    config["train_batch_size"] = 16  # 2 x 4 x 2 ranks
    path = tmp_path / "two_ranks.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate_args(_args(paths, "--ds_config", str(path)), cuda_available=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ArgsError, match="train_batch_size=16"):
        validate_args(_args(paths, "--ds_config", str(path)), cuda_available=False)


def test_output_dir_must_be_creatable(paths, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ArgsError) as info:
        validate_args(
            _args(paths, "--output_dir", str(blocker / "out"), "--tensorboard_dir", str(blocker)),
            cuda_available=False,
        )
    text = str(info.value)
    assert f"--output_dir={blocker / 'out'} cannot be created: {blocker} is a file" in text
    assert f"--tensorboard_dir={blocker} is a file" in text
    validate_args(_args(paths, "--output_dir", str(tmp_path / "new" / "deeper")), cuda_available=False)


def test_interrupted_checkpoint_is_refused_before_any_work(paths, tmp_path):
    ckpt = tmp_path / "out" / "epoch-1-step-4"
    (ckpt / "training_state").mkdir(parents=True)  # the save was cut before trainer_state.json
    with pytest.raises(ArgsError, match=r"trainer_state\.json is missing, so its save was interrupted"):
        validate_args(_args(paths, "--resume_from_checkpoint", str(ckpt)), cuda_available=False)


def test_unknown_lora_target_is_an_argument_error(tiny_baichuan_dir):
    """Only the model knows its module names: the check runs at load time but reports like a flag error."""
    from sft.modeling.loading import load_base_model
    from sft.train.model import build_peft_config

    model = load_base_model(tiny_baichuan_dir, "none", dtype=torch.float32)
    args = parse_args(["--lora_target", "q_proj,W_pack"])
    with pytest.raises(ArgsError, match="--lora_target q_proj: no such module in BaichuanForCausalLM"):
        build_peft_config(args, model)
    assert build_peft_config(parse_args(["--lora_target", "W_pack"]), model).target_modules == {"W_pack"}


def test_docs_flag_tables_are_generated_from_the_code():
    """docs/TRAINING.md's flag tables are the help texts of TrainArgs (one source of truth)."""
    from sft.core.flags import flag_table, generated_block

    docs = (REPO_ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    assert generated_block("train-flags", flag_table(TrainArgs)) in docs, (
        "docs/TRAINING.md is out of date: run python -m sft.train.args --update-docs"
    )
