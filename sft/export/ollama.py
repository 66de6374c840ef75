"""Chat templates for llama.cpp and Ollama: recognise the model's template, write an Ollama `Modelfile`.

A model directory's chat template is a Jinja string (`tokenizer.chat_template`); llama.cpp reads it from the GGUF
file, Ollama needs the same format as a Go template in its `Modelfile`. Jinja cannot be translated to Go in
general, so the formats are known by name: every named training template with a Go form
(`NAMED_TEMPLATES`: chatml, llama2, llama3, baichuan2). Its module in `sft.data.templates` holds both forms,
`Template.chat_template()` (Jinja) and `Template.go_template()` with `Template.stop_strings()`.

A tokenizer's template is *recognised* as one of them when both Jinja strings render the same text for probe
conversations (with and without a system prompt); a template that adds a default system prompt when none is
given (SmolLM2, Qwen2.5) is recognised too, and that prompt becomes the Modelfile's `SYSTEM`. A template that is
none of them (Llama 3.1's, Gemma's, Mistral's, Phi-3's) is kept in the GGUF file as it is: llama.cpp renders
Jinja itself, and a Modelfile without `TEMPLATE` lets Ollama take the file's template (matched against its own
library); its stop strings are the special token that ends the template's answers and the generation config's
EOS tokens. A model without any chat template gets the training default for its model type in both places.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.data.templates import TEMPLATES, default_template_name, get_template

logger = logging.getLogger(__name__)

NAMED_TEMPLATES = tuple(name for name, cls in TEMPLATES.items() if cls.GO_TEMPLATE)  # those Ollama can speak

# Probe conversations for recognition: with a system prompt, without one; two rounds, ending with a user turn.
_PROBE_SYSTEM = "You are a poet."
_PROBE_TURNS = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "写一首诗"},
]
_SYSTEM_MARK = "\x00SYSTEM\x00"


@dataclass
class ChatFormat:
    """The chat format chosen for a GGUF file and its Modelfile.

    Attributes:
        name: One of NAMED_TEMPLATES, or "gguf" (the file's own template, no TEMPLATE line).
        source: How it was chosen: "flag", "recognised", "the file's own", "default for model type".
        jinja: What goes into the GGUF's tokenizer.chat_template (the tokenizer's own when it has one).
        go_template: The Modelfile TEMPLATE.
        stops: End-of-turn strings (Modelfile PARAMETER stop).
        default_system: A system prompt the template inserts when none is given (Modelfile SYSTEM), or None.
    """

    name: str
    source: str
    jinja: str
    go_template: str | None  # None: Ollama takes the GGUF's own template
    stops: list[str]
    default_system: str | None = None


def _render(jinja: str, tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=jinja, tokenize=False, add_generation_prompt=True
    )


def _recognise(jinja: str, tokenizer: Any, model_dir: Path) -> tuple[str, str | None] | None:
    """(name, default system prompt) of the named template that renders like `jinja`, or None."""
    with_system = [{"role": "system", "content": _PROBE_SYSTEM}, *_PROBE_TURNS]
    try:
        theirs_sys = _render(jinja, tokenizer, with_system)
        theirs_plain = _render(jinja, tokenizer, _PROBE_TURNS)
    except Exception as err:  # a template may reject the probe (e.g. demand alternating roles); not ours then
        logger.warning("the tokenizer's chat template failed on a probe conversation (%s)", err)
        return None
    for name in NAMED_TEMPLATES:
        try:
            ours = get_template(name, tokenizer, model_dir).chat_template()
        except (ValueError, OSError):  # the model lacks what it needs (baichuan2: generation_config.json)
            continue
        if ours is None or _render(ours, tokenizer, with_system) != theirs_sys:
            continue
        if _render(ours, tokenizer, _PROBE_TURNS) == theirs_plain:
            return name, None
        # Does it insert a default system prompt S? Then theirs_plain is ours rendered with system S.
        marked = _render(ours, tokenizer, [{"role": "system", "content": _SYSTEM_MARK}, *_PROBE_TURNS])
        head, _, tail = marked.partition(_SYSTEM_MARK)
        if theirs_plain.startswith(head) and theirs_plain.endswith(tail):
            system = theirs_plain[len(head) : len(theirs_plain) - len(tail)]
            if system and _render(
                ours, tokenizer, [{"role": "system", "content": system}, *_PROBE_TURNS]
            ) == (theirs_plain):
                return name, system
    return None


def choose_chat_format(
    tokenizer: Any, model_dir: Path, model_type: str, template: str | None = None
) -> ChatFormat:
    """Pick the chat format: `template` when given, else the tokenizer's recognised template, else the default.

    Args:
        tokenizer: The model directory's transformers tokenizer.
        model_dir: The model directory (generation_config.json holds baichuan2's turn-token ids).
        model_type: config.model_type, for the training default (baichuan -> baichuan2, llama -> llama2, ...).
        template: One of NAMED_TEMPLATES to force (e.g. the --template the model was fine-tuned with).
    """
    own = getattr(tokenizer, "chat_template", None)
    own = own if isinstance(own, str) and own.strip() else None
    default_system = None
    if template is not None:
        if template not in NAMED_TEMPLATES:
            raise ValueError(f"--template {template!r} is not one of {list(NAMED_TEMPLATES)}")
        name, source = template, "flag"
    elif own is not None and (found := _recognise(own, tokenizer, model_dir)) is not None:
        (name, default_system), source = found, "recognised"
    elif own is not None:
        logger.info(
            "the tokenizer's chat template is none of %s: the GGUF keeps it and the Modelfile has no TEMPLATE "
            "(Ollama takes the file's); pass --template to write one",
            list(NAMED_TEMPLATES),
        )
        return ChatFormat("gguf", "the file's own", own, None, _own_stops(tokenizer, model_dir))
    else:
        name, source = default_template_name(model_type), "default for model type"
        name = name if name in NAMED_TEMPLATES else "chatml"
    named = get_template(name, tokenizer, model_dir)  # (raises when baichuan2's turn ids are missing)
    # The model's own template is the authority for llama.cpp.
    jinja = own if own is not None and source != "flag" else named.chat_template()
    return ChatFormat(
        name=name,
        source=source,
        jinja=jinja,
        go_template=named.go_template(),
        stops=named.stop_strings(),
        default_system=default_system,
    )


def _own_stops(tokenizer: Any, model_dir: Path) -> list[str]:
    """Where answers end under the tokenizer's own template: the special token after an answer, and the
    generation config's EOS tokens (a GGUF holds one EOS; Gemma's <end_of_turn>, Phi-3's <|end|> are not it)."""
    ids = [get_template("tokenizer", tokenizer).end_id]
    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    ids += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(ids)))


