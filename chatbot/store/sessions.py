"""Sessions and their messages."""
import json
import time
import unicodedata
from datetime import datetime, timedelta, timezone

from .base import SessionGone, new_id, now_iso, transaction, when_not_busy
from .conversations import conversation_hash
from .quotas import session_count

TITLE_CHARS = 40          # length of a title made from the first message, in characters
# An import is written a batch at a time, each batch its own short transaction
# (a few milliseconds), so other keys' writes and running replies' heartbeats
# never wait long for SQLite's single writer.
IMPORT_BATCH_BYTES = 256 * 1024
IMPORT_BATCH_ROWS = 500
# Until its last batch is written, an imported session belongs to no key:
# its owner is this prefix + the key's name (a key's name has no ':').
IMPORTING = "importing:"
ABANDONED_IMPORT = timedelta(hours=1)   # an import this old whose worker died is deleted


class SessionQuota(Exception):
    """The owner has as many sessions as it may (CHATBOT_MAX_SESSIONS_PER_KEY)."""


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
    (seq,) = db.execute("INSERT INTO session_activity (session_id, at) VALUES (?, ?) RETURNING seq",
                        (session_id, now)).fetchone()
    # On PostgreSQL two activities of one session may commit out of their seq
    # order: the session keeps the later one.
    db.execute("UPDATE sessions SET last_accessed = ?, activity_seq = ? WHERE session_id = ?"
               " AND (activity_seq IS NULL OR activity_seq < ?)", (now, seq, session_id, seq))


def create_session(db, metadata, title=None, system_prompt=None, created_at=None, messages=(), *, owner,
                   max_sessions=0):
    """A new session of `owner`; `messages` (the few of an OpenAI client's
    request) are stored with it in the same transaction. SessionQuota when
    `owner` has `max_sessions` already (0: no limit)."""
    session_id, now = new_id(), now_iso()
    with transaction(db):
        if max_sessions and session_count(db, owner) >= max_sessions:
            raise SessionQuota(owner)
        _insert_session(db, session_id, metadata, title, system_prompt, created_at or now, now, owner,
                        conversation_hash(messages))
        _insert_messages(db, session_id, messages)
        _touch(db, session_id, now)
    return get_session(db, session_id, owner)


def _insert_session(db, session_id, metadata, title, system_prompt, created_at, now, owner, digest=None):
    db.execute(
        "INSERT INTO sessions (session_id, created_at, last_accessed, metadata, title, system_prompt, owner,"
        " conversation_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (session_id, created_at, now, json.dumps(metadata, ensure_ascii=False), title, system_prompt, owner,
         digest),
    )


def _insert_messages(db, session_id, messages):
    db.executemany(
        "INSERT INTO messages (message_id, session_id, role, content, created_at, status,"
        " token_usage, finish_reason, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(new_id(), session_id, m["role"], m["content"], m["created_at"], m["status"],
          json.dumps(m["token_usage"]) if m.get("token_usage") else None, m.get("finish_reason"),
          json.dumps(m["error"], ensure_ascii=False) if m.get("error") else None) for m in messages])


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
        "  WHERE owner = :owner AND activity_seq < :before ORDER BY activity_seq DESC LIMIT :n) AS still"
        " UNION ALL"
        " SELECT * FROM (SELECT session_id, (SELECT max(a.seq) FROM session_activity a"
        "  WHERE a.session_id = moved.session_id AND a.seq <= :snapshot) AS list_rank"
        "  FROM sessions moved WHERE owner = :owner AND activity_seq > :snapshot) AS active"
        "  WHERE list_rank < :before"
        ") AS candidates ORDER BY list_rank DESC LIMIT :n)"
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
        if db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is None:
            raise SessionGone(session_id)
        if "title" in columns and columns["title"] is None:
            first = db.execute("SELECT content FROM messages WHERE session_id = ? AND role = 'user'"
                               " ORDER BY seq LIMIT 1", (session_id,)).fetchone()
            columns["title"] = make_title(first["content"]) if first else None
        if columns:
            db.execute(f"UPDATE sessions SET {', '.join(f'{k} = ?' for k in columns)} WHERE session_id = ?",
                       (*columns.values(), session_id))
        _touch(db, session_id, now_iso())
    return _reread(db, session_id)


def import_session(db, session, messages, *, owner, max_sessions=0):
    """A new session (new id) holding an exported conversation: messages keep
    their order, role, content, status, times and usage, under new ids.

    Written in short transactions (IMPORT_BATCH_*); the session belongs to no
    key until the last one, so nobody sees half an import, and one that fails
    midway is deleted. SessionQuota as for create_session.
    """
    title = session.get("title")
    if title is None:
        title = next((make_title(m["content"]) for m in messages if m["role"] == "user"), None)
    session_id, now = new_id(), now_iso()
    hidden = IMPORTING + owner
    with transaction(db):
        _drop_abandoned_imports(db)
        if max_sessions and session_count(db, owner) >= max_sessions:
            raise SessionQuota(owner)
        _insert_session(db, session_id, session.get("metadata") or {}, title, session.get("system_prompt"),
                        session.get("created_at") or now, now, hidden)
    try:
        for batch in _batches(messages):
            with transaction(db):
                _insert_messages(db, session_id, batch)
            time.sleep(0)   # let a thread waiting for the writer in this process take it
        with transaction(db):
            db.execute("UPDATE sessions SET owner = ?, conversation_hash = ? WHERE session_id = ?",
                       (owner, conversation_hash(messages), session_id))
            _touch(db, session_id, now)
    except BaseException:
        when_not_busy(delete_session, db, session_id, hidden)
        raise
    return get_session(db, session_id, owner)


def _batches(messages):
    batch, size = [], 0
    for m in messages:
        batch.append(m)
        size += len(m["content"]) * 3 + 200   # at most 3 bytes a character in UTF-8, plus the other fields
        if size >= IMPORT_BATCH_BYTES or len(batch) >= IMPORT_BATCH_ROWS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _drop_abandoned_imports(db):
    """Delete imports left unfinished by a worker that died (inside a transaction)."""
    before = (datetime.now(timezone.utc) - ABANDONED_IMPORT).isoformat(timespec="microseconds")
    # A range, not LIKE, so that the owner index finds them.
    db.execute("DELETE FROM sessions WHERE owner >= ? AND owner < ? AND last_accessed < ?",
               (IMPORTING, IMPORTING[:-1] + chr(ord(IMPORTING[-1]) + 1), before))


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
