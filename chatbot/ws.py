"""GET /api/chat/ws: chat turns over a WebSocket (flask-sock).

A plain blocking loop, as flask-sock intends: receive a frame, run the turn,
send its events as frames. The same Turn as JSON and SSE; only the framing
differs. A bad frame gets an error frame and the socket stays open.
"""
import json

from flask import Blueprint
from flask_sock import Sock

from .chat import start_turn
from .errors import ApiError
from .models import ChatRequest, checked_text, parse

bp = Blueprint("ws", __name__, url_prefix="/api")
sock = Sock()


def error_frame(code, detail, **extra):
    return {"type": "error", "code": code, "detail": detail, **extra}


def read_frame(raw):
    """A client frame as a dict with a `type`, or raise ApiError."""
    try:
        frame = json.loads(raw)
    except (TypeError, ValueError, RecursionError):  # RecursionError: nested too deep to parse
        raise ApiError(400, "invalid_json", "The frame is not valid JSON.") from None
    if not isinstance(frame, dict) or frame.get("type") not in ("chat", "stop"):
        raise ApiError(422, "validation_error", 'A frame is a JSON object whose "type" is "chat" or "stop".')
    return checked_text(frame)


@sock.route("/chat/ws", bp=bp)
def chat_ws(ws):
    def send(frame):
        ws.send(json.dumps(frame, ensure_ascii=False))

    while True:
        try:
            frame = read_frame(ws.receive())
            if frame["type"] == "stop":
                raise ApiError(409, "nothing_to_stop", "No reply is being generated on this socket.")
            body = parse(ChatRequest, {k: v for k, v in frame.items() if k != "type"})
            turn = start_turn(body, stream=True, client_gone=lambda: not ws.connected)
        except ApiError as e:
            send(error_frame(e.code, e.detail, **({"errors": e.errors} if e.errors else {})))
            continue
        relay(ws, send, turn)


def relay(ws, send, turn):
    """Send one turn's events; meanwhile answer the frames the client sends."""
    events = turn.events()
    try:
        for kind, value in events:
            if kind == "start":
                send({"type": "start", **value})
            elif kind == "delta":
                send({"type": "delta", "content": value})
            elif kind == "done":
                send({"type": "done", "message": value, "finish_reason": value["finish_reason"]})
                return
            elif kind == "error":
                send(error_frame(value["code"], value["detail"], message_id=value["message"]["message_id"]))
                return
            raw = ws.receive(timeout=0)
            if raw is not None:
                answer_during_turn(raw, send, turn)
    finally:
        events.close()  # socket closed mid-answer: the turn keeps the text as incomplete


def answer_during_turn(raw, send, turn):
    try:
        frame = read_frame(raw)
    except ApiError as e:
        send(error_frame(e.code, e.detail))
        return
    if frame["type"] == "stop":
        turn.stop.set()
    else:
        send(error_frame("generation_in_progress", "Wait for the current reply, or stop it, before the next."))
