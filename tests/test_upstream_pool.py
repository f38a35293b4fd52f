"""Upstream connections are kept alive between calls (chatbot.llm.Upstream's
pool), and that changes nothing else: abort() still reaches a pooled
connection before the answer's headers, and a kept-alive connection the
server dropped is retried on a new one. The stand-in closes each connection
after its answer (werkzeug's development server), so these tests use a small
HTTP/1.1 server that keeps them open."""
import json
import socket
import socketserver
import threading
import time

import pytest

from chatbot import DEFAULTS
from chatbot.llm import Upstream, UpstreamCut

OPTIONS = {"max_new_tokens": 64, "temperature": 0.7, "do_sample": False}


class KeepAliveLLM(socketserver.ThreadingTCPServer):
    """Answers POST /chat/stream with a chunked SSE body and keeps the connection.

    The request's last user message says what to do: "hold" sends no headers
    (until the client goes), "drop" closes the connection without an answer;
    anything else is the answer's text, in one event."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.connections, self.requests, self.closed_by_client = 0, [], threading.Event()
        self.request_lines = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.server.connections += 1
        while True:
            head = self.rfile.readline()
            if not head:
                return
            self.server.request_lines.append(head)
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            text = json.loads(self.rfile.read(length))["messages"][-1]["content"]
            self.server.requests.append((self.server.connections, text))
            if text == "drop":
                return
            if text == "hold":
                if self.rfile.read(1) == b"":   # blocks until the client closes or shuts down
                    self.server.closed_by_client.set()
                return
            event = f"data: {json.dumps({'token': text})}\n\ndata: [DONE]\n\n".encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n"
                             + f"{len(event):x}\r\n".encode() + event + b"\r\n0\r\n\r\n")


@pytest.fixture
def server():
    srv = KeepAliveLLM()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def upstream(url):
    return Upstream({**DEFAULTS, "LLM_URL": url, "LLM_PROTOCOL": "midm", "LLM_CONNECT_RETRIES": 0})


def answer(up, text):
    c = up.call([{"role": "user", "content": text}], OPTIONS)
    c.open()
    return "".join(chunk.text for chunk in c.chunks())


def test_calls_reuse_one_kept_alive_connection(server):
    up = upstream(server.url)
    assert [answer(up, f"piece {i}") for i in range(3)] == ["piece 0", "piece 1", "piece 2"]
    assert server.connections == 1


def test_abort_reaches_a_pooled_connection_still_waiting_for_headers(server):
    up = upstream(server.url)
    assert answer(up, "first") == "first"
    c = up.call([{"role": "user", "content": "hold"}], OPTIONS)
    threading.Timer(0.3, c.abort).start()
    started = time.monotonic()
    with pytest.raises(UpstreamCut):
        c.open()
    assert time.monotonic() - started < 5
    assert server.closed_by_client.wait(5)
    assert server.connections == 1          # it was the pooled connection that was shut down
    assert answer(up, "after") == "after"   # and the pool does not hand it out again


def test_a_kept_alive_connection_the_server_dropped_is_retried_on_a_new_one(server):
    up = upstream(server.url)
    assert answer(up, "first") == "first"
    # The next request on that connection is dropped unanswered (as a server closing an
    # idle connection at the moment we send does); the call goes on over a new one.
    server.requests.clear()
    assert answer_with_first_dropped(up, server) == "second"
    assert [text for _, text in server.requests] == ["drop", "second"]
    assert server.connections == 2


def answer_with_first_dropped(up, server):
    """Send "second"; the first time it is sent (on the pooled connection) the
    server reads "drop" instead, the same length; the retry goes through as is."""
    c = up.call([{"role": "user", "content": "second"}], OPTIONS)
    sent = []
    real = socket.socket.sendall

    def swap(sock, data, *args):
        if not sent and b'"second"' in data:
            sent.append(1)
            data = data.replace(b'"second"', b'"drop"  ')
        return real(sock, data, *args)
    socket.socket.sendall = swap
    try:
        c.open()
    finally:
        socket.socket.sendall = real
    return "".join(chunk.text for chunk in c.chunks())


def test_the_proxy_of_the_environment_is_used(server, monkeypatch):
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", server.url)   # read once, when the Upstream is made
    up = upstream("http://llm.invalid:9")
    assert answer(up, "through the proxy") == "through the proxy"
    assert server.request_lines[-1].startswith(b"POST http://llm.invalid:9/chat/stream HTTP/1.1")
