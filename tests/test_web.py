"""The chat page's files and headers (chatbot/web.py), through the Flask test client.
What a person sees and clicks is in tests/test_web_browser.py."""
import re

import pytest

from chatbot.web import STATIC
from helpers import assert_problem

FILES = ["/", "/static/app.js", "/static/style.css", "/static/favicon.svg"]


@pytest.mark.parametrize("path", FILES)
def test_the_page_and_its_files_need_no_key(make_app, path):
    client = make_app(AUTH="required").test_client()
    response = client.get(path)
    assert response.status_code == 200
    assert client.get("/api/sessions").status_code == 401  # the API still does


def test_the_page_is_html_with_a_strict_content_security_policy(client):
    response = client.get("/")
    assert response.mimetype == "text/html" and b'<script src="/static/app.js"' in response.data
    csp = dict(d.strip().split(" ", 1) for d in response.headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"   # no inline, no eval
    assert "unsafe" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/static/app.js").mimetype in ("text/javascript", "application/javascript")


def test_the_files_fetch_nothing_from_another_host_and_hold_no_inline_script():
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path   # no CDN, no other host
        assert "innerHTML" not in text and "eval(" not in text, path
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']
    assert not re.search(r"<[^>]+\son[a-z]+=", html) and "style=" not in html


def test_the_page_is_small():
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in STATIC.iterdir())
    assert lines < 520, lines   # readable by a newcomer in one sitting


def test_a_path_that_leaves_the_static_folder_is_not_found(client):
    for path in ["/static/../web.py", "/static/%2e%2e/web.py", "/static/nothing.js"]:
        assert_problem(client.get(path), 404, "not_found")


@pytest.mark.parametrize("value", ["false", "0"])
def test_web_ui_off_makes_the_page_a_404_like_any_unknown_path(make_app, monkeypatch, value):
    monkeypatch.setenv("CHATBOT_WEB_UI", value)
    client = make_app().test_client()
    for path in ["/", "/static/app.js"]:
        assert_problem(client.get(path), 404, "not_found")
    keyed = make_app(AUTH="required").test_client()
    assert keyed.get("/").status_code == keyed.get("/no-such-page").status_code == 401   # like any unknown path
