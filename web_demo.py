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
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from models import register_models
from sft.core.errors import UserError
from sft.core.flags import ArgumentParser, HelpFormatter, add_arguments, flag, parse_flags
from sft.core.runner import run_entry_point, set_seed, setup_logging
from sft.inference.chat import context_window, fit_history
from sft.inference.generate import stream_reply
from sft.inference.loading import ModelLoadArgs, load_from_flags
from sft.inference.settings import GenerationArgs, build_generation_config

logger = logging.getLogger("web_demo")

MAX_NEW_TOKENS_LIMIT = 2048  # slider maximum


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
    host: str = flag("127.0.0.1", "Interface to listen on (0.0.0.0 exposes the demo).")
    port: int = flag(7860, "TCP port of the page.")
    seed: int = flag(1234, "Random seed for sampling.")

    def problems(self) -> list[str]:
        """Role prompts and a plain assistant's prompt do not mix."""
        problems = []
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


class RolePlayChat:
    """The model side of the demo: system prompts, history handling and streamed generation.

    With ``profiles`` ({role: description}) each role's system prompt is ``system_template`` filled in. Without
    them (None or empty) it is a plain assistant whose system prompt is ``system``; None sends none, so the chat
    template applies its own default.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: Any,
        profiles: dict[str, str] | None,
        system_template: str | None = None,
        system: str | None = None,
    ) -> None:
        if profiles and system_template is None:
            raise ValueError("role profiles need a system_template with {role} and {desc}")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.profiles = profiles or {}
        self.system_template = system_template
        self.system = system
        self.defaults = model.generation_config

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
        return build_generation_config(self.model, self.tokenizer, settings, stop_ids=[self.template.end_id])

    def prompt(
        self, message: str, turns: list[dict[str, str]], role: str | None, max_new_tokens: int
    ) -> list[int]:
        """Prompt ids for ``message`` after ``turns`` (oldest rounds dropped to leave room for the reply)."""
        system = self.system_prompt(role)
        given = {} if system is None else {"system": system}

        def build(conv: list[dict[str, str]]) -> list[int]:
            return self.template.build_prompt({**given, "conversations": conv})

        # Rounds whose reply came out empty cannot be prompt turns (the data format forbids empty answers).
        conv = [*_drop_empty_rounds(turns), {"role": "user", "content": message}]
        ids, _ = fit_history(build, conv, context_window(self.model) - max_new_tokens)
        return ids

    def reply(
        self,
        message: str,
        history: list[dict[str, Any]],
        role: str | None,
        max_new_tokens: float,
        top_p: float,
        temperature: float,
    ) -> Iterator[tuple[str, list[dict[str, str]]]]:
        """Stream the answer to ``message``: yields (textbox value, chat history) after every piece.

        The slider values arrive with every call, so a change applies to the very next message.
        """
        message = (message or "").strip()
        turns = [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]
        if not message:
            yield "", turns
            return
        config = self.settings(max_new_tokens, top_p, temperature)
        prompt = self.prompt(message, turns, role, config.max_new_tokens)
        shown = [*turns, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield "", shown
        for piece in stream_reply(self.model, self.tokenizer, prompt, config):
            shown[-1] = {"role": "assistant", "content": shown[-1]["content"] + piece}
            yield "", copy.copy(shown)

    def reply_plain(
        self,
        message: str,
        history: list[dict[str, Any]],
        max_new_tokens: float,
        top_p: float,
        temperature: float,
    ) -> Iterator[tuple[str, list[dict[str, str]]]]:
        """:meth:`reply` without a role: the plain assistant's event handler."""
        yield from self.reply(message, history, None, max_new_tokens, top_p, temperature)


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


def build_demo(chat: RolePlayChat, title: str) -> Any:
    """The Gradio page. The ``chat`` event is also an API endpoint (``/chat``) for gradio_client: (message,
    history, role, max_new_tokens, top_p, temperature), without the role for a plain assistant."""
    import gradio as gr

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
            handler, inputs = chat.reply, [textbox, chatbot, role, *sliders]
        else:
            handler, inputs = chat.reply_plain, [textbox, chatbot, *sliders]
        textbox.submit(handler, inputs, [textbox, chatbot], api_name="chat")
        send.click(handler, inputs, [textbox, chatbot], api_name=False)
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
    loaded = load_from_flags(args)
    chat = RolePlayChat(
        loaded.model, loaded.tokenizer, loaded.template, profiles, system_template, args.system
    )
    demo = build_demo(chat, title="Role-play chat" if profiles else "Chat")
    logger.info("serving on http://%s:%d", args.host, args.port)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=False, show_error=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (README.md, "When things go wrong")."""
    return run_entry_point(run, argv, logger=logger)


if __name__ == "__main__":
    sys.exit(main())
