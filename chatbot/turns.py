"""Starting a turn and finding a reply to follow, for every transport.

`chat()` runs the checks, stores the user message, builds the context and
starts the reply's producer (chatbot/generation.py), or, for an idempotency
key seen before, follows the reply that key started. `attach()` follows a
reply from a position (re-attach). Both return the reply's events for one
client. They raise `TurnRefused`, a domain error: errors.py turns it into a
problem+json answer, ws.py into an error frame.
"""
import hashlib
import json

from flask import current_app

from . import context, metrics, store
from .access import per_key_limit
from .db import close_db, get_db
from .generation import INTERNAL_ERROR, MONITOR, Turn, follow_stored, lease_owner


class TurnRefused(Exception):
    """A turn that cannot start, or a reply that cannot be followed.

    `code` is the contract's error code; errors.py knows the HTTP status of
    each (`status` overrides it for an upstream's error)."""

    def __init__(self, code, detail, *, status=None, errors=None, headers=None, **extra):
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, status
        self.errors, self.headers, self.extra = errors, headers or {}, extra


STREAM_RETRY_AFTER = 5   # seconds; a running reply may end any moment, or in minutes


def session_of(conn, session_id, owner):
    session = store.get_session(conn, session_id, owner)
    if session is None:
        raise TurnRefused("session_not_found", f"No session with id {session_id!r}.")
    return session


def idempotency_key(raw):
    """The key of an Idempotency-Key header (or frame field), or None without one."""
    if raw is None:
        return None
    if not isinstance(raw, str):  # a WebSocket frame's field may be any JSON value
        raise TurnRefused("invalid_idempotency_key", "An Idempotency-Key is a string.")
    key = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    if not 1 <= len(key) <= 255 or not all("!" <= c <= "~" for c in key):
        raise TurnRefused("invalid_idempotency_key",
                          "An Idempotency-Key is 1 to 255 visible ASCII characters (surrounding quotes aside).")
    return key


def fingerprint(body, upstream_messages=None):
    """What makes two requests with one idempotency key the same request (with
    the OpenAI door, the context its client sent too)."""
    fields = body.model_dump(include={"session_id", "message", "regenerate", "max_new_tokens", "temperature",
                                      "do_sample"})
    if upstream_messages is not None:
        fields["upstream_messages"] = upstream_messages
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def chat(body, owner, key=None, *, stream=True, client_gone=None, upstream_messages=None):
    """Start the turn `body` asks for; returns (events, replayed).

    With an idempotency key already used for the same request, nothing new
    starts: the events are those of the reply it started (replayed=True).
    `upstream_messages`, when given, is the context sent upstream instead of
    the session's history (the OpenAI door: its client owns its context)."""
    cfg, conn = current_app.config, get_db()
    claim = None
    if key is not None:
        claim = (owner, key, fingerprint(body, upstream_messages))
        earlier = store.idempotent_turn(conn, owner, key, cfg["IDEMPOTENCY_TTL"])
        if earlier:
            return _replay(earlier, claim, owner, client_gone), True
    session = session_of(conn, body.session_id, owner)
    # The session's own system prompt, when it has one, replaces the default ("" means none).
    system_prompt = session["system_prompt"]
    if system_prompt is None:
        system_prompt = cfg["SYSTEM_PROMPT"]
    budget = cfg["CONTEXT_MAX_TOKENS"]
    text = store.last_user_message(conn, body.session_id) if body.regenerate else body.message
    if text is None:
        raise nothing_to_regenerate()
    if upstream_messages is not None:
        if not context.fits_messages(upstream_messages, budget):
            raise TurnRefused("context_length_exceeded", f"The last message, with the system messages, is longer"
                                                         f" than the context budget of {budget} tokens.")
    elif not context.fits(system_prompt, text, budget):
        field = "regenerate" if body.regenerate else "message"
        raise TurnRefused("validation_error", "The message does not fit the context budget.",
                          errors=[{"field": field, "detail": f"with the system prompt, longer than the context"
                                                             f" budget of {budget} tokens"}])
    try:
        ids = store.begin_turn(conn, body.session_id, None if body.regenerate else body.message,
                               per_key_limit("MAX_STREAMS_PER_KEY"), lease_owner=lease_owner(),
                               lease_seconds=float(cfg["LEASE_SECONDS"]), idempotency=claim)
    except store.NothingToRegenerate:
        raise nothing_to_regenerate() from None
    except store.TooManyTurns:
        raise TurnRefused("too_many_streams", f"This key already has {cfg['MAX_STREAMS_PER_KEY']} replies"
                          " being generated; wait for one to end.",
                          headers={"Retry-After": str(STREAM_RETRY_AFTER)}) from None
    except store.SessionGone:
        raise TurnRefused("session_not_found", f"No session with id {body.session_id!r}.") from None
    if ids is None:
        raise TurnRefused("generation_in_progress",
                          "A reply is still being generated for this session; wait for it or stop it.")
    if "existing" in ids:  # the same key won a race with us a moment ago
        return _replay(ids["existing"], claim, owner, client_gone), True
    try:
        if upstream_messages is None:
            messages = context.build(system_prompt, store.history(conn, body.session_id), budget)
        else:
            messages = context.trim(upstream_messages, budget)
        turn = Turn(cfg, current_app.extensions["upstream"], body.session_id, ids, messages, body.options(),
                    stream=stream, keep_going=body.on_disconnect == "continue")
        close_db()   # the request's connection goes back to the pool while the reply streams
        # A stream is opened upstream in this thread, which waits for it anyway
        # (first_event) and then reads it; a whole answer by a producer thread.
        turn.start(open_here=stream)
    except BaseException:
        # Never leave the session marked as generating a reply nobody generates.
        store.finish_turn(get_db(), body.session_id, ids["reply_id"], ids["fence"], "", "failed", None, None,
                          INTERNAL_ERROR)
        raise
    return turn.follow(0, client_gone), False


