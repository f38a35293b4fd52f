"""Sessions and messages: every SQL statement of the service lives here.

Functions take an open connection (see db.connect) and return plain dicts.
Write transactions are short and never span a call to the upstream.
"""
import json
import math
import os
import sqlite3
import threading
import time
import unicodedata
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

HEARTBEAT_SECONDS = 5.0   # how often a running generation refreshes its marker and saves its text
STALE_SECONDS = 20.0      # a marker not refreshed for this long is abandoned
TITLE_CHARS = 40          # length of a title made from the first message, in characters


class NothingToRegenerate(LookupError):
    """A regenerate request for a session with no reply after its last user message."""


# SQLite has one writer at a time. Threads of one process queue for it here, in
# order, instead of in SQLite's busy handler, which polls with sleeps and lets a
# crowd of hundreds of streams starve some of them past the busy timeout.
_writer = threading.Lock()


@contextmanager
def transaction(db):
    """BEGIN IMMEDIATE ... COMMIT: take the write lock up front, so a
    read-then-write cannot be overtaken by another process."""
    with _writer:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def now_iso():
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_id():
    return str(uuid.uuid4())


def make_title(text, limit=TITLE_CHARS):
    """A short title made from a message.

    Whitespace is collapsed; length is counted in characters, not bytes (a
    Hangul syllable is 3 bytes). A longer text is cut on the last space in
    the second half of the limit (Korean and English both separate words with
    spaces), else between characters (a long word, or text without spaces),
    and ends with an ellipsis.
    """
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if len(text) <= limit:
        return text
    cut = limit - 1  # room for the ellipsis
    space = text.rfind(" ", 0, cut + 1)
    if space >= limit // 2:
        cut = space
    else:  # do not separate a character from its combining marks or a joined emoji
        while cut > 0 and (unicodedata.combining(text[cut]) or text[cut] in "\u200d\ufe0f"):
            cut -= 1
    head = text[:cut]
    return (head.rstrip(" ,.;:!?-\u200d") or head) + "…"


SESSION_COLUMNS = ("s.*, (SELECT count(*) FROM messages m WHERE m.session_id = s.session_id"
                   " AND m.status != 'pending') AS message_count")
SESSION_SELECT = f"SELECT {SESSION_COLUMNS} FROM sessions s"


def _session(row):
    return {
        "session_id": row["session_id"],
        "created_at": row["created_at"],
        "last_accessed": row["last_accessed"],
        "title": row["title"],
        "metadata": json.loads(row["metadata"]),
        "system_prompt": row["system_prompt"],   # None: the configured default
        "message_count": row["message_count"],
    }


def message_dict(row):
    return {
        "message_id": row["message_id"],
        "session_id": row["session_id"],
        "role": row["role"],
        "content": row["content"],
        "created_at": row["created_at"],
        "status": row["status"],
        "token_usage": json.loads(row["token_usage"]) if row["token_usage"] else None,
        "finish_reason": row["finish_reason"],
        "error": json.loads(row["error"]) if row["error"] else None,
    }


def _touch(db, session_id, now):
    """Record an activity of the session (inside a transaction): it moves to the top of the list."""
    seq = db.execute("INSERT INTO session_activity (session_id, at) VALUES (?, ?)",
                     (session_id, now)).lastrowid
    db.execute("UPDATE sessions SET last_accessed = ?, activity_seq = ? WHERE session_id = ?",
               (now, seq, session_id))


def create_session(db, metadata, title=None, system_prompt=None, created_at=None, messages=(), *, owner):
    """A new session of `owner`; `messages` (for an import) are stored with it in the same transaction."""
    session_id, now = new_id(), now_iso()
    with transaction(db):
        db.execute(
            "INSERT INTO sessions (session_id, created_at, last_accessed, metadata, title, system_prompt, owner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (session_id, created_at or now, now, json.dumps(metadata, ensure_ascii=False), title,
             system_prompt, owner),
        )
        for m in messages:
            db.execute(
                "INSERT INTO messages (message_id, session_id, role, content, created_at, status,"
                " token_usage, finish_reason, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (new_id(), session_id, m["role"], m["content"], m["created_at"], m["status"],
                 json.dumps(m["token_usage"]) if m.get("token_usage") else None, m.get("finish_reason"),
                 json.dumps(m["error"], ensure_ascii=False) if m.get("error") else None),
            )
        _touch(db, session_id, now)
    return get_session(db, session_id, owner)


