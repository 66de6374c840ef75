"""Convert public data sets to the conversation JSONL format used for training.

    python data_helper.py rolebench --data_dir ../shared/data/rolebench-zh --out_dir data/rolebench
    python data_helper.py dolly --input dolly.jsonl --output data/dolly.jsonl [--reverse]
    python data_helper.py dialogsum --input ../shared/data/dialogsum/dialogsum.test.jsonl --output data/dialogsum_test.jsonl
    python data_helper.py alpaca --input alpaca_data.json --output data/alpaca.jsonl
    python data_helper.py conversations --input chats.jsonl --output data/chats.jsonl

Every sub-command prints its counts: input records read, kept and skipped (with the reasons), and
samples written (RoleBench counts questions: each kept question gives up to --max_answers samples).
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

from sft.cli import ArgumentParser, check_output_path, run_entry_point
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
    return parser


def _report(name: str, stats: ConvertStats) -> None:
    # The counts are this command's product: printed, not logged.
    for line in stats.lines(name):
        print(line)


def run(args: argparse.Namespace) -> None:
    """Convert everything first, then write: an error leaves no output file behind."""
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
