"""Regenerate: the last reply is replaced by a new one made from the same context."""
import json

import pytest
import requests
import websocket

from chatbot import db, store
from conftest import SSEStream


def chat(client, body):
    return client.post("/api/chat", json=body)


def history(client, session_id):
    return client.get(f"/api/sessions/{session_id}/messages").json["messages"]


def test_regenerate_replaces_the_last_reply(client, session_id, standin_log):
    chat(client, {"session_id": session_id, "message": "first @@words=1"})
    cut_short = chat(client, {"session_id": session_id, "message": "second", "max_new_tokens": 2}).json
    before = history(client, session_id)

    response = chat(client, {"session_id": session_id, "regenerate": True})
    assert response.status_code == 200, response.json
    reply = response.json
    assert reply["message_id"] != cut_short["message_id"]
    assert reply["content"].startswith(cut_short["content"]) and reply["content"] != cut_short["content"]
    # The same context went upstream: everything up to and including the last user message.
    first_try, second_try = standin_log()[-2:]
    assert second_try["body"]["messages"] == first_try["body"]["messages"]
    # The old reply is gone from history; the rest is untouched.
    assert history(client, session_id) == before[:-1] + [reply]
    assert client.get(f"/api/sessions/{session_id}").json["message_count"] == 4


def test_the_old_reply_is_not_in_later_contexts(client, session_id, standin_log):
    old = chat(client, {"session_id": session_id, "message": "question", "max_new_tokens": 2}).json
    new = chat(client, {"session_id": session_id, "regenerate": True}).json
    chat(client, {"session_id": session_id, "message": "next @@words=1"})
    sent = standin_log()[-1]["body"]["messages"]
    replies = [m["content"] for m in sent if m["role"] == "assistant"]
    assert replies == [new["content"]] and old["content"] not in replies


def test_a_failed_reply_can_be_regenerated(client, session_id):
    failed = chat(client, {"session_id": session_id, "message": "hello @@status=500"})
    assert failed.status_code == 502
    # The directive stays in the stored user message, so the retry fails the same way
    # (that is the stand-in's doing); what matters is that the failed reply was replaced.
    retried = chat(client, {"session_id": session_id, "regenerate": True})
    assert retried.status_code == 502
    messages = history(client, session_id)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["message_id"] == retried.json["message_id"] != failed.json["message_id"]


def test_regenerating_moves_the_session_to_the_top(client, session_id):
    chat(client, {"session_id": session_id, "message": "hello @@words=1"})
    other = client.post("/api/sessions").json["session_id"]
    chat(client, {"session_id": session_id, "regenerate": True})
    assert [s["session_id"] for s in client.get("/api/sessions").json["sessions"]] == [session_id, other]


def test_nothing_to_regenerate_is_a_409(client, session_id):
    response = chat(client, {"session_id": session_id, "regenerate": True})
    assert response.status_code == 409
    assert response.json["code"] == "nothing_to_regenerate"


def test_regenerate_of_an_unknown_session_is_404(client):
    response = chat(client, {"session_id": "nope", "regenerate": True})
    assert response.status_code == 404 and response.json["code"] == "session_not_found"


@pytest.mark.parametrize("body,field", [
    ({"message": "hi", "regenerate": True}, "regenerate"),
    ({}, "message"),
    ({"regenerate": False}, "message"),
    ({"regenerate": "yes"}, "regenerate"),
])
def test_message_and_regenerate_go_one_at_a_time(client, session_id, body, field):
    response = chat(client, {"session_id": session_id, **body})
    assert response.status_code == 422
    assert response.json["code"] == "validation_error"
    assert field in [e["field"] for e in response.json["errors"]]


def test_regenerate_waits_for_a_reply_in_progress(app, client, session_id):
    chat(client, {"session_id": session_id, "message": "hello @@words=1"})
    kept = history(client, session_id)
    conn = db.connect(app.config["DATABASE"])
    try:
        # Another reply is being generated (this process holds the marker).
        store.begin_turn(conn, session_id, "meanwhile")
        response = chat(client, {"session_id": session_id, "regenerate": True})
        assert response.status_code == 409 and response.json["code"] == "generation_in_progress"
        # The reply was not deleted.
        assert history(client, session_id)[:2] == kept
    finally:
        conn.close()


def test_regenerate_over_the_stream_and_the_websocket(server):
    sid = server.new_session()
    first = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "안녕 @@words=3"})
    events = list(first.events())
    replies, user_id = [events[-1][1]["message_id"]], events[0][1]["user_message_id"]

    again = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "regenerate": True})
    assert again.status == 200
    events = list(again.events())
    assert events[0][0] == "start" and events[0][1]["user_message_id"] == user_id
    assert events[-1][0] == "done"
    assert "".join(e[1]["content"] for e in events if e[0] == "delta") == events[-1][1]["content"]
    replies.append(events[-1][1]["message_id"])

    ws = websocket.create_connection(server.url.replace("http", "ws") + "/api/chat/ws", timeout=15)
    try:
        ws.send(json.dumps({"type": "chat", "session_id": sid, "regenerate": True}))
        frames = [json.loads(ws.recv())]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv()))
    finally:
        ws.close()
    assert frames[0]["type"] == "start" and frames[0]["user_message_id"] == user_id
    assert frames[-1]["type"] == "done"
    replies.append(frames[-1]["message"]["message_id"])

    messages = requests.get(f"{server.url}/api/sessions/{sid}/messages").json()["messages"]
    assert [m["message_id"] for m in messages] == [user_id, replies[-1]]
    assert len(set(replies)) == 3