def get_session(db, session_id, owner):
    """The session, or None when there is none with that id *for this owner*:
    another owner's session is not found, exactly like one that does not exist."""
    row = db.execute(SESSION_SELECT + " WHERE s.session_id = ? AND s.owner = ?", (session_id, owner)).fetchone()
    return _session(row) if row else None


def _reread(db, session_id):
    """A session just changed by a caller that has checked its owner."""
    return _session(db.execute(SESSION_SELECT + " WHERE s.session_id = ?", (session_id,)).fetchone())


def list_sessions(db, limit, after=None, *, owner):
    """A page of `owner`'s sessions, most recently active first: (sessions, where the next page starts).

    Sessions are ranked by their latest activity seq as it stood at a snapshot:
    the first page takes the newest activity as its snapshot; `after` is
    (snapshot, rank of the last session listed) from the page before. A session
    active since the snapshot keeps its rank of then, so paging lists every
    session once, skipping none, however the order moves meanwhile; sessions
    created after the snapshot have no rank and show up on a new first page.
    """
    if after is None:
        (snapshot,) = db.execute("SELECT coalesce(max(seq), 0) FROM session_activity").fetchone()
        after = (snapshot, snapshot + 1)
    snapshot, before_rank = after
    # Two kinds of candidates, each found through the activity_seq index: sessions
    # not active since the snapshot (ranked by their activity_seq), and the few
    # active since (ranked by their latest activity up to the snapshot; NULL,
    # so left out, for sessions created after it). Messages are counted only
    # for the page.
    rows = db.execute(
        "WITH page AS (SELECT session_id, list_rank FROM ("
        " SELECT * FROM (SELECT session_id, activity_seq AS list_rank FROM sessions"
        "  WHERE owner = :owner AND activity_seq < :before ORDER BY activity_seq DESC LIMIT :n)"
        " UNION ALL"
        " SELECT * FROM (SELECT session_id, (SELECT max(a.seq) FROM session_activity a"
        "  WHERE a.session_id = moved.session_id AND a.seq <= :snapshot) AS list_rank"
        "  FROM sessions moved WHERE owner = :owner AND activity_seq > :snapshot) WHERE list_rank < :before"
        ") ORDER BY list_rank DESC LIMIT :n)"
        f" SELECT {SESSION_COLUMNS}, page.list_rank FROM sessions s JOIN page USING (session_id)"
        " ORDER BY page.list_rank DESC",
        {"snapshot": snapshot, "before": before_rank, "n": limit + 1, "owner": owner},
    ).fetchall()
    following = (snapshot, rows[limit - 1]["list_rank"]) if len(rows) > limit else None
    return [_session(r) for r in rows[:limit]], following


def update_session(db, session_id, changes):
    """Change title, metadata and/or system_prompt. A title of None goes back to
    the one made from the first message; a system_prompt of None to the default."""
    columns = {k: v for k, v in changes.items() if k in ("title", "metadata", "system_prompt")}
    if "metadata" in columns:
        columns["metadata"] = json.dumps(columns["metadata"], ensure_ascii=False)
    with transaction(db):
        if "title" in columns and columns["title"] is None:
            first = db.execute("SELECT content FROM messages WHERE session_id = ? AND role = 'user'"
                               " ORDER BY seq LIMIT 1", (session_id,)).fetchone()
            columns["title"] = make_title(first["content"]) if first else None
        if columns:
            db.execute(f"UPDATE sessions SET {', '.join(f'{k} = ?' for k in columns)} WHERE session_id = ?",
                       (*columns.values(), session_id))
        _touch(db, session_id, now_iso())
    return _reread(db, session_id)


