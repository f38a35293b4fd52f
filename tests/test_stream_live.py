"""POST /api/chat/stream against real processes: gunicorn running the service,
the stand-in LLM server, and raw SSE bytes read off the socket as they arrive."""
import json

import pytest
import requests

from chatbot.standin import MARKER
from conftest import SSEStream, wait_for
from helpers import deltas, in_thread, stored_messages

IDLE_TIMEOUT = 2


@pytest.fixture(scope="module")
def live_server_env():
    return {"CHATBOT_SSE_KEEPALIVE": "0.2", "CHATBOT_LLM_IDLE_TIMEOUT": str(IDLE_TIMEOUT)}


@pytest.fixture
def server(live_server):
    return live_server


def words(n):
    return MARKER + "".join(f"단어{i} " for i in range(1, n + 1))


def stream(server, session_id, message):
    return SSEStream(server.url, "/api/chat/stream", {"session_id": session_id, "message": message})


def names(events):
    return [name for name, _, _ in events if name != "comment"]


def test_a_stream_has_the_contracts_headers_events_and_ids(server):
    sid = server.new_session()
    s = stream(server, sid, "hi @@words=5")
    events = list(s.events())
    assert s.status == 200
    assert s.headers["Content-Type"].startswith("text/event-stream")
    assert s.headers["Cache-Control"] == "no-cache" and s.headers["X-Accel-Buffering"] == "no"
    assert names(events) == ["start"] + ["delta"] * 5 + ["done"]
    start, done = events[0][1], events[-1][1]
    user, reply = stored_messages(server.db_path, sid)
    assert start == {"type": "start", "session_id": sid, "user_message_id": user["message_id"],
                     "message_id": reply["message_id"]}
    # Ids are positions: the reply's length so far in code points; done carries the final one.
    pieces = [data["content"] for name, data, _ in events if name == "delta"]
    assert s.ids == [None] + [len("".join(pieces[:i + 1])) for i in range(5)] + [len(done["content"])]
    assert done["message_id"] == reply["message_id"] and done["status"] == "complete"
    assert done["finish_reason"] == "stop" and done["token_usage"]["completion_tokens"] == 5
    assert deltas(events) == done["content"] == reply["content"] == words(5)
    listed = requests.get(f"{server.url}/api/sessions/{sid}/messages").json()["messages"]
    assert listed[-1] == {k: v for k, v in done.items() if k != "type"} and done["type"] == "complete"
    assert s.raw.endswith(b"event: done\ndata: " + json.dumps(done, ensure_ascii=False).encode() +
                          b"\n\ndata: [DONE]\n\n")


@pytest.mark.parametrize("fmt", ["serving", "token", "content", "text", "delta", "response", "openai", "plain"])
def test_every_upstream_form_reaches_the_client_piece_by_piece(server, fmt):
    events = list(stream(server, server.new_session(), f"@@words=4 @@format={fmt} @@split").events())
    pieces = [data["content"] for name, data, _ in events if name == "delta"]
    assert pieces == [MARKER + "단어1 ", "단어2 ", "단어3 ", "단어4 "]
    assert events[-1][1]["content"] == "".join(pieces)


def test_the_first_delta_arrives_while_the_upstream_is_still_generating(server, standin_log):
    s = stream(server, server.new_session(), "@@words=6 @@delay=0.3")
    events = s.events()
    assert next(events)[0] == "start"
    name, data, _ = next(events)
    assert name == "delta" and data["content"] == MARKER + "단어1 "
    [entry] = standin_log()
    assert entry["state"] == "running" and entry["pieces_sent"] < 6
    assert deltas(list(events)) == words(6)[len(data["content"]):]


@pytest.mark.parametrize("path", ["/api/chat/stream", "/api/chat"])
def test_the_user_message_is_committed_before_the_upstream_answers(server, standin_log, path):
    sid = server.new_session()
    body = {"session_id": sid, "message": "안녕 @@first=1.5 @@words=2"}
    finished = in_thread(requests.post, server.url + path, json=body, timeout=30)
    assert wait_for(lambda: standin_log() and standin_log()[-1]["pieces_sent"] == 0)
    # The stand-in has the request and has sent no text yet: look from outside.
    user, reply = stored_messages(server.db_path, sid)
    assert (user["role"], user["content"], user["status"]) == ("user", "안녕 @@first=1.5 @@words=2", "complete")
    assert reply["status"] == "pending" and standin_log()[-1]["state"] == "running"
    assert finished().status_code == 200
    assert [m["status"] for m in stored_messages(server.db_path, sid)] == ["complete", "complete"]


