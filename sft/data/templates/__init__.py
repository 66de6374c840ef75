"""Chat templates: conversation records -> ``input_ids`` and ``labels`` (-100 where no loss).

Each template renders a conversation into the pieces of :mod:`sft.data.templates.base` (head, content,
end, tail per turn), which decide the labels and the truncation. One module per named format
(``alpaca``, ``baichuan2``, ``chatml``, ``llama2``, ``llama3``) holds every rendering of it: the
pieces training and ``build_prompt`` use, its jinja chat template and its Ollama Go template with the
stop strings. ``tokenizer`` (:mod:`sft.data.templates.jinja`) renders with the model's own jinja chat
template. The registry is the package itself: each module defines one ``Template`` subclass and is
found by its ``name``, so a new template is a new module (and its test).

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

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from sft.data.templates.base import LOSS_PLACEMENTS, Template, assemble, sample_plan

__all__ = [
    "LOSS_PLACEMENTS",
    "TEMPLATES",
    "TEMPLATE_NAMES",
    "Template",
    "assemble",
    "get_template",
    "resolve_template_name",
    "sample_plan",
]


def _find_templates() -> dict[str, type[Template]]:
    """The ``Template`` subclass each module of this package defines, by its ``name``."""
    found: dict[str, type[Template]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cls in vars(module).values():
            ours = isinstance(cls, type) and issubclass(cls, Template) and cls.__module__ == module.__name__
            if ours and cls is not Template:
                if cls.name in found:
                    raise RuntimeError(f"two templates are named {cls.name!r}: {found[cls.name]}, {cls}")
                found[cls.name] = cls
    return dict(sorted(found.items()))


TEMPLATES = _find_templates()  # name -> Template subclass
TEMPLATE_NAMES = tuple(TEMPLATES)
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


def get_template(name: str, tokenizer: Any, model_dir: str | Path | None = None) -> Template:
    """Build a template by name (one of :data:`TEMPLATE_NAMES`); ``model_dir`` for those that read the
    model directory (baichuan2's turn ids)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {list(TEMPLATE_NAMES)}")
    return TEMPLATES[name].for_model(tokenizer, model_dir)
