"""Bad input for re-attaching to a reply (GET /api/sessions/{id}/messages/{message_id}/stream
and the WebSocket `resume` frame) gets the contract's clear errors, against a
real gunicorn process."""
import json
import uuid

import pytest
import requests
import websocket

from conftest import SSEStream
from helpers import assert_problem, deltas, stored_messages


def resume(server, sid, message_id, params=None, headers=None):
    return requests.get(f"{server.url}/api/sessions/{sid}/messages/{message_id}/stream", params=params,
                        headers=headers, timeout=30)


def finished_turn(server, headers=None, message="@@words=6"):
    """A session with one finished turn: (session id, user message id, reply)."""
    sid = server.new_session(headers)
    answer = requests.post(server.url + "/api/chat", json={"session_id": sid, "message": message},
                           headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    user = next(m for m in stored_messages(server.db_path, sid) if m["role"] == "user")
    return sid, user["message_id"], answer.json()


def events_with_ids(text):
    """The (event, data, id) of an SSE body read whole (helpers.sse_events leaves the ids out)."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"]), fields.get("id")))
    return events


@pytest.fixture(scope="module")
def turn(live_server):
    return finished_turn(live_server)


def test_a_finished_reply_can_be_followed_from_a_position(live_server, turn):
    # The good case, so that the refusals below are refusals of the input only.
    sid, _, reply = turn
    answer = resume(live_server, sid, reply["message_id"], {"after": "5"})
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/event-stream")
    events = events_with_ids(answer.text)
    assert events[0][0] == "start" and events[-1][0] == "done"
    assert "".join(d["content"] for e, d, _ in events if e == "delta") == reply["content"][5:]
    assert events[-1][2] == str(len(reply["content"]))


def test_an_unknown_message_is_404_message_not_found(live_server, turn):
    sid = turn[0]
    assert_problem(resume(live_server, sid, str(uuid.uuid4())), 404, "message_not_found")
    assert_problem(resume(live_server, sid, "not-a-uuid"), 404, "message_not_found")


def test_a_user_messages_id_is_404_message_not_found(live_server, turn):
    sid, user_id, _ = turn
    assert_problem(resume(live_server, sid, user_id), 404, "message_not_found")


def test_a_reply_of_another_session_is_404_message_not_found(live_server, turn):
    other = live_server.new_session()
    assert_problem(resume(live_server, other, turn[2]["message_id"]), 404, "message_not_found")


def test_an_unknown_session_is_404_session_not_found(live_server, turn):
    assert_problem(resume(live_server, str(uuid.uuid4()), turn[2]["message_id"]), 404, "session_not_found")


def test_another_keys_session_is_404_session_not_found(start_server):
    server = start_server(CHATBOT_AUTH="required")
    alice, bob = server.new_key("alice"), server.new_key("bob")
    sid, _, reply = finished_turn(server, alice)
    assert_problem(resume(server, sid, reply["message_id"], headers=bob), 404, "session_not_found")
    assert resume(server, sid, reply["message_id"], headers=alice).status_code == 200
    ws = websocket.create_connection(server.url.replace("http", "ws") + "/api/chat/ws", timeout=30,
                                     header=[f"Authorization: {bob['Authorization']}"])
    try:
        ws.send(json.dumps({"type": "resume", "session_id": sid, "message_id": reply["message_id"]}))
        frame = json.loads(ws.recv())
        assert frame["type"] == "error" and frame["code"] == "session_not_found"
    finally:
        ws.close()


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "", " 3", "+3", "0x10", "١٢", "²"])
def test_a_malformed_after_is_400_invalid_position(live_server, turn, after):
    sid, _, reply = turn
    assert_problem(resume(live_server, sid, reply["message_id"], {"after": after}), 400, "invalid_position")


@pytest.mark.parametrize("last_event_id", ["-1", "abc", "1.5", "x1"])
def test_a_malformed_last_event_id_is_400_invalid_position(live_server, turn, last_event_id):
    sid, _, reply = turn
    assert_problem(resume(live_server, sid, reply["message_id"], headers={"Last-Event-ID": last_event_id}),
                   400, "invalid_position")


def test_last_event_id_gives_the_position(live_server, turn):
    sid, _, reply = turn
    answer = resume(live_server, sid, reply["message_id"], headers={"Last-Event-ID": "7"})
    assert answer.status_code == 200
    assert "".join(d["content"] for e, d, _ in events_with_ids(answer.text) if e == "delta") == reply["content"][7:]


def test_after_wins_over_last_event_id(live_server, turn):
    sid, _, reply = turn
    answer = resume(live_server, sid, reply["message_id"], {"after": "3"}, {"Last-Event-ID": "10"})
    assert answer.status_code == 200
    assert "".join(d["content"] for e, d, _ in events_with_ids(answer.text) if e == "delta") == reply["content"][3:]
    # A malformed Last-Event-ID is not even read when ?after is there...
    answer = resume(live_server, sid, reply["message_id"], {"after": "3"}, {"Last-Event-ID": "garbage"})
    assert answer.status_code == 200
    # ...and a malformed ?after is not saved by a good Last-Event-ID.
    assert_problem(resume(live_server, sid, reply["message_id"], {"after": "abc"}, {"Last-Event-ID": "3"}),
                   400, "invalid_position")


def test_a_position_at_or_past_the_end_of_a_finished_reply_gets_only_its_end(live_server, turn):
    sid, _, reply = turn
    for after in (len(reply["content"]), len(reply["content"]) + 100):
        events = events_with_ids(resume(live_server, sid, reply["message_id"], {"after": str(after)}).text)
        assert [e for e, _, _ in events] == ["start", "done"]


def test_a_running_reply_can_be_followed_by_a_second_client(live_server):
    # Re-attach of a running reply: the refusals above are not about running replies.
    sid = live_server.new_session()
    first = SSEStream(live_server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=30 @@delay=0.05"})
    events = first.events()
    start = next(events)
    answer = resume(live_server, sid, start[1]["message_id"], {"after": "0"})
    assert answer.status_code == 200
    attached = events_with_ids(answer.text)
    rest = list(events)
    assert attached[-1][0] == "done"
    assert "".join(d["content"] for e, d, _ in attached if e == "delta") == deltas(rest) == attached[-1][1]["content"]


# --- the WebSocket resume frame ---------------------------------------------------

@pytest.fixture
def ws(live_server):
    sock = websocket.create_connection(live_server.url.replace("http", "ws") + "/api/chat/ws", timeout=30)
    yield sock
    sock.close()


def ws_frames_until_end(ws):
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(json.loads(ws.recv()))
    return frames


def still_open(ws, sid, reply):
    """The socket still serves a good resume frame after the error."""
    ws.send(json.dumps({"type": "resume", "session_id": sid, "message_id": reply["message_id"], "after": 2}))
    frames = ws_frames_until_end(ws)
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "done"
    assert "".join(f["content"] for f in frames if f["type"] == "delta") == reply["content"][2:]


@pytest.mark.parametrize("missing", [("session_id",), ("message_id",), ("session_id", "message_id")])
def test_a_resume_frame_missing_a_field_gets_an_error_frame(live_server, turn, ws, missing):
    sid, _, reply = turn
    frame = {"type": "resume", "session_id": sid, "message_id": reply["message_id"]}
    for field in missing:
        del frame[field]
    ws.send(json.dumps(frame))
    error = json.loads(ws.recv())
    assert error["type"] == "error" and error["code"] == "validation_error" and error["detail"]
    assert sorted(e["field"] for e in error["errors"]) == sorted(missing)
    still_open(ws, sid, reply)


@pytest.mark.parametrize("fields, code", [
    ({"session_id": 5}, "validation_error"),
    ({"message_id": None}, "validation_error"),
    ({"message_id": "unknown"}, "message_not_found"),
    ({"message_id": "user"}, "message_not_found"),
    ({"session_id": "unknown"}, "session_not_found"),
    ({"after": -1}, "invalid_position"),
    ({"after": 1.5}, "invalid_position"),
    ({"after": "abc"}, "invalid_position"),
    ({"after": True}, "invalid_position"),
])
def test_a_bad_resume_frame_gets_an_error_frame_and_the_socket_stays_open(live_server, turn, ws, fields, code):
    sid, user_id, reply = turn
    frame = {"type": "resume", "session_id": sid, "message_id": reply["message_id"], **fields}
    if frame["message_id"] == "user":
        frame["message_id"] = user_id
    if frame["message_id"] == "unknown" or frame["session_id"] == "unknown":
        frame = {k: str(uuid.uuid4()) if v == "unknown" else v for k, v in frame.items()}
    ws.send(json.dumps(frame))
    error = json.loads(ws.recv())
    assert error["type"] == "error" and error["code"] == code and error["detail"], error
    still_open(ws, sid, reply)
