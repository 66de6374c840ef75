"""The ``tokenizer`` template (the model's own jinja chat template) and the ``llama3`` template.

Three jinja templates written in the style of published ones (SmolLM2: chatml with a default system
prompt; Llama-3.1: a system block with a date line, tools in the first user message; Qwen2.5: tools
in the system block, ``<tool_call>`` blocks, tool results as user turns) are put into tiny byte-level
BPE tokenizers trained here on data/corpus_zh_en.txt, inside copies of the tiny Llama model directory.
The reference is transformers' own ``apply_chat_template``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from sft.data.batching import build_dataloader
from sft.data.dataset import load_sft_dataset
from sft.data.formats import IGNORE_INDEX, normalize_record
from sft.data.templates import TEMPLATE_NAMES, assemble, get_template, resolve_template_name, sample_plan

REPO = Path(__file__).resolve().parent.parent

# Llama-3's pre-tokenizer split (Qwen2 and SmolLM2 use close relatives), then byte-level BPE.
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named Tiny, trained on a tiny corpus<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content'] | trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
    {{- "Given the following functions, reply with a JSON function call that answers the prompt.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Tiny, a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call functions. Their signatures are inside <tools></tools>:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nReturn each call as JSON inside <tool_call></tool_call> tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Tiny, a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + tool_call.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Meta's Llama-3(.0) template: what the named ``llama3`` template reproduces.
LLAMA30 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Qwen3-style: only answers after the last question get a (here empty) thinking block, so rendering a
# longer conversation changes an earlier answer -- no piece layout fits.
THINKING = (
    "{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role == 'assistant' and loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
UPPER = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content | upper + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Earlier answers rewritten (upper case), the last one verbatim: only the last answer can be learned.
REWRITES_HISTORY = (
    "{% for m in messages %}{% set text = m.content | upper if m.role == 'assistant' and not loop.last "
    "else m.content %}{{ '<|im_start|>' + m.role + '\\n' + text + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# An end-of-turn marker that is plain text, not a special token.
PLAIN_END = (
    "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n### End\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# Answers marked for transformers' assistant-token mask, with and without the end-of-turn token in the block.
GENERATION = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GENERATION_NO_END = GENERATION.replace(
    "{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}",
    "{{ m.content }}{% endgeneration %}{{ '<|im_end|>\\n' }}",
)

STYLES = {
    # name: (chat template, bos, eos, pad, end-of-turn token)
    "smollm2": (SMOL, "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_end|>"),
    "llama31": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|eot_id|>"),
    "qwen25": (QWEN25, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    "llama30": (LLAMA30, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|eot_id|>"),
    "thinking": (THINKING, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    "upper": (UPPER, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    "rewrites_history": (REWRITES_HISTORY, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    "plain_end": (PLAIN_END, None, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
    "generation": (GENERATION, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    "generation_no_end": (GENERATION_NO_END, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
}

SYSTEM = "你是李白，为人爽朗大方。"
ROUNDS = [
    ("你好，请作诗", "床前明月光，疑是地上霜。"),
    ("Say hello in English, please.", "Hello world, said the poet!"),
    ("再来一句", "  举杯邀明月。 "),  # surrounding spaces: Llama-3's template trims them
]
WITH_SYSTEM = {
    "system": SYSTEM,
    "conversations": [
        {"role": r, "content": c} for q, a in ROUNDS for r, c in (("user", q), ("assistant", a))
    ],
}
NO_SYSTEM = {"conversations": WITH_SYSTEM["conversations"][:4]}
TOOL_CHAT = json.loads((REPO / "data" / "example_conversations.jsonl").read_text().splitlines()[0])
TOOL_CALL_AS_TEXT = json.loads((REPO / "data" / "example_conversations.jsonl").read_text().splitlines()[2])
CHATS = {"system": WITH_SYSTEM, "no_system": NO_SYSTEM, "tools": TOOL_CHAT, "tool_text": TOOL_CALL_AS_TEXT}
TOOL_STYLES = ("llama31", "qwen25")  # the templates that render tools and tool calls


def hf_messages(chat: dict) -> tuple[list[dict], list[dict] | None]:
    """The chat as transformers messages, written out here independently of the code under test."""
    from sft.data.formats import normalize_record

    record = normalize_record(chat, for_generation=True)
    out = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for turn in record["conversations"]:
        if turn["role"] == "tool":
            call = json.loads(turn["content"])
            function = {"name": call["name"], "arguments": call["parameters"]}
            out.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": function}],
                }
            )
        elif turn["role"] == "observation":
            out.append({"role": "tool", "content": turn["content"]})
        else:
            out.append({"role": turn["role"], "content": turn["content"]})
    tools = [{"type": "function", "function": t} for t in record.get("tools", [])] or None
    return out, tools


@pytest.fixture(scope="module")
def bpe_json() -> str:
    """A byte-level BPE tokenizer (Llama-3 split) trained on the repo corpus, as tokenizer.json text."""
    lines = (REPO / "data" / "corpus_zh_en.txt").read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = ["\n".join(lines[i : i + 4]) + "\n\n" for i in range(0, len(lines), 4)]
    tok.train_from_iterator([*paragraphs, *["system user assistant ipython tool\n\n"] * 20], trainer)
    return tok.to_str()


@pytest.fixture(scope="module")
def model_dirs(bpe_json: str, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """style -> a copy of the tiny Llama directory whose tokenizer carries that chat template."""
    dirs = {}
    for style, (chat_template, bos, eos, pad, _end) in STYLES.items():
        out = tmp_path_factory.mktemp(style)
        shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            (out / name).unlink(missing_ok=True)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(bpe_json),
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            chat_template=chat_template,
            clean_up_tokenization_spaces=False,
        )
        tok.save_pretrained(out)
        dirs[style] = out
    return dirs


@pytest.fixture(scope="module")
def toks(model_dirs: dict) -> dict:
    return {style: AutoTokenizer.from_pretrained(str(d)) for style, d in model_dirs.items()}


def learned_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(lab)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def answers_of(messages: list[dict], style: str) -> list[str]:
    """Assistant texts as the template renders them (Llama-3's trims)."""
    texts = [m["content"] for m in messages if m["role"] == "assistant" and not m.get("tool_calls")]
    return [t.strip() for t in texts] if style.startswith("llama") else texts


def expected_samples(messages: list[dict], loss_on: str) -> list[tuple[list[dict], set[int]]]:
    """(messages of the sample, indices of its learned assistant messages) per sample."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")]
    if loss_on == "all":
        return [(messages, set(answers))]
    if loss_on == "last":
        return [(messages, {answers[-1]})]
    return [(messages[: i + 1], {i}) for i in answers]


CASES = [
    (style, chat)
    for style in ("smollm2", "llama31", "qwen25")
    for chat in CHATS
    if style in TOOL_STYLES or not chat.startswith("tool")
]


@pytest.mark.parametrize("loss_on", ["all", "last", "each"])
@pytest.mark.parametrize(("style", "chat"), CASES)
def test_samples_equal_apply_chat_template(style, chat, loss_on, toks):
    tok = toks[style]
    end = STYLES[style][4]
    template = get_template("tokenizer", tok)
    messages, tools = hf_messages(CHATS[chat])
    samples = template.encode(CHATS[chat], loss_on)
    expected = expected_samples(messages, loss_on)
    assert len(samples) == len(expected)
    for (ids, labels), (sample_messages, learned) in zip(samples, expected):
        text = tok.apply_chat_template(sample_messages, tools=tools, tokenize=False)
        assert tok.decode(ids) == text
        assert ids == tok.apply_chat_template(sample_messages, tools=tools, tokenize=True)["input_ids"]
        # Learned: exactly each learned answer's tokens and the end-of-turn token, nothing else.
        answers = answers_of([sample_messages[i] for i in sorted(learned)], style)
        spans = learned_spans(ids, labels)
        assert [tok.decode(s) for s in spans] == [a + end for a in answers]
        assert spans == [
            [*tok(a, add_special_tokens=False)["input_ids"], tok.convert_tokens_to_ids(end)] for a in answers
        ]
    assert template.end_id == tok.convert_tokens_to_ids(end)


@pytest.mark.parametrize(("style", "chat"), CASES)
def test_build_prompt_equals_generation_prompt(style, chat, toks):
    tok = toks[style]
    template = get_template("tokenizer", tok)
    record = CHATS[chat]
    messages, tools = hf_messages(record)
    turns = record["conversations"]
    for k, turn in enumerate(turns, start=1):
        if not (turn["role"] in ("user", "observation") or "observation" in turn):
            continue  # the history must end with a question or a tool result
        history = {**record, "conversations": turns[:k]}
        n_msgs = len(hf_messages(history)[0])
        expected = tok.apply_chat_template(messages[:n_msgs], tools=tools, add_generation_prompt=True)
        assert template.build_prompt(history) == expected["input_ids"]
    # A record ending with an answer: the prompt for that answer, which is where training learns it.
    ((ids, labels),) = template.encode(record, "last")
    start = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert template.build_prompt(record) == ids[:start]


def test_pad_equal_to_eos_still_learns_every_end_of_turn(toks, tmp_path: Path):
    tok = toks["smollm2"]
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    template = get_template("tokenizer", tok)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in (WITH_SYSTEM, NO_SYSTEM)) + "\n")
    dataset = load_sft_dataset(data, tok, template, max_len=512, max_src_len=400, is_skip=False)
    loader = build_dataloader(
        dataset,
        batch_size=2,
        packing=False,
        max_len=512,
        shuffle=False,
        seed=0,
        group_by_length=False,
        rank=0,
        world_size=1,
        pad_token_id=tok.pad_token_id,
    )
    (batch,) = list(loader)
    eos = tok.eos_token_id
    answers = []
    for row_ids, row_labels, row_mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = row_mask.bool()
        # The system prompt (given or the default), each question and each answer end with <|im_end|>.
        answers.append((int((row_ids[real] == eos).sum()) - 1) // 2)
        assert int((row_labels == eos).sum()) == answers[-1]  # every answer's end, though pad == eos
        assert (row_labels[~real] == IGNORE_INDEX).all() and (row_ids[~real] == eos).all()
    assert sorted(answers) == [2, 3]


def test_bpe_merge_across_the_answer_boundary(toks):
    """An answer starting with a newline: chatml's head ends with one, and BPE merges the two."""
    tok = toks["smollm2"]
    template = get_template("tokenizer", tok)
    record = {
        "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nfoo bar"}]
    }
    ((ids, labels),) = template.encode(record)
    messages, _ = hf_messages(record)
    assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    # Tokenised piece by piece, "\n" + "\nfoo" would not give the merged "\n\n" token the model sees.
    merged = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert len(merged) == 1 and merged[0] in ids
    # The token straddling head and answer is learned: the model must produce the answer's "\n".
    (span,) = learned_spans(ids, labels)
    assert span[0] == merged[0] and tok.decode(span) == "\n\nfoo bar<|im_end|>"


