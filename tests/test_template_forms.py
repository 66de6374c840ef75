"""Every named chat template, one module each: the registry is the package's modules, and the three renderings
of a format (the Python pieces training uses, the jinja chat template, Ollama's Go template) agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import sft.data.templates as templates
from sft.data.templates import TEMPLATES, get_template
from sft.export.ollama import NAMED_TEMPLATES

# Probe conversations: with and without a system prompt, one round and two, each ending with a user turn.
SYSTEM = "You are a poet."
TURNS = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "写一首诗"},
]
PROBES = [(system, TURNS[:n]) for system in (SYSTEM, "") for n in (1, 3)]
WITH_JINJA = [name for name, cls in TEMPLATES.items() if cls.JINJA]
# The tiny Baichuan tokenizer has no SentencePiece dummy prefix: pieces tokenised one by one give the ids of the
# whole text. llama2's pieces leave the spaces around [INST]/[/INST] to that dummy prefix, so they equal its
# jinja text only up to whitespace.
SPACED_BY_DUMMY_PREFIX = {"llama2"}


def test_registry_is_the_modules_of_the_package():
    """Each module (or subpackage: jinja/) of sft/data/templates but base.py defines one template, found without
    a hand-kept list."""
    folder = Path(templates.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "base"}
    modules |= {p.parent.name for p in folder.glob("*/__init__.py")}
    assert sorted(cls.__module__.rsplit(".", 1)[1] for cls in TEMPLATES.values()) == sorted(modules)
    assert all(cls.name == name for name, cls in TEMPLATES.items())
    assert tuple(TEMPLATES) == templates.TEMPLATE_NAMES and "tokenizer" in TEMPLATES
    assert set(NAMED_TEMPLATES) == {name for name, cls in TEMPLATES.items() if cls.GO_TEMPLATE}
    assert set(NAMED_TEMPLATES) <= set(WITH_JINJA)  # a Modelfile's format is recognised by its jinja form


@pytest.fixture(scope="module")
def tokenizers(tiny_baichuan_dir: Path, tiny_llama_dir: Path) -> dict:
    return {
        "baichuan": (AutoTokenizer.from_pretrained(str(tiny_baichuan_dir)), tiny_baichuan_dir),
        "llama": (AutoTokenizer.from_pretrained(str(tiny_llama_dir)), tiny_llama_dir),
    }


def _built(name: str, tokenizers: dict) -> list[tuple[str, object, object]]:
    """(tokenizer name, tokenizer, template) for each tiny tokenizer the template can be built for."""
    built = []
    for arch, (tok, model_dir) in tokenizers.items():
        try:
            built.append((arch, tok, get_template(name, tok, model_dir)))
        except ValueError:  # baichuan2 needs turn ids the Llama directory lacks
            continue
    assert built, f"template {name!r} builds for no tiny tokenizer"
    return built


def _jinja(tok, template, system: str, turns: list[dict]) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    return tok.apply_chat_template(
        messages, chat_template=template.chat_template(), tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("name", WITH_JINJA)
def test_pieces_render_like_the_jinja_template(name, tokenizers):
    for arch, tok, template in _built(name, tokenizers):
        for system, turns in PROBES:
            prompt = template.build_prompt({"system": system, "conversations": turns})
            text = _jinja(tok, template, system, turns)
            squeezed = re.sub(r"\s", "", tok.decode(prompt, skip_special_tokens=False))
            assert squeezed == re.sub(r"\s", "", text), (arch, system, len(turns))
            if arch == "baichuan" and name not in SPACED_BY_DUMMY_PREFIX:
                assert prompt == tok(text, add_special_tokens=False)["input_ids"], (system, len(turns))


@pytest.mark.parametrize("name", NAMED_TEMPLATES)
def test_go_template_renders_like_the_jinja_template(name, tokenizers, ollama_render):
    """Ollama's form, executed by Go's text/template, renders the jinja text less its first BOS (the GGUF's
    tokenizer adds that)."""
    for arch, tok, template in _built(name, tokenizers):
        for system, turns in PROBES:
            text = _jinja(tok, template, system, turns)
            if tok.bos_token and text.startswith(tok.bos_token):
                text = text[len(tok.bos_token) :]
            messages = ([{"role": "system", "content": system}] if system else []) + turns
            assert ollama_render(template.go_template(), system, messages) == text, (arch, system, len(turns))
        stops = template.stop_strings()
        assert stops and template.tokenizer.convert_ids_to_tokens(template.end_id) in stops