def test_keep_alive_comments_while_the_upstream_is_silent(server):
    events = list(stream(server, server.new_session(), "@@words=3 @@first=1 @@silence=1@1").events())
    sequence = [name for name, _, _ in events]
    # silent before the first piece (prefill) and between the first and second
    first_delta = sequence.index("delta")
    assert sequence[:first_delta].count("comment") >= 2
    assert sequence[first_delta + 1:sequence.index("delta", first_delta + 1)].count("comment") >= 2
    assert all(block == ": keep-alive" for name, block, _ in events if name == "comment")
    assert deltas(events) == events[-1][1]["content"] == words(3)


def assert_ends_with_error(server, sid, events, code):
    assert names(events)[0] == "start" and names(events)[-1] == "error" and "done" not in names(events)
    error = events[-1][1]
    reply = stored_messages(server.db_path, sid)[-1]
    assert error["code"] == code and error["detail"] and error["message_id"] == reply["message_id"]
    assert json.loads(reply["error"])["code"] == code
    return reply


def test_an_upstream_error_after_start_is_an_error_event_and_the_text_is_kept(server):
    sid = server.new_session()
    events = list(stream(server, sid, "@@words=5 @@error=2").events())
    reply = assert_ends_with_error(server, sid, events, "upstream_error")
    assert reply["status"] == "incomplete" and reply["content"] == deltas(events) == words(2)


def test_an_upstream_that_breaks_off_mid_answer(server):
    sid = server.new_session()
    events = list(stream(server, sid, "@@words=5 @@break=3").events())
    reply = assert_ends_with_error(server, sid, events, "upstream_error")
    assert reply["status"] == "incomplete" and reply["content"] == deltas(events) == words(3)


def test_an_upstream_that_breaks_off_before_any_text(server):
    sid = server.new_session()
    events = list(stream(server, sid, "@@words=5 @@break=0").events())
    reply = assert_ends_with_error(server, sid, events, "upstream_error")
    assert reply["status"] == "failed" and reply["content"] == "" and deltas(events) == ""


def test_an_upstream_silent_too_long_mid_answer_times_out(server):
    sid = server.new_session()
    events = list(stream(server, sid, "@@words=3 @@silence=30@1").events())
    reply = assert_ends_with_error(server, sid, events, "upstream_timeout")
    assert reply["status"] == "incomplete" and reply["content"] == words(1)


def test_a_client_that_leaves_mid_stream_closes_the_upstream_and_keeps_the_text(start_server, standin_log):
    server = start_server(CHATBOT_RESUME_GRACE="0")  # no grace: leaving stops at once, as before resumable streams
    sid = server.new_session()
    s = stream(server, sid, "@@words=100 @@delay=0.1")
    events = s.events()
    received = [next(events) for _ in range(3)]  # start and two deltas
    s.close()
    entry = wait_for(lambda: [e for e in standin_log() if e["state"] == "cancelled"], timeout=3)
    assert entry and entry[0]["pieces_sent"] < 100
    reply = wait_for(lambda: stored_messages(server.db_path, sid)[-1]["status"] != "pending" and
                     stored_messages(server.db_path, sid)[-1], timeout=3)
    assert reply["status"] == "incomplete" and reply["finish_reason"] == "client_gone"
    assert reply["content"].startswith(deltas(received)) and words(100).startswith(reply["content"])
    # the marker went with it: the session takes a new turn at once
    assert requests.post(f"{server.url}/api/chat", json={"session_id": sid, "message": "@@words=1"}).status_code == 200


def test_a_client_that_leaves_while_the_upstream_is_silent_is_noticed(start_server):
    server = start_server(CHATBOT_RESUME_GRACE="0")
    sid = server.new_session()
    s = stream(server, sid, "@@first=30")
    assert next(s.events())[0] == "start"
    s.close()
    # No write fails while nothing is sent: the service must watch the socket.
    reply = wait_for(lambda: stored_messages(server.db_path, sid)[-1]["status"] != "pending" and
                     stored_messages(server.db_path, sid)[-1], timeout=3)
    assert reply and reply["status"] == "failed" and json.loads(reply["error"])["code"] == "client_gone"
