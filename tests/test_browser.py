"""The chat page in a real headless browser: Debian's chromium driven by Playwright for Python.

`make test` (and `make test-browser`) install chromium with apt-get when /usr/bin/chromium is missing;
Playwright cannot download its own browsers here, so it is pointed at the system one. Outside CI a
machine without chromium skips this file; in CI (CI set) a missing browser is a failure.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import randomize_adapters

import ventoux
from ventoux import lora
from ventoux.server import Settings, create_app
from ventoux.server.background import BackgroundServer

CHROMIUM = Path(os.environ.get("VENTOUX_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-extensions", "--no-first-run"]
KEY = "sk-browser"

if not CHROMIUM.exists():
    reason = f"{CHROMIUM} is missing: `make test-browser` installs it (apt-get install chromium)"
    if os.environ.get("CI"):
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    llm = ventoux.load(dtype="float32")
    # a step of at least 20 ms, as a real model's: the demo model's 24 tokens can otherwise come in one network
    # read, and the page would show the reply whole (what the streaming test checks it does not)
    llm.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    lora.add_adapter(llm.model, lora.LoraConfig(rank=4, alpha=8), name="poet", activate=False)
    randomize_adapters(llm.model, scale=0.3, name="poet")  # chosen per request, in the page's model list
    app = create_app(Settings(served_name="demo", api_key=KEY, adapters={"poet": "in memory"}),
                     load=lambda: (llm, llm.engine(max_batch=4)))
    with BackgroundServer(app) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(server.url + "/")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        yield page
        browser.close()


def test_type_send_and_watch_the_reply_stream_in(server, page):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.evaluate("""() => {  // every text the reply bubble shows on its way
        window.seen = new Set();
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.assistant');
            if (replies.length) window.seen.add(replies[replies.length - 1].textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", "Speak, good sir.")
    page.press("#prompt", "Enter")
    reply = page.locator(".assistant").last
    page.wait_for_selector(".assistant[data-state=done]")
    expected = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"messages": [{"role": "user", "content": "Speak, good sir."}], "max_tokens": 24,
                                "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert reply.text_content() == expected
    shown = [t for t in page.evaluate("() => [...window.seen]") if t]
    assert len(shown) >= 3 and all(expected.startswith(t) for t in shown)  # grew piece by piece
    assert page.locator(".user").last.text_content() == "Speak, good sir."


def test_stop_ends_the_reply_and_frees_the_server_row(server, page):
    page.fill("#max-tokens", "3000")
    page.fill("#prompt", "Tell me a very long story.")
    page.click("#send")
    reply = page.locator(".assistant").last
    page.wait_for_function("() => { const r = [...document.querySelectorAll('.assistant')].pop();"
                           " return r.dataset.state === 'streaming' && r.textContent.length > 10; }")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    page.wait_for_selector(".assistant[data-state=stopped]")
    assert len(reply.text_content()) > 10 and page.is_enabled("#send")
    engine = server.app.state.ventoux.engine
    deadline = time.monotonic() + 10
    while engine.stats().running:
        assert time.monotonic() < deadline, "the stopped reply still holds its row"
        time.sleep(0.05)


def test_the_model_list_offers_the_adapters_and_a_reply_comes_from_the_one_chosen(server, page):
    """The list is read again once the key is given (the fixture types it after the page loaded without one)."""
    page.wait_for_function("() => document.getElementById('model').options.length === 2")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.textContent])") == [
        ["demo", "demo"], ["poet", "poet (adapter)"]]
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "16")
    page.click("#reset")
    page.select_option("#model", "poet")
    page.fill("#prompt", "Speak, good sir.")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".assistant[data-state=done]")

    def answer(model):
        return httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": model, "messages": [{"role": "user", "content": "Speak, good sir."}],
                                "max_tokens": 16, "temperature": 0}).json()["choices"][0]["message"]["content"]

    assert answer("poet") != answer("demo")
    assert page.locator(".assistant").last.text_content() == answer("poet")
    page.select_option("#model", "demo")