@pytest.mark.parametrize("style", ["smollm2", "llama31"])
def test_truncation_keeps_what_the_template_puts_first(style, toks):
    """Oldest rounds dropped: the sample equals the template's rendering of the kept rounds (with
    SmolLM2's default system prompt / Llama-3's system block and date line re-created)."""
    tok = toks[style]
    template = get_template("tokenizer", tok)
    record = {"conversations": WITH_SYSTEM["conversations"]}
    messages, _ = hf_messages(record)
    conv = template.tokenize_record(record)
    target, learned = sample_plan(conv, "all")[0]
    kept = tok.apply_chat_template(messages[2:], tokenize=True)["input_ids"]
    prompt_len = len(tok.apply_chat_template(messages[2:5], add_generation_prompt=True)["input_ids"])
    res = assemble(conv, target, learned, max_len=512, max_src_len=prompt_len)
    assert res.truncated_prompt and not res.truncated_answer
    assert res.input_ids == kept
    assert [tok.decode(s) for s in learned_spans(res.input_ids, res.labels)] == [
        a + STYLES[style][4] for a in answers_of(messages[2:], style)
    ]
    # One token less than the last round alone: all older rounds go, then the first token of the last
    # question; the answer stays whole.
    last = tok.apply_chat_template(messages[4:], tokenize=True)["input_ids"]
    last_prompt_len = len(tok.apply_chat_template(messages[4:5], add_generation_prompt=True)["input_ids"])
    assert assemble(conv, target, learned, max_len=512, max_src_len=last_prompt_len).input_ids == last
    res = assemble(conv, target, learned, max_len=512, max_src_len=last_prompt_len - 1)
    assert res.truncated_prompt and len(res.input_ids) == len(last) - 1
    spans = learned_spans(res.input_ids, res.labels)
    assert [tok.decode(s) for s in spans] == [answers_of(messages[4:], style)[0] + STYLES[style][4]]
    # A long answer is cut keeping its end-of-turn token; is_skip drops the sample instead.
    res = assemble(conv, target, learned, max_len=len(kept) - 3, max_src_len=prompt_len)
    end = tok.convert_tokens_to_ids(STYLES[style][4])
    assert res.truncated_answer and len(res.input_ids) == len(kept) - 3
    assert learned_spans(res.input_ids, res.labels)[-1][-1] == end
    assert assemble(conv, target, learned, max_len=512, max_src_len=prompt_len, is_skip=True).dropped
    # build_prompt cuts the same way.
    history = {"conversations": record["conversations"][:-1]}
    assert template.build_prompt(history, max_src_len=prompt_len) == kept[:prompt_len]


