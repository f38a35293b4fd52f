"""Configured limits: body size, fields, per-key request rate, replies at once per key."""
import json
import time

import pytest
import requests

from chatbot import db, store
from conftest import SSEStream, bearer, new_api_key
from helpers import assert_problem


def failing_fields(answer):
    return [e["field"] for e in assert_problem(answer, 422, "validation_error")["errors"]]


# --- sizes and values ---------------------------------------------------------------

def test_a_body_over_max_content_length_is_413(make_app):
    client = make_app(MAX_CONTENT_LENGTH=1000).test_client()
    sid = client.post("/api/sessions").json["session_id"]
    big = json.dumps({"session_id": sid, "message": "x" * 2000})
    assert_problem(client.post("/api/chat", data=big, content_type="application/json"), 413, "payload_too_large")
    assert_problem(client.post("/api/sessions", json={"metadata": {"k": "x" * 2000}}), 413, "payload_too_large")
    assert client.post("/api/chat", json={"session_id": sid, "message": "x" * 500}).status_code == 200


def test_a_message_over_max_message_chars_is_422(make_app):
    client = make_app(MAX_MESSAGE_CHARS=10).test_client()
    sid = client.post("/api/sessions").json["session_id"]
    assert failing_fields(client.post("/api/chat", json={"session_id": sid, "message": "가" * 11})) == ["message"]
    assert client.post("/api/chat", json={"session_id": sid, "message": "가" * 10}).status_code == 200


def test_metadata_over_metadata_max_bytes_is_422(make_app):
    client = make_app(METADATA_MAX_BYTES=100).test_client()
    # Bytes of JSON, not characters: a Hangul syllable is 3 bytes.
    assert failing_fields(client.post("/api/sessions", json={"metadata": {"k": "가" * 40}})) == ["metadata"]
    assert client.post("/api/sessions", json={"metadata": {"k": "가" * 25}}).status_code == 201


@pytest.mark.parametrize("field, too_much, enough", [
    ("max_new_tokens", 9, 8),
    ("temperature", 1.01, 1.0),
])
def test_generation_options_over_their_caps_are_422(make_app, field, too_much, enough):
    client = make_app(MAX_NEW_TOKENS_LIMIT=8, TEMPERATURE_LIMIT=1.0).test_client()
    sid = client.post("/api/sessions").json["session_id"]
    body = {"session_id": sid, "message": "hi"}
    assert failing_fields(client.post("/api/chat", json={**body, field: too_much})) == [field]
    assert client.post("/api/chat", json={**body, field: enough}).status_code == 200


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", "64"), ("max_new_tokens", 1.5), ("max_new_tokens", True), ("max_new_tokens", 0),
    ("temperature", "0.5"), ("temperature", -0.1), ("do_sample", 1), ("do_sample", "true"),
])
def test_options_of_the_wrong_type_are_422_not_coerced(client, session_id, field, value):
    answer = client.post("/api/chat", json={"session_id": session_id, "message": "hi", field: value})
    assert failing_fields(answer) == [field]


def test_a_whole_number_written_as_a_float_is_an_integer(client, session_id):
    # JSON Schema (and so the OpenAPI description) counts 16.0 as an integer.
    answer = client.post("/api/chat", json={"session_id": session_id, "message": "hi", "max_new_tokens": 16.0})
    assert answer.status_code == 200


# --- request rate per key ---------------------------------------------------------

