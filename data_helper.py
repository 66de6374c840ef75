"""Convert public data sets to the conversation JSONL format used for training.

    python data_helper.py rolebench --data_dir ../shared/data/rolebench-zh --out_dir data/rolebench
    python data_helper.py dolly --input dolly.jsonl --output data/dolly.jsonl [--reverse]
    python data_helper.py dialogsum --input ../shared/data/dialogsum/dialogsum.test.jsonl --output data/dialogsum_test.jsonl
    python data_helper.py alpaca --input alpaca_data.json --output data/alpaca.jsonl
    python data_helper.py conversations --input chats.jsonl --output data/chats.jsonl
    python data_helper.py synthesize --model_path BASE --adapter_dir REVERSE_ADAPTER --input texts.txt --output data/alpaca.jsonl

Every sub-command prints its counts: input records read, kept and skipped (with the reasons), and
samples written (RoleBench counts questions: each kept question gives up to --max_answers samples;
synthesize counts texts).
A bad record stops the run with ``file:line: reason`` and exit status 1, and no output file is
written (``--skip_invalid`` counts such records as skipped instead). Outputs are written to a temp file and renamed;
rolebench's train.jsonl and test.jsonl are replaced together, so a killed run leaves the old pair or the new one.
See docs/DATA.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models import register_models
from sft.core.errors import ArgsError
from sft.core.flags import ArgumentParser, add_arguments, from_namespace
from sft.core.paths import check_output_path, require_local_dir
from sft.core.runner import run_entry_point, set_seed
from sft.data.converters import (
    DIALOGSUM_PROMPT,
    ROLEBENCH_SYSTEM_TEMPLATE,
    ConvertStats,
    convert_alpaca,
    convert_conversations,
    convert_dialogsum,
    convert_dolly,
    convert_rolebench,
)
from sft.data.formats import DataFormatError, write_jsonl_atomic, write_jsonl_dir_atomic
from sft.inference.loading import ModelLoadArgs, load_from_flags
from sft.inference.settings import GenerationArgs, build_generation_config, describe, read_generation_config
from sft.inference.synthesize import SynthesisFilters, read_texts, synthesize
from sft.train.args import DataArgs

logger = logging.getLogger("data_helper")


def _add_common(p: argparse.ArgumentParser, *, io: bool = True) -> None:
    if io:
        p.add_argument("--input", required=True, type=Path, help="source file (JSONL, or a JSON array)")
        p.add_argument("--output", required=True, type=Path, help="output conversation JSONL file")
    p.add_argument(
        "--skip_invalid",
        action="store_true",
        help="count invalid records as skipped instead of stopping with an error",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="data_helper.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sub.add_parser("rolebench", help="RoleBench-zh (role-specific + general) -> train/test files")
    p.add_argument(
        "--data_dir",
        type=Path,
        default=Path("../shared/data/rolebench-zh"),
        help="folder with rolebench-zh_*_{train,test}.jsonl and profiles-zh_desc.json",
    )
    p.add_argument("--out_dir", type=Path, required=True, help="writes train.jsonl and test.jsonl here")
    p.add_argument(
        "--roles", nargs="+", default=None, help="roles to keep (default: every role in the profiles file)"
    )
    p.add_argument(
        "--system_template",
        default=ROLEBENCH_SYSTEM_TEMPLATE,
        help="system prompt template with {role} and {desc} (default: the recipe's Chinese prompt)",
    )
    p.add_argument("--max_answers", type=int, default=2, help="answers kept per question (seeded shuffle)")
    p.add_argument("--seed", type=int, default=42, help="seed for choosing the answers")
    p.add_argument(
        "--splits",
        nargs="+",
        default=["train", "test"],
        choices=["train", "test"],
        help="which splits to convert",
    )
    _add_common(p, io=False)

    p = sub.add_parser("dolly", help="Dolly-15k style instruction/context/response records")
    _add_common(p)
    p.add_argument(
        "--reverse",
        action="store_true",
        help="instruction back-translation: learn response (+context) -> instruction",
    )

    p = sub.add_parser("dialogsum", help="DialogSum dialogues -> summarisation samples")
    _add_common(p)
    p.add_argument("--prompt", default=DIALOGSUM_PROMPT, help="user prompt template with {dialogue}")

    p = sub.add_parser("alpaca", help="Alpaca instruction/input/output records")
    _add_common(p)

    p = sub.add_parser("conversations", help="multi-turn chats with system, tools, tool calls, observations")
    _add_common(p)

    p = sub.add_parser(
        "synthesize",
        help="your own texts -> Alpaca (instruction, text) pairs, instructions written by a reverse model",
        description="Prompt a reverse model (trained on `dolly --reverse` samples) with each text, as in its "
        "training, and keep the (generated instruction, text) pairs that pass the filters (docs/DATA.md).",
    )
    add_arguments(p, ModelLoadArgs)
    io = p.add_argument_group("texts")
    io.add_argument(
        "--input",
        required=True,
        type=Path,
        help="texts: .txt (one a line) or .jsonl/.json (see --text_field)",
    )
    io.add_argument("--output", required=True, type=Path, help="output Alpaca JSONL file")
    io.add_argument("--text_field", default=None, help="JSONL field holding the text (default: text)")
    io.add_argument(
        "--skip_invalid",
        action="store_true",
        help="count JSONL records without a string text field as skipped instead of stopping with an error",
    )
    io.add_argument("--batch_size", type=int, default=8, help="texts generated for together (left-padded)")
    filters = p.add_argument_group("filters (each drop is counted in the summary)")
    add_arguments(
        filters,
        DataArgs,
        only=["max_src_len"],
        defaults_from="the adapter's training --max_src_len, else train.py's",
        grouped=False,
    )
    filters.add_argument(
        "--max_instruction_len",
        type=int,
        default=128,
        help="drop instructions longer than this (tokens); --max_new_tokens defaults to it + 1",
    )
    filters.add_argument(
        "--max_copy_overlap",
        type=float,
        default=0.5,
        help="drop instructions more than this share of whose word 3-grams occur in the text (1 = off)",
    )
    filters.add_argument(
        "--near_dup_threshold",
        type=float,
        default=0.8,
        help="drop texts whose word 3-gram Jaccard similarity to an earlier text is at least this",
    )
    add_arguments(p, GenerationArgs)
    p.add_argument("--seed", type=int, default=1234, help="random seed (makes sampling repeatable)")
    return parser


def _report(name: str, stats: ConvertStats) -> None:
    # The counts are this command's product: printed, not logged.
    for line in stats.lines(name):
        print(line)


def synthesis_filters(args: argparse.Namespace, train_args: dict) -> SynthesisFilters:
    """The filter flags; --max_src_len defaults to the reverse adapter's training value (its prompts were
    cut there), else train.py's default."""
    max_src_len = args.max_src_len
    if max_src_len is None:
        max_src_len = train_args.get("max_src_len", DataArgs.max_src_len)
    return SynthesisFilters(
        max_src_len=max_src_len,
        max_instruction_len=args.max_instruction_len,
        max_copy_overlap=args.max_copy_overlap,
        near_dup_threshold=args.near_dup_threshold,
    )


