"""Chat turns, framed as one JSON answer or a Server-Sent Events stream;
re-attaching to a reply; stop."""
import json
import time

from flask import Blueprint, Response, current_app, g, request

from . import turns
from .generation import client_watcher
from .models import ChatRequest, parse_body

bp = Blueprint("chat", __name__, url_prefix="/api")

REPLAYED = {"Idempotent-Replayed": "true"}


def start(body, stream):
    """The turn a chat request asks for: (events, replayed)."""
    g.session_id = body.session_id  # for the request log
    key = turns.idempotency_key(request.headers.get("Idempotency-Key"))
    return turns.chat(body, g.owner, key, stream=stream, client_gone=client_watcher(request.environ))


@bp.post("/chat")
def chat():
    events, replayed = start(parse_body(ChatRequest), stream=False)
    return turns.reply_of(events, replayed), 200, REPLAYED if replayed else {}


@bp.post("/chat/stream")
def chat_stream():
    events, replayed = start(parse_body(ChatRequest), stream=True)
    return sse_response(events, replayed)


@bp.get("/sessions/<session_id>/messages/<message_id>/stream")
def resume(session_id, message_id):
    """Re-attach to a reply: what came after position `after`, then live, then its end."""
    g.session_id = session_id
    after = request.args.get("after", request.headers.get("Last-Event-ID", "0"))
    events = turns.attach(session_id, message_id, g.owner, turns.position(after),
                          client_watcher(request.environ))
    return sse_response(events)


def sse_response(events, replayed=False):
    first = turns.first_event(events, replayed)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(REPLAYED if replayed else {})}
    return Response(sse(first, events, current_app.config["SSE_KEEPALIVE"]),
                    mimetype="text/event-stream", headers=headers)


# Clients written for the original backend read `data:` lines only and tell events
# apart by a `type` in that backend's words; they stop at `data: [DONE]`. Our own
# clients read the `event:` names and skip the [DONE] line.
ORIGINAL_TYPES = {"start": "start", "delta": "token", "done": "complete", "error": "error"}
TERMINAL = ("done", "error")


def sse_event(event, data, event_id=None):
    data = {"type": ORIGINAL_TYPES[event], **data}
    if event == "error":
        data["message"] = data["detail"]
    head = f"id: {event_id}\n" if event_id is not None else ""
    frame = f"{head}event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
    if event in TERMINAL:
        frame += "data: [DONE]\n\n"
    return frame.encode("utf-8")


def delta_frame(text, position):
    """sse_event("delta", {"content": text}, position), byte for byte, without
    building a dict per piece: this is the one frame sent per token."""
    return f'id: {position}\nevent: delta\ndata: {{"type": "token", "content": {json.dumps(text, ensure_ascii=False)}}}\n\n'.encode("utf-8")


def sse(first, events, keepalive):
    """Frame a reply's events as Server-Sent Events; ids are positions in the reply.

    Deltas that were waiting together (a busy server falls behind the
    upstream) go out in one write, each still its own event with its own id:
    one system call and one chunk of the response instead of one per delta.
    An `idle` event says nothing more is waiting, so nothing is held back."""
    last_write = time.monotonic()
    held = []
    try:
        kind, value, pos = first
        yield sse_event(kind, value)
        for kind, value, pos in events:
            if kind == "delta":
                held.append(delta_frame(value, pos))
                continue
            if kind == "idle":
                if held:
                    frame = b"".join(held)
                elif time.monotonic() - last_write >= keepalive:
                    frame = b": keep-alive\n\n"
                else:
                    continue
            elif kind == "error":
                frame = b"".join(held) + sse_event("error", {
                    "code": value["code"], "detail": value["detail"],
                    "message_id": (value.get("message") or {}).get("message_id")}, pos)
            else:  # done
                frame = b"".join(held) + sse_event(kind, value, pos)
            held = []
            last_write = time.monotonic()
            yield frame
    finally:
        events.close()  # a client that left: the reply goes on for the grace period, or to its end


@bp.post("/sessions/<session_id>/stop")
def stop(session_id):
    g.session_id = session_id
    turns.stop(session_id, g.owner)
    return {"stopped": True}, 202