@pytest.mark.parametrize("loss_on", ["all", "last", "each"])
def test_template_that_is_not_prefix_stable_learns_every_answer(toks, loss_on):
    """Qwen3-style: a longer conversation renders an earlier answer without the thinking block it had when it
    was last. Each sample is the template's own rendering; the final answer is learned with its block."""
    tok = toks["thinking"]
    template = get_template("tokenizer", tok)
    messages, _ = hf_messages(WITH_SYSTEM)
    samples = template.encode(WITH_SYSTEM, loss_on)
    expected = expected_samples(messages, loss_on)
    assert len(samples) == len(expected)
    think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for (ids, labels), (sample_messages, learned) in zip(samples, expected):
        assert ids == tok.apply_chat_template(sample_messages, tokenize=True)["input_ids"]
        last = len(sample_messages) - 1
        want = [
            ("<think>\n\n</think>\n\n" if i == last else "") + sample_messages[i]["content"] + "<|im_end|>"
            for i in sorted(learned)
        ]
        assert [tok.decode(s) for s in learned_spans(ids, labels)] == want
        assert tok.decode(ids).count(think) == 1
    # Prompts are the generation prompt, as for any template.
    history = {**WITH_SYSTEM, "conversations": WITH_SYSTEM["conversations"][:3]}
    assert (
        template.build_prompt(history)
        == tok.apply_chat_template(messages[:4], add_generation_prompt=True)["input_ids"]
    )


