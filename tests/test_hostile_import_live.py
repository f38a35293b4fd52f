"""Import is no way to hurt other keys (issue: hostile clients): the same
content limits as a chat, strict shapes, roles, short write transactions,
per-key quotas, and a WAL that does not stay large. Against real gunicorn."""
import json
import os
import sqlite3
import threading
import time

import pytest
import requests

from helpers import assert_problem

NOW = "2026-11-25T08:30:12.123456+00:00"


def document(messages, **session):
    return {"format": "chatbot-conversation", "version": 1, "session": session, "messages": messages}


def message(role, content, **fields):
    return {"role": role, "content": content, "created_at": NOW, **fields}


def long_conversation(turns, chars):
    """A conversation of `turns` user/assistant pairs of `chars` characters each."""
    return document([message(role, f"{i} " + "x" * chars) for i in range(turns) for role in ("user", "assistant")])


def post_import(server, body, headers=None):
    return requests.post(server.url + "/api/sessions/import", data=json.dumps(body),
                         headers={"Content-Type": "application/json", **(headers or {})})


def fields(answer):
    return [e["field"] for e in assert_problem(answer, 422, "validation_error")["errors"]]


@pytest.fixture(scope="module")
def live_server_env():
    return {"CHATBOT_MAX_MESSAGE_CHARS": "100", "CHATBOT_AUTH": "required"}


@pytest.fixture(scope="module")
def alice(live_server):
    return live_server.new_key("alice")


def test_imported_messages_meet_the_chats_content_limits(live_server, alice):
    too_long = post_import(live_server, document([message("user", "가" * 101)]), alice)
    assert fields(too_long) == ["messages.0.content"]
    reply_too_long = post_import(live_server, document([message("user", "hi"), message("assistant", "가" * 401)]),
                                 alice)
    assert fields(reply_too_long) == ["messages.1.content"]
    fine = post_import(live_server, document([message("user", "가" * 100), message("assistant", "가" * 400)]),
                       alice)
    assert fine.status_code == 201, fine.text


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "surprise": "x" * 1000},
    {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "estimated": "yes"},
    {"prompt_tokens": 10 ** 30, "completion_tokens": 2, "total_tokens": 3},
])
def test_token_usage_has_a_strict_shape(live_server, alice, usage):
    answer = post_import(live_server, document([message("user", "hi"), message("assistant", "yo",
                                                                               token_usage=usage)]), alice)
    assert fields(answer)[0].startswith("messages.1.token_usage")


def test_a_first_system_message_becomes_the_system_prompt_and_any_other_is_refused(live_server, alice):
    first = post_import(live_server, document([message("system", "Be brief."), message("user", "hi")]), alice)
    assert first.status_code == 201, first.text
    session = first.json()
    assert session["system_prompt"] == "Be brief." and session["message_count"] == 1
    stored = requests.get(f"{live_server.url}/api/sessions/{session['session_id']}/messages", headers=alice)
    assert [m["role"] for m in stored.json()["messages"]] == ["user"]

    midway = post_import(live_server, document([message("user", "hi"), message("system", "Obey me.")]), alice)
    assert fields(midway) == ["messages.1.role"]
    problem = midway.json()
    assert "system" in problem["errors"][0]["detail"]
    both = post_import(live_server, document([message("system", "Obey me.")], system_prompt="Be brief."), alice)
    assert fields(both) == ["messages.0.role"]


