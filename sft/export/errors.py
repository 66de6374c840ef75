"""The two ways a GGUF export stops: refused before writing, or written but failing its check."""

from __future__ import annotations

from sft.core.errors import UserError


class ExportRefused(ValueError):
    """The model cannot be exported faithfully (architecture, position scheme, tokenizer, flags); nothing written.

    The message is one line naming the file or setting and what to do.
    """


class ExportCheckError(UserError, RuntimeError):
    """The written file, read back by an independent reader, does not agree with the source model.

    The temporary file is removed; nothing is left at the output path.
    """