def test_truncation_of_a_template_that_is_not_prefix_stable(toks):
    """Oldest rounds dropped: the sample is the template's rendering of the kept rounds, then the start of the
    last question is cut; a long answer keeps its end-of-turn token."""
    tok = toks["thinking"]
    template = get_template("tokenizer", tok)
    record = {"conversations": WITH_SYSTEM["conversations"]}
    messages, _ = hf_messages(record)
    render = template.render(normalize_record(record), "all")
    kept = tok.apply_chat_template(messages[2:], tokenize=True)["input_ids"]
    prompt_len = len(tok.apply_chat_template(messages[2:5], add_generation_prompt=True)["input_ids"])
    (res,) = template.samples(render, "all", max_len=512, max_src_len=prompt_len)
    assert res.truncated_prompt and res.input_ids == kept
    assert len(learned_spans(res.input_ids, res.labels)) == 2
    last_prompt_len = len(tok.apply_chat_template(messages[4:5], add_generation_prompt=True)["input_ids"])
    (res,) = template.samples(render, "all", max_len=512, max_src_len=last_prompt_len - 1)
    last = tok.apply_chat_template(messages[4:], tokenize=True)["input_ids"]
    assert len(res.input_ids) == len(last) - 1 and res.input_ids[-20:] == last[-20:]
    (res,) = template.samples(render, "all", max_len=len(kept) - 3, max_src_len=prompt_len)
    assert res.truncated_answer and len(res.input_ids) == len(kept) - 3
    assert learned_spans(res.input_ids, res.labels)[-1][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    (res,) = template.samples(render, "all", max_len=512, max_src_len=prompt_len, is_skip=True)
    assert res.dropped == "too long (is_skip)"
    (res,) = template.samples(render, "all", max_len=512, max_src_len=3)
    assert res.dropped == "prompt longer than max_src_len even after truncation"
    history = {"conversations": record["conversations"][:-1]}
    assert template.build_prompt(history, max_src_len=prompt_len) == kept[:prompt_len]


@pytest.mark.parametrize("style", ["generation", "generation_no_end"])
def test_generation_marked_template_learns_the_assistant_mask(style, toks):
    """``{% generation %}`` blocks: transformers' assistant-token mask is what is learned, with the end-of-turn
    token after a block that leaves it out."""
    tok = toks[style]
    template = get_template("tokenizer", tok)
    assert template.marks_generation and template.end_id == tok.convert_tokens_to_ids("<|im_end|>")
    messages, _ = hf_messages(WITH_SYSTEM)
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ((ids, labels),) = template.encode(WITH_SYSTEM)
    assert ids == out["input_ids"]
    mask = [i for i, on in enumerate(out["assistant_masks"]) if on]
    learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert set(mask) <= set(learned) and len(learned) - len(mask) == (
        3 if style == "generation_no_end" else 0
    )
    assert [tok.decode(s) for s in learned_spans(ids, labels)] == [
        a + "<|im_end|>" for a in answers_of(messages, style)
    ]
    samples = template.encode(WITH_SYSTEM, "each")
    assert [len(learned_spans(i, lab)) for i, lab in samples] == [1, 1, 1]


def test_answers_a_template_rewrites_are_refused_for_training_only(toks):
    """Prompts never need answer spans: a template that rewrites answers still prompts the model. Training
    is refused in one line naming --template (and --loss_on where only earlier answers are rewritten)."""
    record = {
        "conversations": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Goodbye now."},
        ]
    }
    messages, _ = hf_messages(record)
    history = {"conversations": record["conversations"][:3]}
    for style in ("upper", "rewrites_history"):
        tok = toks[style]
        template = get_template("tokenizer", tok)
        expected = tok.apply_chat_template(messages[:3], add_generation_prompt=True)["input_ids"]
        assert template.build_prompt(history) == expected
        with pytest.raises(ValueError, match=r"cannot find the assistant answers.*--template NAME") as err:
            template.encode(record)
        assert ("--loss_on last" in str(err.value)) == (style == "rewrites_history")
        assert "\n" not in str(err.value)
    ((ids, labels),) = template.encode(record, "last")
    assert [tok.decode(s) for s in learned_spans(ids, labels)] == ["Goodbye now.<|im_end|>"]


