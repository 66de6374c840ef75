"""Generate answers with a fine-tuned model: batch predictions over a JSONL file, or a terminal chat.

    python predict.py --model_path MERGED --data_path test.jsonl --output_path preds.jsonl
    python predict.py --model_path BASE --adapter_dir ADAPTER --data_path test.jsonl --output_path preds.jsonl
    python predict.py --model_path MERGED --chat [--system "..."]

The output JSONL has one line per input record: ``prompt`` (the decoded prompt), ``prediction``,
``references`` (the record's ``references``, else its last assistant turn) and the input ``record``.
``python evaluate.py rouge --pred_path preds.jsonl`` scores it. See docs/INFERENCE.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from models import register_models
from sft.core.flags import ArgumentParser, HelpFormatter, add_arguments, flag, flag_of, parse_flags
from sft.core.paths import check_output_path, require_local_dir
from sft.core.runner import run_entry_point, set_seed, setup_logging
from sft.inference.chat import fit_history
from sft.inference.engines import Engine, load_engine
from sft.inference.settings import (
    GenerationArgs,
    LiveArgs,
    ModelLoadArgs,
    build_generation_config,
    describe,
    engine_problems,
    read_generation_config,
)
from sft.train.args import DataArgs

logger = logging.getLogger("predict")

CHAT_HELP = "Type a message and press Enter; 'clear' starts a new conversation, 'exit' (or Ctrl-D) quits."


@dataclass
class BatchArgs:
    """Batch prediction: the JSONL file to answer, where the answers go, and how."""

    flag_group = "batch prediction"
    data_path: str | None = flag(None, "JSONL conversations to answer (docs/DATA.md).", aliases=("--input",))
    output_path: str | None = flag(None, "Where to write the predictions JSONL.", aliases=("--output",))
    batch_size: int | None = flag(
        None,
        "Prompts generated together; default: 32 for greedy decoding on a CPU (our loop: less CPU per token), "
        "else 8; 1 with --engine llama_cpp (docs/INFERENCE.md).",
    )
    max_samples: int | None = flag(None, "Answer only the first N records.", aliases=("--limit",))
    max_src_len: int | None = flag_of(DataArgs, "max_src_len", defaults_from="no cut")


@dataclass
class ChatArgs:
    """The terminal chat."""

    flag_group = "interactive chat"
    chat: bool = flag(False, "Chat in the terminal (multi-turn, streamed) instead.", action="store_true")
    system: str | None = flag(None, "System prompt of the chat (e.g. a role description).")
    prompt_cache_mb: int | None = flag_of(LiveArgs, "prompt_cache_mb")


@dataclass
class PredictArgs(GenerationArgs, ChatArgs, BatchArgs, ModelLoadArgs):
    """Every flag of predict.py. Generation flags default to the model's generation_config.json."""

    seed: int = flag(1234, "Random seed (makes sampling repeatable).")

    def problems(self) -> list[str]:
        """Impossible combinations and out-of-range values (the files and the model are checked later)."""
        problems = []
        if self.chat:
            if self.data_path or self.output_path:
                problems.append(
                    "--chat is interactive: drop --data_path/--output_path (or drop --chat for batch mode)"
                )
            if self.num_beams is not None and self.num_beams > 1:
                problems.append("--chat streams its replies, which beam search cannot: drop --num_beams")
        else:
            if not self.data_path or not self.output_path:
                problems.append(
                    "batch mode needs --data_path and --output_path (or pass --chat for a terminal chat)"
                )
            if self.system is not None:
                problems.append("--system only applies to --chat (batch records carry their own 'system')")
            if self.prompt_cache_mb is not None:
                problems.append(
                    "--prompt_cache_mb only applies to --chat (batches share prompt starts anyway)"
                )
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"--batch_size={self.batch_size} must be >= 1")
        problems += engine_problems(self, streams=self.chat, batch_size=self.batch_size)
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"--max_samples={self.max_samples} must be >= 1")
        if self.max_src_len is not None and self.max_src_len < 1:
            problems.append(f"--max_src_len={self.max_src_len} must be >= 1")
        return problems


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: the fields of :class:`PredictArgs`."""
    parser = ArgumentParser(
        description="Batch generation over a JSONL file, or an interactive chat (see docs/INFERENCE.md).",
        formatter_class=HelpFormatter,
    )
    return add_arguments(parser, PredictArgs)


def read_records(path: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line, record)`` of every record of --data_path, validated (errors name file:line)."""
    from sft.data.formats import DataFormatError, iter_json_records, normalize_record

    records = [
        (line, normalize_record(value, source=path, line=line, for_generation=True))
        for line, value in iter_json_records(path)
    ]
    if not records:
        raise DataFormatError("no valid records", source=path)
    return records


