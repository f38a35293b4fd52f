"""The WebSocket, against a real gunicorn process and the stand-in LLM."""
import json

import pytest
import websocket

from conftest import wait_for
from helpers import rows


@pytest.fixture
def ws(server):
    sock = websocket.create_connection(server.url.replace("http", "ws") + "/api/chat/ws", timeout=15)
    yield sock
    sock.close()


def frames_until_end(ws, end=("done", "error")):
    frames = []
    while not frames or frames[-1]["type"] not in end:
        frames.append(json.loads(ws.recv()))
    return frames


def stored(server, message_id):
    [row] = rows(server.db_path, "SELECT content, status FROM messages WHERE message_id = ?", message_id)
    return row["content"], row["status"]


def test_many_turns_on_one_socket(server, ws):
    sid = server.new_session()
    for text in ("첫 번째 @@words=3", "두 번째 @@words=4"):
        ws.send(json.dumps({"type": "chat", "session_id": sid, "message": text}))
        frames = frames_until_end(ws)
        assert frames[0]["type"] == "start" and frames[0]["session_id"] == sid, frames
        deltas = "".join(f["content"] for f in frames if f["type"] == "delta")
        done = frames[-1]
        assert done["type"] == "done" and done["finish_reason"] == "stop"
        assert done["message"]["content"] == deltas
        assert stored(server, done["message"]["message_id"]) == (deltas, "complete")
    history = server.get(f"/api/sessions/{sid}/messages")["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"] * 2


@pytest.mark.parametrize("frame, code", [
    ("not json", "invalid_json"),
    ('{"type": "chat", "session_id": "x", "message": "a\\ud800"}', "invalid_json"),
    pytest.param("[" * 5000 + "]" * 5000, "invalid_json", id="nested-too-deep"),
    (json.dumps({"type": "dance"}), "validation_error"),
    (json.dumps({"type": "chat", "session_id": "nope", "message": "hi"}), "session_not_found"),
    (json.dumps({"type": "chat", "message": "hi"}), "validation_error"),
    (json.dumps({"type": "stop"}), "nothing_to_stop"),
])
def test_a_bad_frame_gets_an_error_frame_and_the_socket_stays_open(server, ws, frame, code):
    ws.send(frame)
    error = json.loads(ws.recv())
    assert error["type"] == "error" and error["code"] == code and error["detail"]
    sid = server.new_session()
    ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "still here? @@words=2"}))
    assert frames_until_end(ws)[-1]["type"] == "done"


def test_a_stop_frame_ends_the_reply_as_incomplete(server, ws, standin_log):
    sid = server.new_session()
    ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "길게 @@words=200 @@delay=0.05"}))
    frames = [json.loads(ws.recv()) for _ in range(3)]  # start and two deltas
    ws.send(json.dumps({"type": "stop"}))
    frames += frames_until_end(ws)
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stopped"
    assert done["message"]["status"] == "incomplete"
    deltas = "".join(f["content"] for f in frames if f["type"] == "delta")
    assert done["message"]["content"] == deltas != ""
    assert wait_for(lambda: standin_log()[-1]["state"] == "cancelled")
    assert standin_log()[-1]["pieces_sent"] < 200


def test_a_chat_frame_during_a_reply_is_refused_not_queued(server, ws):
    sid = server.new_session()
    ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "@@words=20 @@delay=0.05"}))
    assert json.loads(ws.recv())["type"] == "start"
    ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "me too"}))
    frames = frames_until_end(ws, end=("done",))
    assert {"generation_in_progress"} <= {f.get("code") for f in frames}
    assert frames[-1]["type"] == "done" and frames[-1]["message"]["status"] == "complete"


def test_a_socket_closed_mid_answer_keeps_the_text_as_incomplete(server, ws, standin_log):
    sid = server.new_session()
    ws.send(json.dumps({"type": "chat", "session_id": sid, "message": "@@words=200 @@delay=0.05"}))
    start = json.loads(ws.recv())
    first = json.loads(ws.recv())
    ws.close()
    # After the grace period (CHATBOT_RESUME_GRACE, 5 s) with nobody re-attached, the upstream is closed.
    assert wait_for(lambda: standin_log()[-1]["state"] == "cancelled", timeout=15)
    content, status = wait_for(lambda: (row := stored(server, start["message_id"])) and row[1] != "pending" and row)
    assert status == "incomplete" and content.startswith(first["content"])
