"""Gradio chat page for a fine-tuned model: role play, or a plain assistant.

    python web_demo.py --model_path MERGED --desc_path ../shared/data/rolebench-zh/profiles-zh_desc.json --port 7860
    python web_demo.py --model_path BASE --adapter_dir ADAPTER --desc_path profiles.json --port 7860
    python web_demo.py --model_path demo_out/merged --port 7860          # a plain assistant (no roles)

With role profiles (``--desc_path``), pick a role: its description becomes the system prompt, in the
wording training used. Without them, the page is a plain assistant: no system prompt is sent, so the
model's chat template applies its own default (SmolLM2's "You are a helpful AI assistant named SmolLM...";
``--system`` sets one instead). Chat with history, and change max new tokens / top-p / temperature between
messages: the sliders are read for every message. Replies stream as they are generated. Binds to 127.0.0.1 unless --host says
otherwise. Needs the demo extras: ``pip install -r requirements-demo.txt``. See docs/INFERENCE.md.

Serving several people: up to ``--max_live_replies`` replies are generated at once, decoded together in one batch
(:mod:`sft.inference.serving`); more requests wait in gradio's queue. A chat's next message computes only its new
text: recent prompts' and replies' keys/values are kept (``--prompt_cache_mb``). A reply whose reader leaves (a
cancelled request, a closed tab) stops generating at the next token. A message too long for the context window is
cut from its start, inside its content: the system prompt and the template's headers always stay.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from models import register_models
from sft.core.errors import UserError
from sft.core.flags import ArgumentParser, HelpFormatter, add_arguments, flag, flag_of, parse_flags
from sft.core.runner import run_entry_point, set_seed, setup_logging
from sft.inference.chat import FittedPrompt, fit_history
from sft.inference.engines import Engine, load_engine
from sft.inference.settings import (
    GenerationArgs,
    LiveArgs,
    ModelLoadArgs,
    build_generation_config,
    engine_problems,
)

logger = logging.getLogger("web_demo")

MAX_NEW_TOKENS_LIMIT = 2048  # slider maximum
LIVE_REPLIES = 4  # --max_live_replies default with --engine torch (docs/INFERENCE.md: measured)


@dataclass
class WebDemoArgs(ModelLoadArgs):
    """Every flag of web_demo.py: the model, the page's roles (or a plain assistant), where it listens."""

    desc_path: str | None = flag(
        None,
        "Role profiles JSON: {role name: description} (RoleBench profiles-zh_desc.json); without it the page "
        "is a plain assistant with no roles.",
    )
    system_template: str | None = flag(
        None,
        "With --desc_path: system prompt with {role} and {desc}; default: the RoleBench template training used.",
    )
    system: str | None = flag(
        None,
        "Without --desc_path: the assistant's system prompt; default: none sent, so the chat template's own "
        "default applies.",
    )
    engine: str = flag_of(GenerationArgs, "engine")
    gguf: str | None = flag_of(GenerationArgs, "gguf")
    max_live_replies: int | None = flag(
        None,
        f"Replies generated at once; more requests wait in the queue. Default {LIVE_REPLIES} with --engine torch "
        "(decoded together in one batch), 1 with llama_cpp (one stream at a time).",
    )
    prompt_cache_mb: int | None = flag_of(LiveArgs, "prompt_cache_mb")
    max_prompt_tokens: int | None = flag(
        None,
        "Longest prompt (system prompt, history, message); longer: the oldest rounds go, then the start of the "
        "message. Default: the context window minus the reply's max new tokens.",
    )
    host: str = flag("127.0.0.1", "Interface to listen on (0.0.0.0 exposes the demo).")
    port: int = flag(7860, "TCP port of the page.")
    seed: int = flag(1234, "Random seed for sampling.")

    def problems(self) -> list[str]:
        """Role prompts and a plain assistant's prompt do not mix; the engine must stream; limits are positive."""
        problems = engine_problems(self, streams=True)
        if self.max_live_replies is not None and self.max_live_replies < 1:
            problems.append(f"--max_live_replies={self.max_live_replies} must be >= 1")
        if self.max_live_replies not in (None, 1) and self.engine != "torch":
            problems.append(f"--engine {self.engine} streams one reply at a time: drop --max_live_replies")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            problems.append(f"--max_prompt_tokens={self.max_prompt_tokens} must be >= 1")
        if self.desc_path is None and self.system_template is not None:
            problems.append(
                "--system_template fills in role profiles: pass --desc_path too (or --system for a plain assistant)"
            )
        if self.desc_path is not None and self.system is not None:
            problems.append(
                "--system is the plain assistant's prompt; roles take theirs from --system_template: drop --system"
            )
        return problems


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: the fields of :class:`WebDemoArgs`."""
    parser = ArgumentParser(
        description="Gradio chat demo: role play, or a plain assistant (see docs/INFERENCE.md).",
        formatter_class=HelpFormatter,
    )
    return add_arguments(parser, WebDemoArgs)


def text_of(content: Any) -> str:
    """Plain text of a Gradio chat message's content (a string, or a list of content blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(text_of(part) for part in content)
    return ""