def run_synthesize(args: argparse.Namespace) -> None:
    """Check flags and read the texts before loading the model; generate; filter; write atomically."""
    register_models()
    problems = [] if args.batch_size >= 1 else [f"--batch_size={args.batch_size} must be >= 1"]
    problems += synthesis_filters(args, {}).problems()
    if problems:
        raise ArgsError(problems)
    settings = from_namespace(GenerationArgs, args)
    if settings.max_new_tokens is None:
        # One token more than the filter allows: an instruction cut by this limit is caught as over-long, and
        # no time goes into generating past it (a chat model's generation_config may allow thousands).
        settings.max_new_tokens = args.max_instruction_len + 1
    settings.check(read_generation_config(require_local_dir(args.model_path, "--model_path")))
    stats = ConvertStats(unit="texts")
    texts = read_texts(args.input, text_field=args.text_field, skip_invalid=args.skip_invalid, stats=stats)

    loaded = load_from_flags(from_namespace(ModelLoadArgs, args))
    if loaded.adapter is None and args.template is None:
        logger.warning(
            "no --adapter_dir: prompting with the template %s chosen from the model; pass --template as the "
            "reverse model was trained if that differs",
            loaded.template_name,
        )
    filters = synthesis_filters(args, loaded.adapter.train_args if loaded.adapter else {})
    set_seed(args.seed)
    config = build_generation_config(
        loaded.model, loaded.tokenizer, settings, stop_ids=[loaded.template.end_id]
    )
    logger.info("template %s; %s; generation: %s", loaded.template_name, filters, describe(config))
    records = synthesize(
        texts, loaded.model, loaded.tokenizer, loaded.template, config, filters,
        batch_size=args.batch_size, stats=stats,
    )  # fmt: skip
    _report("synthesize", stats)
    if not records:
        raise DataFormatError(f"nothing to write to {args.output}: every text was skipped")
    write_jsonl_atomic(args.output, records)
    print(f"wrote {len(records)} samples to {args.output}")


def run(args: argparse.Namespace) -> None:
    """Convert everything first, then write: an error leaves no output file behind."""
    if args.source == "synthesize":
        check_output_path(args.output, "--output", kind="file", inputs={"--input": args.input})
        run_synthesize(args)
        return
    if args.source == "rolebench":
        check_output_path(args.out_dir, "--out_dir", kind="dir", inputs={"--data_dir": args.data_dir})
    else:
        check_output_path(args.output, "--output", kind="file", inputs={"--input": args.input})
    outputs: dict[Path, list] = {}
    if args.source == "rolebench":
        for split in args.splits:
            records, stats = convert_rolebench(
                args.data_dir,
                split,
                roles=args.roles,
                system_template=args.system_template,
                max_answers=args.max_answers,
                seed=args.seed,
                skip_invalid=args.skip_invalid,
            )
            _report(f"rolebench {split}", stats)
            outputs[args.out_dir / f"{split}.jsonl"] = records
    else:
        if args.source == "dolly":
            records, stats = convert_dolly(args.input, reverse=args.reverse, skip_invalid=args.skip_invalid)
        elif args.source == "dialogsum":
            records, stats = convert_dialogsum(args.input, prompt=args.prompt, skip_invalid=args.skip_invalid)
        elif args.source == "alpaca":
            records, stats = convert_alpaca(args.input, skip_invalid=args.skip_invalid)
        else:
            records, stats = convert_conversations(args.input, skip_invalid=args.skip_invalid)
        _report(args.source, stats)
        outputs[args.output] = records
    for path, records in outputs.items():
        if not records:
            raise DataFormatError(f"nothing to write to {path}: every record was skipped")
    if args.source == "rolebench":
        write_jsonl_dir_atomic(args.out_dir, {path.name: records for path, records in outputs.items()})
    else:
        write_jsonl_atomic(args.output, outputs[args.output])
    for path, records in outputs.items():
        print(f"wrote {len(records)} samples to {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (README.md, "When things go wrong")."""
    return run_entry_point(lambda args: run(build_parser().parse_args(args)), argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
