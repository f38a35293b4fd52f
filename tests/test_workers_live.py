"""Killed and restarted gunicorn workers lose nothing and block nothing."""
import os
import signal
import time

import requests

from chatbot import generation

from conftest import SSEStream, wait_for
from helpers import rows


def marker(server, sid):
    """The pid of the worker holding the session's lease (owner ids are host:pid:nonce)."""
    [row] = rows(server.db_path, "SELECT lease_owner FROM sessions WHERE session_id = ?", sid)
    return int(row["lease_owner"].split(":")[1])


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
    assert rows(server.db_path, "SELECT status FROM messages WHERE role = 'assistant'") == [{"status": "complete"}]


def test_an_answer_longer_than_the_graceful_timeout_is_stored_incomplete(start_server):
    server = start_server(CHATBOT_GRACEFUL_TIMEOUT="3")
    _, rest = signal_mid_stream(server, signal.SIGTERM, words=400)
    name, done, _ = rest[-1]
    assert name == "done" and done["status"] == "incomplete" and done["finish_reason"] == "shutdown"
    assert done["content"] == "".join(e[1]["content"] for e in rest if e[0] == "delta")
    server.proc.wait(20)
    stored = rows(server.db_path, "SELECT content, status FROM messages WHERE role = 'assistant'")
    marker_left = rows(server.db_path, "SELECT generating_message_id FROM sessions")
    assert stored == [{"content": done["content"], "status": "incomplete"}]
    assert marker_left == [{"generating_message_id": None}]


def test_a_reload_with_sighup_lets_the_running_answer_finish_and_keeps_serving(start_server):
    server = start_server(CHATBOT_GRACEFUL_TIMEOUT="20")
    sid, rest = signal_mid_stream(server, signal.SIGHUP, words=40)
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "complete"
    answer = requests.post(server.url + "/api/chat", json={"session_id": sid, "message": "@@words=2"})
    assert answer.status_code == 200 and answer.json()["status"] == "complete"