class ChatInputError(ValueError):
    """A message the demo cannot answer, with what the user should do (shown on the page)."""


def check_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode; else :class:`ChatInputError` saying where and why (a lone surrogate, half
    of a UTF-16 pair, arrives through the HTTP API as ``"\\ud83d"`` and cannot be encoded, so not tokenised)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ChatInputError(
            f"{what} holds invalid Unicode at character {err.start + 1}: U+{ord(text[err.start]):04X} is half of a "
            "UTF-16 surrogate pair without its other half; send the whole character or remove it"
        ) from None
    return text


class RolePlayChat:
    """The model side of the demo: system prompts, history handling and streamed generation.

    With ``profiles`` ({role: description}) each role's system prompt is ``system_template`` filled in. Without
    them (None or empty) it is a plain assistant whose system prompt is ``system``; None sends none, so the chat
    template applies its own default. Replies stream through ``live`` (default: the engine's own ``stream``; the
    web demo passes ``engine.live(...)``, which decodes several users' replies together).
    ``max_prompt_tokens`` caps the prompt below the context window.
    """

    def __init__(
        self,
        engine: Engine,
        profiles: dict[str, str] | None,
        system_template: str | None = None,
        system: str | None = None,
        *,
        live: Any = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if profiles and system_template is None:
            raise ValueError("role profiles need a system_template with {role} and {desc}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.template = engine.template
        self.profiles = profiles or {}
        self.system_template = system_template
        self.system = system
        self.defaults = engine.generation_config
        self.live = live or engine
        self.max_prompt_tokens = max_prompt_tokens

    def system_prompt(self, role: str | None) -> str | None:
        """The role's system prompt (same wording as the training data); a plain assistant's ``system``."""
        if not self.profiles:
            return self.system
        if role not in self.profiles:
            raise ValueError(f"unknown role {role!r}; the profiles file has {list(self.profiles)}")
        return self.system_template.format(role=role, desc=self.profiles[role])

    def settings(self, max_new_tokens: float, top_p: float, temperature: float) -> Any:
        """Generation config for one message from the slider values; temperature 0 = greedy."""
        sample = temperature > 0
        settings = GenerationArgs(
            max_new_tokens=int(max_new_tokens),
            do_sample=sample,
            temperature=float(temperature) if sample else None,
            top_p=float(top_p) if sample else None,
            num_beams=1,
        )
        return build_generation_config(self.engine, self.tokenizer, settings, stop_ids=[self.template.end_id])

    def fit(
        self, message: str, turns: list[dict[str, str]], role: str | None, max_new_tokens: int
    ) -> FittedPrompt:
        """The prompt for ``message`` after ``turns``, fitted to the context window minus the reply's room (and
        ``max_prompt_tokens``): oldest rounds dropped, then the message cut from its start inside the template."""
        system = self.system_prompt(role)
        given = {} if system is None else {"system": system}

        def build(conv: list[dict[str, str]], max_src_len: int | None) -> list[int]:
            return self.template.build_prompt({**given, "conversations": conv}, max_src_len=max_src_len)

        # Rounds whose reply came out empty cannot be prompt turns (the data format forbids empty answers).
        conv = [*_drop_empty_rounds(turns), {"role": "user", "content": message}]
        budget = self.engine.context_window - max_new_tokens
        if self.max_prompt_tokens is not None:
            budget = min(budget, self.max_prompt_tokens)
        try:
            return fit_history(build, conv, budget)
        except ValueError as err:
            raise ChatInputError(f"{err}") from err

    def prompt(
        self, message: str, turns: list[dict[str, str]], role: str | None, max_new_tokens: int
    ) -> list[int]:
        """Prompt ids for ``message`` after ``turns`` (:meth:`fit`)."""
        return self.fit(message, turns, role, max_new_tokens).ids

    def reply(
        self,
        message: str,
        history: list[dict[str, Any]],
        role: str | None,
        max_new_tokens: float,
        top_p: float,
        temperature: float,
        *,
        notify: Callable[[str], Any] = logger.info,
    ) -> Iterator[tuple[str, list[dict[str, str]]]]:
        """Stream the answer to ``message``: yields (textbox value, chat history) after every piece.

        The slider values arrive with every call, so a change applies to the very next message. A message cut to
        fit is answered, and ``notify`` tells the user (the page shows a warning). Invalid input raises
        :class:`ChatInputError`. Closing this generator (the reader left) stops the generation.
        """
        message = check_text((message or "").strip(), "the message")
        turns = [
            {"role": m["role"], "content": check_text(text_of(m["content"]), "the chat history")}
            for m in history or []
        ]
        if not message:
            yield "", turns
            return
        config = self.settings(max_new_tokens, top_p, temperature)
        fitted = self.fit(message, turns, role, config.max_new_tokens)
        if fitted.cut:
            logger.info("message cut by %d tokens to a %d-token prompt", fitted.cut, len(fitted.ids))
            notify(
                f"Your message was too long for the model: its first {fitted.cut} tokens were left out, the rest "
                "was answered."
            )
        shown = [*turns, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield "", shown
        for piece in self.live.stream(fitted.ids, config):
            shown[-1] = {"role": "assistant", "content": shown[-1]["content"] + piece}
            yield "", copy.copy(shown)

    def reply_plain(
        self,
        message: str,
        history: list[dict[str, Any]],
        max_new_tokens: float,
        top_p: float,
        temperature: float,
        *,
        notify: Callable[[str], Any] = logger.info,
    ) -> Iterator[tuple[str, list[dict[str, str]]]]:
        """:meth:`reply` without a role: the plain assistant's event handler."""
        yield from self.reply(message, history, None, max_new_tokens, top_p, temperature, notify=notify)


def _drop_empty_rounds(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Remove user/assistant pairs whose assistant answer is empty."""
    out: list[dict[str, str]] = []
    for turn in turns:
        if turn["role"] == "assistant" and not turn["content"].strip():
            if out and out[-1]["role"] == "user":
                out.pop()
            continue
        out.append(turn)
    return out


def build_demo(chat: RolePlayChat, title: str, *, max_live: int = 1) -> Any:
    """The Gradio page. The ``chat`` event is also an API endpoint (``/chat``) for gradio_client: (message,
    history, role, max_new_tokens, top_p, temperature), without the role for a plain assistant. At most
    ``max_live`` chat events run at once (the Enter key and the Send button share the limit); the rest queue."""
    import gradio as gr

    def handle(reply: Callable[..., Iterator]) -> Callable[..., Iterator]:
        """``reply`` as a gradio event handler: a cut message shows a warning, a bad one an error."""

        def event(*inputs: Any) -> Iterator:
            try:
                yield from reply(*inputs, notify=gr.Warning)
            except ChatInputError as err:
                raise gr.Error(str(err)) from None

        return event

    defaults = chat.defaults
    roles = list(chat.profiles)
    hint = "Say something to the role and press Enter" if roles else "Type a message and press Enter"
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot")
                with gr.Row():
                    textbox = gr.Textbox(
                        placeholder=hint,
                        label="Message",
                        show_label=False,
                        scale=5,
                        elem_id="message",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                clear = gr.Button("Clear history", elem_id="clear")
            with gr.Column(scale=2):
                if roles:
                    role = gr.Dropdown(choices=roles, value=roles[0], label="Role", elem_id="role")
                    description = gr.Textbox(
                        value=chat.profiles[roles[0]], label="Role description", lines=6, interactive=False
                    )
                max_new_tokens = gr.Slider(
                    1,
                    MAX_NEW_TOKENS_LIMIT,
                    value=min(defaults.max_new_tokens or 512, MAX_NEW_TOKENS_LIMIT),
                    step=1,
                    label="Max new tokens",
                    elem_id="max_new_tokens",
                )
                top_p = gr.Slider(
                    0.05, 1.0, value=defaults.top_p or 1.0, step=0.01, label="Top-p", elem_id="top_p"
                )
                temperature = gr.Slider(
                    0.0,
                    2.0,
                    value=defaults.temperature if defaults.do_sample else 0.0,
                    step=0.05,
                    label="Temperature (0 = greedy)",
                    elem_id="temperature",
                )
        sliders = [max_new_tokens, top_p, temperature]
        if roles:
            handler, inputs = handle(chat.reply), [textbox, chatbot, role, *sliders]
        else:
            handler, inputs = handle(chat.reply_plain), [textbox, chatbot, *sliders]
        limit = {"concurrency_limit": max_live, "concurrency_id": "chat"}
        textbox.submit(handler, inputs, [textbox, chatbot], api_name="chat", **limit)
        send.click(handler, inputs, [textbox, chatbot], api_name=False, **limit)
        clear.click(lambda: ("", []), None, [textbox, chatbot], api_name="clear")
        if roles:
            # A new role starts a new conversation: the old history belongs to another character.
            role.change(lambda r: (chat.profiles[r], []), role, [description, chatbot], api_name=False)
    return demo


def run(argv: list[str]) -> None:
    """Load the model, build the page and serve it until interrupted."""
    args = parse_flags(build_parser(), WebDemoArgs, argv)
    setup_logging()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the demo
    register_models()
    from sft.data.converters import ROLEBENCH_SYSTEM_TEMPLATE, check_system_template, load_profiles

    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise UserError("the web demo needs gradio: pip install -r requirements-demo.txt") from err
    profiles, system_template = None, None
    if args.desc_path is not None:
        profiles = load_profiles(args.desc_path)
        system_template = args.system_template or ROLEBENCH_SYSTEM_TEMPLATE
        check_system_template(system_template)
    set_seed(args.seed)
    engine = load_engine(args, seed=args.seed)
    max_live = args.max_live_replies or (LIVE_REPLIES if engine.name == "torch" else 1)
    live = engine.live(max_live, args.seed, args.prompt_cache_mb)
    chat = RolePlayChat(
        engine, profiles, system_template, args.system, live=live, max_prompt_tokens=args.max_prompt_tokens
    )
    demo = build_demo(chat, title="Role-play chat" if profiles else "Chat", max_live=max_live)
    logger.info(
        "serving on http://%s:%d (engine %s, %d replies at once)", args.host, args.port, engine.name, max_live
    )
    demo.queue().launch(server_name=args.host, server_port=args.port, share=False, show_error=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (README.md, "When things go wrong")."""
    return run_entry_point(run, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
