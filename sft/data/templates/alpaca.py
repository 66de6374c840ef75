"""``alpaca``: ``### Instruction:`` (the system text when there is one, then ``### Input:`` with the user
text) / ``### Response:``; later rounds repeat ``### Instruction`` / ``### Response``. For base models
without any chat format; it has no jinja or Ollama form (its blocks have no agreed one).
"""

from __future__ import annotations

from sft.data.templates.base import Piece, RenderedTurn, Template


class AlpacaTemplate(Template):
    """``### Instruction:`` / ``### Input:`` / ``### Response:`` blocks."""

    name = "alpaca"

    def render_prefix(self, system: str) -> list[Piece]:
        return [self.bos] if self.bos else []

    def render_turn(self, role: str, content: str, system: str) -> RenderedTurn:
        if role in ("assistant", "tool"):
            return RenderedTurn(role, ["\n\n### Response:\n"], content, [(self.eos_id,)], ["\n\n"])
        if role == "observation":
            return RenderedTurn(role, ["### Observation:\n"], content, [], [])
        first = [f"### Instruction:\n{system}\n\n### Input:\n"] if system else None
        return RenderedTurn(role, ["### Instruction:\n"], content, [], [], head_first=first)
