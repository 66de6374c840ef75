"""sft.core.flags: flags declared as dataclass fields (types, switches, lists, positionals, sections,
sub-commands), and every script reporting all the problems of its flags at once, before any work."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from sft.core.errors import ArgsError
from sft.core.flags import (
    REQUIRED,
    ArgumentParser,
    HelpFormatter,
    add_arguments,
    add_command,
    flag,
    flag_of,
    parse_command,
    parse_flags,
)


@dataclass
class Source:
    """Source: where the data comes from."""

    path: str = flag(REQUIRED, "A path.", aliases=("--input",))
    level: int = flag(3, "A level.", choices=(1, 2, 3))


@dataclass
class Job(Source):
    """Every flag of a made-up script."""

    files: list[Path] | None = flag(None, "Files.")
    splits: list[str] = flag(["train", "test"], "Splits.", choices=("train", "test"))
    force: bool = flag(False, "Force.", action="store_true")
    sample: bool | None = flag(None, "Sample.")
    out_type: str = flag("f16", "Type.", option="--type")
    level: int | None = flag_of(Source, "level", defaults_from="the source's own")
    target: Path = flag(REQUIRED, "Target.", positional=True)

    def problems(self) -> list[str]:
        return [f"--{name} is odd" for name in ("force", "sample") if getattr(self, name)]


def _parser(cls: type = Job) -> ArgumentParser:
    parser = ArgumentParser(prog="job", formatter_class=HelpFormatter)
    add_arguments(parser, cls)
    return parser


def test_fields_become_typed_flags():
    args = parse_flags(
        _parser(), Job, ["T", "--input", "p", "--files", "a", "b", "--no-sample", "--type", "q8_0"]
    )
    assert isinstance(args, Job)
    assert (args.path, args.target, args.files, args.sample, args.out_type) == (
        "p", Path("T"), [Path("a"), Path("b")], False, "q8_0",
    )  # fmt: skip
    assert args.splits == ["train", "test"] and args.force is False and args.level is None
    assert Job(path="p", target=Path("t")).splits is not Job(path="q", target=Path("t")).splits
    with pytest.raises(ArgsError, match=r"argument --splits: invalid choice: 'dev'"):
        parse_flags(_parser(), Job, ["T", "--path", "p", "--splits", "dev"])
    with pytest.raises(ArgsError, match=r"the following arguments are required: --path/--input, target"):
        parse_flags(_parser(), Job, [])


def test_help_sections_switches_and_defaults():
    text = _parser().format_help()
    usage, options, source = text.split("\n\n")[0], text.split("options:")[1], text.split("Source: where")[1]
    # Fields keep their order (an overridden one keeps its place), flags their argparse spelling.
    assert usage.split() == [
        "usage:", "job", "[-h]", "[--debug]", "--path", "PATH", "[--level", "{1,2,3}]", "[--files", "FILES",
        "[FILES", "...]]", "[--splits", "{train,test}", "[{train,test}", "...]]", "[--force]", "[--sample",
        "|", "--no-sample]", "[--type", "OUT_TYPE]", "target",
    ]  # fmt: skip
    # A field goes into the section of the class that declares it last; Job's own are under "options".
    assert "--path PATH, --input PATH" in source and "--level" not in source
    assert "A level. (default: the source's own)" in " ".join(options.split())
    assert "Force. (default: False)" in " ".join(options.split())


def test_all_problems_are_reported_together():
    with pytest.raises(ArgsError) as info:
        parse_flags(_parser(), Job, ["T", "--path", "p", "--force", "--sample"])
    assert info.value.problems == ["--force is odd", "--sample is odd"]
    plain = argparse.ArgumentParser(prog="job")  # a plain argparse script: its usage error, exit status 2
    add_arguments(plain, Job)
    with pytest.raises(SystemExit) as exited:
        parse_flags(plain, Job, ["T", "--path", "p", "--force", "--sample"])
    assert exited.value.code == 2


def test_sub_commands_parse_into_their_dataclass():
    parser = ArgumentParser(prog="tool")
    commands = parser.add_subparsers(dest="command", required=True)
    add_command(commands, "job", Job, help="Run a job.")
    add_command(commands, "source", Source, help="Only a source.")
    name, args = parse_command(parser, ["source", "--path", "p", "--level", "1"])
    assert (name, args) == ("source", Source(path="p", level=1))
    name, args = parse_command(parser, ["job", "T", "--path", "p"])
    assert name == "job" and isinstance(args, Job) and args.target == Path("T")
    with pytest.raises(ArgsError, match="--force is odd"):
        parse_command(parser, ["job", "T", "--path", "p", "--force"])
    with pytest.raises(ArgsError, match="argument command: invalid choice: 'other'"):
        parse_command(parser, ["other"])


def _one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1, errors
    return errors[0]


def test_predict_reports_every_flag_problem_before_any_file_is_read(tmp_path, capsys):
    import predict

    argv = ["--model_path", str(tmp_path / "none"), "--chat", "--input", "x.jsonl", "--num_beams", "2",
            "--batch_size", "0", "--limit", "0", "--max_src_len", "0"]  # fmt: skip
    assert predict.main(argv) == 2
    line = _one_error_line(capsys)
    for problem in (
        "--chat is interactive: drop --data_path/--output_path",
        "--chat streams its replies, which beam search cannot: drop --num_beams",
        "--batch_size=0 must be >= 1",
        "--max_samples=0 must be >= 1",
        "--max_src_len=0 must be >= 1",
    ):
        assert problem in line
    argv = ["--model_path", str(tmp_path / "none"), "--system", "be brief", "--prompt_cache_mb", "-1"]
    assert predict.main(argv) == 2
    line = _one_error_line(capsys)
    for problem in (
        "batch mode needs --data_path and --output_path",
        "--system only applies to --chat",
        "--prompt_cache_mb only applies to --chat",
        "--prompt_cache_mb=-1 must be >= 0",
    ):
        assert problem in line


def test_synthesize_reports_every_flag_problem_before_any_file_is_read(tmp_path, capsys):
    import data_helper

    output = tmp_path / "out" / "alpaca.jsonl"
    argv = ["synthesize", "--model_path", str(tmp_path / "none"), "--input", str(tmp_path / "none.txt"),
            "--output", str(output), "--batch_size", "0", "--max_copy_overlap", "2", "--near_dup_threshold", "0"]  # fmt: skip
    assert data_helper.main(argv) == 2
    line = _one_error_line(capsys)
    assert "--batch_size=0 must be >= 1" in line
    assert "--max_copy_overlap=2.0 must be in [0, 1]" in line
    assert "--near_dup_threshold=0.0 must be in (0, 1]" in line
    assert not output.parent.exists()


def test_generation_flags_report_every_problem_together():
    from transformers import GenerationConfig

    from sft.inference.settings import GenerationArgs

    with pytest.raises(ArgsError) as info:
        GenerationArgs(do_sample=False, top_p=0.5, max_new_tokens=0, num_beams=0).check(GenerationConfig())
    assert info.value.problems == [
        "--top_p only applies when sampling, but sampling is off (--no-do_sample): add --do_sample or drop them",
        "--max_new_tokens=0 must be > 0",
        "--num_beams=0 must be >= 1",
    ]


def test_web_demo_and_demo_check_their_flags_at_parse_time():
    import demo
    import web_demo

    args = parse_flags(web_demo.build_parser(), web_demo.WebDemoArgs, ["--model_path", "m", "--port", "80"])
    assert (args.model_path, args.port, args.host) == ("m", 80, "127.0.0.1")
    assert web_demo.WebDemoArgs(model_path="m", desc_path="p.json", system="hi").problems() == [
        "--system is the plain assistant's prompt; roles take theirs from --system_template: drop --system"
    ]
    with pytest.raises(SystemExit) as exited:
        demo.main(["--pipeline", "baichuan", "--smoke"])
    assert exited.value.code == 2
