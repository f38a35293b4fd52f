"""Turns: the user message and its pending reply, the session's "reply in
progress" marker, stop requests, heartbeats, and recovery of replies whose
worker died."""
import json
import os
import time

from .base import now_iso, transaction
from .sessions import _insert_message, _touch, get_message, make_title

HEARTBEAT_SECONDS = 5.0   # how often a running generation refreshes its marker and saves its text
STALE_SECONDS = 20.0      # a marker not refreshed for this long is abandoned


class NothingToRegenerate(LookupError):
    """A regenerate request for a session with no reply after its last user message."""


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
