"""web_demo.py: the role-play chat logic in process, then the real server through gradio_client and Chromium.

The server tests start ``python web_demo.py`` on a free local port with the tiny Baichuan2 and the
real RoleBench profiles file. The browser test needs Debian's ``chromium`` (/usr/bin/chromium) and
the ``playwright`` Python package (which drives that browser; no browser is downloaded).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def profiles_path(shared_data_dir: Path) -> Path:
    return shared_data_dir / "rolebench-zh" / "profiles-zh_desc.json"


@pytest.fixture(scope="module")
def chat(tiny_baichuan_dir: Path, profiles_path: Path):
    from sft.data.converters import ROLEBENCH_SYSTEM_TEMPLATE, load_profiles
    from sft.data.templates import get_template
    from sft.inference.engines import TorchEngine
    from sft.inference.loading import load_for_inference
    from web_demo import RolePlayChat

    model, tokenizer = load_for_inference(tiny_baichuan_dir)
    engine = TorchEngine(model, tokenizer, get_template("baichuan2", tokenizer, tiny_baichuan_dir))
    return RolePlayChat(engine, load_profiles(profiles_path), ROLEBENCH_SYSTEM_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# In process
# ---------------------------------------------------------------------------------------------


def test_role_system_prompt_is_applied(chat):
    from sft.data.converters import ROLEBENCH_SYSTEM_TEMPLATE

    system = ROLEBENCH_SYSTEM_TEMPLATE.format(role="李白", desc=chat.profiles["李白"])
    assert chat.system_prompt("李白") == system
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}]
    ids = chat.prompt("你是谁？", history, "李白", 16)
    assert ids == chat.template.build_prompt(
        {"system": system, "conversations": [*history, {"role": "user", "content": "你是谁？"}]}
    )
    with pytest.raises(ValueError, match="unknown role"):
        chat.system_prompt("nobody")


def test_sliders_map_to_generation_settings(chat):
    greedy = chat.settings(7, 0.5, 0.0)
    assert (greedy.max_new_tokens, greedy.do_sample) == (7, False)
    sampled = chat.settings(20, 0.5, 0.8)
    assert (sampled.max_new_tokens, sampled.do_sample, sampled.top_p, sampled.temperature) == (
        20,
        True,
        0.5,
        0.8,
    )


def test_reply_streams_and_keeps_history(chat):
    history = [
        {"role": "user", "content": [{"type": "text", "text": "你好"}]},
        {"role": "assistant", "content": "嗯"},
    ]
    updates = list(chat.reply("再见", history, "孙悟空", 6, 1.0, 0.0))
    assert len(updates) >= 2  # the user's message shows at once, then the reply grows piece by piece
    final = updates[-1][1]
    assert [m["role"] for m in final] == ["user", "assistant", "user", "assistant"]
    assert final[0]["content"] == "你好" and final[2]["content"] == "再见" and final[3]["content"]


# ---------------------------------------------------------------------------------------------
# The real server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    log: Path

    def log_lines(self, pattern: str) -> list[str]:
        """The server's log lines matching ``pattern`` (a regular expression)."""
        return [line for line in self.log.read_text().splitlines() if re.search(pattern, line)]

    def wait_for_log(self, pattern: str, seconds: float = 30.0, count: int = 1) -> list[str]:
        """The matching lines once there are ``count`` of them."""
        deadline = time.monotonic() + seconds
        while len(lines := self.log_lines(pattern)) < count:
            assert time.monotonic() < deadline, (
                f"no {pattern!r} in the server log:\n{self.log.read_text()[-3000:]}"
            )
            time.sleep(0.05)
        return lines


