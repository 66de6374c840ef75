"""web_demo.py: the role-play chat logic in process, then the real server through gradio_client and Chromium.

The server tests start ``python web_demo.py`` on a free local port with the tiny Baichuan2 and the
real RoleBench profiles file. The browser test needs Debian's ``chromium`` (/usr/bin/chromium) and
the ``playwright`` Python package (which drives that browser; no browser is downloaded).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
    from sft.inference.loading import load_for_inference
    from web_demo import RolePlayChat

    model, tokenizer = load_for_inference(tiny_baichuan_dir)
    template = get_template("baichuan2", tokenizer, tiny_baichuan_dir)
    return RolePlayChat(model, tokenizer, template, load_profiles(profiles_path), ROLEBENCH_SYSTEM_TEMPLATE)


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


@pytest.fixture(scope="module")
def demo_url(tiny_baichuan_dir: Path, profiles_path: Path, tmp_path_factory: pytest.TempPathFactory):
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
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