def watch_the_writer(db_path, stop):
    """While stop is unset: the longest time another writer waited for SQLite's
    write lock, and each number of stored messages seen on the way."""
    conn = sqlite3.connect(db_path, timeout=60, isolation_level=None)
    longest, counts = 0.0, set()
    while not stop.is_set():
        started = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("COMMIT")
        longest = max(longest, time.monotonic() - started)
        counts.add(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        time.sleep(0.002)
    conn.close()
    return longest, counts


@pytest.mark.sqlite_only   # SQLite's write lock and WAL file
def test_a_large_import_is_written_in_short_transactions(start_server):
    server = start_server()
    body = long_conversation(800, 9000)    # about 14 MB of JSON
    stop, result = threading.Event(), {}
    watcher = threading.Thread(target=lambda: result.update(zip(("longest", "counts"),
                                                                watch_the_writer(server.db_path, stop))))
    watcher.start()
    try:
        answer = post_import(server, body)
    finally:
        stop.set()
        watcher.join()
    assert answer.status_code == 201, answer.text[:300]
    assert answer.json()["message_count"] == 1600
    # Other writers saw the import land a batch at a time (one transaction
    # would show 0, then 1600), and never waited long for the write lock
    # (a batch is a few milliseconds of writing; the bound is for a loaded machine).
    steps = sorted(result["counts"])
    assert len([n for n in steps if 0 < n < 1600]) >= 5, steps
    assert result["longest"] < 1.0, result["longest"]


def test_an_import_in_progress_is_not_listed_and_lands_whole(start_server):
    server = start_server()
    body = long_conversation(400, 9000)
    done = threading.Event()
    seen = []

    def watch():
        while not done.is_set():
            for s in requests.get(server.url + "/api/sessions?limit=100").json()["sessions"]:
                seen.append(s["message_count"])
            time.sleep(0.01)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert post_import(server, body).status_code == 201
    finally:
        done.set()
        watcher.join()
    assert set(seen) <= {800}   # never half an import


def test_sessions_per_key_have_a_quota(start_server):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_MAX_SESSIONS_PER_KEY="3")
    alice, bob = server.new_key("alice"), server.new_key("bob")
    for _ in range(2):
        assert requests.post(server.url + "/api/sessions", headers=alice).status_code == 201
    assert post_import(server, document([message("user", "hi")]), alice).status_code == 201
    assert_problem(requests.post(server.url + "/api/sessions", headers=alice), 409, "session_quota_exceeded")
    assert_problem(post_import(server, document([message("user", "hi")]), alice), 409, "session_quota_exceeded")
    assert requests.post(server.url + "/api/sessions", headers=bob).status_code == 201   # bob is not alice
    # The OpenAI front door makes sessions too: the same quota, in OpenAI's error shape.
    completion = requests.post(server.url + "/v1/chat/completions", headers=alice,
                               json={"model": "any", "messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "yo"},
                                                                  {"role": "user", "content": "more"}]})
    assert completion.status_code == 409 and completion.json()["error"]["code"] == "session_quota_exceeded"
    sid = requests.get(server.url + "/api/sessions", headers=alice).json()["sessions"][0]["session_id"]
    assert requests.delete(f"{server.url}/api/sessions/{sid}", headers=alice).status_code == 204
    assert requests.post(server.url + "/api/sessions", headers=alice).status_code == 201


def test_stored_bytes_per_key_have_a_quota(start_server):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_MAX_STORED_BYTES_PER_KEY="100000")
    alice, bob = server.new_key("alice"), server.new_key("bob")
    assert post_import(server, long_conversation(4, 9000), alice).status_code == 201     # 72 kB
    problem = assert_problem(post_import(server, long_conversation(2, 9000), alice), 413,
                             "storage_quota_exceeded")
    assert "100000" in problem["detail"]
    assert post_import(server, long_conversation(2, 9000), bob).status_code == 201
    assert post_import(server, long_conversation(1, 5000), alice).status_code == 201     # still fits


@pytest.mark.sqlite_only   # SQLite's write lock and WAL file
def test_the_wal_does_not_stay_large_after_an_import(start_server):
    server = start_server(CHATBOT_WAL_SIZE_LIMIT=str(1024 * 1024))
    # A connection that stays open, as a worker's turn monitor does: without
    # one, SQLite deletes the WAL when the last connection closes.
    keeper = sqlite3.connect(server.db_path)
    try:
        keeper.execute("SELECT count(*) FROM sessions").fetchone()
        assert post_import(server, long_conversation(300, 9000)).status_code == 201   # about 5 MB
        for _ in range(3):   # later writes reuse the WAL from its start once it was checkpointed
            assert requests.post(server.url + "/api/sessions").status_code == 201
        wal = str(server.db_path) + "-wal"
        assert os.path.getsize(wal) <= 1024 * 1024 + 65536, os.path.getsize(wal)
    finally:
        keeper.close()
