"""Convert public data sets to the conversation JSONL format used for training.

    python data_helper.py rolebench --data_dir ../shared/data/rolebench-zh --out_dir data/rolebench
    python data_helper.py dolly --input dolly.jsonl --output data/dolly.jsonl [--reverse]
    python data_helper.py dialogsum --input ../shared/data/dialogsum/dialogsum.test.jsonl --output data/dialogsum_test.jsonl
    python data_helper.py alpaca --input alpaca_data.json --output data/alpaca.jsonl
    python data_helper.py conversations --input chats.jsonl --output data/chats.jsonl
    python data_helper.py synthesize --model_path BASE --adapter_dir REVERSE_ADAPTER --input texts.txt --output data/alpaca.jsonl
    python data_helper.py preference --model_path BASE --adapter_dir SFT_ADAPTER --input train.jsonl --output pairs.jsonl

Every sub-command prints its counts: input records read, kept and skipped (with the reasons), and
samples written (RoleBench counts questions: each kept question gives up to --max_answers samples;
synthesize counts texts; preference counts records and the pairs written).
A bad record stops the run with ``file:line: reason`` and exit status 1, and no output file is
written (``--skip_invalid`` counts such records as skipped instead). Outputs are written to a temp file and renamed;
rolebench's train.jsonl and test.jsonl are replaced together, so a killed run leaves the old pair or the new one.
See docs/DATA.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models import register_models
from sft.core.flags import REQUIRED, ArgumentParser, add_command, flag, flag_of, parse_command
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
from sft.data.formats import DataFormatError, read_conversations, write_jsonl_atomic, write_jsonl_dir_atomic
from sft.inference.self_play import self_play_pairs
from sft.inference.settings import (
    GenerationArgs,
    ModelLoadArgs,
    build_generation_config,
    describe,
    engine_problems,
    read_generation_config,
)
from sft.inference.synthesize import SynthesisFilters, read_texts, synthesize
from sft.train.args import DataArgs

logger = logging.getLogger("data_helper")


@dataclass
class ConvertArgs:
    """The flags of a converter: its input, its output and what to do with a bad record (alpaca, conversations)."""

    flag_group = None  # listed under "options" also where it is inherited
    input: Path = flag(REQUIRED, "source file (JSONL, or a JSON array)")
    output: Path = flag(REQUIRED, "output conversation JSONL file")
    skip_invalid: bool = flag(
        False, "count invalid records as skipped instead of stopping with an error", action="store_true"
    )


@dataclass
class DollyArgs(ConvertArgs):
    """The flags of ``dolly``."""

    reverse: bool = flag(
        False, "instruction back-translation: learn response (+context) -> instruction", action="store_true"
    )


@dataclass
class DialogsumArgs(ConvertArgs):
    """The flags of ``dialogsum``."""

    prompt: str = flag(DIALOGSUM_PROMPT, "user prompt template with {dialogue}")


@dataclass
class RolebenchArgs:
    """The flags of ``rolebench``."""

    data_dir: Path = flag(
        Path("../shared/data/rolebench-zh"),
        "folder with rolebench-zh_*_{train,test}.jsonl and profiles-zh_desc.json",
    )
    out_dir: Path = flag(REQUIRED, "writes train.jsonl and test.jsonl here")
    roles: list[str] | None = flag(None, "roles to keep (default: every role in the profiles file)")
    system_template: str = flag(
        ROLEBENCH_SYSTEM_TEMPLATE,
        "system prompt template with {role} and {desc} (default: the recipe's Chinese prompt)",
    )
    max_answers: int = flag(2, "answers kept per question (seeded shuffle)")
    seed: int = flag(42, "seed for choosing the answers")
    splits: list[str] = flag(["train", "test"], "which splits to convert", choices=("train", "test"))
    skip_invalid: bool = flag_of(ConvertArgs, "skip_invalid")


@dataclass
class TextsArgs:
    """The texts of ``synthesize``, its output file, and how many texts are generated for together."""

    flag_group = "texts"
    input: Path = flag(REQUIRED, "texts: .txt (one a line) or .jsonl/.json (see --text_field)")
    output: Path = flag(REQUIRED, "output Alpaca JSONL file")
    text_field: str | None = flag(None, "JSONL field holding the text (default: text)")
    skip_invalid: bool = flag(
        False,
        "count JSONL records without a string text field as skipped instead of stopping with an error",
        action="store_true",
    )
    batch_size: int | None = flag(
        None, "texts generated for together; default: as predict.py's --batch_size (docs/INFERENCE.md)"
    )


@dataclass
class FilterArgs:
    """The limits of the quality filters of ``synthesize`` (:class:`SynthesisFilters`)."""

    flag_group = "filters (each drop is counted in the summary)"
    max_src_len: int | None = flag_of(
        DataArgs, "max_src_len", defaults_from="the adapter's training --max_src_len, else train.py's"
    )
    max_instruction_len: int = flag(
        SynthesisFilters.max_instruction_len,
        "drop instructions longer than this (tokens); --max_new_tokens defaults to it + 1",
    )
    max_copy_overlap: float = flag(
        SynthesisFilters.max_copy_overlap,
        "drop instructions more than this share of whose word 3-grams occur in the text (1 = off)",
    )
    near_dup_threshold: float = flag(
        SynthesisFilters.near_dup_threshold,
        "drop texts whose word 3-gram Jaccard similarity to an earlier text is at least this",
    )

    def filters(self, train_args: dict) -> SynthesisFilters:
        """The filters; --max_src_len defaults to the reverse adapter's training value (its prompts were cut
        there), else train.py's default."""
        max_src_len = self.max_src_len
        if max_src_len is None:
            max_src_len = train_args.get("max_src_len", DataArgs.max_src_len)
        return SynthesisFilters(
            max_src_len=max_src_len,
            max_instruction_len=self.max_instruction_len,
            max_copy_overlap=self.max_copy_overlap,
            near_dup_threshold=self.near_dup_threshold,
        )