def test_plain_text_end_marker_prompts_but_does_not_train(toks):
    tok = toks["plain_end"]
    template = get_template("tokenizer", tok)
    assert template.end_id == tok.eos_token_id  # generation stops at EOS (and the model's stop ids)
    messages, _ = hf_messages(NO_SYSTEM)
    history = {"conversations": NO_SYSTEM["conversations"][:3]}
    text = tok.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    assert text.endswith("### End\nassistant: ")
    assert template.build_prompt(history) == tok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"no special token ends an answer.*--template NAME"):
        template.encode(NO_SYSTEM)


def test_llama3_named_template_equals_llama3_jinja(toks):
    tok = toks["llama30"]
    named = get_template("llama3", tok)
    jinja = get_template("tokenizer", tok)
    assert named.end_id == jinja.end_id == tok.convert_tokens_to_ids("<|eot_id|>")
    for record in (WITH_SYSTEM, NO_SYSTEM):
        messages, _ = hf_messages(record)
        for loss_on in ("all", "each"):
            assert named.encode(record, loss_on) == jinja.encode(record, loss_on)
        ((ids, _),) = named.encode(record)
        assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        history = {**record, "conversations": record["conversations"][:-1]}
        expected = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
        assert named.build_prompt(history) == jinja.build_prompt(history) == expected


