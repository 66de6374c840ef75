"""Conversation format validation, the converters on the real data, and data_helper.py's CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sft.data.converters import (
    convert_alpaca,
    convert_conversations,
    convert_dialogsum,
    convert_dolly,
    convert_rolebench,
    strip_role_address,
)
from sft.data.formats import DataFormatError, normalize_record, read_conversations

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "data_helper.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---- RoleBench on the real files ------------------------------------------------------------


@pytest.fixture(scope="module")
def rolebench(shared_data_dir: Path):
    data_dir = shared_data_dir / "rolebench-zh"
    return data_dir, convert_rolebench(data_dir, "train"), convert_rolebench(data_dir, "test")


def _raw_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_rolebench_counts_and_answers(rolebench):
    data_dir, (train, tstats), (test, _) = rolebench
    specific = _raw_lines(data_dir / "rolebench-zh_role_specific_train.jsonl")
    general = _raw_lines(data_dir / "rolebench-zh_general_train.jsonl")
    assert tstats.read == len(specific) + len(general) == 7468
    expected = sum(min(2, len(r["generated"])) for r in specific + general)
    assert tstats.written == len(train) == expected
    assert sum(tstats.skipped.values()) == 0
    # Every role of the profiles file, both subsets.
    assert {r["meta"]["role"] for r in train} == {"孙悟空", "张飞", "李白", "皇帝", "华妃"}
    assert Counter(r["meta"]["subset"] for r in train)["role_specific"] == len(specific)
    # Answers come from `generated`, stripped; system prompt is filled from the profile.
    answers_by_q = {}
    for r in general:
        answers_by_q.setdefault(r["question"].strip(), set()).update(a.strip() for a in r["generated"])
    sample = next(r for r in train if r["meta"]["subset"] == "general")
    assert sample["conversations"][1]["content"] in answers_by_q[sample["conversations"][0]["content"]]
    assert sample["system"].startswith(f"你是{sample['meta']['role']}，你的特征描述是：")
    # Questions lose stray whitespace but keep embedded newlines; `type` lists are normalised.
    assert all(r["conversations"][0]["content"] == r["conversations"][0]["content"].strip() for r in train)
    assert any("\n" in r["conversations"][0]["content"] for r in train)
    assert all(isinstance(r["meta"]["type"], list) for r in train + test)
    assert all(len(r["references"]) >= 1 for r in test)


def test_rolebench_role_specific_address_removed(rolebench):
    _data_dir, (train, stats), (_test, _) = rolebench
    removed = stats.notes["role-specific questions with the address removed"]
    kept = stats.notes["role-specific questions without an address"]
    assert removed + kept == 1535 and removed >= 1500
    specific = [r["conversations"][0]["content"] for r in train if r["meta"]["subset"] == "role_specific"]
    for address in ("皇上，", "陛下，", "张飞，", "孙悟空，", "华妃娘娘，", "李白先生，"):
        assert not any(q.startswith(address) for q in specific), address
    # The rule itself: short vocatives go; scene phrases, long clauses and comma-less questions stay.
    assert strip_role_address("皇上，您打算如何处理？") == ("您打算如何处理？", True)
    assert strip_role_address("孙悟空大圣，你好，请问？") == ("你好，请问？", True)
    assert strip_role_address("在剧中，栾泰向您道歉") == ("在剧中，栾泰向您道歉", False)
    assert strip_role_address("张飞将来到耒阳县巡视，你有何看法？")[1] is False
    assert strip_role_address("皇上对于年羹尧的惩罚是否已经公布？")[1] is False


def test_rolebench_roles_seed_and_template(shared_data_dir: Path):
    data_dir = shared_data_dir / "rolebench-zh"
    a, sa = convert_rolebench(
        data_dir, "test", roles=["李白", "张飞"], seed=7, max_answers=1, system_template="扮演{role}。{desc}"
    )
    b, _ = convert_rolebench(
        data_dir, "test", roles=["李白", "张飞"], seed=7, max_answers=1, system_template="扮演{role}。{desc}"
    )
    c, _ = convert_rolebench(data_dir, "test", roles=["李白", "张飞"], seed=8, max_answers=1)
    assert a == b  # deterministic for a seed
    assert [r["conversations"][1] for r in a] != [r["conversations"][1] for r in c]
    assert {r["meta"]["role"] for r in a} == {"李白", "张飞"}
    assert sa.skipped["role not selected (--roles)"] > 0
    assert a[0]["system"].startswith("扮演") and len(a) == sa.written
    with pytest.raises(DataFormatError, match="not in the profiles file"):
        convert_rolebench(data_dir, "test", roles=["诸葛亮"])


def test_dialogsum_test_keeps_three_references(shared_data_dir: Path):
    records, stats = convert_dialogsum(shared_data_dir / "dialogsum" / "dialogsum.test.jsonl")
    assert stats.read == stats.written == 500
    raw = _raw_lines(shared_data_dir / "dialogsum" / "dialogsum.test.jsonl")[0]
    first = records[0]
    assert first["references"] == [raw["summary1"].strip(), raw["summary2"].strip(), raw["summary3"].strip()]
    assert first["conversations"][1]["content"] == first["references"][0]
    assert raw["dialogue"].strip() in first["conversations"][0]["content"]
    dev, _ = convert_dialogsum(shared_data_dir / "dialogsum" / "dialogsum.dev.jsonl")
    assert len(dev) == 500 and "references" not in dev[0]


def test_dolly_forward_and_reverse():
    fwd, stats = convert_dolly(DATA / "example_dolly.jsonl")
    rev, _ = convert_dolly(DATA / "example_dolly.jsonl", reverse=True)
    assert stats.written == 5
    with_context = fwd[1]["conversations"]
    assert with_context[0]["content"].startswith("Summarize what the passage says about tea.\n\nTea is made")
    assert rev[1]["conversations"][1]["content"] == "Summarize what the passage says about tea."
    assert with_context[1]["content"] in rev[1]["conversations"][0]["content"]
    assert "Reference text" in rev[1]["conversations"][0]["content"]
    assert "Reference text" not in rev[0]["conversations"][0]["content"]


def test_alpaca_and_conversations_examples():
    alpaca, _ = convert_alpaca(DATA / "example_alpaca.json")
    assert alpaca[0] == {
        "system": "Translate to French.",
        "conversations": [
            {"role": "user", "content": "Good morning"},
            {"role": "assistant", "content": "Bonjour"},
        ],
    }
    assert "system" not in alpaca[1] and alpaca[1]["conversations"][0]["content"].startswith("Name a prime")
    convs, stats = convert_conversations(DATA / "example_conversations.jsonl")
    roles = [t["role"] for t in convs[0]["conversations"]]
    assert roles == ["user", "tool", "observation", "assistant", "user", "assistant"]
    assert convs[0]["tools"][0]["name"] == "get_weather" and convs[0]["system"].startswith("You are")
    assert json.loads(convs[0]["conversations"][2]["content"])["temperature_c"] == 21
    assert stats.notes["tool calls"] == 2


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": [{"role": "assistant", "content": "hi"}]}, "not allowed at the start"),
        (
            {"conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "after 'user'",
        ),
        ({"conversations": [{"role": "user", "content": "a"}]}, "no assistant turn"),
        (
            {
                "conversations": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "must end with an assistant turn",
        ),
        (
            {"conversations": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]},
            "must be a string",
        ),
        ({"conversations": [{"role": "bot", "content": "x"}]}, "unknown role"),
        (
            {
                "conversations": [
                    {"role": "user", "content": "a"},
                    {"role": "tool", "content": "f()"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "after 'tool'",
        ),
        ({"instruction": "x", "input": "", "output": 5}, "'output' must be a string"),
        ({"question": "x"}, "missing field 'conversations'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_invalid_records_name_file_and_line(record, message):
    with pytest.raises(DataFormatError, match=message) as info:
        normalize_record(record, source="f.jsonl", line=7)
    assert str(info.value).startswith("f.jsonl:7: ")


def test_read_conversations_errors_and_skips(tmp_path: Path):
    good = {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"conversations": [{"role": "user", "content": "a"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(f"{json.dumps(good)}\n\n{json.dumps(bad)}\n")
    with pytest.raises(DataFormatError, match=rf"{path}:3: conversation has no assistant turn"):
        read_conversations(path)
    skipped = Counter()
    assert len(read_conversations(path, skip_invalid=True, skipped=skipped)) == 1
    assert skipped == {"conversation has no assistant turn": 1}
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="empty"):
        read_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + '\n{"conversations": [\n')
    with pytest.raises(DataFormatError, match=r"broken.jsonl:2: invalid JSON"):
        read_conversations(tmp_path / "broken.jsonl")


# ---- the CLI --------------------------------------------------------------------------------


def test_cli_help_for_every_source():
    for source in ("rolebench", "dolly", "dialogsum", "alpaca", "conversations"):
        result = run_cli(source, "--help")
        assert result.returncode == 0 and "--skip_invalid" in result.stdout


@pytest.mark.parametrize(
    ("source", "content", "message"),
    [
        (
            "conversations",
            '{"conversations": [{"role": "user", "content": "a"}]}\n',
            ":1: conversation has no assistant",
        ),
        (
            "conversations",
            '{"conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
            ":1: turn 1: role 'user' not allowed after 'user'",
        ),
        ("alpaca", '{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', ":2: invalid JSON"),
        (
            "alpaca",
            '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "x", "input": 1, "output": "y"}\n',
            ":2: alpaca record: field 'input' must be a string",
        ),
        ("dolly", "", "file is empty"),
        (
            "dolly",
            '{"instruction": "a", "context": "", "category": "x"}\n',
            ":1: field 'response' is missing",
        ),
        ("dialogsum", '{"fname": "x", "dialogue": "#Person1#: hi"}\n', ":1: no 'summary'"),
    ],
)
def test_cli_bad_input_exits_nonzero_without_output(tmp_path: Path, source, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content, encoding="utf-8")
    out = tmp_path / "out" / "converted.jsonl"
    result = run_cli(source, "--input", str(src), "--output", str(out))
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and str(src) in result.stderr
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temp file left behind either


def test_cli_skip_invalid_counts(tmp_path: Path):
    src = tmp_path / "in.jsonl"
    good = '{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    src.write_text(good + '\n{"conversations": [{"role": "user", "content": "a"}]}\n' + good + "\n")
    out = tmp_path / "out.jsonl"
    result = run_cli("conversations", "--input", str(src), "--output", str(out), "--skip_invalid")
    assert result.returncode == 0, result.stderr
    assert "records read 3, kept 2, skipped 1; samples written 2" in result.stdout
    assert len(out.read_text().splitlines()) == 2


def test_cli_rolebench_missing_role_and_bad_data(tmp_path: Path, shared_data_dir: Path):
    out = tmp_path / "rb"
    result = run_cli(
        "rolebench",
        "--data_dir",
        str(shared_data_dir / "rolebench-zh"),
        "--out_dir",
        str(out),
        "--roles",
        "诸葛亮",
    )
    assert result.returncode == 1 and "诸葛亮" in result.stderr and not out.exists()
    # A role missing from the profiles in the data itself: file and line named, nothing written.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "profiles-zh_desc.json").write_text(
        json.dumps({"李白": "诗人"}, ensure_ascii=False), encoding="utf-8"
    )
    line = {"role": "李白", "question": "李白，你好？", "generated": ["好"], "type": "script_based"}
    (fake / "rolebench-zh_role_specific_train.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n")
    other = {"role": "杜甫", "question": "写诗", "generated": ["好"]}
    (fake / "rolebench-zh_general_train.jsonl").write_text(
        json.dumps(line, ensure_ascii=False) + "\n" + json.dumps(other, ensure_ascii=False) + "\n"
    )
    result = run_cli("rolebench", "--data_dir", str(fake), "--out_dir", str(out), "--splits", "train")
    assert result.returncode == 1
    assert "rolebench-zh_general_train.jsonl:2: role '杜甫' is not in the profiles file" in result.stderr
    assert not out.exists()
    result = run_cli(
        "rolebench", "--data_dir", str(fake), "--out_dir", str(out), "--splits", "train", "--skip_invalid"
    )
    assert (
        result.returncode == 0 and "questions read 3, kept 2, skipped 1; samples written 2" in result.stdout
    )
    written = [json.loads(x) for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert written[0]["conversations"][0]["content"] == "你好？"


def test_non_utf8_file_names_file_and_line(tmp_path: Path):
    good = '{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(
        good.encode() + '{"conversations": [{"role": "user", "content": "你好"}]}\n'.encode("gbk")
    )
    with pytest.raises(DataFormatError, match=r"gbk.jsonl:2: not UTF-8 text \(byte 0xc4 at offset \d+\)"):
        read_conversations(path)


def test_cli_unusable_output_paths_fail_before_converting(tmp_path: Path, shared_data_dir: Path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    result = run_cli("conversations", "--input", str(src), "--output", str(tmp_path))
    assert result.returncode == 1 and f"--output={tmp_path} is a directory" in result.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_cli("conversations", "--input", str(src), "--output", str(blocker / "sub" / "out.jsonl"))
    assert result.returncode == 1 and f"{blocker} is a file, not a directory" in result.stderr
    result = run_cli(
        "rolebench", "--data_dir", str(shared_data_dir / "rolebench-zh"), "--out_dir", str(blocker)
    )
    assert result.returncode == 1 and f"--out_dir={blocker} is a file" in result.stderr
    assert "Traceback" not in result.stderr and "rolebench train" not in result.stdout  # nothing converted


def test_rolebench_counts_questions_and_samples_separately(tmp_path: Path):
    """Questions read = kept + skipped; each kept question gives up to --max_answers samples."""
    data = tmp_path / "rb"
    data.mkdir()
    (data / "profiles-zh_desc.json").write_text(
        json.dumps({"李白": "诗人", "杜甫": "诗人"}, ensure_ascii=False), encoding="utf-8"
    )
    rows = [
        {"role": "李白", "question": "写诗", "generated": ["好", "妙", "绝"]},
        {"role": "李白", "question": "喝酒", "generated": ["好"]},
        {"role": "杜甫", "question": "写诗", "generated": ["好", "妙"]},
    ]
    for subset in ("role_specific", "general"):
        (data / f"rolebench-zh_{subset}_train.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    out = tmp_path / "out"
    result = run_cli(
        "rolebench", "--data_dir", str(data), "--out_dir", str(out), "--splits", "train", "--roles", "李白"
    )
    assert result.returncode == 0, result.stderr
    # 6 questions: 2 of 杜甫 skipped, 4 kept; 李白's answers: 2 + 1 per subset -> 6 samples.
    assert "rolebench train: questions read 6, kept 4, skipped 2; samples written 6" in result.stdout
    assert "skipped (role not selected (--roles)): 2" in result.stdout
    assert len((out / "train.jsonl").read_text(encoding="utf-8").splitlines()) == 6
