"""``chatml``: ``<|im_start|>role\\ntext<|im_end|>\\n`` turns (Qwen, SmolLM2).

The end-of-turn id is ``<|im_end|>`` when the vocabulary has it as one token, otherwise the tokenizer's
EOS (the markers then tokenise as plain text); every form ends a turn with it. A tool call is an
assistant turn, a tool result an ``observation`` turn; the Go form renders user and assistant only.
"""

from __future__ import annotations

from sft.data.templates.base import Piece, RenderedTurn, Template


class ChatMLTemplate(Template):
    """``<|im_start|>role\\ntext<|im_end|>\\n`` turns."""

    name = "chatml"
    END_TOKEN = "<|im_end|>"
    JINJA = (
        "{% for m in messages %}{% set role = 'observation' if m['role'] == 'tool' else m['role'] %}"
        "<|im_start|>{{ role }}{{ '\\n' }}{{ ('[observation] ' if m['role'] == 'tool' else '') + m['content'] }}"
        "{END}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
    )
    GO_TEMPLATE = (
        "{{- if .System }}<|im_start|>system\n{{ .System }}{END}\n{{ end }}\n"
        "{{- range .Messages }}\n"
        '{{- if eq .Role "user" }}<|im_start|>user\n{{ .Content }}{END}\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}{END}\n'
        "{{ end }}\n"
        "{{- end }}<|im_start|>assistant\n"
    )
    GO_STOPS = ("{END}",)

    def render_prefix(self, system: str) -> list[Piece]:
        return ["<|im_start|>system\n" + system, (self.end_id,), "\n"] if system else []

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        speaker = {"tool": "assistant"}.get(role, role)
        return RenderedTurn(role, [f"<|im_start|>{speaker}\n"], content, [(self.end_id,)], ["\n"])
