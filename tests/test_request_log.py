"""One JSON line per request, with no key and, unless asked for, nothing anyone said."""
import json
import logging

import pytest

from conftest import SSEStream, bearer, new_api_key

SAID = "비밀 이야기 0f3c9a"   # a message whose text must not reach the logs


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture
def request_log():
    handler = Lines()
    logger = logging.getLogger("chatbot.requests")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.fixture
def everything_logged():
    """Every record of every logger, as text (the request log does not propagate)."""
    handler = Lines()
    loggers = [logging.getLogger(), logging.getLogger("chatbot.requests")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.lines
    for logger in loggers:
        logger.removeHandler(handler)


def send(client, method, path, **kwargs):
    answer = client.open(path, method=method, **kwargs)
    answer.get_data()
    answer.close()  # servers close every response; the line is written then
    return answer


def test_each_request_logs_one_json_line_without_the_key_or_the_content(make_app, request_log,
                                                                         everything_logged):
    app = make_app(AUTH="required")
    key = new_api_key(app.config["DATABASE"], "alice")
    client = app.test_client()
    sid = send(client, "POST", "/api/sessions", headers=bearer(key)).json["session_id"]
    send(client, "POST", "/api/chat", headers=bearer(key), json={"session_id": sid, "message": SAID})
    send(client, "POST", "/api/chat/stream", headers=bearer(key), json={"session_id": sid, "message": SAID})
    send(client, "GET", f"/api/sessions/{sid}/messages", headers=bearer(key))
    send(client, "GET", f"/api/sessions/{sid}", headers=bearer(key[:-2] + "zz"))
    send(client, "GET", "/api/health")

    records = [json.loads(line) for line in request_log]
    assert [(r["method"], r["path"], r["status"]) for r in records] == [
        ("POST", "/api/sessions", 201), ("POST", "/api/chat", 200), ("POST", "/api/chat/stream", 200),
        ("GET", f"/api/sessions/{sid}/messages", 200), ("GET", f"/api/sessions/{sid}", 401),
        ("GET", "/api/health", 200)]
    assert [r["key"] for r in records] == ["alice"] * 4 + [None, None]
    assert [r["session_id"] for r in records][:5] == [sid] * 5
    assert all(isinstance(r["duration_ms"], float) for r in records)

    text = "\n".join(everything_logged)
    secret = key.split("_", 2)[2]
    assert secret not in text and key[:-2] not in text
    assert SAID not in text and "0f3c9a" not in text


def test_content_is_logged_only_when_asked_for(make_app, request_log):
    client = make_app(LOG_CONTENT=True).test_client()
    sid = send(client, "POST", "/api/sessions").json["session_id"]
    send(client, "POST", "/api/chat", json={"session_id": sid, "message": SAID})
    assert json.loads(request_log[-1])["message"] == SAID


def test_a_live_server_writes_json_lines_with_no_secret(start_server):
    server = start_server(CHATBOT_AUTH="required")
    headers = server.new_key("alice")
    key = headers["Authorization"].split()[1]
    sid = server.new_session(headers)
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": SAID + " @@words=3"},
                       headers=headers)
    assert [e[0] for e in stream.events()][-1] == "done"
    server.stop()

    output = server.output()
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    streamed = [r for r in records if r["path"] == "/api/chat/stream"]
    assert len(streamed) == 1
    assert streamed[0]["status"] == 200 and streamed[0]["session_id"] == sid and streamed[0]["key"] == "alice"
    assert key not in output and key.split("_", 2)[2] not in output
    assert "0f3c9a" not in output
