"""The WebSocket is no way round the limits (issue: hostile clients), against
real gunicorn processes: frame size, sockets per key across workers, idle
sockets, the request rate, revoked keys, and the request log."""
import json
import struct
import time

import pytest
import websocket

from chatbot import db, store
from conftest import wait_for


def connect(server, headers=None, timeout=15):
    return websocket.create_connection(server.url.replace("http", "ws") + "/api/chat/ws", timeout=timeout,
                                       header=headers or {})


def turn(ws, sid, message="hi @@words=1"):
    ws.send(json.dumps({"type": "chat", "session_id": sid, "message": message}))
    frames = [json.loads(ws.recv())]
    while frames[-1]["type"] not in ("done", "error"):
        frames.append(json.loads(ws.recv()))
    return frames


def close_code(ws, within=10):
    """The code of the close frame the server sends (skipping data and pings), or None."""
    ws.settimeout(within)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            frame = ws.recv_frame()   # as it came: no close frame sent back to a server that has gone
        except (websocket.WebSocketConnectionClosedException, OSError):
            return None
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else 1005
    return None


def test_a_frame_over_the_body_limit_closes_the_socket_with_1009(start_server):
    server = start_server(CHATBOT_MAX_CONTENT_LENGTH="20000")
    ws = connect(server)
    try:
        ws.send(json.dumps({"type": "chat", "session_id": "x", "message": "가" * 30000}))
        assert close_code(ws) == 1009   # message too big: refused while it arrived, never parsed
    finally:
        ws.close()
    # a frame under the limit is read as always
    ws = connect(server)
    try:
        sid = server.new_session()
        assert turn(ws, sid, "가" * 1000 + " @@words=2")[-1]["type"] == "done"
    finally:
        ws.close()


def test_a_key_has_at_most_max_sockets_open_across_workers(start_server, tmp_path):
    path = tmp_path / "shared.sqlite"
    # Two servers on one database stand for the worker processes (or hosts) of one service.
    first = start_server(path, CHATBOT_AUTH="required", CHATBOT_MAX_SOCKETS_PER_KEY="3")
    second = start_server(path, CHATBOT_AUTH="required", CHATBOT_MAX_SOCKETS_PER_KEY="3")
    alice, bob = first.new_key("alice"), first.new_key("bob")
    sockets = [connect(first, alice), connect(second, alice), connect(first, alice)]
    try:
        for server in (first, second):
            with pytest.raises(websocket.WebSocketBadStatusException) as refused:
                connect(server, alice)
            assert refused.value.status_code == 429
            problem = json.loads(refused.value.resp_body)
            assert problem["code"] == "too_many_sockets" and refused.value.resp_headers["retry-after"]
        sockets.append(connect(second, bob))          # another key is not affected
        sockets.pop(0).close()                        # a closed socket frees its place
        sockets.append(wait_for(lambda: _try_connect(second, alice), timeout=10))
        assert sockets[-1] is not None
        sid = second.new_session(alice)
        assert turn(sockets[-1], sid)[-1]["type"] == "done"
    finally:
        for ws in sockets:
            ws.close()


def _try_connect(server, headers):
    try:
        return connect(server, headers)
    except websocket.WebSocketBadStatusException:
        return None


def test_an_idle_socket_is_closed_and_a_live_one_is_pinged(start_server):
    server = start_server(CHATBOT_WS_IDLE_TIMEOUT="2", CHATBOT_WS_PING_SECONDS="0.5")
    ws = connect(server)
    try:
        sid = server.new_session()
        # A turn longer than the idle timeout is not idleness: the next frame right after it is answered.
        assert turn(ws, sid, "@@words=30 @@delay=0.1")[-1]["type"] == "done"
        assert turn(ws, sid)[-1]["type"] == "done"
        ws.settimeout(10)
        started, seen = time.monotonic(), []
        while True:
            frame = ws.recv_frame()
            seen.append(frame.opcode)
            if frame.opcode == websocket.ABNF.OPCODE_PING:
                ws.pong(frame.data)
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                break
        idle = time.monotonic() - started
        assert websocket.ABNF.OPCODE_PING in seen
        assert 1.5 < idle < 8, idle
    finally:
        ws.close()


def test_every_chat_frame_counts_against_the_request_rate(start_server):
    server = start_server(CHATBOT_AUTH="required", CHATBOT_RATE_LIMIT_PER_MINUTE="6")
    alice = server.new_key("alice")
    sid = server.new_session(alice)          # request 1
    ws = connect(server, alice)              # request 2: the handshake
    try:
        answers = [turn(ws, sid)[-1] for _ in range(6)]
    finally:
        ws.close()
    assert [a["type"] for a in answers] == ["done"] * 4 + ["error"] * 2
    assert answers[-1]["code"] == "rate_limited" and answers[-1]["retry_after"] >= 1


def test_a_revoked_key_is_refused_at_its_next_frame(start_server):
    server = start_server(CHATBOT_AUTH="required")
    alice = server.new_key("alice")
    sid = server.new_session(alice)
    ws = connect(server, alice)
    try:
        assert turn(ws, sid)[-1]["type"] == "done"
        conn = db.connect(str(server.db_path))
        try:
            assert store.revoke_api_key(conn, "alice")
        finally:
            conn.close()
        error = turn(ws, sid)[-1]
        assert error["type"] == "error" and error["code"] == "unauthorized"
        assert close_code(ws) == 1008
    finally:
        ws.close()
    stored = server.get(f"/api/sessions/{sid}/messages", server.new_key("alice2"))
    assert stored["code"] == "session_not_found"


def test_sockets_and_their_turns_reach_the_request_log(start_server):
    server = start_server(CHATBOT_AUTH="required")
    alice = server.new_key("alice")
    sid = server.new_session(alice)
    ws = connect(server, alice)
    try:
        turn(ws, sid)
        turn(ws, sid, "again @@words=2")
    finally:
        ws.close()
    wait_for(lambda: '"event": "socket"' in server.output(), timeout=10)
    server.stop()
    records = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    turns = [r for r in records if r.get("event") == "turn"]
    sockets = [r for r in records if r.get("event") == "socket"]
    assert [(t["status"], t["session_id"], t["key"]) for t in turns] == [("complete", sid, "alice")] * 2
    assert len(sockets) == 1
    assert sockets[0]["key"] == "alice" and sockets[0]["turns"] == 2 and sockets[0]["path"] == "/api/chat/ws"
    assert all(isinstance(r["duration_ms"], float) for r in turns + sockets)
    assert alice["Authorization"].split()[1] not in server.output()
