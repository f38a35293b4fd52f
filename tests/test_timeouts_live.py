"""Connect, first-token and idle timeouts; retries only before anything was sent."""
import socket

import pytest
import requests

from chatbot import llm
from conftest import SSEStream


@pytest.fixture
def silent_upstream():
    """A TCP server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.fixture
def full_upstream():
    """A TCP server whose accept queue is full: new connections hang in connect()."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    for s in fillers:
        s.close()
    listener.close()


def chat(server, path="/api/chat", message="hello"):
    sid = server.new_session()
    return sid, requests.post(server.url + path, json={"session_id": sid, "message": message}, timeout=30)


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_an_upstream_that_never_answers_is_504_before_the_stream(start_server, silent_upstream, path):
    server = start_server(CHATBOT_LLM_URL=silent_upstream, CHATBOT_LLM_FIRST_TOKEN_TIMEOUT="1",
                          CHATBOT_HEALTH_TIMEOUT="0.5")
    sid, answer = chat(server, path)
    assert answer.status_code == 504
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json()["code"] == "upstream_timeout"
    messages = server.get(f"/api/sessions/{sid}/messages")["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "failed")]
    assert messages[1]["error"]["code"] == "upstream_timeout"


def test_a_connect_timeout_is_504(start_server, full_upstream):
    server = start_server(CHATBOT_LLM_URL=full_upstream, CHATBOT_LLM_CONNECT_TIMEOUT="0.5",
                          CHATBOT_HEALTH_TIMEOUT="0.5")
    _, answer = chat(server)
    assert answer.status_code == 504 and answer.json()["code"] == "upstream_timeout"
    assert "Connecting" in answer.json()["detail"]


def test_no_first_text_in_time_after_the_stream_started_is_an_error_event(start_server):
    server = start_server(CHATBOT_LLM_FIRST_TOKEN_TIMEOUT="1")
    sid = server.new_session()
    events = list(SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@first=4"}).events())
    assert [e[0] for e in events] == ["start", "error"]
    assert events[-1][1]["code"] == "upstream_timeout"
    assert server.get(f"/api/sessions/{sid}/messages")["messages"][-1]["status"] == "failed"


def test_silence_between_pieces_ends_in_upstream_timeout_keeping_the_text(start_server, standin_log):
    server = start_server(CHATBOT_LLM_IDLE_TIMEOUT="1")
    sid = server.new_session()
    events = list(SSEStream(server.url, "/api/chat/stream",
                            {"session_id": sid, "message": "@@words=5 @@silence=5@2"}).events())
    assert events[-1][0] == "error" and events[-1][1]["code"] == "upstream_timeout"
    deltas = "".join(e[1]["content"] for e in events if e[0] == "delta")
    reply = server.get(f"/api/sessions/{sid}/messages")["messages"][-1]
    assert reply["status"] == "incomplete" and reply["content"] == deltas
    assert deltas.count("단어") == 2


def test_an_upstream_that_breaks_off_is_not_asked_again(server, standin_log):
    sid = server.new_session()
    events = list(SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@break=2"}).events())
    assert events[-1][0] == "error"
    assert len(standin_log()) == 1


def upstream(url, retries):
    from chatbot import DEFAULTS
    return llm.Upstream({**DEFAULTS, "LLM_URL": url, "LLM_CONNECT_RETRIES": retries})


def test_a_refused_connection_is_retried_before_anything_was_sent(standin, monkeypatch):
    real_send, attempts = llm.Call._send, []

    def refuse_twice(*args, **kwargs):
        attempts.append(1)
        if len(attempts) <= 2:
            raise requests.ConnectionError("Connection refused")
        return real_send(*args, **kwargs)
    monkeypatch.setattr(llm.Call, "_send", refuse_twice)
    call = upstream(standin, retries=2).call([{"role": "user", "content": "@@words=2"}],
                                             {"max_new_tokens": 10, "temperature": 0, "do_sample": False})
    call.open()
    assert "".join(c.text for c in call.chunks()).count("단어") == 2
    assert len(attempts) == 3


def test_a_refused_connection_without_retries_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    call = upstream(f"http://127.0.0.1:{port}", retries=0).call([], {"max_new_tokens": 1, "temperature": 0,
                                                                     "do_sample": False})
    with pytest.raises(llm.UpstreamUnavailable):
        call.open()
