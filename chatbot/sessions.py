"""Sessions: create, list, change, delete; their message history; export and import."""
import base64
import hashlib
import hmac
import json
import os
import re
import struct
from datetime import timezone
from urllib.parse import quote

from flask import Blueprint, current_app, g, request

from . import store
from .access import current_owner
from .db import get_db
from .errors import ApiError, session_not_found
from .models import (Conversation, CreateSession, ExportQuery, MessagesQuery, PatchSession, SessionsQuery,
                     parse_body, parse_query)

bp = Blueprint("sessions", __name__, url_prefix="/api/sessions")

MESSAGES_PAGE = 50   # page size when `before` is given without `limit`


def session_or_404(session_id):
    """The caller's session: every endpoint that takes a session id comes here,
    so another key's session is a 404, the same as one that does not exist."""
    session = store.get_session(get_db(), session_id, current_owner())
    if session is None:
        raise session_not_found(session_id)
    g.session_id = session_id  # for the request log
    return session


@bp.post("")
def create():
    body = parse_body(CreateSession, optional=True)
    try:
        session = store.create_session(get_db(), body.metadata, body.title, body.system_prompt,
                                       owner=current_owner(), max_sessions=current_app.config["MAX_SESSIONS_PER_KEY"])
    except store.SessionQuota:
        raise session_quota() from None
    g.session_id = session["session_id"]
    return session, 201


def session_quota():
    limit = current_app.config["MAX_SESSIONS_PER_KEY"]
    return ApiError(409, "session_quota_exceeded",
                    f"This key has {limit} sessions, as many as it may keep; delete some first.")


@bp.get("")
def list_sessions():
    query = parse_query(SessionsQuery)
    after = open_cursor(query.cursor) if query.cursor else None
    sessions, following = store.list_sessions(get_db(), query.limit, after, owner=current_owner())
    return {"sessions": sessions, "next_cursor": seal_cursor(following) if following else None}


# The cursor holds the list's snapshot and the rank of the last session listed
# (see store.list_sessions). Both are positions in the activity of every key,
# so the cursor is sealed: encrypted (HMAC-SHA256 as a keystream) and
# authenticated with the caller's name, so that it tells nothing of other
# keys' activity and is good for its owner only.
CURSOR = struct.Struct(">QQ")
NONCE_BYTES, TAG_BYTES = 12, 16


def _cursor_key(purpose):
    secret = current_app.extensions.get("cursor_secret")
    if secret is None:
        secret = current_app.extensions["cursor_secret"] = store.server_secret(get_db(), "cursor")
    return hmac.new(secret, purpose, hashlib.sha256).digest()


def _keystream(nonce):
    return hmac.new(_cursor_key(b"encrypt"), nonce, hashlib.sha256).digest()[:CURSOR.size]


def _tag(nonce, sealed):
    return hmac.new(_cursor_key(b"authenticate"), nonce + sealed + current_owner().encode(),
                    hashlib.sha256).digest()[:TAG_BYTES]


def seal_cursor(after):
    nonce = os.urandom(NONCE_BYTES)
    sealed = bytes(a ^ b for a, b in zip(CURSOR.pack(*after), _keystream(nonce)))
    return base64.urlsafe_b64encode(nonce + sealed + _tag(nonce, sealed)).decode().rstrip("=")


def open_cursor(cursor):
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except ValueError:   # bad base64 (binascii.Error is a ValueError)
        raw = b""
    nonce, sealed, tag = raw[:NONCE_BYTES], raw[NONCE_BYTES:-TAG_BYTES], raw[-TAG_BYTES:]
    if len(raw) == NONCE_BYTES + CURSOR.size + TAG_BYTES and hmac.compare_digest(tag, _tag(nonce, sealed)):
        return CURSOR.unpack(bytes(a ^ b for a, b in zip(sealed, _keystream(nonce))))
    raise ApiError(400, "invalid_cursor", "The cursor is not one this server gave to this key; start again"
                                          " without it.")


@bp.get("/<session_id>")
def get(session_id):
    return session_or_404(session_id)


@bp.patch("/<session_id>")
def patch(session_id):
    session_or_404(session_id)
    body = parse_body(PatchSession)
    try:
        return store.update_session(get_db(), session_id, body.changes())
    except store.SessionGone:  # deleted since the check above
        raise session_not_found(session_id) from None


@bp.delete("/<session_id>")
def delete(session_id):
    if not store.delete_session(get_db(), session_id, current_owner()):
        raise session_not_found(session_id)
    return "", 204


@bp.get("/<session_id>/messages")
def messages(session_id):
    session = session_or_404(session_id)
    query = parse_query(MessagesQuery)
    if query.limit is None and query.before is None:
        messages = store.list_messages(get_db(), session_id)
        return {"session_id": session_id, "messages": messages, "has_more": False, "total_count": len(messages)}
    page = store.page_messages(get_db(), session_id, query.limit or MESSAGES_PAGE, query.before)
    if page is None:
        raise ApiError(404, "message_not_found",
                       f"No message with id {query.before!r} in this session (for `before`).")
    messages, has_more = page
    # total_count (the original backend's field) counts the whole session, not the page
    return {"session_id": session_id, "messages": messages, "has_more": has_more,
            "total_count": session["message_count"]}


