"""Chat turns, framed as one JSON answer or a Server-Sent Events stream; stop."""
import itertools
import json
import time

from flask import Blueprint, Response, current_app, request

from . import context, store
from .access import per_key_limit, too_many_streams
from .db import get_db
from .errors import ApiError
from .generation import INTERNAL_ERROR, Turn, client_watcher
from .models import ChatRequest, parse_body
from .sessions import session_or_404

bp = Blueprint("chat", __name__, url_prefix="/api")


def start_turn(body, stream, client_gone=None):
    """Everything before the upstream is asked: checks, the stored user message, the context.

    With body.regenerate, no new message: the session's last reply is replaced
    by a new one made from the same context (store.begin_turn)."""
    cfg = current_app.config
    conn = get_db()
    session = session_or_404(body.session_id)
    # The session's own system prompt, when it has one, replaces the default ("" means none).
    system_prompt = session["system_prompt"]
    if system_prompt is None:
        system_prompt = cfg["SYSTEM_PROMPT"]
    budget = cfg["CONTEXT_MAX_TOKENS"]
    text = store.last_user_message(conn, body.session_id) if body.regenerate else body.message
    if text is None:
        raise nothing_to_regenerate()
    if not context.fits(system_prompt, text, budget):
        field = "regenerate" if body.regenerate else "message"
        raise ApiError(422, "validation_error", "The message does not fit the context budget.",
                       errors=[{"field": field, "detail": f"with the system prompt, longer than the context"
                                                          f" budget of {budget} tokens"}])
    try:
        ids = store.begin_turn(conn, body.session_id, None if body.regenerate else body.message,
                               per_key_limit("MAX_STREAMS_PER_KEY"))
    except store.NothingToRegenerate:
        raise nothing_to_regenerate() from None
    except store.TooManyTurns:
        raise too_many_streams() from None
    if ids is None:
        raise ApiError(409, "generation_in_progress",
                       "A reply is still being generated for this session; wait for it or stop it.")
    try:
        messages = context.build(system_prompt, store.history(conn, body.session_id), budget)
        return Turn(cfg, current_app.extensions["upstream"], body.session_id, *ids, messages,
                    body.options(), stream=stream, client_gone=client_gone)
    except BaseException:
        # Never leave the session marked as generating a reply nobody generates.
        store.finish_turn(conn, body.session_id, ids[1], "", "failed", None, None, INTERNAL_ERROR)
        raise


def nothing_to_regenerate():
    return ApiError(409, "nothing_to_regenerate", "This session has no reply to regenerate.")


def turn_error(problem):
    return ApiError(problem["status"], problem["code"], problem["detail"],
                    message_id=problem["message"]["message_id"])


@bp.post("/chat")
def chat():
    body = parse_body(ChatRequest)
    turn = start_turn(body, stream=False, client_gone=client_watcher(request.environ))
    for kind, value in turn.events():
        if kind == "done":
            return value
        if kind == "error":
            raise turn_error(value)


@bp.post("/chat/stream")
def chat_stream():
    body = parse_body(ChatRequest)
    turn = start_turn(body, stream=True, client_gone=client_watcher(request.environ))
    events = turn.events()
    # The upstream is asked before the response starts, so that a server that
    # cannot be reached or refuses is a plain problem+json answer, not a stream.
    first = next(e for e in events if e[0] != "idle")
    if first[0] == "error":
        raise turn_error(first[1])
    return Response(sse(first, events, current_app.config["SSE_KEEPALIVE"]),
                    mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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


def sse(first, events, keepalive):
    """Frame a turn's events as Server-Sent Events."""
    last_write, deltas = time.monotonic(), 0
    try:
        for kind, value in itertools.chain([first], events):
            if kind == "idle":
                if time.monotonic() - last_write < keepalive:
                    continue
                frame = b": keep-alive\n\n"
            elif kind == "delta":
                deltas += 1
                frame = sse_event("delta", {"content": value}, deltas)
            elif kind == "error":
                frame = sse_event("error", {"code": value["code"], "detail": value["detail"],
                                            "message_id": value["message"]["message_id"]})
            else:  # start, done
                frame = sse_event(kind, value)
            last_write = time.monotonic()
            yield frame
    finally:
        events.close()  # a client that left: the turn closes the upstream and stores the text


@bp.post("/sessions/<session_id>/stop")
def stop(session_id):
    session_or_404(session_id)
    if not store.request_stop(get_db(), session_id):
        raise ApiError(409, "nothing_to_stop", "No reply is being generated for this session.")
    return {"stopped": True}, 202
