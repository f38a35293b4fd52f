"""Idempotency-Key on /api/chat, /api/chat/stream and WebSocket chat frames,
against a real gunicorn process and the stand-in LLM: a retry starts nothing
new (the stand-in sees one generation), whatever the endpoint."""
import json
import time
import uuid

import pytest
import requests
import websocket

from conftest import SSEStream, wait_for
from helpers import assert_problem, deltas, in_thread, stored_messages

REPLAYED = "Idempotent-Replayed"


def new_key():
    return f"key-{uuid.uuid4()}"


def chat(server, body, key=None, headers=None, path="/api/chat"):
    headers = dict(headers or {})
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(server.url + path, json=body, headers=headers, timeout=60)


def stream(server, body, key, headers=None):
    return SSEStream(server.url, "/api/chat/stream", body, {"Idempotency-Key": key, **(headers or {})})


def generations(standin_log, marker):
    """The upstream calls the stand-in received for a message containing `marker`."""
    return [e for e in standin_log() if marker in json.dumps(e["body"], ensure_ascii=False)]


def message_of(data):
    """The message object of an SSE `done` event (its data also carries the original backend's `type`)."""
    return {k: v for k, v in data.items() if k != "type"}


def ws_connect(server, headers=None):
    return websocket.create_connection(server.url.replace("http", "ws") + "/api/chat/ws", timeout=30,
                                       header=[f"{k}: {v}" for k, v in (headers or {}).items()])


def ws_frames_until_end(ws):
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(json.loads(ws.recv()))
    return frames


# --- /api/chat ------------------------------------------------------------------

