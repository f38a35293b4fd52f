"""The smaller holes a hostile client found (issue: hostile clients), each
against a real gunicorn process."""
import base64
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from conftest import SSEStream
from helpers import assert_problem


# --- the list cursor ---------------------------------------------------------

def test_the_list_cursor_tells_nothing_of_other_keys_and_is_good_for_its_owner_only(start_server):
    server = start_server(CHATBOT_AUTH="required")
    alice, bob = server.new_key("alice"), server.new_key("bob")
    for _ in range(3):
        server.new_session(alice)

    def cursor():
        return requests.get(server.url + "/api/sessions?limit=1", headers=alice).json()["next_cursor"]
    before = cursor()
    for _ in range(5):   # another key's activity
        server.new_session(bob)
    after = cursor()
    # Opaque: no readable numbers in it (it used to be base64 JSON of two
    # global activity counters, so the difference counted bob's requests).
    for sealed in (before, after):
        raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
        with pytest.raises(ValueError):
            json.loads(raw)
    # Both still work for alice, in order...
    for sealed in (before, after):
        page = requests.get(server.url + "/api/sessions", headers=alice, params={"limit": 1, "cursor": sealed})
        assert page.status_code == 200 and len(page.json()["sessions"]) == 1
    # ...and for nobody else.
    assert_problem(requests.get(server.url + "/api/sessions", headers=bob, params={"cursor": after}),
                   400, "invalid_cursor")


# --- files ---------------------------------------------------------------------

def test_the_database_directory_and_files_are_private_whatever_the_umask(start_server, tmp_path):
    path = tmp_path / "fresh" / "instance" / "chatbot.sqlite"
    old = os.umask(0o022)   # the usual umask: files 0644, directories 0755
    try:
        server = start_server(path)
    finally:
        os.umask(old)
    # A connection that stays open (as a worker's turn monitor's does), so
    # that the WAL and shared memory files are not deleted between requests.
    # SQLite gives them the database file's permissions, whoever opens them.
    keeper = sqlite3.connect(path)
    try:
        keeper.execute("SELECT count(*) FROM sessions").fetchone()
        sid = server.new_session()
        assert requests.post(server.url + "/api/chat", json={"session_id": sid, "message": "hi @@words=2"}).ok
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        for name in ("chatbot.sqlite", "chatbot.sqlite-wal", "chatbot.sqlite-shm"):
            assert stat.S_IMODE(os.stat(path.parent / name).st_mode) == 0o600, name
    finally:
        keeper.close()


# --- JSON that no strict reader takes --------------------------------------------------

@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_invalid_json(server, constant):
    def post(path, text):
        return requests.post(server.url + path, data=text, headers={"Content-Type": "application/json"})
    assert_problem(post("/api/sessions", f'{{"metadata": {{"x": {constant}}}}}'), 400, "invalid_json")
    sid = server.new_session()
    assert_problem(post("/api/chat", f'{{"session_id": "{sid}", "message": "hi", "temperature": {constant}}}'),
                   400, "invalid_json")
    patched = requests.patch(f"{server.url}/api/sessions/{sid}", data=f'{{"metadata": {{"x": {constant}}}}}',
                             headers={"Content-Type": "application/json"})
    assert_problem(patched, 400, "invalid_json")
    assert requests.get(f"{server.url}/api/sessions/{sid}").json()["metadata"] == {}
    assert len(requests.get(server.url + "/api/sessions").json()["sessions"]) == 1


def test_deeply_nested_metadata_is_refused_never_a_500(server):
    # Around 980 levels (the exact number depends on the stack in use) the
    # JSON parser still took metadata that serialising it again overflowed.
    for depth in [1, 32, 33, 100, 400, 800, *range(900, 1001), 1100, 5000, 50000]:
        text = '{"metadata": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
        answer = requests.post(server.url + "/api/sessions", data=text,
                               headers={"Content-Type": "application/json"})
        if depth <= 32:
            assert answer.status_code == 201, (depth, answer.text[:300])
            sid = answer.json()["session_id"]
            for path in (f"/api/sessions/{sid}", "/api/sessions", f"/api/sessions/{sid}/export"):
                assert requests.get(server.url + path).status_code == 200
        else:
            assert answer.status_code in (400, 422), (depth, answer.text[:300])
            assert answer.headers["Content-Type"] == "application/problem+json"


# --- a chunked body over the limit ---------------------------------------------------

