"""The chat page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium) against a real uvicorn server over the tiny checkpoint, with an API key.

Skips, saying why, only where the browser or its driver is not installed (`.ci/run` installs
them). WORKMEM_UI_SCREENSHOT=PATH also saves the README's screenshot there (`make screenshot`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import live_server, make_app, start_engine

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException, TimeoutException, WebDriverException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "browser-key"
ENGINE = dict(max_model_len=4096, num_kv_blocks=512, block_size=16)
WAIT_S = 60  # the longest any expected change may take on a loaded 2-core machine
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,800")
LONG_ANSWER = '{"ignore_eos": true, "max_tokens": 3500}'  # runs long enough to press Stop in


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny llama with a 4k context (same weights), so an answer runs long enough to stop."""
    path = tmp_path_factory.mktemp("tiny-llama-4k")
    shutil.copytree(tiny_checkpoint("llama"), path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": ENGINE["max_model_len"]}))
    return path


@pytest.fixture(scope="module")
def server(long_context_checkpoint):
    engine = start_engine(long_context_checkpoint, **ENGINE)
    try:
        with live_server(make_app(engine, api_keys=(KEY,))) as url:
            yield url
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary, driver_path = _find("chromium", "chromium-browser"), _find("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        pytest.skip(f"Chromium did not start: {exc.msg}")
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait(driver, condition, what: str):
    try:
        # an element that went stale between finding it and reading it: the page re-rendered
        # mid-poll, so the next poll looks again
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
    except TimeoutException:
        shown = driver.execute_script("return [document.getElementById('error').textContent,"
                                      " document.getElementById('messages').innerText]")
        raise AssertionError(f"waited {WAIT_S} s for {what}; error box {shown[0]!r}; chat {shown[1][-600:]!r}") from None


def click(driver, css: str, index: int = 0) -> None:
    """Click the index-th match, again if the page redrew it meanwhile (it redraws lists)."""
    def attempt(d):
        try:
            d.find_elements(By.CSS_SELECTOR, css)[index].click()
            return True
        except (StaleElementReferenceException, IndexError):
            return False
    wait(driver, attempt, f"{css} to be clickable")


def session_action(driver, name: str, action: str) -> bool:
    """Press the `action` button (rename, delete) of the sidebar's session called `name`."""
    return driver.execute_script("""
        for (const li of document.querySelectorAll('#session-list .session')) {
          if (li.querySelector('.open').innerText === arguments[0]) { li.querySelector('.' + arguments[1]).click(); return true; }
        }
        return false;""", name, action)


def session_names(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#session-list .session .open')].map(e => e.innerText)")


def text(driver, css: str) -> str:
    """The element's shown text, read in the page (the panels redraw every second)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css)


def memory(server: str) -> dict:
    return httpx.get(server + "/v1/memory", headers={"Authorization": f"Bearer {KEY}"}).json()


def open_page(driver, server: str, key: str = KEY, extra: str = "") -> None:
    """A fresh page with `key` and `extra` remembered in the browser, on a new chat."""
    driver.get(server + "/")
    driver.execute_script("localStorage.clear(); localStorage.setItem('workmem.apiKey', arguments[0]);"
                          "localStorage.setItem('workmem.extra', arguments[1]);", key, extra)
    driver.get(server + "/")
    wait(driver, lambda d: text(d, "#model-name") or text(d, "#error"), "the page to load the model name")


def send(driver, message: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(message)
    box.send_keys(Keys.ENTER)


def watch_answer(driver) -> None:
    """Record the streaming answer's text length at every change (a MutationObserver)."""
    driver.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
          const n = document.querySelector('.msg.assistant.streaming .body');
          if (n) window.__lengths.push(n.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)


def answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def finished(driver, n: int) -> bool:
    done = [a for a in answers(driver) if "finish:" in a.text]
    return len(done) >= n and not driver.find_element(By.ID, "send").get_attribute("hidden")


def delete_all(server: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for s in httpx.get(server + "/v1/sessions?limit=100", headers=headers).json()["data"]:
        httpx.delete(f"{server}/v1/sessions/{s['id']}", headers=headers)


def test_streams_an_answer_that_grows_and_shows_its_numbers(browser, server):
    delete_all(server)
    open_page(browser, server, extra='{"ignore_eos": true, "max_tokens": 300}')
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert box.get_attribute("value") == "first line\nsecond line" and not answers(browser)  # Shift+Enter: newline
    watch_answer(browser)
    box.send_keys(Keys.ENTER)
    wait(browser, lambda d: finished(d, 1), "the answer to finish")
    lengths = browser.execute_script("return window.__lengths")
    assert len(set(n for n in lengths if n)) >= 2, lengths  # seen at two lengths at least: it streamed
    stats = answers(browser)[0].find_element(By.CLASS_NAME, "stats").text
    assert "300 tokens" in stats and "TTFT" in stats and "tok/s" in stats and "from memory" in stats
    assert "finish: length" in stats
    assert browser.find_element(By.CSS_SELECTOR, "#messages .msg.user").text == "first line\nsecond line"
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#session-list .session")) == 1, "one session")


def test_stop_aborts_the_stream_on_the_server(browser, server):
    delete_all(server)
    open_page(browser, server, extra=LONG_ANSWER)
    send(browser, "tell me a long story")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming .body")
         and d.find_element(By.CSS_SELECTOR, ".msg.assistant.streaming .body").text, "the answer to start")
    assert memory(server)["requests"]["running"] == 1
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda d: "stopped" in answers(d)[0].text, "the page to say it stopped")
    deadline = time.monotonic() + WAIT_S
    while memory(server)["requests"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert memory(server)["requests"]["running"] == 0  # the server aborted it
    wait(browser, lambda d: text(d, "#mem-running") == "0", "the memory panel's running count back to 0")
    (session,) = memory(server)["sessions"]
    assert session["num_turns"] == 0  # a stopped turn leaves the session as it was


def test_fork_at_turn_one_shows_both_branches_and_memory_follows(browser, server):
    delete_all(server)
    open_page(browser, server, extra='{"ignore_eos": true, "max_tokens": 40}')
    wait(browser, lambda d: text(d, "#blocks-pinned") == "0", "no pinned blocks before any turn")
    send(browser, "one")
    wait(browser, lambda d: finished(d, 1), "turn 1")
    wait(browser, lambda d: int(text(d, "#blocks-pinned")) > 0, "pinned blocks to rise after a turn")
    send(browser, "two")
    wait(browser, lambda d: finished(d, 2), "turn 2")
    click(browser, "#messages .msg.assistant .fork")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#session-list .session")) == 2, "two sessions")
    names = session_names(browser)
    assert any(n.endswith("(fork @1)") for n in names) and "one" in names, names
    wait(browser, lambda d: len(answers(d)) == 1, "the fork shown with its one turn")
    wait(browser, lambda d: int(text(d, "#blocks-shared")) > 0, "the branches to share blocks")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#memory-sessions tbody tr")) == 2,
         "both sessions in the memory panel")
    wait(browser, lambda d: session_action(d, "one", "open"), "the source in the sidebar")
    wait(browser, lambda d: finished(d, 2), "the source shown again with its two turns and their numbers")
    shot = Path(os.environ.get("WORKMEM_UI_SCREENSHOT") or "")
    if shot.name:  # the README's picture
        browser.save_screenshot(str(shot))
    fork_name = next(n for n in names if n.endswith("(fork @1)"))
    wait(browser, lambda d: session_action(d, fork_name, "rename"), "the fork's rename button")
    field = browser.find_element(By.CSS_SELECTOR, "#session-list .rename-input")
    field.send_keys(Keys.CONTROL, "a")  # the page selected the old name already; typing replaces it
    field.send_keys("renamed branch", Keys.ENTER)
    wait(browser, lambda d: "renamed branch" in text(d, "#session-list"), "the new name in the sidebar")
    pinned = int(text(browser, "#blocks-pinned"))
    for name in ("one", "renamed branch"):  # the source first: the branch's blocks are all shared with it
        wait(browser, lambda d: session_action(d, name, "delete"), f"{name!r} in the sidebar")
        wait(browser, lambda d: int(text(d, "#blocks-pinned")) < pinned, f"pinned blocks to fall after deleting {name!r}")
        pinned = int(text(browser, "#blocks-pinned"))
    assert pinned == 0 and not browser.find_elements(By.CSS_SELECTOR, "#session-list .session")


def test_a_bad_api_key_shows_the_servers_error(browser, server):
    open_page(browser, server, key="wrong-key")
    wait(browser, lambda d: "invalid or missing API key" in text(d, "#error"), "the 401 message")
    assert text(browser, "#error").startswith("401")
    send(browser, "hello?")
    wait(browser, lambda d: "invalid or missing API key" in text(d, "#error"), "the 401 message after sending")
    assert not answers(browser)


def test_narrow_screen_folds_the_panels(browser, server):
    open_page(browser, server)
    browser.set_window_size(400, 800)
    try:
        toggle = browser.find_element(By.ID, "toggle-memory")
        assert toggle.is_displayed() and not browser.find_element(By.ID, "side-panel").is_displayed()
        assert browser.find_element(By.ID, "prompt").is_displayed()
        toggle.click()
        wait(browser, lambda d: d.find_element(By.ID, "memory-grid").is_displayed(), "the memory panel")
    finally:
        browser.set_window_size(1280, 800)


def test_markdown_renders_code_blocks_with_copy_and_escapes_html(browser, server):
    open_page(browser, server)
    html = browser.execute_script("return renderMarkdown(arguments[0])",
                                  "# Title\n**bold** and `x<y`\n\n```python\nif a < b:\n    print('<b>')\n```\n"
                                  "- one\n- two\n<img src=x onerror=alert(1)> [ok](https://example.org) [no](javascript:x)")
    assert "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html and "<ul><li>one</li><li>two</li></ul>" in html
    assert '<span class="lang">python</span><button type="button" class="copy">Copy</button>' in html
    assert "if a &lt; b:\n    print(&#39;&lt;b&gt;&#39;)" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert '<a href="https://example.org"' in html and 'href="javascript' not in html
    # the copy button puts the block's text on the clipboard (or the selection fallback)
    browser.execute_script("""
        const m = document.createElement('div'); m.className = 'msg assistant';
        m.innerHTML = renderMarkdown('```\\nprint(1)\\n```'); document.getElementById('messages').append(m);""")
    click(browser, "#messages .code .copy")
    wait(browser, lambda d: text(d, "#messages .code .copy") == "Copied", "the copy button to confirm")
