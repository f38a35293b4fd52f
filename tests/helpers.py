"""Small helpers shared by the test modules (fixtures live in conftest.py)."""
import json
import os
import sqlite3
import threading
from datetime import datetime

import requests

from chatbot import db


def assert_problem(response, status, code, field=None):
    """The response is an RFC 9457 problem with this status and code (and,
    given `field`, a validation error of that field); returns its body.

    Works for a Flask test response and for a requests.Response.
    """
    content_type = response.headers["Content-Type"]
    body = response.json() if callable(response.json) else response.json
    assert response.status_code == status, body
    assert content_type.startswith("application/problem+json"), content_type
    assert body["status"] == status and body["code"] == code, body
    assert isinstance(body["title"], str) and isinstance(body["type"], str)
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def chat(target, session_id, message, path="/api/chat", **fields):
    """POST one chat turn and read the whole answer (a stream to its end).

    `target` is a Flask test client, or a live server (anything with a `url`).
    """
    body = {"session_id": session_id, "message": message, **fields}
    if hasattr(target, "url"):
        return requests.post(target.url + path, json=body, timeout=30)
    response = target.post(path, json=body)
    response.get_data()
    return response


def sse_block(block):
    """One Server-Sent Event, the text between two blank lines: (name, data),
    or ("comment", text) for a block with no event (a keep-alive)."""
    fields = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
    if "event" in fields:
        return fields["event"], json.loads(fields["data"])
    return "comment", block


def sse_events(body):
    """The events of a whole SSE body (bytes or text, e.g. a test client's
    response data), keep-alive comments left out: [(name, data)]."""
    text = body.decode() if isinstance(body, bytes) else body
    return [e for e in (sse_block(b) for b in text.strip().split("\n\n") if b) if e[0] != "comment"]


def rows(database, sql, *params):
    """Read the service's database (a SQLite path or a PostgreSQL URL) through a
    connection of our own, as another process would (it sees only what the
    service has committed). `?` placeholders on both."""
    if "://" in str(database):
        conn = db.connect(str(database))
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def stored_messages(db_path, session_id):
    return rows(db_path, "SELECT * FROM messages WHERE session_id = ? ORDER BY seq", session_id)


def write_turn(conn, session_id, question, answer, status="complete", finish_reason="stop"):
    """A whole turn written through the store, as the service writes one; the reply's id."""
    from chatbot import store
    turn = store.begin_turn(conn, session_id, question)
    store.finish_turn(conn, session_id, turn["reply_id"], turn["fence"], answer, status, None, finish_reason)
    return turn["reply_id"]


def deltas(events):
    """The concatenated text of the `delta` events of an SSE stream."""
    return "".join(data["content"] for name, data, _ in events if name == "delta")


def is_iso_utc(text):
    parsed = datetime.fromisoformat(text)
    return parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread; returns a function that waits and gives its result."""
    result = {}

    def run():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # surfaced by the waiter
            result["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def wait(timeout=30):
        thread.join(timeout)
        assert not thread.is_alive(), "the call did not finish"
        if "error" in result:
            raise result["error"]
        return result["value"]
    return wait


class ScriptedSocket:
    """A socket for chatbot.llm.Body in unit tests: each recv(n) returns
    receive(n) (b"": the peer closed), and its descriptor is a pipe kept
    readable, so that polling it always says more has come, as a busy network would."""

    def __init__(self, receive):
        self.receive = receive
        self.fd, write_end = os.pipe()
        os.write(write_end, b"x")
        os.close(write_end)

    def gettimeout(self):
        return None

    def setblocking(self, flag):
        pass

    def fileno(self):
        return self.fd

    def recv(self, n):
        return self.receive(n)