@dataclass
class SynthesizeArgs(GenerationArgs, FilterArgs, TextsArgs, ModelLoadArgs):
    """The flags of ``synthesize``."""

    seed: int = flag(1234, "random seed (makes sampling repeatable)")

    def problems(self) -> list[str]:
        """Out-of-range batch size and filter limits."""
        problems = (
            []
            if self.batch_size is None or self.batch_size >= 1
            else [f"--batch_size={self.batch_size} must be >= 1"]
        )
        return problems + self.filters({}).problems() + engine_problems(self, batch_size=self.batch_size)


@dataclass
class PairsArgs:
    """The conversations of ``preference``, its output file, and how its pairs are kept."""

    flag_group = "pairs"
    input: Path = flag(REQUIRED, "conversation JSONL: each record's last assistant turn is the chosen reply")
    output: Path = flag(
        REQUIRED, "output preference JSONL file (chosen = the data set's reply, rejected = the model's)"
    )
    skip_invalid: bool = flag_of(ConvertArgs, "skip_invalid")
    batch_size: int | None = flag(
        None, "prompts generated for together; default: as predict.py's --batch_size (docs/INFERENCE.md)"
    )
    max_src_len: int | None = flag_of(
        DataArgs, "max_src_len", defaults_from="the adapter's training --max_src_len, else no cut"
    )
    max_similarity: float = flag(
        0.9,
        "drop a pair whose generation reaches this ROUGE-L F1 against the chosen reply (1 = only identical)",
    )


