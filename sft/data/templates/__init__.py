"""Chat templates: conversation records -> ``input_ids`` and ``labels`` (-100 where no loss).

Each template renders a conversation into the pieces of :mod:`sft.data.templates.base` (head, content,
end, tail per turn), which decide the labels and the truncation. To add a template: a ``Template``
subclass here, its name in :data:`TEMPLATE_NAMES` and in :func:`get_template`.

Templates (``--template``):

* ``baichuan2``: ``system <user_token> user <assistant_token> answer </s> ...``; the turn token
  ids come from the model directory's ``generation_config.json`` (``user_token_id`` /
  ``assistant_token_id``). No BOS, as in the official ``build_chat_input``.
* ``llama2``: ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s><s>[INST] ...``.
* ``alpaca``: ``### Instruction:`` (the system text when there is one, then ``### Input:`` with
  the user text) / ``### Response:``; later rounds repeat ``### Instruction`` / ``### Response``.
* ``llama3``: ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nsystem<|eot_id|>``
  then ``<|start_header_id|>role<|end_header_id|>\\n\\ntext<|eot_id|>`` per turn (Meta's Llama-3 chat
  format; texts are stripped as Meta's template does); the end-of-turn id is ``<|eot_id|>`` when the
  vocabulary has it as one token, otherwise EOS. Tool results use the ``ipython`` role.
* ``chatml``: ``<|im_start|>role\\ntext<|im_end|>\\n``; the end-of-turn id is ``<|im_end|>`` when
  the vocabulary has it as one token, otherwise the tokenizer's EOS.
* ``tokenizer``: the model's own jinja chat template (``tokenizer.chat_template``), see
  :mod:`sft.data.templates.jinja`.

Tool calls render with the assistant's head and ``[tool call] `` before their text, observations
with the user's head (``observation`` role for chatml) and ``[observation] `` before their text;
neither is learned. ``tools`` definitions are appended to the system text as JSON.

Default template (:func:`resolve_template_name`, for training and inference alike): an explicit
``--template`` wins; else ``tokenizer`` when the tokenizer carries a chat template; else by model
type (:func:`default_template_name`): baichuan -> baichuan2, llama -> llama2, qwen2 -> chatml,
anything else -> chatml (its markers tokenise as plain text when a vocabulary lacks them; pick
``alpaca`` for base models without any chat format).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.data.templates.base import (
    LOSS_PLACEMENTS,
    Piece,
    RenderedTurn,
    Template,
    assemble,
    sample_plan,
    single_token_id,
)
from sft.data.templates.jinja import JinjaTemplate

if TYPE_CHECKING:
    from transformers import GenerationConfig

__all__ = [
    "LOSS_PLACEMENTS",
    "TEMPLATE_NAMES",
    "Template",
    "assemble",
    "get_template",
    "resolve_template_name",
    "sample_plan",
]

TEMPLATE_NAMES = ("baichuan2", "llama2", "llama3", "alpaca", "chatml", "tokenizer")
_DEFAULT_BY_MODEL_TYPE = {"baichuan": "baichuan2", "llama": "llama2", "qwen2": "chatml"}


def default_template_name(model_type: str) -> str:
    """Template for a ``config.model_type``: baichuan -> baichuan2, llama -> llama2, qwen2 -> chatml,
    anything else -> chatml."""
    return _DEFAULT_BY_MODEL_TYPE.get(model_type, "chatml")


def resolve_template_name(name: str | None, tokenizer: Any, model_type: str) -> str:
    """The template to use: ``name`` when given (``--template``); else ``tokenizer`` when the
    tokenizer carries a jinja chat template (tokenizer_config.json ``chat_template`` or
    ``chat_template.jinja``); else :func:`default_template_name` of the model type.

    The official Baichuan2 files carry no chat template, so they keep ``baichuan2``; a Llama-3 or
    SmolLM2 model (model type ``llama``) is spoken to in its own format, not Llama-2's.
    """
    if name:
        return name
    if getattr(tokenizer, "chat_template", None) and getattr(tokenizer, "is_fast", False):
        return "tokenizer"  # (the jinja template needs character offsets: a fast tokenizer)
    return default_template_name(model_type)


# ---- the templates --------------------------------------------------------------------------


class Baichuan2Template(Template):
    """``system <user_token> user <assistant_token> answer </s> ...`` with turn ids from the
    model's generation config."""

    name = "baichuan2"

    def __init__(self, tokenizer: Any, model_dir: str | Path | GenerationConfig | None) -> None:
        """``model_dir``: the model directory (its generation_config.json), or that GenerationConfig."""
        super().__init__(tokenizer)
        if model_dir is None:
            raise ValueError(
                "template 'baichuan2' needs the model directory (its generation_config.json holds "
                "user_token_id/assistant_token_id); pass model_dir"
            )
        from transformers import GenerationConfig

        if isinstance(model_dir, GenerationConfig):
            gen, where = model_dir, "the generation config"
        else:
            gen, where = (
                GenerationConfig.from_pretrained(str(model_dir)),
                Path(model_dir) / "generation_config.json",
            )
        user_id = getattr(gen, "user_token_id", None)
        assistant_id = getattr(gen, "assistant_token_id", None)
        if user_id is None or assistant_id is None:
            raise ValueError(
                f"{where} has no user_token_id/assistant_token_id; add them (195/196 in the official Baichuan2 files)"
            )
        self.user_id, self.assistant_id = int(user_id), int(assistant_id)

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}:user={self.user_id}:assistant={self.assistant_id}"

    def render_prefix(self, system: str) -> list[Piece]:
        return [system] if system else []

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        if role in ("assistant", "tool"):
            return RenderedTurn(role, [(self.assistant_id,)], content, [(self.eos_id,)], [])
        return RenderedTurn(role, [(self.user_id,)], content, [], [])

    def chat_template(self) -> str | None:
        user, assistant, eos = self.tokenizer.convert_ids_to_tokens(
            [self.user_id, self.assistant_id, self.eos_id]
        )
        return (
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
            f"{{% elif m['role'] == 'assistant' %}}{assistant}{{{{ m['content'] }}}}{eos}"
            f"{{% elif m['role'] == 'tool' %}}{user}[observation] {{{{ m['content'] }}}}"
            f"{{% else %}}{user}{{{{ m['content'] }}}}{{% endif %}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{assistant}{{% endif %}}"
        )


