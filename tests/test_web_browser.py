"""The chat page at / in a real browser: Debian's Chromium, headless, driven by
Selenium through the system chromedriver, against a real gunicorn and the
stand-in LLM. Each test does what a person does (types, presses Enter, clicks)
and checks what they see, then what the server stored.

Skipped with the reason when Chromium, chromedriver or selenium is missing,
except under CI=true, where that is a failure."""
import os
import shutil
import tempfile
import time

import pytest
import requests

from chatbot.standin import MARKER
from conftest import SSEStream, bearer, free_port, new_api_key
from helpers import stored_messages

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def words(n):
    """The stand-in's answer to a message with @@words=n."""
    return MARKER + "".join(f"단어{i} " for i in range(1, n + 1))


@pytest.fixture(scope="module")
def live_server_env():
    # No grace: a reply outlives the page only because the page asks for it ("on_disconnect": "continue").
    return {"CHATBOT_AUTH": "required", "CHATBOT_RESUME_GRACE": "0"}


@pytest.fixture(scope="module")
def driver():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("the selenium package (requirements-dev.txt)")
    if missing:
        reason = "browser tests need " + " and ".join(missing) + " (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI=true, so they must run")
        pytest.skip(reason)
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="chatbot-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1200,800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The chat page of one server, seen by one person with their own API key."""

    def __init__(self, driver, server, key):
        self.driver, self.server, self.key = driver, server, key
        self.headers = bearer(key) if key else {}

    def open(self, key=True):
        """A fresh visit: nothing in the browser's storage but (with key=True) the API key."""
        self.driver.get(self.server.url + "/")
        self.driver.execute_script("localStorage.clear(); sessionStorage.clear();"
                                   "if (arguments[0]) localStorage.setItem('chatbot.key', arguments[0]);",
                                   self.key if key else None)
        self.driver.refresh()
        return self

    def until(self, condition, timeout=30, message=""):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting: {message or condition}"
            time.sleep(0.05)

    def find(self, css):
        return self.driver.find_element("css selector", css)

    def visible(self, css):
        elements = self.driver.find_elements("css selector", css)
        return bool(elements) and elements[0].is_displayed()

    def messages(self):
        """[(role, text, note, message_id)] of the conversation, as shown."""
        return [tuple(m) for m in self.driver.execute_script(
            "return [...document.querySelectorAll('#messages .message')].map(m => ["
            " m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.body').textContent,"
            " m.querySelector('.note').textContent, m.dataset.messageId || null])")]

    def last_reply(self):
        shown = self.messages()
        return shown[-1] if shown and shown[-1][0] == "assistant" else None

    def sessions(self):
        """The sidebar's titles, top to bottom."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#sessions button')].map(b => b.textContent)")

    def type(self, *keys):
        self.find("#input").send_keys(*keys)

    def send(self, text):
        from selenium.webdriver.common.keys import Keys
        self.type(text, Keys.ENTER)

    def idle(self):
        """No reply is being written: the Send button is back."""
        return self.visible("#send") and not self.visible("#stop")

    def notice(self):
        return self.find("#notice").text if self.visible("#notice") else ""

    def api(self, method, path, **kwargs):
        return requests.request(method, self.server.url + path, headers=self.headers, **kwargs)

    def session_id(self):
        return self.driver.execute_script("return sessionStorage.getItem('chatbot.open')")


@pytest.fixture
def page(driver, live_server, request):
    key = new_api_key(live_server.db_path, request.node.name[:60].replace("[", "_").replace("]", ""))
    return Page(driver, live_server, key)


def test_a_wrong_key_gets_a_clear_message_and_the_right_one_opens_the_sessions(page):
    page.api("POST", "/api/sessions", json={"title": "첫 대화"})
    page.open(key=False)
    page.until(lambda: page.visible("#key-dialog"), message="the key dialog")
    page.find("#key-input").send_keys("cbk_0123456789ab_wrong\n")
    page.until(lambda: page.visible("#key-error"), message="the wrong-key message")
    assert page.find("#key-error").text == ("This key was not accepted: "
                                            "The API key is not valid (unknown or revoked).")
    page.find("#key-input").send_keys(page.key + "\n")
    page.until(lambda: page.sessions() == ["첫 대화"], message="the key's sessions")
    assert not page.visible("#key-dialog")
    assert page.driver.execute_script("return localStorage.getItem('chatbot.key')") == page.key


def test_sessions_are_listed_most_recent_first_and_open_with_their_history(page):
    ids = [page.api("POST", "/api/sessions", json={"title": title}).json()["session_id"]
           for title in ("하나", "둘", "셋")]
    page.api("POST", "/api/chat", json={"session_id": ids[0], "message": "다시 @@words=3"})
    page.open()
    page.until(lambda: page.sessions() == ["하나", "셋", "둘"], message="most recent first")
    page.driver.find_elements("css selector", "#sessions button")[0].click()
    page.until(lambda: len(page.messages()) == 2, message="the history")
    stored = stored_messages(page.server.db_path, ids[0])
    assert [(r, text) for r, text, _, _ in page.messages()] == [(m["role"], m["content"]) for m in stored]
    assert page.find("#title").text == "하나"
    assert page.find("#sessions button.active").text == "하나"


def test_enter_sends_shift_enter_breaks_the_line_and_the_answer_grows_token_by_token(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    page.open()
    # Enter that ends a Korean IME composition does not send (the event is synchronous: nothing was sent).
    composing = page.driver.execute_script("""
        const box = document.getElementById('input');
        box.value = '조합';
        box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, bubbles: true}));
        const shown = document.querySelectorAll('#messages .message').length;
        box.value = '';
        return shown;""")
    assert composing == 0
    page.type("첫 줄")
    ActionChains(page.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    page.send("둘째 줄 @@words=40 @@delay=0.1")
    page.until(lambda: page.last_reply(), message="the reply")
    assert page.messages()[0][:2] == ("user", "첫 줄\n둘째 줄 @@words=40 @@delay=0.1")
    assert page.driver.find_element("css selector", ".message.user").text.splitlines()[0] == "첫 줄"
    seen, screenshot = [], tmp_path / "chat-page-mid-answer.png"
    while not page.idle():
        text = page.last_reply()[1]
        if not seen or text != seen[-1]:
            seen.append(text)
        if len(seen) == 5:
            page.driver.save_screenshot(str(screenshot))
            print(f"\nscreenshot of the page mid-answer: {screenshot}")
        time.sleep(0.05)
    final = page.last_reply()[1]
    assert final == words(40) == stored_messages(page.server.db_path, page.session_id())[-1]["content"]
    growing = [text for text in seen if text]
    assert len(growing) >= 5 and all(final.startswith(text) for text in growing)
    assert screenshot.stat().st_size > 0
    assert page.sessions() == [page.api("GET", f"/api/sessions/{page.session_id()}").json()["title"]]
    assert page.find("#input").get_attribute("value") == ""


def test_stop_ends_the_answer_and_keeps_its_text(page):
    page.open()
    page.send("길게 @@words=500 @@delay=0.05")
    page.until(lambda: (page.last_reply() or "  ")[1].count("단어") >= 3, message="some text")
    page.find("#stop").click()
    page.until(page.idle, message="the reply to end")
    _, text, note, message_id = page.last_reply()
    stored = stored_messages(page.server.db_path, page.session_id())[-1]
    assert (stored["message_id"], stored["status"], stored["finish_reason"]) == (message_id, "incomplete", "stopped")
    assert text == stored["content"] and 0 < text.count("단어") < 500
    assert note == "Stopped."


def test_regenerate_replaces_the_last_answer(page, standin_log):
    page.open()
    page.send("다시 해 줘 @@words=5")
    page.until(lambda: page.idle() and page.last_reply() and page.last_reply()[2] == "" and
               page.last_reply()[1] == words(5), message="the first answer")
    first_id = page.last_reply()[3]
    page.find("#regenerate").click()
    page.until(lambda: page.idle() and page.last_reply() and page.last_reply()[3] not in (None, first_id),
               message="a new answer")
    stored = stored_messages(page.server.db_path, page.session_id())
    assert [(m["role"], m["message_id"]) for m in stored][1:] == [("assistant", page.last_reply()[3])]
    assert [role for role, *_ in page.messages()] == ["user", "assistant"]
    assert page.last_reply()[1] == stored[1]["content"] == words(5)
    assert len(standin_log()) == 2


def test_rename_and_delete_a_session(page):
    page.open()
    page.send("이름을 바꿀 대화 @@words=2")
    page.until(lambda: page.idle() and page.sessions(), message="the new session")
    session_id = page.session_id()
    page.find("#rename").click()
    prompt = page.driver.switch_to.alert
    assert prompt.text == "A new title for this conversation:"
    prompt.send_keys("새 이름 ✓")
    prompt.accept()
    page.until(lambda: page.sessions() == ["새 이름 ✓"], message="the new title in the list")
    assert page.find("#title").text == "새 이름 ✓"
    assert page.api("GET", f"/api/sessions/{session_id}").json()["title"] == "새 이름 ✓"
    page.find("#delete").click()
    page.driver.switch_to.alert.accept()
    page.until(lambda: page.sessions() == [], message="the session gone from the list")
    assert page.api("GET", f"/api/sessions/{session_id}").status_code == 404
    assert page.messages() == [] and page.find("#title").text == "New chat"


def test_korean_and_html_show_exactly_as_written(page):
    text = "안녕하세요, 세계! <b>x</b> & <img src=x onerror=alert(1)> 한국어 中文 é"
    page.open()
    page.send(text)
    page.until(lambda: page.idle() and page.last_reply() and page.last_reply()[1], message="the answer")
    stored = stored_messages(page.server.db_path, page.session_id())
    assert page.messages()[0][1] == stored[0]["content"] == text
    assert page.last_reply()[1] == stored[1]["content"] and f"You said: {text}" in stored[1]["content"]
    assert page.driver.find_elements("css selector", "#messages b, #messages img") == []
    assert page.sessions()[0].startswith("안녕하세요, 세계! <b>x</b>")
    violations = [e for e in page.driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert violations == []


def test_code_blocks_keep_their_line_breaks(page):
    code = "def hello():\n    print('안녕')\n    return 1\n"
    page.api("POST", "/api/sessions/import", json={
        "format": "chatbot-conversation", "version": 1, "session": {"title": "코드"},
        "messages": [{"role": "user", "content": "코드 보여 줘", "created_at": "2026-01-02T03:04:05Z"},
                     {"role": "assistant", "content": f"Here:\n```python\n{code}```\nDone.",
                      "created_at": "2026-01-02T03:04:06Z"}]})
    page.open()
    page.until(lambda: page.sessions() == ["코드"], message="the imported session")
    page.find("#sessions button").click()
    page.until(lambda: page.visible("#messages pre"), message="the code block")
    block = page.find("#messages pre")
    assert block.get_attribute("textContent") == code
    assert block.text.splitlines() == code.rstrip("\n").splitlines()   # what is rendered, indents too


def test_the_view_follows_the_answer_unless_the_person_scrolled_up(page):
    page.open()
    page.send("스크롤 @@words=450 @@delay=0.01")
    gap = "const m = document.getElementById('messages'); return m.scrollHeight - m.scrollTop - m.clientHeight"
    height = "return document.getElementById('messages').scrollHeight - document.getElementById('messages').clientHeight"
    page.until(lambda: page.driver.execute_script(height) > 200, message="text taller than the view")
    assert page.driver.execute_script(gap) < 40   # kept at the end
    page.driver.execute_script("document.getElementById('messages').scrollTop = 0")
    page.until(page.idle, message="the end of the answer")
    assert page.driver.execute_script("return document.getElementById('messages').scrollTop") == 0
    assert page.last_reply()[1] == words(450)


def test_errors_show_as_sentences(page):
    page.open()
    page.send("실패 @@error=3")
    page.until(lambda: page.idle() and page.last_reply() and page.last_reply()[2], message="the error")
    assert page.last_reply()[2] == "The LLM server reported an error: stand-in error requested"
    assert "error" in page.find("#messages .message:last-child .note").get_attribute("class")
    # A reply already running in this session (started by another client).
    running = SSEStream(page.server.url, "/api/chat/stream",
                        {"session_id": page.session_id(), "message": "@@words=400 @@delay=0.05"}, page.headers)
    try:
        next(running.events())
        page.send("지금 보내면")
        page.until(page.notice, message="the notice")
        assert page.notice() == "A reply is still being generated for this session; wait for it or stop it."
        assert page.find("#input").get_attribute("value") == "지금 보내면"   # given back to send again
        # The history shown again is the stored one, where the refused message is not.
        page.until(lambda: "지금 보내면" not in [text for _, text, _, _ in page.messages()])
    finally:
        page.api("POST", f"/api/sessions/{page.session_id()}/stop")
        running.close()


def test_an_llm_that_is_down_and_a_rate_limit_show_as_sentences(driver, start_server):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_LLM_URL=f"http://127.0.0.1:{free_port()}",
                          CHATBOT_LLM_CONNECT_RETRIES="0", CHATBOT_RATE_LIMIT_PER_MINUTE="20")
    page = Page(driver, server, new_api_key(server.db_path, "down")).open()
    page.send("안녕?")
    page.until(page.notice, message="the notice")
    notice = page.notice()
    assert notice.startswith("The LLM server") and "{" not in notice
    page.until(lambda: page.messages() and page.messages()[-1][0] == "assistant", message="the failed reply")
    assert page.messages()[-1][2] == notice   # the stored failed reply says the same
    assert page.messages()[-2][1] == "안녕?" and page.find("#input").get_attribute("value") == ""  # kept, not given back
    while page.api("GET", "/api/sessions").status_code != 429:
        pass
    page.find("#input").clear()
    page.send("또?")
    page.until(lambda: "requests per minute" in page.notice(), message="the rate-limit notice")
    assert page.notice().startswith("More than 20 requests per minute with this key. Try again in ")


def test_reload_mid_answer_continues_with_no_gap_duplicate_or_second_generation(page, standin_log):
    page.open()
    page.send("새로 고침 @@words=120 @@delay=0.05")
    page.until(lambda: (page.last_reply() or "  ")[1].count("단어") >= 15, message="some text")
    session_id = page.session_id()
    page.driver.refresh()
    page.until(lambda: page.last_reply() and page.last_reply()[1], message="the reply after the reload")
    seen = set()
    while not page.idle() or page.last_reply() is None:
        seen.add(page.last_reply()[1] if page.last_reply() else "")
        time.sleep(0.05)
    final = page.last_reply()[1]
    assert final == words(120)
    assert any(words(15) in text and text != final for text in seen), "the reply grew after the reload"
    assert [role for role, *_ in page.messages()] == ["user", "assistant"]
    stored = stored_messages(page.server.db_path, session_id)
    assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "complete")]
    assert stored[1]["content"] == final and page.last_reply()[3] == stored[1]["message_id"]
    assert len(standin_log()) == 1   # one generation, followed twice


def test_web_ui_off_serves_no_page(driver, start_server):
    server = start_server(CHATBOT_WEB_UI="false")
    response = requests.get(server.url + "/")
    assert response.status_code == 404 and response.headers["Content-Type"] == "application/problem+json"
    driver.get(server.url + "/")
    assert driver.find_elements("css selector", "#composer") == []
    assert '"code":"not_found"' in driver.find_element("tag name", "body").text.replace(" ", "")


def test_the_page_carries_its_content_security_policy(live_server):
    response = requests.get(live_server.url + "/")
    assert response.status_code == 200
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]


def test_the_event_reader_skips_keep_alives_done_lines_and_keeps_split_characters_whole(page):
    """The page's own SSE parser (readEvents in app.js), fed one byte at a time, so
    that every Korean character arrives split; CRLF line ends work too."""
    page.open()
    stream = (': keep-alive\n\nevent: start\ndata: {"message_id": "m"}\n\n'
              'id: 2\nevent: delta\ndata: {"content": "안녕", "type": "token"}\n\n'
              'event: surprise\ndata: {"x": 1}\n\ndata: {"type": "complete"}\n\n'
              'id: 2\r\nevent: done\r\ndata: {"status": "complete"}\r\n\r\ndata: [DONE]\n\n')
    seen = page.driver.execute_async_script("""
        const [text, callback] = arguments, bytes = new TextEncoder().encode(text), seen = [];
        const body = new ReadableStream({start(c) { for (const b of bytes) c.enqueue(new Uint8Array([b])); c.close(); }});
        readEvents(new Response(body), (name, data, id) => seen.push([name, data, id]))
            .then(() => callback(seen), (e) => callback(String(e)));""", stream)
    assert seen == [["start", {"message_id": "m"}, None], ["delta", {"content": "안녕", "type": "token"}, "2"],
                    ["surprise", {"x": 1}, None], ["message", {"type": "complete"}, None],
                    ["done", {"status": "complete"}, "2"]]


def test_leaving_a_session_mid_answer_and_coming_back_shows_the_whole_answer(page, standin_log):
    page.open()
    page.send("다른 대화로 @@words=100 @@delay=0.05")
    page.until(lambda: (page.last_reply() or "  ")[1].count("단어") >= 10, message="some text")
    session_id = page.session_id()
    page.find("#new-session").click()
    assert page.messages() == []
    page.find(f"#sessions button[data-session-id='{session_id}']").click()
    page.until(lambda: page.idle() and page.last_reply() and page.last_reply()[1] == words(100),
               message="the whole answer")
    assert [role for role, *_ in page.messages()] == ["user", "assistant"]
    assert stored_messages(page.server.db_path, session_id)[1]["content"] == words(100)
    assert len(standin_log()) == 1
