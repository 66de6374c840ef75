"""``baichuan2``: ``system <user_token> user <assistant_token> answer </s> ...``.

The turn token ids come from the model directory's ``generation_config.json`` (``user_token_id`` /
``assistant_token_id``, 195/196 in the official files). No BOS, as in the official
``build_chat_input``. A tool call is an assistant turn, a tool result a user turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.data.templates.base import Piece, RenderedTurn, Template

if TYPE_CHECKING:
    from transformers import GenerationConfig


class Baichuan2Template(Template):
    """``system <user_token> user <assistant_token> answer </s> ...``, turn ids from the generation config."""

    name = "baichuan2"
    JINJA = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{ASSISTANT}{{ m['content'] }}{EOS}"
        "{% elif m['role'] == 'tool' %}{USER}[observation] {{ m['content'] }}"
        "{% else %}{USER}{{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{ASSISTANT}{% endif %}"
    )
    GO_TEMPLATE = (
        "{{- if .System }}{{ .System }}{{ end }}\n"
        "{{- range .Messages }}\n"
        '{{- if eq .Role "user" }}{USER}{{ .Content }}\n'
        '{{- else if eq .Role "assistant" }}{ASSISTANT}{{ .Content }}{EOS}\n'
        "{{- end }}\n"
        "{{- end }}{ASSISTANT}"
    )
    GO_STOPS = ("{EOS}", "{USER}")  # a model that starts the next user turn is done

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

    @classmethod
    def for_model(cls, tokenizer: Any, model_dir: Any) -> Template:
        return cls(tokenizer, model_dir)

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}:user={self.user_id}:assistant={self.assistant_id}"

    def special_texts(self) -> dict[str, str]:
        user, assistant = self.tokenizer.convert_ids_to_tokens([self.user_id, self.assistant_id])
        return {**super().special_texts(), "USER": user, "ASSISTANT": assistant}

    def render_prefix(self, system: str) -> list[Piece]:
        return [system] if system else []

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        if role in ("assistant", "tool"):
            return RenderedTurn(role, [(self.assistant_id,)], content, [(self.eos_id,)], [])
        return RenderedTurn(role, [(self.user_id,)], content, [], [])