@dataclass
class PreferenceArgs(GenerationArgs, PairsArgs, ModelLoadArgs):
    """The flags of ``preference``."""

    seed: int = flag(1234, "random seed (makes sampling repeatable)")

    def problems(self) -> list[str]:
        problems = (
            []
            if self.batch_size is None or self.batch_size >= 1
            else [f"--batch_size={self.batch_size} must be >= 1"]
        )
        if not 0 < self.max_similarity <= 1:
            problems.append(f"--max_similarity={self.max_similarity} must be in (0, 1]")
        return problems + engine_problems(self, batch_size=self.batch_size)


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per source: the fields of its dataclass above."""
    parser = ArgumentParser(
        prog="data_helper.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    add_command(
        sub, "rolebench", RolebenchArgs, help="RoleBench-zh (role-specific + general) -> train/test files"
    )
    add_command(sub, "dolly", DollyArgs, help="Dolly-15k style instruction/context/response records")
    add_command(sub, "dialogsum", DialogsumArgs, help="DialogSum dialogues -> summarisation samples")
    add_command(sub, "alpaca", ConvertArgs, help="Alpaca instruction/input/output records")
    add_command(
        sub,
        "conversations",
        ConvertArgs,
        help="multi-turn chats with system, tools, tool calls, observations",
    )
    add_command(
        sub,
        "synthesize",
        SynthesizeArgs,
        help="your own texts -> Alpaca (instruction, text) pairs, instructions written by a reverse model",
        description="Prompt a reverse model (trained on `dolly --reverse` samples) with each text, as in its "
        "training, and keep the (generated instruction, text) pairs that pass the filters (docs/DATA.md).",
    )
    add_command(
        sub,
        "preference",
        PreferenceArgs,
        help="conversations -> self-play preference pairs: the data set's reply chosen, the model's own rejected",
        description="Generate the model's own reply (e.g. the SFT adapter on its base) to every prompt of a "
        "conversation file; each record's own last reply is chosen, the generation rejected; pairs whose "
        "generation is as good as the reply are dropped and counted (docs/DATA.md).",
    )
    return parser


def _report(name: str, stats: ConvertStats) -> None:
    # The counts are this command's product: printed, not logged.
    for line in stats.lines(name):
        print(line)


def run_synthesize(args: SynthesizeArgs) -> None:
    """Check the generation flags and read the texts before loading the model; generate; filter; write
    atomically."""
    from sft.inference.engines import load_engine  # torch and transformers: only the commands that generate

    register_models()
    settings = GenerationArgs(**args.overrides())  # a copy: max_new_tokens may be filled in
    if settings.max_new_tokens is None:
        # One token more than the filter allows: an instruction cut by this limit is caught as over-long, and
        # no time goes into generating past it (a chat model's generation_config may allow thousands).
        settings.max_new_tokens = args.max_instruction_len + 1
    settings.check(read_generation_config(require_local_dir(args.model_path, "--model_path")))
    stats = ConvertStats(unit="texts")
    texts = read_texts(args.input, text_field=args.text_field, skip_invalid=args.skip_invalid, stats=stats)

    engine = load_engine(args, seed=args.seed)
    if engine.adapter is None and args.template is None:
        logger.warning(
            "no --adapter_dir: prompting with the template %s chosen from the model; pass --template as the "
            "reverse model was trained if that differs",
            engine.template_name,
        )
    filters = args.filters(engine.adapter.train_args if engine.adapter else {})
    set_seed(args.seed)
    config = build_generation_config(engine, engine.tokenizer, settings, stop_ids=[engine.template.end_id])
    logger.info("template %s; %s; generation: %s", engine.template_name, filters, describe(config))
    records = synthesize(texts, engine, config, filters, batch_size=args.batch_size, stats=stats)
    _report("synthesize", stats)
    if not records:
        raise DataFormatError(f"nothing to write to {args.output}: every text was skipped")
    write_jsonl_atomic(args.output, records)
    print(f"wrote {len(records)} samples to {args.output}")


def run_preference(args: PreferenceArgs) -> None:
    """Read the conversations and check the generation flags before loading the model; generate; pair; write."""
    from sft.inference.engines import load_engine

    register_models()
    settings = GenerationArgs(**args.overrides())
    settings.check(read_generation_config(require_local_dir(args.model_path, "--model_path")))
    stats = ConvertStats(unit="records")
    records = read_conversations(args.input, skip_invalid=args.skip_invalid, skipped=stats.skipped)
    stats.read = len(records) + sum(stats.skipped.values())
    engine = load_engine(args, seed=args.seed)
    train_args = engine.adapter.train_args if engine.adapter else {}
    max_src_len = args.max_src_len if args.max_src_len is not None else train_args.get("max_src_len")
    set_seed(args.seed)
    config = build_generation_config(engine, engine.tokenizer, settings, stop_ids=[engine.template.end_id])
    logger.info("engine %s; template %s; generation: %s", engine.name, engine.template_name, describe(config))
    with tqdm(total=len(records), desc="preference", unit="prompt") as bar:
        pairs = self_play_pairs(
            records, engine, config,
            max_src_len=max_src_len, max_similarity=args.max_similarity, batch_size=args.batch_size,
            stats=stats, progress=bar.update,
        )  # fmt: skip
    _report("preference", stats)
    if not pairs:
        raise DataFormatError(f"nothing to write to {args.output}: every record was skipped")
    write_jsonl_atomic(args.output, pairs)
    print(f"wrote {len(pairs)} pairs to {args.output}")


def run(source: str, args: Any) -> None:
    """Convert everything first, then write: an error leaves no output file behind."""
    if source in ("synthesize", "preference"):
        check_output_path(args.output, "--output", kind="file", inputs={"--input": args.input})
        (run_synthesize if source == "synthesize" else run_preference)(args)
        return
    if source == "rolebench":
        check_output_path(args.out_dir, "--out_dir", kind="dir", inputs={"--data_dir": args.data_dir})
    else:
        check_output_path(args.output, "--output", kind="file", inputs={"--input": args.input})
    outputs: dict[Path, list] = {}
    if source == "rolebench":
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
        if source == "dolly":
            records, stats = convert_dolly(args.input, reverse=args.reverse, skip_invalid=args.skip_invalid)
        elif source == "dialogsum":
            records, stats = convert_dialogsum(args.input, prompt=args.prompt, skip_invalid=args.skip_invalid)
        elif source == "alpaca":
            records, stats = convert_alpaca(args.input, skip_invalid=args.skip_invalid)
        else:
            records, stats = convert_conversations(args.input, skip_invalid=args.skip_invalid)
        _report(source, stats)
        outputs[args.output] = records
    for path, records in outputs.items():
        if not records:
            raise DataFormatError(f"nothing to write to {path}: every record was skipped")
    if source == "rolebench":
        write_jsonl_dir_atomic(args.out_dir, {path.name: records for path, records in outputs.items()})
    else:
        write_jsonl_atomic(args.output, outputs[args.output])
    for path, records in outputs.items():
        print(f"wrote {len(records)} samples to {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (README.md, "When things go wrong")."""
    return run_entry_point(lambda args: run(*parse_command(build_parser(), args)), argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
