"""Sessions and messages: every SQL statement of the service lives here.

Functions take an open connection (see db.connect) and return plain dicts.
Write transactions are short and never span a call to the upstream.
"""
import json
import os
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

HEARTBEAT_SECONDS = 5.0   # how often a running generation refreshes its marker and saves its text
STALE_SECONDS = 20.0      # a marker not refreshed for this long is abandoned


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


def _session(row, message_count):
    return {
        "session_id": row["session_id"],
        "created_at": row["created_at"],
        "last_accessed": row["last_accessed"],
        "metadata": json.loads(row["metadata"]),
        "message_count": message_count,
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


def create_session(db, metadata):
    session_id, now = new_id(), now_iso()
    with transaction(db):
        db.execute(
            "INSERT INTO sessions (session_id, created_at, last_accessed, metadata) VALUES (?, ?, ?, ?)",
            (session_id, now, now, json.dumps(metadata, ensure_ascii=False)),
        )
    return get_session(db, session_id)


def get_session(db, session_id):
    row = db.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    if row is None:
        return None
    (count,) = db.execute(
        "SELECT count(*) FROM messages WHERE session_id = ? AND status != 'pending'", (session_id,)
    ).fetchone()
    return _session(row, count)


def delete_session(db, session_id):
    with transaction(db):
        return db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0


def list_messages(db, session_id):
    rows = db.execute(
        "SELECT * FROM messages WHERE session_id = ? AND status != 'pending' ORDER BY seq",
        (session_id,),
    )
    return [message_dict(r) for r in rows]


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


def _insert_message(db, session_id, role, content, status, now):
    message_id = new_id()
    db.execute(
        "INSERT INTO messages (message_id, session_id, role, content, created_at, status)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (message_id, session_id, role, content, now, status),
    )
    return message_id


def begin_turn(db, session_id, user_text):
    """Store the user message and a pending reply, and take the session's marker.

    One short IMMEDIATE transaction, so two workers cannot both take the marker.
    Returns (user_message_id, reply_id), or None when another reply is running.
    """
    with transaction(db):
        row = db.execute(
            "SELECT generating_message_id, generating_pid, heartbeat FROM sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row["generating_message_id"]:
            if not _abandoned(row):
                return None
            _recover(db, session_id, row["generating_message_id"])
        now = now_iso()
        user_id = _insert_message(db, session_id, "user", user_text, "complete", now)
        reply_id = _insert_message(db, session_id, "assistant", "", "pending", now)
        db.execute(
            "UPDATE sessions SET generating_message_id = ?, generating_pid = ?, heartbeat = ?,"
            " stop_requested = 0, last_accessed = ? WHERE session_id = ?",
            (reply_id, os.getpid(), time.time(), now, session_id),
        )
    return user_id, reply_id


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