def test_a_retried_chat_answers_the_stored_reply_without_a_second_generation(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=5"}
    first = chat(live_server, body, key)
    assert first.status_code == 200, first.text
    assert REPLAYED not in first.headers
    again = chat(live_server, body, key)
    assert again.status_code == 200, again.text
    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert len(generations(standin_log, marker)) == 1
    # Nothing new was stored either: one user message, one reply.
    assert [m["role"] for m in stored_messages(live_server.db_path, sid)] == ["user", "assistant"]


def test_a_retried_chat_whose_upstream_failed_answers_the_same_problem(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@status=503"}
    first = chat(live_server, body, key)
    problem = assert_problem(first, 503, "upstream_unavailable")
    assert REPLAYED not in first.headers
    again = chat(live_server, body, key)
    assert_problem(again, 503, "upstream_unavailable")
    assert again.headers[REPLAYED] == "true"
    assert again.json()["message_id"] == problem["message_id"]
    assert len(generations(standin_log, marker)) == 1


def test_a_chat_retried_while_its_turn_runs_waits_for_that_turn(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=20 @@delay=0.05"}
    first = in_thread(chat, live_server, body, key)
    assert wait_for(lambda: generations(standin_log, marker))
    again = chat(live_server, body, key)  # never 409 generation_in_progress: it is its own turn
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "complete"
    assert first().json() == again.json()
    assert len(generations(standin_log, marker)) == 1


# --- /api/chat/stream -------------------------------------------------------------

def test_a_stream_retried_while_its_turn_runs_attaches_to_it(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=40 @@delay=0.05"}
    first = stream(live_server, body, key)
    assert first.status == 200
    events = first.events()
    start = next(events)
    assert start[0] == "start"
    assert next(events)[0] == "delta"  # the reply is under way

    second = stream(live_server, body, key)
    assert second.status == 200, second.response.read()
    attached = list(second.events())
    assert attached[0][0] == "start" and attached[0][1]["message_id"] == start[1]["message_id"]
    assert attached[-1][0] == "done"
    done = attached[-1][1]
    assert done["status"] == "complete" and deltas(attached) == done["content"]
    assert second.done_marker

    rest = list(events)
    assert rest[-1][1] == done
    assert len(generations(standin_log, marker)) == 1


def test_a_stream_retried_after_its_turn_replays_the_whole_turn(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} 안녕 @@words=6"}
    first = stream(live_server, body, key)
    original = list(first.events())
    assert original[-1][0] == "done"

    again = stream(live_server, body, key)
    assert again.status == 200
    assert again.headers[REPLAYED] == "true"
    assert again.headers["Content-Type"].startswith("text/event-stream")
    replay = list(again.events())
    assert replay[0][0] == "start" and replay[0][1] == original[0][1]
    assert [name for name, _, _ in replay[1:-1]] == ["delta"] * (len(replay) - 2)
    assert deltas(replay) == deltas(original)
    assert replay[-1][0] == "done" and replay[-1][1] == original[-1][1]
    assert again.ids[-1] == len(deltas(original))  # the terminal event's id is the reply's length
    assert again.done_marker
    assert len(generations(standin_log, marker)) == 1


def test_the_endpoint_does_not_matter_json_then_stream_replays(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=4"}
    reply = chat(live_server, body, key).json()
    again = stream(live_server, body, key)
    assert again.status == 200 and again.headers[REPLAYED] == "true"
    replay = list(again.events())
    assert replay[0][1]["message_id"] == reply["message_id"]
    assert deltas(replay) == reply["content"]
    assert replay[-1][0] == "done" and message_of(replay[-1][1]) == reply
    assert len(generations(standin_log, marker)) == 1


def test_the_endpoint_does_not_matter_stream_then_json_replays(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=4"}
    original = list(stream(live_server, body, key).events())
    again = chat(live_server, body, key)
    assert again.status_code == 200 and again.headers[REPLAYED] == "true"
    assert again.json() == message_of(original[-1][1])
    assert len(generations(standin_log, marker)) == 1


def test_a_websocket_chat_frame_with_a_known_key_replays_the_turn(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=4"}
    reply = chat(live_server, body, key).json()
    ws = ws_connect(live_server)
    try:
        ws.send(json.dumps({"type": "chat", **body, "idempotency_key": key}))
        frames = ws_frames_until_end(ws)
        assert frames[0]["type"] == "start" and frames[0]["message_id"] == reply["message_id"]
        assert "".join(f["content"] for f in frames if f["type"] == "delta") == reply["content"]
        assert frames[-1]["type"] == "done" and frames[-1]["message"] == reply
        # And the other way round: a key first used on the socket replays over HTTP.
        other_key, other = new_key(), {"session_id": sid, "message": f"{marker} again @@words=3"}
        ws.send(json.dumps({"type": "chat", **other, "idempotency_key": other_key}))
        done = ws_frames_until_end(ws)[-1]
        assert done["type"] == "done"
        again = chat(live_server, other, other_key)
        assert again.headers[REPLAYED] == "true" and again.json() == done["message"]
    finally:
        ws.close()
    assert len(generations(standin_log, marker)) == 2


def test_a_websocket_chat_frame_retried_while_running_attaches(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=30 @@delay=0.05"}
    first = stream(live_server, body, key)
    events = first.events()
    start = next(events)
    ws = ws_connect(live_server)
    try:
        ws.send(json.dumps({"type": "chat", **body, "idempotency_key": key}))
        frames = ws_frames_until_end(ws)
    finally:
        ws.close()
    assert frames[0]["type"] == "start" and frames[0]["message_id"] == start[1]["message_id"]
    assert frames[-1]["type"] == "done"
    assert "".join(f["content"] for f in frames if f["type"] == "delta") == frames[-1]["message"]["content"]
    assert message_of(list(events)[-1][1]) == frames[-1]["message"]
    assert len(generations(standin_log, marker)) == 1


# --- keys: reuse, form ------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_the_same_key_with_a_different_body_is_422(live_server, standin_log, path):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    assert chat(live_server, {"session_id": sid, "message": f"{marker} @@words=2"}, key).status_code == 200
    for different in ({"session_id": sid, "message": f"{marker} other @@words=2"},
                      {"session_id": sid, "message": f"{marker} @@words=2", "max_new_tokens": 7},
                      {"session_id": sid, "regenerate": True},
                      {"session_id": live_server.new_session(), "message": f"{marker} @@words=2"}):
        assert_problem(chat(live_server, different, key, path=path), 422, "idempotency_key_reused")
    assert len(generations(standin_log, marker)) == 1


def test_a_websocket_frame_reusing_a_key_for_another_body_gets_an_error_frame(live_server):
    sid, key = live_server.new_session(), new_key()
    assert chat(live_server, {"session_id": sid, "message": "one @@words=2"}, key).status_code == 200
    ws = ws_connect(live_server)
    try:
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "two", "idempotency_key": key}))
        error = json.loads(ws.recv())
        assert error["type"] == "error" and error["code"] == "idempotency_key_reused" and error["detail"]
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "three @@words=2"}))
        assert ws_frames_until_end(ws)[-1]["type"] == "done"  # the socket stayed open
    finally:
        ws.close()


MALFORMED = {
    "quoted-empty": '""',
    "empty": "",
    "256-chars": "k" * 256,
    "quoted-256-chars": '"' + "k" * 256 + '"',
    "non-ascii": "키".encode(),           # sent as UTF-8 bytes
    "latin-1": "clé".encode("latin-1"),
    "space": "two words",
    "control": "tab\there",
}


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_key_is_400(live_server, standin_log, path, raw):
    sid, marker = live_server.new_session(), uuid.uuid4().hex
    answer = requests.post(live_server.url + path, json={"session_id": sid, "message": f"{marker} @@words=2"},
                           headers={"Idempotency-Key": raw}, timeout=30)
    assert_problem(answer, 400, "invalid_idempotency_key")
    assert generations(standin_log, marker) == []
    assert stored_messages(live_server.db_path, sid) == []


@pytest.mark.parametrize("raw", ["", '""', "k" * 256, "키", "two words", 123, None, ["k"]],
                         ids=["empty", "quoted-empty", "256-chars", "non-ascii", "space", "number", "null", "list"])
def test_a_malformed_key_in_a_websocket_frame_gets_an_error_frame(live_server, raw):
    sid = live_server.new_session()
    ws = ws_connect(live_server)
    try:
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "hi @@words=2", "idempotency_key": raw}))
        frame = json.loads(ws.recv())
        if raw is None:  # a null key is no key: the turn runs
            assert frame["type"] == "start"
            assert ws_frames_until_end(ws)[-1]["type"] == "done"
        else:
            assert frame["type"] == "error" and frame["code"] == "invalid_idempotency_key", frame
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "still open? @@words=2"}))
        assert ws_frames_until_end(ws)[-1]["type"] == "done"
    finally:
        ws.close()