@bp.get("/<session_id>/export")
def export(session_id):
    query = parse_query(ExportQuery)
    session = session_or_404(session_id)
    document = conversation(session, store.list_messages(get_db(), session_id))
    if query.format == "json":
        data = json.dumps(document, ensure_ascii=False, indent=2).encode("utf-8")
        mimetype = "application/json"
    else:
        data = markdown(document).encode("utf-8")
        mimetype = "text/markdown; charset=utf-8"
    ascii_name, name = download_names(session, {"json": "json", "markdown": "md"}[query.format])
    response = current_app.response_class(data, mimetype=mimetype)
    # filename is for every client (curl -OJ too); filename* (RFC 6266) carries a Korean title.
    extra = {"filename*": "UTF-8''" + quote(name)} if name != ascii_name else {}
    response.headers.set("Content-Disposition", "attachment", filename=ascii_name, **extra)
    return response


def conversation(session, messages):
    """The export document (its schema is models.Conversation)."""
    keys = ("message_id", "role", "content", "created_at", "status", "token_usage", "finish_reason", "error")
    return {
        "format": "chatbot-conversation",
        "version": 1,
        "exported_at": store.now_iso(),
        "session": {k: session[k] for k in ("session_id", "created_at", "last_accessed", "title",
                                              "metadata", "system_prompt")},
        "messages": [{k: m[k] for k in keys} for m in messages],
    }


def markdown(document):
    session = document["session"]
    lines = [f"# {escape_line(session['title'] or 'Conversation')}", "",
             f"- Session: `{session['session_id']}`", f"- Created: {session['created_at']}",
             f"- Exported: {document['exported_at']}"]
    if session["system_prompt"] is not None:
        lines += ["", "System prompt:", "", fenced(session["system_prompt"])]
    for m in document["messages"]:
        note = "" if m["status"] == "complete" else f" ({m['status']})"
        lines += ["", f"## {m['role'].capitalize()}{note}", "", f"*{m['created_at']}*", "", fenced(m["content"])]
    return "\n".join(lines) + "\n"


def fenced(text):
    """Text as a fenced block whose fence is longer than any run of backticks
    in it, so that what someone wrote can neither close the block early nor
    pose as a heading of the transcript: each message stays its own block."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def escape_line(text):
    """A title on one line, with the characters escaped that would make
    Markdown of it (emphasis, links, images, HTML, code)."""
    return re.sub(r"([\\`*_\[\]<>!#])", r"\\\1", " ".join(text.split()))


def download_names(session, extension):
    """(ASCII file name, full file name), made from the title: its words kept, the rest dashes."""
    def name(other_chars):
        stem = re.sub(other_chars, "-", session["title"] or "").strip("-_")[:40].rstrip("-_")
        return f"{stem or 'conversation'}-{session['session_id'][:8]}.{extension}"
    return name(r"[^A-Za-z0-9_]+"), name(r"\W+")


@bp.post("/import")
def import_():
    # An export of a long conversation can outgrow the usual body limit.
    request.max_content_length = current_app.config["IMPORT_MAX_BYTES"]
    body = parse_body(Conversation)
    session = body.session.model_dump(include={"title", "metadata"})
    session["system_prompt"] = body.system_prompt()
    if body.session.created_at:
        session["created_at"] = utc_iso(body.session.created_at)
    messages = [{**m.model_dump(exclude={"message_id", "created_at"}), "created_at": utc_iso(m.created_at),
                 # the usage as it was given: no "estimated": null added
                 "token_usage": m.token_usage and m.token_usage.model_dump(exclude_unset=True)}
                for m in body.history()]
    check_storage_quota(session, messages)
    try:
        imported = store.import_session(get_db(), session, messages, owner=current_owner(),
                                        max_sessions=current_app.config["MAX_SESSIONS_PER_KEY"])
    except store.SessionQuota:
        raise session_quota() from None
    store.checkpoint(get_db())   # the WAL such a write grew goes back to its size limit
    g.session_id = imported["session_id"]
    return imported, 201


def check_storage_quota(session, messages):
    """413 when the import would take the key past CHATBOT_MAX_STORED_BYTES_PER_KEY.
    Checked before writing, outside any transaction (summing what a key has
    stored must not hold the writer)."""
    limit = current_app.config["MAX_STORED_BYTES_PER_KEY"]
    if not limit:
        return
    adding = sum(len(m["content"].encode("utf-8")) for m in messages) + sum(
        len(v.encode("utf-8")) for v in (session["title"], session["system_prompt"]) if v) + len(
        json.dumps(session["metadata"], ensure_ascii=False).encode("utf-8"))
    stored = store.stored_bytes(get_db(), current_owner())
    if stored + adding > limit:
        raise ApiError(413, "storage_quota_exceeded",
                       f"This import ({adding} bytes) would take the key past its {limit} bytes of stored text"
                       f" ({stored} used); delete some sessions first.")


def utc_iso(moment):
    """The contract's time format, for a time given with any offset."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")