def load(args: PredictArgs) -> tuple[Engine, Any]:
    """The engine (model, tokenizer, chat template) and the generation config from the flags."""
    engine = load_engine(args, seed=args.seed)
    config = build_generation_config(engine, engine.tokenizer, args, stop_ids=[engine.template.end_id])
    logger.info("engine %s; template %s; generation: %s", engine.name, engine.template_name, describe(config))
    return engine, config


def predict_file(
    args: PredictArgs,
    records: list[tuple[int, dict[str, Any]]],
    engine: Engine,
    config: Any,
) -> int:
    """Answer ``records`` (from --data_path) and write prompt, prediction and references to --output_path."""
    from sft.data.formats import DataFormatError, split_prompt, write_jsonl_atomic

    tokenizer, template = engine.tokenizer, engine.template
    if args.max_samples is not None:
        records = records[: args.max_samples]
    prompts, references = [], []
    for line, record in records:
        prompt_record, refs = split_prompt(record)
        try:
            prompts.append(template.build_prompt(prompt_record, max_src_len=args.max_src_len))
        except DataFormatError:
            raise
        except ValueError as err:  # the prompt does not fit --max_src_len even with its history dropped
            raise DataFormatError(
                f"{err}: raise --max_src_len or shorten this record's system prompt",
                source=args.data_path,
                line=line,
            ) from err
        references.append(refs)
    batch_size = args.batch_size or engine.batch_size_for(config)
    logger.info("%d prompts, batch size %d", len(prompts), batch_size)
    with tqdm(total=len(prompts), desc="generating", unit="prompt") as bar:
        predictions = engine.generate(prompts, config, batch_size=batch_size, progress=bar.update)
    rows = (
        {
            "prompt": tokenizer.decode(prompt),
            "prediction": prediction,
            "references": refs,
            "record": record,
        }
        for prompt, prediction, refs, (_, record) in zip(
            prompts, predictions, references, records, strict=True
        )
    )
    count = write_jsonl_atomic(args.output_path, rows)
    logger.info("wrote %d predictions to %s", count, args.output_path)
    return count


def chat_loop(args: PredictArgs, engine: Engine, config: Any) -> None:
    """Multi-turn terminal chat: history kept across turns, replies streamed to stdout as generated."""
    room = engine.context_window - config.max_new_tokens
    history: list[dict[str, str]] = []

    def build(turns: list[dict[str, str]], max_src_len: int | None) -> list[int]:
        record = {"conversations": turns, **({"system": args.system} if args.system else {})}
        return engine.template.build_prompt(record, max_src_len=max_src_len)

    # torch: a live batcher of one, whose kept caches make a turn compute only its new message
    session = engine.session(config, args.seed, args.prompt_cache_mb)
    print(CHAT_HELP, flush=True)
    while True:
        try:
            message = input("\nUser: ").strip()
        except EOFError:
            print(flush=True)
            return
        if not sys.stdin.isatty():
            print(message, flush=True)  # echo piped input so the transcript reads like a session
        if message in ("exit", "quit"):
            return
        if message == "clear":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not message:
            continue
        prompt, kept, cut = fit_history(build, [*history, {"role": "user", "content": message}], room)
        if len(kept) < len(history) + 1:
            logger.info("dropped the %d oldest turns to fit the context window", len(history) + 1 - len(kept))
        if cut:
            logger.info("cut the first %d tokens of the message to fit the context window", cut)
        print("Assistant: ", end="", flush=True)
        reply = ""
        for piece in session.stream(prompt, config):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        if reply.strip():
            history = [*kept, {"role": "assistant", "content": reply.strip()}]
        else:  # an empty answer cannot be a history turn (the format forbids it): forget this round
            history = kept[:-1]


def run(argv: list[str]) -> None:
    """Parse and check the flags, load, then answer the file or chat."""
    args = parse_flags(build_parser(), PredictArgs, argv)
    setup_logging()
    register_models()
    # Before loading anything: the output path, the model directory, the generation flags against its defaults.
    if not args.chat:
        check_output_path(
            args.output_path, "--output_path", kind="file", inputs={"--data_path": args.data_path}
        )
    args.check(read_generation_config(require_local_dir(args.model_path, "--model_path")))
    records = None if args.chat else read_records(args.data_path)
    set_seed(args.seed)
    engine, config = load(args)
    if records is None:
        chat_loop(args, engine, config)
    else:
        predict_file(args, records, engine, config)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (README.md, "When things go wrong")."""
    return run_entry_point(run, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