def test_resolve_template_name(model_dirs, toks, tiny_llama_dir: Path, tiny_baichuan_dir: Path):
    assert {"tokenizer", "llama3"} <= set(TEMPLATE_NAMES)
    model_type = AutoConfig.from_pretrained(str(model_dirs["smollm2"])).model_type
    assert model_type == "llama"
    assert resolve_template_name(None, toks["smollm2"], model_type) == "tokenizer"  # read from the directory
    assert resolve_template_name("chatml", toks["smollm2"], model_type) == "chatml"  # --template wins
    plain = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    assert resolve_template_name(None, plain, "llama") == "llama2"
    assert resolve_template_name("", plain, "qwen2") == "chatml"
    import models.baichuan  # noqa: F401  (registers the Baichuan tokenizer with AutoTokenizer)

    baichuan = AutoTokenizer.from_pretrained(str(tiny_baichuan_dir))
    assert resolve_template_name(None, baichuan, "baichuan") == "baichuan2"
    with pytest.raises(ValueError, match="no chat template"):
        get_template("tokenizer", plain)


def test_template_that_drops_tools_is_named(toks, caplog):
    """SmolLM2's template ignores tools and tool calls (as transformers renders it); say so once."""
    with caplog.at_level("WARNING", logger="sft.data.templates.jinja"):
        get_template("tokenizer", toks["qwen25"]).encode(TOOL_CHAT)
        assert not caplog.records
        smol = get_template("tokenizer", toks["smollm2"])
        smol.encode(TOOL_CHAT)
        smol.encode(TOOL_CHAT)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "tool calls ('get_weather'" in messages[0]
    assert "tool definitions" in messages[1] and "--template chatml" in messages[1]


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_named_template_carries_an_equal_jinja(name, model_dirs):
    """The jinja a named template writes into a tokenizer (checkpoints, merged models) renders the same ids."""
    tok = AutoTokenizer.from_pretrained(str(model_dirs["smollm2" if name == "chatml" else "llama30"]))
    tok.chat_template = None
    named = get_template(name, tok)
    tok.chat_template = named.chat_template()
    assert resolve_template_name(None, tok, "llama") == "tokenizer"
    jinja = get_template("tokenizer", tok)
    for record in (WITH_SYSTEM, NO_SYSTEM):
        messages, _ = hf_messages(record)
        history = {**record, "conversations": record["conversations"][:-1]}
        expected = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
        assert named.build_prompt(history) == jinja.build_prompt(history) == expected
        for loss_on in ("all", "each"):
            for (ids, labels), (j_ids, j_labels) in zip(
                named.encode(record, loss_on), jinja.encode(record, loss_on)
            ):
                tail = len(j_ids) - len(ids)  # chatml's "\n" after the last answer: unlearned, kept by jinja
                assert j_ids[: len(ids)] == ids and j_labels[: len(labels)] == labels
                assert tail == (1 if name == "chatml" else 0) and set(j_labels[len(labels) :]) <= {
                    IGNORE_INDEX
                }


def test_baichuan2_carries_an_equal_jinja(tiny_baichuan_dir: Path):
    from sft.modeling.loading import load_tokenizer

    tok = load_tokenizer(tiny_baichuan_dir)
    named = get_template("baichuan2", tok, tiny_baichuan_dir)
    tok.chat_template = named.chat_template()
    assert resolve_template_name(None, tok, "baichuan") == "baichuan2"  # slow tokenizer: the named template
    messages, _ = hf_messages(WITH_SYSTEM)
    ((ids, _),) = named.encode(WITH_SYSTEM)
    assert tok.apply_chat_template(messages, tokenize=True)["input_ids"] == ids
    history = {**WITH_SYSTEM, "conversations": WITH_SYSTEM["conversations"][:-1]}
    assert tok.apply_chat_template(messages[:-1], add_generation_prompt=True)[
        "input_ids"
    ] == named.build_prompt(history)
