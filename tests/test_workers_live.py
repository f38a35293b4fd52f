"""Killed and restarted gunicorn workers lose nothing and block nothing."""
import os
import signal
import sqlite3
import time

import requests

from chatbot import generation

from conftest import SSEStream, wait_for


def marker(server, sid):
    """The pid of the worker holding the session's lease (owner ids are host:pid:nonce)."""
    with sqlite3.connect(server.db_path) as db:
        owner = db.execute("SELECT lease_owner FROM sessions WHERE session_id = ?", (sid,)).fetchone()[0]
    return int(owner.split(":")[1])


def test_a_worker_killed_mid_answer_frees_the_session_and_keeps_its_text(server, standin_log):
    sid = server.new_session()
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=400 @@delay=0.02"})
    events = stream.events()
    start = next(events)[1]
    deltas = [next(events)[1]["content"] for _ in range(5)]
    time.sleep(generation.LOG_SECONDS + 0.5)  # past one save: the partial text is in the database
    os.kill(marker(server, sid), signal.SIGKILL)

    # gunicorn replaces the worker; the session takes a new chat at once.
    answer = wait_for(lambda: requests.post(server.url + "/api/chat",
                                            json={"session_id": sid, "message": "again @@words=2"}),
                      timeout=10)
    assert answer.status_code == 200, answer.text
    messages = {m["message_id"]: m for m in server.get(f"/api/sessions/{sid}/messages")["messages"]}
    cut = messages[start["message_id"]]
    assert cut["status"] == "incomplete" and cut["error"]["code"] == "worker_lost"
    assert cut["content"].startswith("".join(deltas))
    assert server.proc.poll() is None


def signal_mid_stream(server, sig, words):
    """Start a streamed answer of `words` pieces, send gunicorn's master `sig`,
    and read the rest of the stream: (session id, events after start)."""
    sid = server.new_session()
    stream = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": f"@@words={words} @@delay=0.05"})
    events = stream.events()
    assert next(events)[0] == "start"
    server.proc.send_signal(sig)
    return sid, list(events)


def test_a_graceful_shutdown_lets_a_running_answer_finish(start_server):
    server = start_server(CHATBOT_GRACEFUL_TIMEOUT="20")
    _, rest = signal_mid_stream(server, signal.SIGTERM, words=40)
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "complete"
    server.proc.wait(20)
    with sqlite3.connect(server.db_path) as db:
        assert db.execute("SELECT status FROM messages WHERE role = 'assistant'").fetchone() == ("complete",)


def test_an_answer_longer_than_the_graceful_timeout_is_stored_incomplete(start_server):
    server = start_server(CHATBOT_GRACEFUL_TIMEOUT="3")
    _, rest = signal_mid_stream(server, signal.SIGTERM, words=400)
    name, done, _ = rest[-1]
    assert name == "done" and done["status"] == "incomplete" and done["finish_reason"] == "shutdown"
    assert done["content"] == "".join(e[1]["content"] for e in rest if e[0] == "delta")
    server.proc.wait(20)
    with sqlite3.connect(server.db_path) as db:
        stored = db.execute("SELECT content, status FROM messages WHERE role = 'assistant'").fetchone()
        marker_left = db.execute("SELECT generating_message_id FROM sessions").fetchone()[0]
    assert stored == (done["content"], "incomplete") and marker_left is None


def test_a_reload_with_sighup_lets_the_running_answer_finish_and_keeps_serving(start_server):
    server = start_server(CHATBOT_GRACEFUL_TIMEOUT="20")
    sid, rest = signal_mid_stream(server, signal.SIGHUP, words=40)
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "complete"
    answer = requests.post(server.url + "/api/chat", json={"session_id": sid, "message": "@@words=2"})
    assert answer.status_code == 200 and answer.json()["status"] == "complete"