@pytest.fixture(scope="module")
def demo_server(tiny_baichuan_dir: Path, profiles_path: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "web_demo.py",
                "--model_path",
                str(tiny_baichuan_dir),
                "--desc_path",
                str(profiles_path),
                "--port",
                str(port),
                "--device",
                "cpu",
            ],
            cwd=REPO_ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"web_demo.py exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"web_demo.py did not answer on {url} within 180 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield Server(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def demo_url(demo_server: Server) -> str:
    return demo_server.url


def reply_text(history: list[dict]) -> str:
    from web_demo import text_of

    assert history[-1]["role"] == "assistant"
    return text_of(history[-1]["content"])


def test_chat_through_gradio_client(demo_url):
    """A reply arrives; a changed max-new-tokens slider changes the very next reply's length; clear empties."""
    from gradio_client import Client

    client = Client(demo_url, verbose=False)
    _, history = client.predict("你好", [], "孙悟空", 3, 0.85, 0.0, api_name="/chat")
    short = reply_text(history)
    assert short and len(history) == 2
    _, history = client.predict("你好", [], "孙悟空", 15, 0.85, 0.0, api_name="/chat")
    long = reply_text(history)
    assert long.startswith(short) and len(long) > len(short)  # greedy: the same start, more of it

    _, history = client.predict("再说一遍", history, "孙悟空", 3, 0.85, 0.0, api_name="/chat")
    assert len(history) == 4 and reply_text(history)  # history carried into the next turn
    assert client.predict(api_name="/clear") == ("", [])


def call_raw(url: str, data: list) -> list[tuple[str, object]]:
    """The chat endpoint over plain HTTP (``/gradio_api/call/chat``), the JSON written with ASCII escapes (so a lone
    surrogate travels as ``\\ud83d``, as any HTTP client may send it): the (event, data) pairs of the answer."""
    request = urllib.request.Request(
        f"{url}gradio_api/call/chat",
        data=json.dumps({"data": data}).encode("ascii"),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    events, name = [], None
    with urllib.request.urlopen(f"{url}gradio_api/call/chat/{event_id}", timeout=120) as response:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def long_reply_message(chat, tokens: int) -> str:
    """A message whose greedy reply (role 孙悟空) runs ``tokens`` tokens without a stop: only a cancel ends it early."""
    from sft.inference.generate import generate_ids

    for message in ("你好", "你是谁？", "讲个故事", "hello", "再说一遍"):
        config = chat.settings(tokens, 0.85, 0.0)
        ids = generate_ids(chat.engine.model, [chat.prompt(message, [], "孙悟空", tokens)], config)[0]
        if len(ids) == tokens and config.eos_token_id not in ids:
            return message
    pytest.fail("no test message keeps the tiny model talking")


def test_cancelled_and_abandoned_requests_stop_generating(demo_server, chat):
    """gradio_client's job.cancel(), and a client that drops its connection mid-stream: the server's generation for
    that reply ends within a step (its log says 'closed after N tokens', N a step or two past what was streamed),
    not at max_new_tokens, and the next request is answered at once."""
    from gradio_client import Client

    message = long_reply_message(chat, 300)
    client = Client(demo_server.url, verbose=False)
    job = client.submit(message, [], "孙悟空", 2048, 0.85, 0.0, api_name="/chat")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 4:
        assert time.monotonic() < deadline and not job.done(), "no streamed output"
        time.sleep(0.01)
    job.cancel()
    (closed,) = demo_server.wait_for_log(r"reply \d+: closed after", seconds=20)
    tokens = int(re.search(r"closed after (\d+) tokens", closed).group(1))
    assert tokens < 300, closed  # the reply would have run to 2,048

    # Abandoned: the reader of the event stream goes away (a closed browser tab).
    request = urllib.request.Request(
        f"{demo_server.url}gradio_api/call/chat",
        data=json.dumps({"data": [message, [], "孙悟空", 2048, 0.85, 0.0]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{demo_server.url}gradio_api/call/chat/{event_id}", timeout=60) as response:
        generating = 0
        for raw in response:
            generating += raw.startswith(b"event: generating")
            if generating == 4:
                break
    lines = demo_server.wait_for_log(r"reply \d+: closed after", seconds=20, count=2)
    assert int(re.search(r"closed after (\d+) tokens", lines[1]).group(1)) < 300, lines[1]
    _, history = client.predict("你好", [], "孙悟空", 3, 0.85, 0.0, api_name="/chat")
    assert reply_text(history)


def test_over_long_message_is_cut_inside_its_content(demo_server, chat):
    """A 20,000-character message through the HTTP API: the server answers the prompt that keeps the system prompt
    and the turn tokens and drops the start of the message (the reply equals the in-process greedy answer to that
    prompt), and says so in its log."""
    from gradio_client import Client

    message = "猴" * 20_000
    max_new = 8
    fitted = chat.fit(message, [], "孙悟空", max_new)
    system = chat.tokenizer.encode(chat.system_prompt("孙悟空"))
    budget = chat.engine.context_window - max_new
    assert len(fitted.ids) == budget and fitted.cut > 10_000
    assert fitted.ids[: len(system)] == system and fitted.ids[len(system)] == 195 and fitted.ids[-1] == 196
    expected = "".join(chat.engine.stream(fitted.ids, chat.settings(max_new, 0.85, 0.0))).strip()

    _, history = Client(demo_server.url, verbose=False).predict(
        message, [], "孙悟空", max_new, 0.85, 0.0, api_name="/chat"
    )
    assert reply_text(history).strip() == expected and expected
    assert demo_server.wait_for_log(rf"message cut by {fitted.cut} tokens to a {budget}-token prompt")


def test_invalid_unicode_gets_a_clear_message(demo_server):
    events = call_raw(demo_server.url, ["\ud83d hi", [], "孙悟空", 4, 0.85, 0.0])
    errors = [data for name, data in events if name == "error"]
    assert errors and "invalid Unicode at character 1: U+D83D" in errors[0]["error"], events
    assert "TextEncodeInput" not in json.dumps(events)
    assert any(
        name == "complete" for name, _ in call_raw(demo_server.url, ["hi", [], "孙悟空", 2, 0.85, 0.0])
    )


def test_concurrent_users_share_decode_steps(demo_server):
    """Three users at once: each gets its own answer (the one it gets alone), and the server decoded them together."""
    from gradio_client import Client

    client = Client(demo_server.url, verbose=False)
    messages = ["你好", "你是谁？", "hello"]
    alone = [
        reply_text(client.predict(m, [], "孙悟空", 24, 0.85, 0.0, api_name="/chat")[1]) for m in messages
    ]
    before = len(demo_server.log_lines(r"joined [12] live"))
    jobs = [client.submit(m, [], "孙悟空", 24, 0.85, 0.0, api_name="/chat") for m in messages]
    together = [reply_text(job.result(timeout=120)[1]) for job in jobs]
    assert together == alone
    assert len(demo_server.log_lines(r"joined [12] live")) > before


@pytest.mark.browser
def test_browser_chat_and_screenshot(demo_url, tmp_path):
    """Headless Chromium: type a message, wait for the streamed reply, save a screenshot."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")

    screenshot = tmp_path / "web_demo.png"
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = context.new_page()
            page.goto(demo_url)
            box = page.locator("#message textarea")
            box.wait_for(timeout=60_000)
            box.fill("你好，请介绍一下你自己")
            box.press("Enter")
            page.wait_for_function(
                """() => {
                    const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
                    return bots.length > 0 && bots[bots.length - 1].innerText.trim().length > 0;
                }""",
                timeout=60_000,
            )
            user = page.locator('#chatbot [data-testid="user"]').last.inner_text()
            bot = page.locator('#chatbot [data-testid="bot"]').last.inner_text()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    assert "介绍一下你自己" in user and bot.strip()
    assert screenshot.stat().st_size > 10_000
