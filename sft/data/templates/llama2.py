"""``llama2``: ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s><s>[INST] ...``.

The jinja form is Meta's text layout, the same text as the pieces; with SentencePiece's dummy prefix the
ids of the whole text may differ from the pieces' at a boundary (a leading "▁"), so apply_chat_template
is close to, not always equal to, the training ids. A tool call is an assistant turn, a tool result a
user turn.
"""

from __future__ import annotations

from sft.data.templates.base import Piece, RenderedTurn, Template


class Llama2Template(Template):
    """``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s>`` per round."""

    name = "llama2"
    JINJA = (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
        "message['content'] + ' [/INST]' }}{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% endif %}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    GO_TEMPLATE = (
        "{{- $first := true }}\n"
        "{{- range .Messages }}\n"
        '{{- if eq .Role "user" }}\n'
        "{{- if $first }}[INST] {{ if $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}\n"
        "{{- else }}{BOS}[INST] {{ end }}{{ .Content }} [/INST]\n"
        "{{- $first = false }}\n"
        '{{- else if eq .Role "assistant" }} {{ .Content }}{EOS}\n'
        "{{- end }}\n"
        "{{- end }}"
    )
    GO_STOPS = ("{EOS}", "[INST]")

    def render_prefix(self, system: str) -> list[Piece]:
        return []

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        if role in ("assistant", "tool"):
            return RenderedTurn(role, ["[/INST]"], content, [(self.eos_id,)], [])
        head: list[Piece] = [self.bos, "[INST]"]
        first: list[Piece] = [self.bos, f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"] if system else head
        return RenderedTurn(role, head, content, [], [], head_first=first)
