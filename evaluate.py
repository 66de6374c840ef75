"""Evaluate a fine-tuned model: ROUGE on a predictions file, perplexity of model+adapter on a test set, reward
accuracy and margin of a preference-trained adapter on pairs.

    python evaluate.py rouge --pred_path preds.jsonl [--lang auto|en|zh] [--zh_tokenizer char|jieba]
    python evaluate.py ppl --model_path BASE --adapter_dir ADAPTER --data_path test.jsonl
    python evaluate.py preference --model_path BASE --adapter_dir ADAPTER --data_path test_pairs.jsonl

Each prints a table and, with ``--output_json FILE``, writes the same numbers as JSON. ``ppl`` computes
exactly what train.py reports at its save steps (same data pipeline, same loss code); its data
settings default to the adapter's train_args.json. See docs/INFERENCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import register_models
from sft.checkpoint.layout import TRAIN_ARGS, read_train_args
from sft.core.errors import ArgsError
from sft.core.flags import REQUIRED, ArgumentParser, HelpFormatter, add_command, flag, flag_of, parse_command
from sft.core.paths import check_output_path
from sft.core.runner import run_entry_point, setup_logging
from sft.inference.rouge import MODE_DESCRIPTIONS, REDUCTIONS, ROUGE_TYPES
from sft.inference.settings import ModelLoadArgs
from sft.train.args import DataArgs, OptimArgs

logger = logging.getLogger("evaluate")

FROM_TRAINING = "the adapter's train_args.json, else train.py's default"


@dataclass
class RougeArgs:
    """The flags of ``evaluate.py rouge``."""

    pred_path: str = flag(
        REQUIRED,
        "JSONL with 'prediction' and 'references' (predict.py output).",
        aliases=("--predictions",),
    )
    lang: str = flag(
        "auto",
        "en: word level with stemming; zh: Chinese (see --zh_tokenizer); auto: decided from the references.",
        choices=("auto", "en", "zh"),
    )
    zh_tokenizer: str = flag("char", "Chinese units: characters or jieba words.", choices=("char", "jieba"))
    multi_ref: str = flag(
        "mean",
        "How a sample with several references is scored: mean over them (default) or the best one.",
        choices=REDUCTIONS,
    )
    output_json: str | None = flag(None, "Also write the scores to this JSON file.")


@dataclass
class PplSettings:
    """The data settings of ``evaluate.py ppl``; unset: the adapter's train_args.json, else train.py's default."""

    flag_group = "data settings (must match training to reproduce its perplexity)"
    max_len: int | None = flag_of(DataArgs, "max_len", defaults_from=FROM_TRAINING)
    max_src_len: int | None = flag_of(DataArgs, "max_src_len", defaults_from=FROM_TRAINING)
    is_skip: bool | None = flag_of(DataArgs, "is_skip", defaults_from=FROM_TRAINING)
    loss_on: str | None = flag_of(DataArgs, "loss_on", defaults_from=FROM_TRAINING)
    packing: bool | None = flag_of(DataArgs, "packing", defaults_from=FROM_TRAINING)
    per_device_eval_batch_size: int | None = flag_of(
        OptimArgs, "per_device_eval_batch_size", defaults_from=FROM_TRAINING
    )


PPL_SETTINGS = tuple(f.name for f in dataclasses.fields(PplSettings))


@dataclass
class PplModel(ModelLoadArgs):
    """The model of ``evaluate.py ppl`` (its dtype as the adapter was trained), and the test set."""

    flag_group = None  # listed under "options" also where it is inherited
    dtype: str | None = flag_of(
        ModelLoadArgs, "dtype", defaults_from="the adapter's training precision, else auto"
    )
    data_path: str = flag(REQUIRED, "Test conversations (JSONL), as train.py's --test_path.")


@dataclass
class PplArgs(PplSettings, PplModel):
    """The flags of ``evaluate.py ppl``."""

    output_json: str | None = flag(None, "Also write the result to this JSON file.")


@dataclass
class PreferenceModel(ModelLoadArgs):
    """The model of ``evaluate.py preference`` (the adapter evaluated; without it, the reference), the pairs."""

    flag_group = None
    dtype: str | None = flag_of(
        ModelLoadArgs, "dtype", defaults_from="the adapter's training precision, else auto"
    )
    data_path: str = flag(REQUIRED, "Preference pairs (JSONL, docs/DATA.md), as train.py's --test_path.")
    pref_beta: float | None = flag(
        None,
        "Beta of the rewards beta * (policy - reference) (default: the adapter's training --pref_beta, else 0.1).",
    )
    ref_adapter_dir: str | None = flag(
        None,
        "The reference: this adapter on --model_path (default: the adapter's training --init_adapter, as DPO "
        "from an SFT adapter used it; else --model_path alone).",
    )


@dataclass
class PreferenceEvalArgs(PplSettings, PreferenceModel):
    """The flags of ``evaluate.py preference``."""

    output_json: str | None = flag(None, "Also write the result to this JSON file.")


def build_parser() -> argparse.ArgumentParser:
    """The ``rouge`` and ``ppl`` subcommands: the fields of :class:`RougeArgs` and :class:`PplArgs`."""
    parser = ArgumentParser(
        description="ROUGE on predictions and perplexity of model+adapter (see docs/INFERENCE.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = HelpFormatter
    add_command(sub, "rouge", RougeArgs, help="ROUGE-1/2/L of a predict.py output file.", formatter_class=fmt)
    add_command(
        sub, "ppl", PplArgs, help="Perplexity of a model (+ adapter) on a test set.", formatter_class=fmt
    )
    add_command(
        sub,
        "preference",
        PreferenceEvalArgs,
        help="Reward accuracy and margin of an adapter on preference pairs, against its reference.",
        formatter_class=fmt,
    )
    return parser


# ---------------------------------------------------------------------------------------------
# rouge
# ---------------------------------------------------------------------------------------------


def read_predictions(path: str) -> tuple[list[str], list[list[str]]]:
    """Predictions and their reference lists from a predict.py output file (errors name file:line)."""
    from sft.data.formats import DataFormatError, iter_json_records

    predictions, references = [], []
    for line, row in iter_json_records(path):
        if not isinstance(row, dict) or not isinstance(row.get("prediction"), str):
            raise DataFormatError(
                "expected an object with a string 'prediction' (predict.py output)", source=path, line=line
            )
        refs = row.get("references")
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise DataFormatError("'references' must be a list of strings", source=path, line=line)
        predictions.append(row["prediction"])
        references.append(refs)
    return predictions, references


def run_rouge(args: RougeArgs) -> dict[str, Any]:
    """Score ``--pred_path`` and print the table."""
    from sft.inference.rouge import corpus_rouge

    predictions, references = read_predictions(args.pred_path)
    mode = {"auto": "auto", "en": "en", "zh": f"zh-{args.zh_tokenizer}"}[args.lang]
    result = corpus_rouge(
        predictions, references, mode=mode, zh_tokenizer=args.zh_tokenizer, reduce=args.multi_ref
    )
    out = {"pred_path": args.pred_path, **result.to_dict()}
    print(f"ROUGE of {args.pred_path}: {result.samples} samples")
    print(f"tokenization: {MODE_DESCRIPTIONS[result.mode]}")
    print(f"multi-reference: {out['multi_reference']}")
    if result.skipped_no_reference:
        print(f"skipped (no reference): {result.skipped_no_reference}")
    print(f"{'metric':<10}{'precision':>11}{'recall':>9}{'f1':>9}")
    for kind in ROUGE_TYPES:
        s = result.scores[kind]
        print(f"{kind:<10}{s['precision']:>11.2f}{s['recall']:>9.2f}{s['f1']:>9.2f}")
    return out


# ---------------------------------------------------------------------------------------------
# ppl
# ---------------------------------------------------------------------------------------------


def ppl_settings(args: PplArgs) -> tuple[dict[str, Any], str]:
    """Data settings for perplexity: flag, else the adapter's train_args.json, else train.py's default.

    Checked here, before any model is loaded; an impossible value names its flag and where it came from.
    """
    from sft.train.args import TrainArgs

    defaults = TrainArgs()
    train_args = (read_train_args(args.adapter_dir) if args.adapter_dir else None) or {}
    settings, sources = {}, {}
    for name in PPL_SETTINGS:
        flag = getattr(args, name)
        if flag is not None:
            settings[name], sources[name] = flag, "flag"
        elif name in train_args:
            settings[name], sources[name] = train_args[name], TRAIN_ARGS
        else:
            settings[name], sources[name] = getattr(defaults, name), "train.py default"
    dtype = args.dtype or train_args.get("precision") or "auto"
    settings["dtype"] = dtype
    check_ppl_settings(settings, sources)
    described = ", ".join(f"{k}={settings[k]!r} ({sources[k]})" for k in PPL_SETTINGS)
    return settings, described


def check_ppl_settings(settings: dict[str, Any], sources: dict[str, str]) -> None:
    """Refuse impossible lengths/batch sizes, naming each flag and where its value came from."""

    def flag(name: str) -> str:
        source = "" if sources[name] == "flag" else f" (from {sources[name]})"
        return f"--{name}={settings[name]}{source}"

    problems = []
    max_len, max_src_len = settings["max_len"], settings["max_src_len"]
    if max_src_len < 1:
        problems.append(f"{flag('max_src_len')} must be >= 1")
    elif max_src_len >= max_len:
        problems.append(
            f"{flag('max_src_len')} must be smaller than {flag('max_len')} (the answer needs room): "
            "lower --max_src_len or raise --max_len"
        )
    if settings["per_device_eval_batch_size"] < 1:
        problems.append(f"{flag('per_device_eval_batch_size')} must be >= 1")
    if problems:
        raise ArgsError(problems)


def run_ppl(args: PplArgs) -> dict[str, Any]:
    """Perplexity of model (+ adapter) on ``--data_path``, as train.py computes it; prints the table."""
    from sft.data.batching import build_eval_dataloader
    from sft.data.dataset import load_sft_dataset
    from sft.inference.loading import load_from_flags
    from sft.train.evaluation import evaluate_perplexity

    settings, described = ppl_settings(args)
    if not Path(args.data_path).is_file():
        raise FileNotFoundError(f"--data_path {args.data_path} is not a file: pass the test set (JSONL)")
    logger.info("perplexity settings: %s", described)
    loaded = load_from_flags(args, dtype=settings["dtype"])
    tokenizer = loaded.tokenizer
    dataset = load_sft_dataset(
        args.data_path,
        tokenizer,
        loaded.template,
        max_len=settings["max_len"],
        max_src_len=settings["max_src_len"],
        is_skip=settings["is_skip"],
        loss_on=settings["loss_on"],
    )
    loader = build_eval_dataloader(
        dataset,
        batch_size=settings["per_device_eval_batch_size"],
        rank=0,
        world_size=1,
        pad_token_id=tokenizer.pad_token_id,
        packing=settings["packing"],
        max_len=settings["max_len"],
    )
    result = evaluate_perplexity(loaded.model, loader, device=loaded.device)
    out = {
        "model_path": str(args.model_path),
        "adapter_dir": args.adapter_dir,
        "data_path": args.data_path,
        "examples": len(dataset),
        "quantization": loaded.quantization,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "template": loaded.template_name,
        **{k: settings[k] for k in PPL_SETTINGS},
        **result,
    }
    print(f"perplexity of {args.model_path}" + (f" + {args.adapter_dir}" if args.adapter_dir else ""))
    print(f"on {args.data_path}: {len(dataset)} examples, {result['tokens']} learned tokens")
    print(f"{'loss':<8}{'ppl':>12}")
    print(f"{result['loss']:<8.4f}{result['ppl']:>12.3f}")
    return out


# ---------------------------------------------------------------------------------------------
# preference
# ---------------------------------------------------------------------------------------------


def run_preference(args: PreferenceEvalArgs) -> dict[str, Any]:
    """Rewards ``beta * (policy - reference)`` of every pair, the adapter being the policy and the model without
    it the reference, as train.py's DPO evaluation computes them; prints the table."""
    from sft.checkpoint.adapters import check_adapter_fits_base, read_adapter
    from sft.data.preference import load_preference_dataset
    from sft.inference.loading import load_from_flags
    from sft.train.attention import use_document_sdpa
    from sft.train.reference import pair_logps

    if not args.adapter_dir:
        raise ArgsError(
            ["--adapter_dir is required: the adapter is the policy, the model without it the reference"]
        )
    settings, described = ppl_settings(args)
    if not Path(args.data_path).is_file():
        raise FileNotFoundError(f"--data_path {args.data_path} is not a file: pass preference pairs (JSONL)")
    train_args = read_train_args(args.adapter_dir) or {}
    beta = args.pref_beta if args.pref_beta is not None else train_args.get("pref_beta", 0.1)
    logger.info("settings: %s, pref_beta=%g", described, beta)
    loaded = load_from_flags(args, dtype=settings["dtype"])
    dataset = load_preference_dataset(
        args.data_path,
        loaded.template,
        loaded.tokenizer,
        max_len=settings["max_len"],
        max_src_len=settings["max_src_len"],
        is_skip=settings["is_skip"],
    )
    if settings["packing"] and loaded.device.type == "cpu":
        # As train.py packs them: each pair's prompt computed once, where the attention can share it (CPU).
        model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        dataset.share_prompt = use_document_sdpa(model)
    common = {
        "batch_size": settings["per_device_eval_batch_size"],
        "pad_token_id": loaded.tokenizer.pad_token_id,
        "packing": settings["packing"],
        "max_len": settings["max_len"],
        "device": loaded.device,
    }
    policy = pair_logps(loaded.model, dataset, adapter=True, **common)
    ref_dir = args.ref_adapter_dir or train_args.get("init_adapter") or None
    if ref_dir:
        flag = (
            "--ref_adapter_dir"
            if args.ref_adapter_dir
            else f"--ref_adapter_dir (from {TRAIN_ARGS}: init_adapter)"
        )
        check_adapter_fits_base(args.model_path, read_adapter(ref_dir, flag), base_flag="--model_path")
        loaded.model.load_adapter(ref_dir, adapter_name="reference")
        loaded.model.set_adapter("reference")
        reference = pair_logps(loaded.model, dataset, adapter=True, **common)
    else:
        reference = pair_logps(loaded.model, dataset, adapter=False, **common)
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    logps = {
        "policy_chosen": float(policy[:, 0].mean()),
        "policy_rejected": float(policy[:, 1].mean()),
        "reference_chosen": float(reference[:, 0].mean()),
        "reference_rejected": float(reference[:, 1].mean()),
    }
    out = {
        "model_path": str(args.model_path),
        "adapter_dir": args.adapter_dir,
        "reference": ref_dir or str(args.model_path),
        "data_path": args.data_path,
        "pairs": len(dataset),
        "pref_beta": beta,
        "reward_accuracy": float((margin > 0).mean()),
        "reward_margin": float(margin.mean()),
        "logps": logps,
    }
    print(f"preference of {args.adapter_dir} (policy) over {out['reference']} (reference)")
    print(f"on {args.data_path}: {len(dataset)} pairs, beta {beta:g}")
    print(f"{'reward accuracy':<18}{out['reward_accuracy']:>10.3f}")
    print(f"{'reward margin':<18}{out['reward_margin']:>10.4f}")
    print(f"{'mean log-prob':<18}{'chosen':>10}{'rejected':>10}")
    print(f"{'  policy':<18}{logps['policy_chosen']:>10.3f}{logps['policy_rejected']:>10.3f}")
    print(f"{'  reference':<18}{logps['reference_chosen']:>10.3f}{logps['reference_rejected']:>10.3f}")
    return out


def run(argv: list[str]) -> None:
    """Parse the flags, compute, print; write --output_json (atomically) when asked."""
    from sft.core.atomic import write_file_atomic

    command, args = parse_command(build_parser(), argv)
    setup_logging()
    if command != "rouge":  # rouge reads text files only: it starts without torch and transformers
        register_models()
    if args.output_json:
        check_output_path(args.output_json, "--output_json", kind="file")
    out = {"rouge": run_rouge, "ppl": run_ppl, "preference": run_preference}[command](args)
    if args.output_json:
        write_file_atomic(
            args.output_json, lambda fh: fh.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        )
        logger.info("wrote %s", args.output_json)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (README.md, "When things go wrong")."""
    return run_entry_point(run, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
