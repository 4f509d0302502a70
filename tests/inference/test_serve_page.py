"""The chat page in a real headless Chromium (Debian's `chromium`, driven by playwright): type, Enter, the answer
streams in, no console errors; Enter while an input method composes does not send; an answer made of HTML shows as
text."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from thuglm.inference.loading import load_for_inference
from thuglm.inference.serve import ChatService

from .serve_helpers import running_server, wait_until

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `apt-get install chromium` (.ci/run does)")

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def page(output_dir):
    tokenizer, model = load_for_inference(output_dir)
    service = ChatService(model, tokenizer, max_new_tokens=24, slots=2, max_seq_len=256)
    with running_server(service) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.problems = []  # console errors, uncaught exceptions and dialogs (an alert would be a script run)
        page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
        page.on("pageerror", lambda error: page.problems.append(str(error)))
        page.on("dialog", lambda dialog: (page.problems.append("dialog: " + dialog.message), dialog.dismiss()))
        page.goto(url + "/")
        page.answers_url = url
        page.service = service
        yield page
        browser.close()


def test_typed_question_is_answered_as_a_stream(page):
    page.locator("#temperature").fill("0")  # greedy, so the page's answer can be compared with the API's
    page.locator("#max-tokens").fill("128")  # long enough to arrive in many pieces
    sizes: list[int] = []  # the answer's length at every change of the page: several sizes means it streamed in
    page.expose_function("recordSize", lambda size: sizes.append(size))
    page.evaluate("""() => new MutationObserver(() => {
        const answer = document.querySelector('.message.assistant .body');
        if (answer) recordSize(answer.textContent.length);
    }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true})""")
    page.locator("#input").fill("介绍一下长城。")
    page.locator("#input").press("Enter")
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=20000)
    shown = page.locator(".message.assistant .body").inner_text().strip()
    api = httpx.post(page.answers_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "介绍一下长城。"}], "temperature": 0, "max_tokens": 128,
        "top_p": 0.7}).json()["choices"][0]["message"]["content"]
    assert shown and " ".join(shown.split()) == " ".join(api.split())
    assert len({size for size in sizes if size}) > 1, f"the answer appeared at once, sizes {sizes}"
    assert page.locator(".message.user .body").inner_text() == "介绍一下长城。"
    assert page.problems == []


def test_stop_keeps_the_partial_answer_and_regenerate_and_clear_work(page):
    page.locator("#clear").click()
    page.locator("#temperature").fill("0")
    page.locator("#max-tokens").fill("2048")  # longer than the slot: the answer runs until Stop
    page.locator("#input").fill("写一首关于月亮的诗")
    page.locator("#input").press("Enter")
    page.wait_for_function("document.querySelector('.streaming .body')?.textContent.length > 0", timeout=20000)
    page.locator("#stop").click()
    page.wait_for_selector(".message.assistant:not(.streaming)")
    assert page.locator("#status").inner_text() == "Stopped."
    assert page.locator(".message.assistant .body").inner_text().strip()  # the partial answer stays
    # The closed connection freed the request's slot on the server.
    assert wait_until(lambda: page.service.batcher.active == 0, timeout=10)

    page.locator("#max-tokens").fill("16")
    page.locator("#regenerate").click()
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=20000)
    assert page.locator(".message").count() == 2  # the stopped answer was replaced, not kept beside the new one
    api = httpx.post(page.answers_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "写一首关于月亮的诗"}], "temperature": 0, "max_tokens": 16,
        "top_p": 0.7}).json()["choices"][0]["message"]["content"]
    assert " ".join(page.locator(".message.assistant .body").inner_text().split()) == " ".join(api.split())

    page.locator("#clear").click()
    assert page.locator(".message").count() == 0
    assert page.problems == []


def test_enter_while_composing_does_not_send(page):
    page.locator("#clear").click()
    page.locator("#input").fill("拼音")
    page.evaluate("""() => document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown',
        {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true, cancelable: true}))""")
    assert page.locator(".message").count() == 0
    assert page.locator("#input").input_value() == "拼音"


def test_an_html_answer_is_shown_as_text(page):
    """The server's answer is replaced by an HTML payload (the model cannot be made to say it); the page must escape."""
    events = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
              for piece in (XSS[:9], XSS[9:], "\n\n```html\n" + XSS + "\n```")]
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    try:
        page.locator("#clear").click()
        page.locator("#input").fill("say html")
        page.locator("#input").press("Enter")
        page.wait_for_selector(".message.assistant:not(.streaming)", timeout=10000)
        answer = page.locator(".message.assistant .body")
        assert answer.locator("img").count() == 0
        assert answer.inner_text().count(XSS) == 2  # once as a paragraph, once in the code block
        assert answer.locator("pre code").inner_text() == XSS
    finally:
        page.unroute("**/v1/chat/completions")
    assert page.problems == []
