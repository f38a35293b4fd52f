"""GET /api/chat/ws: chat turns over a WebSocket (flask-sock).

A plain blocking loop, as flask-sock intends: receive a frame, start a turn
(or re-attach to a reply), send its events as frames. The same turns and
events as JSON and SSE; only the framing differs. A bad frame gets an error
frame and the socket stays open.
"""
import json

from flask import Blueprint, g
from flask_sock import Sock

from . import turns
from .errors import ApiError
from .models import ChatRequest, checked_text, parse
from .sockets import GuardedSocket, init_blueprint

bp = Blueprint("ws", __name__, url_prefix="/api")
sock = Sock()
init_blueprint(bp)   # frame size, sockets per key, idle timeout (chatbot/sockets.py)
FRAME_TYPES = ("chat", "stop", "resume")


def error_frame(code, detail, **extra):
    return {"type": "error", "code": code, "detail": detail, **extra}


def read_frame(raw):
    """A client frame as a dict with a `type`, or raise ApiError."""
    try:
        frame = json.loads(raw)
    except (TypeError, ValueError, RecursionError):  # RecursionError: nested too deep to parse
        raise ApiError(400, "invalid_json", "The frame is not valid JSON.") from None
    if not isinstance(frame, dict) or frame.get("type") not in FRAME_TYPES:
        raise ApiError(422, "validation_error",
                       'A frame is a JSON object whose "type" is "chat", "stop" or "resume".')
    return checked_text(frame)


def events_for(frame, client_gone):
    """The events a chat or resume frame asks for, and the session they belong to."""
    if frame["type"] == "resume":
        missing = [f for f in ("session_id", "message_id") if not isinstance(frame.get(f), str)]
        if missing:
            raise ApiError(422, "validation_error", "A resume frame names the reply to follow.",
                           errors=[{"field": f, "detail": "a string is required"} for f in missing])
        after = turns.position(frame.get("after", 0))
        return turns.attach(frame["session_id"], frame["message_id"], g.owner, after, client_gone), \
            frame["session_id"]
    fields = {k: v for k, v in frame.items() if k not in ("type", "idempotency_key")}
    body = parse(ChatRequest, fields)
    key = turns.idempotency_key(frame.get("idempotency_key"))
    events, _ = turns.chat(body, g.owner, key, client_gone=client_gone)
    return events, body.session_id


@sock.route("/chat/ws", bp=bp)
def chat_ws(raw_ws):
    ws = GuardedSocket(raw_ws)   # the socket's limits and log lines (chatbot/sockets.py)

    def send(frame):
        ws.send(json.dumps(frame, ensure_ascii=False))

    try:
        while True:
            raw = ws.next_frame()
            if raw is None:
                return   # idle for too long: closed
            try:
                frame = read_frame(raw)
                ws.check_frame(frame)
                if frame["type"] == "stop":
                    raise ApiError(409, "nothing_to_stop", "No reply is being generated on this socket.")
                events, session_id = events_for(frame, lambda: not ws.connected)
            except (ApiError, turns.TurnRefused) as e:
                send(error_frame(e.code, e.detail, **ws.error_extra(e)))
                if ws.closed_by == "key_revoked":
                    ws.refuse(e)
                    return
                continue
            relay(ws, send, ws.logged_turn(events, frame["type"], session_id), session_id)
    finally:
        ws.log_socket()


def relay(ws, send, events, session_id):
    """Send one reply's events; meanwhile answer the frames the client sends."""
    try:
        for kind, value, pos in events:
            if kind == "start":
                send({"type": "start", **value})
            elif kind == "delta":
                send({"type": "delta", "content": value, "id": pos})
            elif kind == "done":
                send({"type": "done", "message": value, "finish_reason": value["finish_reason"], "id": pos})
                return
            elif kind == "error":
                send(error_frame(value["code"], value["detail"], id=pos,
                                 message_id=(value.get("message") or {}).get("message_id")))
                return
            raw = ws.receive(timeout=0)
            if raw is not None:
                answer_during_turn(raw, send, session_id)
    finally:
        events.close()  # socket closed mid-answer: the reply goes on for the grace period


def answer_during_turn(raw, send, session_id):
    try:
        frame = read_frame(raw)
        if frame["type"] != "stop":
            raise ApiError(409, "generation_in_progress", "Wait for the current reply, or stop it, before the next.")
        turns.stop(session_id, g.owner)
    except (ApiError, turns.TurnRefused) as e:
        send(error_frame(e.code, e.detail))