def test_the_longest_key_and_every_visible_character_are_accepted(live_server):
    sid = live_server.new_session()
    for key in ("k" * 255, '"' + "q" * 255 + '"', "".join(chr(c) for c in range(0x21, 0x7F))):
        assert chat(live_server, {"session_id": sid, "message": f"{key[:8]} @@words=2"}, key).status_code == 200


def test_quoted_and_bare_forms_are_one_key(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=3"}
    first = chat(live_server, body, f'"{key}"')
    again = chat(live_server, body, key)
    assert again.headers[REPLAYED] == "true" and again.json() == first.json()
    third = chat(live_server, body, f'"{key}"')
    assert third.headers[REPLAYED] == "true" and third.json() == first.json()
    assert len(generations(standin_log, marker)) == 1


# --- keys belong to an API key --------------------------------------------------

def test_keys_are_scoped_per_api_key(start_server, standin_log):
    server = start_server(CHATBOT_AUTH="required")
    alice, bob = server.new_key("alice"), server.new_key("bob")
    key, marker = new_key(), uuid.uuid4().hex
    alice_sid, bob_sid = server.new_session(alice), server.new_session(bob)
    alice_body = {"session_id": alice_sid, "message": f"{marker} alice @@words=3"}
    first = chat(server, alice_body, key, alice)
    assert first.status_code == 200
    # Alice's very body with Alice's key, from Bob: no replay of Alice's reply.
    assert_problem(chat(server, alice_body, key, bob), 404, "session_not_found")
    # Bob's own request with the same key is a request of its own (no 422, no replay).
    bob_answer = chat(server, {"session_id": bob_sid, "message": f"{marker} bob @@words=3"}, key, bob)
    assert bob_answer.status_code == 200 and REPLAYED not in bob_answer.headers
    assert bob_answer.json()["session_id"] == bob_sid
    again = chat(server, alice_body, key, alice)
    assert again.headers[REPLAYED] == "true" and again.json() == first.json()
    assert len(generations(standin_log, marker)) == 2


# --- a key is used only by a turn that began -------------------------------------

def test_a_request_for_an_unknown_session_does_not_use_up_its_key(live_server, standin_log):
    key, marker = new_key(), uuid.uuid4().hex
    assert_problem(chat(live_server, {"session_id": str(uuid.uuid4()), "message": f"{marker} @@words=2"}, key),
                   404, "session_not_found")
    sid = live_server.new_session()
    answer = chat(live_server, {"session_id": sid, "message": f"{marker} @@words=2"}, key)
    assert answer.status_code == 200 and REPLAYED not in answer.headers


def test_a_request_refused_with_409_does_not_use_up_its_key(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    running = stream(live_server, {"session_id": sid, "message": f"{marker} first @@words=20 @@delay=0.05"},
                     new_key())
    events = running.events()
    assert next(events)[0] == "start"
    body = {"session_id": sid, "message": f"{marker} second @@words=2"}
    for path in ("/api/chat", "/api/chat/stream"):
        assert_problem(chat(live_server, body, key, path=path), 409, "generation_in_progress")
    assert list(events)[-1][0] == "done"
    answer = chat(live_server, body, key)
    assert answer.status_code == 200 and REPLAYED not in answer.headers
    assert answer.json()["status"] == "complete"
    assert len(generations(standin_log, marker)) == 2


def test_a_request_refused_with_422_does_not_use_up_its_key(live_server):
    sid, key = live_server.new_session(), new_key()
    for bad in ({"session_id": sid, "message": "   "},
                {"session_id": sid, "message": "hi", "max_new_tokens": 0},
                {"session_id": sid, "regenerate": True}):  # nothing to regenerate yet: 409
        answer = chat(live_server, bad, key)
        assert answer.status_code in (409, 422), answer.text
    answer = chat(live_server, {"session_id": sid, "message": "now right @@words=2"}, key)
    assert answer.status_code == 200 and REPLAYED not in answer.headers


def test_a_request_over_the_stream_limit_does_not_use_up_its_key(start_server, standin_log):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_MAX_STREAMS_PER_KEY="1")
    alice = server.new_key("alice")
    key, marker = new_key(), uuid.uuid4().hex
    running = stream(server, {"session_id": server.new_session(alice), "message": "@@words=20 @@delay=0.05"},
                     new_key(), alice)
    events = running.events()
    assert next(events)[0] == "start"
    body = {"session_id": server.new_session(alice), "message": f"{marker} @@words=2"}
    assert_problem(chat(server, body, key, alice), 429, "too_many_streams")
    assert list(events)[-1][0] == "done"
    answer = chat(server, body, key, alice)
    assert answer.status_code == 200 and REPLAYED not in answer.headers
    assert len(generations(standin_log, marker)) == 1


# --- rate limit, time to live -----------------------------------------------------

def test_a_known_key_is_answered_past_the_rate_limit(start_server, standin_log):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_RATE_LIMIT_PER_MINUTE="4")
    alice = server.new_key("alice")
    key, marker = new_key(), uuid.uuid4().hex
    body = {"session_id": server.new_session(alice), "message": f"{marker} @@words=3"}
    first = chat(server, body, key, alice)
    assert first.status_code == 200
    # Use up the rest of the minute's budget, until a request is refused.
    assert wait_for(lambda: requests.get(server.url + "/api/sessions", headers=alice).status_code == 429,
                    timeout=10)
    assert_problem(chat(server, body, new_key(), alice), 429, "rate_limited")
    for path in ("/api/chat", "/api/chat/stream"):
        again = chat(server, body, key, alice, path=path)
        assert again.status_code == 200, again.text
        assert again.headers[REPLAYED] == "true"
    assert again.text.count("event: done") == 1
    assert len(generations(standin_log, marker)) == 1


