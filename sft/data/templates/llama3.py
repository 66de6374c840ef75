"""``llama3``: Meta's Llama-3 chat format.

``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nsystem<|eot_id|>`` then
``<|start_header_id|>role<|end_header_id|>\\n\\ntext<|eot_id|>`` per turn, texts stripped as Meta's
template does. The end-of-turn id is ``<|eot_id|>`` when the vocabulary has it as one token, otherwise
EOS. A tool call is an assistant turn, a tool result an ``ipython`` turn; the Go form renders user and
assistant only.
"""

from __future__ import annotations

from sft.data.templates.base import Piece, RenderedTurn, Template


class Llama3Template(Template):
    """``<|begin_of_text|>``, then ``<|start_header_id|>role<|end_header_id|>\\n\\ntext<|eot_id|>`` turns."""

    name = "llama3"
    END_TOKEN = "<|eot_id|>"
    JINJA = (
        "{BOS}{% for m in messages %}{% set role = 'ipython' if m['role'] == 'tool' else m['role'] %}"
        "<|start_header_id|>{{ role }}<|end_header_id|>{{ '\\n\\n' }}{{ m['content'] | trim }}"
        "{END}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\\n\\n' }}{% endif %}"
    )
    GO_TEMPLATE = (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}{END}\n{{- end }}\n"
        "{{- range .Messages }}\n"
        '{{- if or (eq .Role "user") (eq .Role "assistant") }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        "{{ .Content }}{END}\n"
        "{{- end }}\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    GO_STOPS = ("{END}",)

    def render_prefix(self, system: str) -> list[Piece]:
        if not system:
            return [self.bos]
        return [self.bos, "<|start_header_id|>system<|end_header_id|>\n\n" + system.strip(), (self.end_id,)]

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        speaker = {"tool": "assistant", "observation": "ipython"}.get(role, role)
        head = f"<|start_header_id|>{speaker}<|end_header_id|>\n\n"
        return RenderedTurn(role, [head], content.strip(), [(self.end_id,)], [])