def import_session(db, session, messages, *, owner):
    """A new session (new id) holding an exported conversation: messages keep
    their order, role, content, status, times and usage, under new ids."""
    title = session.get("title")
    if title is None:
        title = next((make_title(m["content"]) for m in messages if m["role"] == "user"), None)
    return create_session(db, session.get("metadata") or {}, title, session.get("system_prompt"),
                          session.get("created_at"), messages, owner=owner)


def delete_session(db, session_id, owner):
    with transaction(db):
        return db.execute("DELETE FROM sessions WHERE session_id = ? AND owner = ?",
                          (session_id, owner)).rowcount > 0


def list_messages(db, session_id):
    rows = db.execute(
        "SELECT * FROM messages WHERE session_id = ? AND status != 'pending' ORDER BY seq",
        (session_id,),
    )
    return [message_dict(r) for r in rows]


def page_messages(db, session_id, limit, before=None):
    """At most `limit` messages just before message `before` (or the latest),
    oldest first: (messages, has_more). None when `before` is not in the session."""
    bound = ""
    params = [session_id]
    if before is not None:
        row = db.execute("SELECT seq FROM messages WHERE message_id = ? AND session_id = ?",
                         (before, session_id)).fetchone()
        if row is None:
            return None
        bound = " AND seq < ?"
        params.append(row["seq"])
    rows = db.execute(
        f"SELECT * FROM messages WHERE session_id = ? AND status != 'pending'{bound} ORDER BY seq DESC LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    return [message_dict(r) for r in reversed(rows[:limit])], len(rows) > limit


def get_message(db, message_id):
    row = db.execute("SELECT * FROM messages WHERE message_id = ?", (message_id,)).fetchone()
    return message_dict(row) if row else None


def history(db, session_id):
    """Earlier turns for the context: user messages and replies that have text."""
    rows = db.execute(
        "SELECT role, content FROM messages WHERE session_id = ? AND status != 'pending'"
        " AND content != '' ORDER BY seq",
        (session_id,),
    )
    return [{"role": r["role"], "content": r["content"]} for r in rows]


def last_user_message(db, session_id):
    row = db.execute("SELECT content FROM messages WHERE session_id = ? AND role = 'user'"
                     " ORDER BY seq DESC LIMIT 1", (session_id,)).fetchone()
    return row["content"] if row else None


def _insert_message(db, session_id, role, content, status, now):
    message_id = new_id()
    db.execute(
        "INSERT INTO messages (message_id, session_id, role, content, created_at, status)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (message_id, session_id, role, content, now, status),
    )
    return message_id


class TooManyTurns(Exception):
    """The session's owner already has as many replies running as it may."""


def begin_turn(db, session_id, user_text=None, max_per_owner=0):
    """Store the user message and a pending reply, and take the session's marker.

    With user_text None, regenerate instead: the reply after the last user
    message is deleted (not hidden: it leaves history and later contexts) and
    the pending reply answers that user message again; NothingToRegenerate
    when there is no such reply.

    One short IMMEDIATE transaction, so two workers cannot both take the marker,
    nor together exceed the owner's limit of running replies (0: no limit).
    Returns (user_message_id, reply_id), or None when another reply is running
    in this session; raises TooManyTurns when the owner is at its limit.
    """
    with transaction(db):
        row = db.execute(
            "SELECT generating_message_id, generating_pid, heartbeat, owner FROM sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row["generating_message_id"]:
            if not _abandoned(row):
                return None
            _recover(db, session_id, row["generating_message_id"])
        if max_per_owner and running_turns(db, row["owner"]) >= max_per_owner:
            raise TooManyTurns(row["owner"])  # rolls the transaction back
        now = now_iso()
        if user_text is None:
            user_id = _drop_last_reply(db, session_id)
        else:
            user_id = _insert_message(db, session_id, "user", user_text, "complete", now)
            db.execute("UPDATE sessions SET title = ? WHERE session_id = ? AND title IS NULL",
                       (make_title(user_text), session_id))
        reply_id = _insert_message(db, session_id, "assistant", "", "pending", now)
        db.execute(
            "UPDATE sessions SET generating_message_id = ?, generating_pid = ?, heartbeat = ?,"
            " stop_requested = 0 WHERE session_id = ?",
            (reply_id, os.getpid(), time.time(), session_id),
        )
        _touch(db, session_id, now)
    return user_id, reply_id


def _drop_last_reply(db, session_id):
    """Delete the replies after the last user message (normally one); return that message's id."""
    last = db.execute("SELECT seq, message_id FROM messages WHERE session_id = ? AND role = 'user'"
                      " ORDER BY seq DESC LIMIT 1", (session_id,)).fetchone()
    if last is None or not db.execute(
        "DELETE FROM messages WHERE session_id = ? AND role = 'assistant' AND seq > ?",
        (session_id, last["seq"]),
    ).rowcount:
        raise NothingToRegenerate(session_id)
    return last["message_id"]


def running_turns(db, owner):
    """How many replies of this owner are being generated (abandoned markers excluded)."""
    (count,) = db.execute(
        "SELECT count(*) FROM sessions WHERE owner = ? AND generating_message_id IS NOT NULL"
        " AND heartbeat >= ?",
        (owner, time.time() - STALE_SECONDS),
    ).fetchone()
    return count


def heartbeat(db, replies):
    """Refresh the markers and save the partial text of running replies, given
    as (session_id, reply_id, text), for all of a process's turns at once.

    Two statements whatever the number of replies: each statement step
    re-takes Python's GIL, and with hundreds of busy streams in the process
    every re-take is slow while the database's write lock is held.
    """
    marks = ",".join("?" * len(replies))
    cases = " ".join("WHEN ? THEN ?" for _ in replies)
    with transaction(db):
        db.execute(f"UPDATE messages SET content = CASE message_id {cases} END"
                   f" WHERE status = 'pending' AND message_id IN ({marks})",
                   [v for _, reply_id, text in replies for v in (reply_id, text)]
                   + [reply_id for _, reply_id, _ in replies])
        db.execute(f"UPDATE sessions SET heartbeat = ? WHERE generating_message_id IN ({marks})",
                   [time.time()] + [reply_id for _, reply_id, _ in replies])


def stop_requests(db, session_ids):
    """Which of these sessions have been asked to stop."""
    marks = ",".join("?" * len(session_ids))
    rows = db.execute(f"SELECT session_id FROM sessions WHERE stop_requested = 1 AND session_id IN ({marks})",
                      list(session_ids))
    return {row[0] for row in rows}


def request_stop(db, session_id):
    """Ask the worker generating this session's reply to stop. False if none runs."""
    with transaction(db):
        return db.execute(
            "UPDATE sessions SET stop_requested = 1 WHERE session_id = ? AND generating_message_id IS NOT NULL",
            (session_id,),
        ).rowcount > 0


def finish_turn(db, session_id, reply_id, content, status, token_usage, finish_reason, error=None):
    """Store the final reply and clear the marker, in one transaction."""
    with transaction(db):
        db.execute(
            "UPDATE messages SET content = ?, status = ?, token_usage = ?, finish_reason = ?, error = ?"
            " WHERE message_id = ?",
            (content, status, json.dumps(token_usage) if token_usage else None, finish_reason,
             json.dumps(error, ensure_ascii=False) if error else None, reply_id),
        )
        db.execute(
            "UPDATE sessions SET generating_message_id = NULL, generating_pid = NULL, heartbeat = NULL,"
            " stop_requested = 0 WHERE session_id = ? AND generating_message_id = ?",
            (session_id, reply_id),
        )
    return get_message(db, reply_id)


def is_busy(error):
    """Whether a sqlite3.OperationalError says another writer holds the database."""
    return "locked" in str(error) or "busy" in str(error)


def when_not_busy(write, *args, seconds=60):
    """Call write(*args), again while SQLite says the database is locked.

    For the writes that must not be lost (the final reply, which also clears
    the marker): another process may hold the write lock past busy_timeout.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return write(*args)
        except sqlite3.OperationalError as e:
            if not is_busy(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker not yet reaped by gunicorn is a zombie: dead for us
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _abandoned(row):
    return (row["heartbeat"] or 0) < time.time() - STALE_SECONDS or not _pid_alive(row["generating_pid"])


def _recover(db, session_id, reply_id):
    """Close a reply whose worker died: keep the text it had saved."""
    db.execute(
        "UPDATE messages SET status = CASE WHEN content = '' THEN 'failed' ELSE 'incomplete' END,"
        " error = ? WHERE message_id = ? AND status = 'pending'",
        (json.dumps({"code": "worker_lost", "detail": "The worker generating this reply stopped."}),
         reply_id),
    )
    db.execute(
        "UPDATE sessions SET generating_message_id = NULL, generating_pid = NULL, heartbeat = NULL,"
        " stop_requested = 0 WHERE session_id = ?",
        (session_id,),
    )


def recover_dead_generations(db, pid=None):
    """Release markers of dead workers (all abandoned ones, or those of `pid`).

    Called on start-up and by gunicorn's master when a worker exits, so a killed
    worker's session accepts a new chat at once.
    """
    rows = db.execute(
        "SELECT session_id, generating_message_id, generating_pid, heartbeat FROM sessions"
        " WHERE generating_message_id IS NOT NULL"
    ).fetchall()
    for row in rows:
        if row["generating_pid"] == pid or _abandoned(row):
            with transaction(db):
                _recover(db, row["session_id"], row["generating_message_id"])
    # Pending replies whose marker is gone (should not happen, but never leave one pending).
    db.execute(
        "UPDATE messages SET status = CASE WHEN content = '' THEN 'failed' ELSE 'incomplete' END"
        " WHERE status = 'pending' AND message_id NOT IN"
        " (SELECT generating_message_id FROM sessions WHERE generating_message_id IS NOT NULL)"
    )


# API keys: rows are made and checked by chatbot/access.py, which owns the hashing.

def insert_api_key(db, key_id, name, salt, key_hash):
    with transaction(db):
        db.execute("INSERT INTO api_keys (key_id, name, salt, hash, created_at) VALUES (?, ?, ?, ?, ?)",
                   (key_id, name, salt, key_hash, now_iso()))


def find_api_key(db, key_id):
    """The active key with this id, or None."""
    return db.execute("SELECT * FROM api_keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,)).fetchone()


def active_api_key_named(db, name):
    return db.execute("SELECT * FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()


def revoke_api_key(db, name):
    """Revoke the active key of this name; False when there is none."""
    with transaction(db):
        return db.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                          (now_iso(), name)).rowcount > 0


def list_api_keys(db):
    return db.execute("SELECT key_id, name, created_at, revoked_at FROM api_keys"
                      " ORDER BY revoked_at IS NOT NULL, name, created_at").fetchall()


def take_request(db, owner, limit, period, now=None):
    """Count one request of `owner` against `limit` requests per `period` seconds.

    The rate is a sliding window estimated from two fixed slots (the previous
    slot's count weighted by how much of it still lies within the window), so a
    client cannot send twice the limit around a slot boundary. Returns 0 when
    the request may go ahead (and counts it), else the seconds to wait.
    """
    now = time.time() if now is None else now
    slot = int(now // period)
    elapsed = now - slot * period
    with transaction(db):
        counts = dict(db.execute("SELECT slot, count FROM request_counts WHERE owner = ? AND slot >= ?",
                                 (owner, slot - 1)).fetchall())
        current, previous = counts.get(slot, 0), counts.get(slot - 1, 0)
        if current + 1 + previous * (1 - elapsed / period) > limit:
            return _wait(limit, period, elapsed, current, previous)
        db.execute("INSERT INTO request_counts (owner, slot, count) VALUES (?, ?, 1)"
                   " ON CONFLICT (owner, slot) DO UPDATE SET count = count + 1", (owner, slot))
        db.execute("DELETE FROM request_counts WHERE owner = ? AND slot < ?", (owner, slot - 1))
    return 0


def _wait(limit, period, elapsed, current, previous):
    """Seconds until one more request fits the sliding window."""
    if current + 1 > limit:
        # Not in this slot; in the next one this slot's count is the weighted one.
        at = period + period * (1 - (limit - 1) / current)
    else:
        at = period * (1 - (limit - current - 1) / previous)
    return max(1, math.ceil(at - elapsed))