def test_after_the_ttl_the_same_key_starts_a_new_turn(start_server, standin_log):
    server = start_server(CHATBOT_IDEMPOTENCY_TTL="1")
    sid, key, marker = server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=3"}
    first = chat(server, body, key)
    assert chat(server, body, key).headers.get(REPLAYED) == "true"  # within the TTL: a replay
    time.sleep(1.5)
    again = chat(server, body, key)
    assert again.status_code == 200 and REPLAYED not in again.headers
    assert again.json()["message_id"] != first.json()["message_id"]
    assert len(generations(standin_log, marker)) == 2
    # ...and the new turn holds the key from now on.
    third = chat(server, body, key)
    assert third.headers.get(REPLAYED) == "true" and third.json() == again.json()


# --- across processes, at once, regenerate ------------------------------------------

def test_a_retry_through_another_process_attaches_to_the_running_turn(start_server, standin_log):
    # Two servers on one database: the retry is certainly served by another
    # process than the producer's, and follows the reply through the database.
    producer = start_server()
    other = start_server(producer.db_path)
    sid, key, marker = producer.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=40 @@delay=0.05"}
    first = stream(producer, body, key)
    events = first.events()
    start = next(events)
    assert next(events)[0] == "delta"
    second = stream(other, body, key)
    assert second.status == 200
    attached = list(second.events())
    assert attached[0] == ("start", start[1], attached[0][2])
    done = message_of(attached[-1][1])
    assert attached[-1][0] == "done" and done["status"] == "complete"
    assert deltas(attached) == done["content"]
    assert message_of(list(events)[-1][1]) == done
    answer = chat(other, body, key)  # and /api/chat, once it is over, from the other process too
    assert answer.headers[REPLAYED] == "true" and answer.json() == done
    assert len(generations(standin_log, marker)) == 1


