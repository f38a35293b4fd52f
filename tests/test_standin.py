"""Tests for the stand-in LLM server (chatbot/standin.py)."""
import json
import socket
import threading
import time

import pytest
from werkzeug.serving import make_server

from chatbot.standin import MARKER, create_standin_app


def _body(text, **extra):
    return {"messages": [{"role": "user", "content": text}], **extra}


def _events(data: bytes) -> list[str]:
    """The payloads of the `data:` lines of an SSE body."""
    return [line[len("data: "):] for line in data.decode().split("\n\n") if line.startswith("data: ")]


@pytest.fixture
def client():
    return create_standin_app(delay=0).test_client()


@pytest.fixture
def server():
    app = create_standin_app(delay=0.01)
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield app, srv.server_port
    srv.shutdown()


def _raw_post(port, path, body) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait_for_state(client, state, timeout=2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = client.get("/_standin/requests").get_json()["requests"][-1]
        if entry["state"] == state:
            return entry
        time.sleep(0.02)
    raise AssertionError(f"log never reached {state!r}: {entry}")


def test_health(client):
    resp = client.get("/health")
    assert resp.headers["X-Standin-LLM"] == "true"
    assert resp.get_json() == {"status": "healthy", "model_loaded": True, "device": "cpu",
                               "cuda_available": False, "standin": True,
                               "note": "stand-in LLM server, not a real model"}


def test_chat_has_marker_history_and_usage(client):
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "반가워요 hello"}]
    data = client.post("/chat", json={"messages": messages}).get_json()
    assert data["response"].startswith(MARKER)
    assert "You said: 반가워요 hello" in data["response"]
    assert "(3 messages in context)" in data["response"]
    assert data["usage"]["prompt_tokens"] == 3 + 2 + 6
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]


def test_chat_stream_speaks_midm_llm_servings_typed_events(client):
    body = _body("안녕하세요 stand-in")
    whole = client.post("/chat", json=body).get_json()
    resp = client.post("/chat/stream", json=body)
    assert resp.mimetype == "text/event-stream"
    events = _events(resp.get_data())
    assert events[0] == '{"type": "start", "message": "Stream started"}' and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[1:-2]]
    complete = json.loads(events[-2])
    assert all(c["type"] == "chunk" for c in chunks)
    assert [c["token_count"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert [c["accumulated"] for c in chunks] == ["".join(c["content"] for c in chunks[:n])
                                                  for n in range(1, len(chunks) + 1)]
    assert complete == {"type": "complete", "full_response": whole["response"],
                        "total_tokens": whole["usage"]["completion_tokens"]}
    assert chunks[-1]["accumulated"] == whole["response"]


def test_a_typed_error_mid_answer_then_a_normal_end(client):
    events = _events(client.post("/chat/stream", json=_body("@@words=5 @@error=2")).get_data())
    assert [json.loads(e)["type"] for e in events] == ["start", "chunk", "chunk", "error"]
    assert json.loads(events[-1]) == {"type": "error", "message": "stand-in error requested"}


def test_nousage_and_nofinish_in_the_typed_events(client):
    events = _events(client.post("/chat/stream", json=_body("@@words=2 @@nousage")).get_data())
    assert json.loads(events[-2]) == {"type": "complete", "full_response": MARKER + "단어1 단어2 "}
    events = _events(client.post("/chat/stream", json=_body("@@words=2 @@nofinish")).get_data())
    assert [json.loads(e)["type"] for e in events[:-1]] == ["start", "chunk", "chunk"] and events[-1] == "[DONE]"


def test_token_format_matches_chat(client):
    body = _body("안녕하세요 stand-in @@format=token")
    whole = client.post("/chat", json=body).get_json()
    events = _events(client.post("/chat/stream", json=body).get_data())
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    tokens = [json.loads(e)["token"] for e in events[:-2]]
    assert "".join(tokens) == whole["response"]
    assert usage == whole["usage"] and usage["completion_tokens"] == len(tokens)


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_stream_shape(client, include_usage):
    body = _body("hi", model="whatever", stream=True, stream_options={"include_usage": include_usage})
    events = _events(client.post("/v1/chat/completions", json=body).get_data())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "standin" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if include_usage:
        usage_chunk = chunks.pop()
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:-1])
    assert text.startswith(MARKER) and "You said: hi" in text


def test_openai_max_tokens_and_api_key():
    client = create_standin_app(delay=0, api_key="sekret").test_client()
    body = _body("@@words=10", max_tokens=4)
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    resp = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"})
    choice = resp.get_json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == MARKER + "단어1 단어2 단어3 단어4 "


def test_status_directive(client):
    resp = client.post("/v1/chat/completions", json=_body("x @@status=503"))
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == 503
    resp = client.post("/chat/stream", json=_body("x @@status=500@text"))
    assert resp.status_code == 500 and resp.mimetype == "text/plain"
    assert resp.get_data(as_text=True) == "stand-in plain error"
    assert client.post("/chat", json=_body("x @@status=429")).get_json() == {"detail": "stand-in error"}


def test_words_directive_and_bad_requests(client):
    events = _events(client.post("/chat/stream", json=_body("@@words=3 @@format=plain")).get_data())
    assert events[:3] == [MARKER + "단어1 ", "단어2 ", "단어3 "] and events[4] == "[DONE]"
    assert json.loads(events[3])["usage"]["completion_tokens"] == 3
    assert client.post("/chat", data="not json").status_code == 422
    assert client.post("/v1/chat/completions", json={"model": "x"}).status_code == 400


def test_request_log(client):
    client.delete("/_standin/requests")
    client.post("/chat", json=_body("logged"), headers={"Authorization": "Bearer abc"})
    [entry] = client.get("/_standin/requests").get_json()["requests"]
    assert entry["path"] == "/chat" and entry["body"] == _body("logged")
    assert entry["authorization"] == "Bearer abc"
    assert entry["state"] == "finished" and entry["ended"] >= entry["started"]


def test_break_cuts_connection_without_terminator(server):
    app, port = server
    sock = _raw_post(port, "/chat/stream", _body("안녕 @@break=2"))
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body.count(b'"type": "chunk"') == 2 and b"[DONE]" not in body
    assert not body.endswith(b"0\r\n\r\n")
    entry = _wait_for_state(app.test_client(), "broken")
    assert entry["pieces_sent"] == 2


def test_client_disconnect_is_noticed(server):
    app, port = server
    sock = _raw_post(port, "/chat/stream", _body("@@words=50 @@delay=0.05"))
    received = b""
    while b"data: " not in received:
        received += sock.recv(65536)
    sock.close()
    entry = _wait_for_state(app.test_client(), "cancelled")
    assert entry["pieces_sent"] < 50