def sampling_defaults(model_dir: Path) -> dict[str, float | int]:
    """Ollama PARAMETERs from generation_config.json: temperature/top_p/top_k/repeat_penalty, or greedy."""
    path = model_dir / "generation_config.json"
    gen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not gen.get("do_sample", False):
        return {"temperature": 0} if gen else {}  # transformers' default is greedy decoding
    params: dict[str, float | int] = {}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("repetition_penalty", "repeat_penalty"),
    ):
        if gen.get(ours) is not None:
            params[theirs] = gen[ours]
    return params


def _quote(text: str, what: str) -> str:
    if '"""' in text:
        raise ValueError(f'the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def render_modelfile(
    gguf_path: Path, modelfile_path: Path, chat: ChatFormat, params: dict[str, float | int], source_dir: Path
) -> str:
    """Text of an Ollama Modelfile at ``modelfile_path`` for ``gguf_path`` (FROM relative to it: the two travel
    together)."""
    relative = Path(os.path.relpath(gguf_path.absolute(), modelfile_path.absolute().parent)).as_posix()
    lines = [
        f"# Ollama Modelfile written by export_gguf.py from {source_dir}",
        f"# chat template: {chat.name} ({chat.source}). Create the model with: "
        f"ollama create NAME -f {modelfile_path.name}",
        f"FROM {relative if relative.startswith('.') else './' + relative}",
    ]
    if chat.go_template is not None:
        lines.append(f"TEMPLATE {_quote(chat.go_template, 'template')}")
    if chat.default_system:
        lines.append(f"SYSTEM {_quote(chat.default_system, 'default system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in chat.stops]
    lines += [f"PARAMETER {key} {value}" for key, value in params.items()]
    return "\n".join(lines) + "\n"