def test_requests_with_one_key_at_once_share_one_generation(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    body = {"session_id": sid, "message": f"{marker} @@words=10 @@delay=0.05"}

    def one(path):
        answer = chat(live_server, body, key, path=path)
        return answer.status_code, answer.text

    waits = [in_thread(one, path) for path in ["/api/chat/stream", "/api/chat"] * 4]
    answers = [wait() for wait in waits]
    assert [status for status, _ in answers] == [200] * len(answers), answers
    assert len(generations(standin_log, marker)) == 1
    replies = stored_messages(live_server.db_path, sid)
    assert [m["role"] for m in replies] == ["user", "assistant"]
    content = replies[-1]["content"]
    for status, text in answers:
        assert json.dumps(content, ensure_ascii=False)[1:-1] in text


def test_a_retried_regenerate_replays_instead_of_regenerating_again(live_server, standin_log):
    sid, key, marker = live_server.new_session(), new_key(), uuid.uuid4().hex
    original = chat(live_server, {"session_id": sid, "message": f"{marker} @@words=3"}).json()
    body = {"session_id": sid, "regenerate": True}
    first = chat(live_server, body, key)
    assert first.status_code == 200 and first.json()["message_id"] != original["message_id"]
    again = chat(live_server, body, key)
    assert again.status_code == 200 and again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert len(generations(standin_log, marker)) == 2  # the turn and one regenerate
    assert [m["message_id"] for m in stored_messages(live_server.db_path, sid)][-1] == first.json()["message_id"]