def test_the_request_rate_is_limited_per_key(make_app):
    app = make_app(AUTH="required", RATE_LIMIT_PER_MINUTE=3)
    client = app.test_client()
    alice = bearer(new_api_key(app.config["DATABASE"], "alice"))
    bob = bearer(new_api_key(app.config["DATABASE"], "bob"))
    for _ in range(3):
        assert client.post("/api/sessions", headers=alice).status_code == 201
    refused = client.get("/api/sessions/whatever", headers=alice)
    assert_problem(refused, 429, "rate_limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 120  # the window reaches into the previous minute

    assert client.post("/api/sessions", headers=bob).status_code == 201  # another key is not slowed
    for _ in range(5):
        assert client.get("/api/health").status_code == 200              # needs no key, is not counted


def test_no_rate_limit_when_it_is_zero(make_app):
    app = make_app(AUTH="required", RATE_LIMIT_PER_MINUTE=0)
    alice = bearer(new_api_key(app.config["DATABASE"], "alice"))
    assert all(app.test_client().post("/api/sessions", headers=alice).status_code == 201 for _ in range(20))


def test_no_per_key_limits_without_keys(make_app):
    # With keys off every client is the owner 'local': one shared budget would throttle them all.
    client = make_app(AUTH="disabled", RATE_LIMIT_PER_MINUTE=3, MAX_STREAMS_PER_KEY=1).test_client()
    sessions = [client.post("/api/sessions").json["session_id"] for _ in range(5)]
    streams = [client.post("/api/chat/stream", json={"session_id": sid, "message": "hi @@words=2"})
               for sid in sessions]   # none read yet: all five replies are being generated at once
    assert [s.status_code for s in streams] == [200] * 5
    for stream in streams:
        stream.get_data()
        stream.close()


@pytest.fixture
def conn(app):
    conn = db.connect(app.config["DATABASE"])
    yield conn
    conn.close()


def test_the_window_slides(conn):
    # 10 a minute. Slot 100 is [6000, 6060).
    for i in range(10):
        assert store.take_request(conn, "k", 10, 60, now=6000 + i) == 0
    assert store.take_request(conn, "k", 10, 60, now=6059) > 0
    # Half-way through the next slot, half of the previous one still counts: 5 more fit.
    assert [store.take_request(conn, "k", 10, 60, now=6090) == 0 for _ in range(6)] == [True] * 5 + [False]


@pytest.mark.parametrize("earlier, at", [
    ([6000] * 10, 6030),                 # full in this slot: wait for the next one, and more
    ([5950] * 8 + [6030] * 6, 6030),     # the previous slot's weight must decay first
    ([5950] * 4 + [6001] * 6, 6002),
])
def test_retry_after_is_exactly_when_a_request_fits_again(conn, earlier, at):
    for t in earlier:
        assert store.take_request(conn, "k", 10, 60, now=t) == 0
    wait = store.take_request(conn, "k", 10, 60, now=at)
    assert wait > 0
    # Retry-After is whole seconds: one second earlier is too soon, on time is fine.
    assert store.take_request(conn, "k", 10, 60, now=at + wait - 1) > 0
    assert store.take_request(conn, "k", 10, 60, now=at + wait) == 0


def test_the_count_is_shared_by_every_connection(app):
    # Each gunicorn worker has its own connection: they must see one count.
    first, second = db.connect(app.config["DATABASE"]), db.connect(app.config["DATABASE"])
    try:
        results = [store.take_request(c, "k", 4, 60, now=6000) for c in (first, second) * 3]
    finally:
        first.close()
        second.close()
    assert results.count(0) == 4


def test_the_rate_limit_holds_across_gunicorn_workers(start_server):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_RATE_LIMIT_PER_MINUTE="10", CHATBOT_WORKERS="3")
    headers = server.new_key("alice")
    # A new connection for each request, so they spread over the workers.
    statuses = [requests.get(server.url + "/api/sessions/x", headers={**headers, "Connection": "close"}).status_code
                for _ in range(30)]
    assert statuses.count(404) == 10 and statuses.count(429) == 20


# --- replies at once per key ---------------------------------------------------------

def test_replies_at_once_are_limited_per_key_across_workers(start_server):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_MAX_STREAMS_PER_KEY="1")
    alice, bob = server.new_key("alice"), server.new_key("bob")
    first, second = server.new_session(alice), server.new_session(alice)

    running = SSEStream(server.url, "/api/chat/stream",
                        {"session_id": first, "message": "long @@words=60 @@delay=0.05"}, headers=alice)
    events = running.events()
    assert next(events)[0] == "start"

    refused = requests.post(server.url + "/api/chat", json={"session_id": second, "message": "hi"}, headers=alice)
    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.json()["code"] == "too_many_streams"
    assert int(refused.headers["Retry-After"]) >= 1

    theirs = requests.post(server.url + "/api/chat", json={"session_id": server.new_session(bob), "message": "hi"},
                           headers=bob)
    assert theirs.status_code == 200

    assert [e[0] for e in events][-1] == "done"
    again = requests.post(server.url + "/api/chat", json={"session_id": second, "message": "hi"}, headers=alice)
    assert again.status_code == 200


def test_an_expired_lease_does_not_count(conn):
    sid = store.create_session(conn, {}, owner="k")["session_id"]
    other = store.create_session(conn, {}, owner="k")["session_id"]
    assert store.begin_turn(conn, sid, "hi", max_per_owner=1) is not None
    with pytest.raises(store.TooManyTurns):
        store.begin_turn(conn, other, "hi", max_per_owner=1)
    conn.execute("UPDATE sessions SET lease_expires = ? WHERE session_id = ?", (time.time() - 1, sid))
    assert store.begin_turn(conn, other, "hi", max_per_owner=1) is not None