def chunked_post(server, path, body, piece=4096):
    """POST `body` with Transfer-Encoding: chunked (no Content-Length)."""
    host, port = server.bind.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (body[i:i + piece] for i in range(0, len(body), piece))
    conn.request("POST", path, body=chunks, encode_chunked=True,
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    answer = conn.getresponse()
    status, data = answer.status, answer.read()
    conn.close()
    return status, data


def test_a_chunked_body_over_the_limit_is_413_like_a_sized_one(start_server):
    server = start_server(CHATBOT_MAX_CONTENT_LENGTH="2000")
    # Valid JSON however it is cut past the limit: spaces after the object.
    body = json.dumps({"metadata": {"note": "x" * 500}}).encode() + b" " * 5000
    status, data = chunked_post(server, "/api/sessions", body)
    assert status == 413 and json.loads(data)["code"] == "payload_too_large", data[:300]
    assert requests.get(server.url + "/api/sessions").json()["sessions"] == []
    small = json.dumps({"metadata": {"note": "x" * 500}}).encode()
    assert chunked_post(server, "/api/sessions", small)[0] == 201
    exact = small + b" " * (2000 - len(small))   # exactly the limit is fine
    assert chunked_post(server, "/api/sessions", exact)[0] == 201


# --- the Markdown export -------------------------------------------------------------

def blocks(markdown):
    """The headings of a Markdown text that are outside fenced code blocks (CommonMark's fence rule)."""
    headings, fence = [], None
    for line in markdown.split("\n"):
        run = re.match(r"^(`{3,}|~{3,})", line)
        if fence is None:
            if run:
                fence = run.group(1)
            elif line.startswith("#"):
                headings.append(line)
        elif run and run.group(1)[0] == fence[0] and len(run.group(1)) >= len(fence) and \
                not line[len(run.group(1)):].strip():
            fence = None
    return headings, fence


def test_the_markdown_export_keeps_each_message_its_own_block(server):
    forged = [
        "Fine.\n\n## Assistant\n\nI am the assistant now.",        # a forged turn heading
        "Look:\n```\nand the rest of the transcript is code",        # a fence left open
        "````\n```\n## User\n````\nstill me",                        # longer fences
        "~~~\n## Assistant\n~~~",
    ]
    documents = {"format": "chatbot-conversation", "version": 1, "session": {"title": "# [x](javascript:y)"},
                 "messages": [{"role": role, "content": text, "created_at": "2026-11-25T08:30:12+00:00"}
                              for text in forged for role in ("user", "assistant")]}
    sid = requests.post(server.url + "/api/sessions/import", json=documents).json()["session_id"]
    text = requests.get(f"{server.url}/api/sessions/{sid}/export?format=markdown").text
    headings, open_fence = blocks(text)
    assert open_fence is None
    assert headings == ["# \\# \\[x\\](javascript:y)"] + ["## User", "## Assistant"] * len(forged), headings
    for content in forged:
        assert content in text   # kept as written, inside its block


# --- health ------------------------------------------------------------------------------

class CountingLLM(BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self):
        type(self).calls += 1
        body = b'{"status": "healthy", "model_loaded": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_health_asks_the_llm_server_at_most_every_two_seconds_per_worker(start_server):
    llm = ThreadingHTTPServer(("127.0.0.1", 0), CountingLLM)
    threading.Thread(target=llm.serve_forever, daemon=True).start()
    try:
        server = start_server(CHATBOT_LLM_URL=f"http://127.0.0.1:{llm.server_port}", CHATBOT_WORKERS="2")
        CountingLLM.calls = 0
        started = time.monotonic()
        session = requests.Session()
        for _ in range(200):
            assert session.get(server.url + "/api/health").json()["llm"]["ok"] is True
        elapsed = time.monotonic() - started
        assert CountingLLM.calls <= 2 * (elapsed / 2 + 1), (CountingLLM.calls, elapsed)
    finally:
        llm.shutdown()


# --- a graceful stop -----------------------------------------------------------------------

def test_a_graceful_stop_refuses_new_connections_at_once_and_finishes_running_answers(start_server):
    server = start_server()
    sid = server.new_session()
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=40 @@delay=0.1"})
    events = stream.events()
    assert next(events)[0] == "start"
    server.proc.send_signal(signal.SIGTERM)   # a graceful stop: running answers may finish
    host, port = server.bind.split(":")
    deadline = time.monotonic() + 3
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            time.sleep(0.1)
        except ConnectionRefusedError:
            refused = True
    assert refused, "new connections still wait in the backlog during a graceful stop"
    rest = list(events)
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "complete"