def nothing_to_regenerate():
    return TurnRefused("nothing_to_regenerate", "This session has no reply to regenerate.")


def _replay(earlier, claim, owner, client_gone):
    if earlier["fingerprint"] != claim[2]:
        raise TurnRefused("idempotency_key_reused",
                          "This Idempotency-Key was used for a different request; use a new key for a new one.")
    events = _follow(earlier["session_id"], earlier["message_id"], owner, 0, client_gone)
    metrics.idempotent_replay()
    return events


def attach(session_id, message_id, owner, after=0, client_gone=None):
    """Re-attach: the events of a reply from position `after` on."""
    events = _follow(session_id, message_id, owner, after, client_gone)
    metrics.resumed()
    return events


def _follow(session_id, message_id, owner, after, client_gone):
    """The events of a reply from position `after` on: live when it runs in
    this process, else from the database (another process or host, or over)."""
    conn = get_db()
    session_of(conn, session_id, owner)
    message = store.get_message(conn, message_id)
    if message is None or message["session_id"] != session_id or message["role"] != "assistant":
        raise TurnRefused("message_not_found", f"No reply with id {message_id!r} in this session.")
    turn = MONITOR.get(message_id)
    if turn is not None:
        close_db()   # while the reply streams, the request holds no connection
        return turn.follow(after, client_gone, announce=True)
    ids = {"session_id": session_id, "user_message_id": store.question_of(conn, message_id),
           "message_id": message_id}
    close_db()
    return follow_stored(current_app.config, {"ids": ids}, after, client_gone)


def position(text):
    """A re-attach position (`?after`, Last-Event-ID, a frame's `after`): a non-negative integer."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if isinstance(text, str) and text.isascii() and text.isdigit():
        return int(text)
    raise TurnRefused("invalid_position", "A position is a non-negative integer: the length of the text"
                                          " already received, in code points.")


def stop(session_id, owner):
    """Stop the session's running reply, wherever it is produced."""
    conn = get_db()
    session_of(conn, session_id, owner)
    if not store.request_stop(conn, session_id):
        session_of(conn, session_id, owner)  # deleted meanwhile: 404, not "nothing to stop"
        raise TurnRefused("nothing_to_stop", "No reply is being generated for this session.")
    turn = MONITOR.for_session(session_id)
    if turn is not None:  # produced here: no need to wait for the monitor's next look
        turn.end("incomplete", "stopped")


def reply_of(events, replayed=False):
    """The stored reply at the end of a reply's events (a whole answer), or its refusal."""
    for kind, value, _ in events:
        if kind == "done":
            return value
        if kind == "error":
            raise failed(value, replayed)
    raise TurnRefused("client_gone", "The client disconnected.", status=400)


def first_event(events, replayed=False):
    """The first event of a stream (start), or its refusal. The upstream is
    asked before a stream's response starts, so that one that cannot be
    reached or refuses is a plain error answer, not a stream."""
    first = next((e for e in events if e[0] != "idle"), None)
    if first is None:
        raise TurnRefused("client_gone", "The client disconnected.", status=400)
    if first[0] == "error":
        events.close()
        raise failed(first[1], replayed)
    return first


def failed(problem, replayed=False):
    """The turn's error event as a refusal (an upstream that failed before the stream began)."""
    return TurnRefused(problem["code"], problem["detail"], status=problem.get("status", 502),
                       message_id=problem.get("message", {}).get("message_id"),
                       headers={"Idempotent-Replayed": "true"} if replayed else None)