class Llama2Template(Template):
    """``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s>`` per round."""

    name = "llama2"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.bos = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()

    def render_prefix(self, system: str) -> list[Piece]:
        return []

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        if role in ("assistant", "tool"):
            return RenderedTurn(role, ["[/INST]"], content, [(self.eos_id,)], [])
        head: list[Piece] = [self.bos, "[INST]"]
        first: list[Piece] = [self.bos, f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"] if system else head
        return RenderedTurn(role, head, content, [], [], head_first=first)

    def chat_template(self) -> str | None:
        # Meta's text layout: the same text as the pieces above; with SentencePiece's dummy prefix the ids of the
        # whole text may differ from the pieces' at a boundary (a leading "▁"), so apply_chat_template is close to,
        # not always equal to, the training ids.
        return (
            "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
            "{% set loop_messages = messages %}{% endif %}"
            "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
            "{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
            "message['content'] + ' [/INST]' }}{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% endif %}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        )


class AlpacaTemplate(Template):
    """``### Instruction:`` / ``### Input:`` / ``### Response:`` blocks."""

    name = "alpaca"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.bos = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()

    def render_prefix(self, system: str) -> list[Piece]:
        return [self.bos] if self.bos else []

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        if role in ("assistant", "tool"):
            return RenderedTurn(role, ["\n\n### Response:\n"], content, [(self.eos_id,)], ["\n\n"])
        if role == "observation":
            return RenderedTurn(role, ["### Observation:\n"], content, [], [])
        first = [f"### Instruction:\n{system}\n\n### Input:\n"] if system else None
        return RenderedTurn(role, ["### Instruction:\n"], content, [], [], head_first=first)


class ChatMLTemplate(Template):
    """``<|im_start|>role\\ntext<|im_end|>\\n`` turns."""

    name = "chatml"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        im_end = single_token_id(tokenizer, "<|im_end|>")
        self._end = im_end if im_end is not None else self.eos_id

    @property
    def end_id(self) -> int:
        return self._end

    def render_prefix(self, system: str) -> list[Piece]:
        return ["<|im_start|>system\n" + system, (self._end,), "\n"] if system else []

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        speaker = {"tool": "assistant"}.get(role, role)
        return RenderedTurn(role, [f"<|im_start|>{speaker}\n"], content, [(self._end,)], ["\n"])

    def chat_template(self) -> str | None:
        end = self.tokenizer.convert_ids_to_tokens(self._end)
        return (
            "{% for m in messages %}{% set role = 'observation' if m['role'] == 'tool' else m['role'] %}"
            "<|im_start|>{{ role }}{{ '\\n' }}{{ ('[observation] ' if m['role'] == 'tool' else '') + m['content'] }}"
            f"{end}{{{{ '\\n' }}}}{{% endfor %}}"
            "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
        )


class Llama3Template(Template):
    """``<|begin_of_text|>`` then ``<|start_header_id|>role<|end_header_id|>\\n\\ntext<|eot_id|>``
    per turn (the system first), texts stripped as in Meta's template."""

    name = "llama3"

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.bos = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()
        eot = single_token_id(tokenizer, "<|eot_id|>")
        self._end = eot if eot is not None else self.eos_id

    @property
    def end_id(self) -> int:
        return self._end

    def render_prefix(self, system: str) -> list[Piece]:
        if not system:
            return [self.bos]
        return [self.bos, "<|start_header_id|>system<|end_header_id|>\n\n" + system.strip(), (self._end,)]

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        speaker = {"tool": "assistant", "observation": "ipython"}.get(role, role)
        head = f"<|start_header_id|>{speaker}<|end_header_id|>\n\n"
        return RenderedTurn(role, [head], content.strip(), [(self._end,)], [])

    def chat_template(self) -> str | None:
        bos = self.tokenizer.convert_ids_to_tokens(self.bos[0]) if self.bos else ""
        end = self.tokenizer.convert_ids_to_tokens(self._end)
        return (
            f"{bos}{{% for m in messages %}}{{% set role = 'ipython' if m['role'] == 'tool' else m['role'] %}}"
            "<|start_header_id|>{{ role }}<|end_header_id|>{{ '\\n\\n' }}{{ m['content'] | trim }}"
            f"{end}{{% endfor %}}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\\n\\n' }}{% endif %}"
        )


def get_template(name: str, tokenizer: Any, model_dir: str | Path | None = None) -> Template:
    """Build a template by name (one of :data:`TEMPLATE_NAMES`)."""
    if name == "baichuan2":
        return Baichuan2Template(tokenizer, model_dir)
    if name == "tokenizer":
        return JinjaTemplate(tokenizer)
    classes = {
        "llama2": Llama2Template,
        "llama3": Llama3Template,
        "alpaca": AlpacaTemplate,
        "chatml": ChatMLTemplate,
    }
    if name not in classes:
        raise ValueError(f"unknown template {name!r}; choose one of {list(TEMPLATE_NAMES)}")
    return classes[name](tokenizer)
