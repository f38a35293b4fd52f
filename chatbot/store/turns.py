"""Turns: the user message and its pending reply, the lease that owns a running
reply, its appended text log, stop requests, idempotency keys, and recovery of
replies whose worker died.

Ownership is a lease on the session row (lease_owner, lease_expires,
lease_fence), never a process id: staleness is judged by the lease alone, so it
holds for several hosts or containers sharing one database. Every write of a
running reply names the fence it was given, so an owner whose lease was taken
over writes nothing.
"""
import json
import time

from .base import SessionGone, ago_iso, now_iso, transaction
from .sessions import _insert_message, _touch, get_message, make_title, message_dict

STOP_CHANNEL = "chatbot_stop"   # PostgreSQL's NOTIFY channel for stop requests

WORKER_LOST = {"code": "worker_lost", "detail": "The worker generating this reply stopped."}


class NothingToRegenerate(LookupError):
    """A regenerate request for a session with no reply after its last user message."""


class TooManyTurns(Exception):
    """The session's owner already has as many replies running as it may."""


def begin_turn(db, session_id, user_text=None, max_per_owner=0, *, lease_owner="local", lease_seconds=15.0,
               idempotency=None):
    """Store the user message and a pending reply, and take the session's lease.

    With user_text None, regenerate instead: the reply after the last user
    message is deleted (not hidden: it leaves history and later contexts) and
    the pending reply answers that user message again; NothingToRegenerate
    when there is no such reply.

    `idempotency` is (owner, key, fingerprint) or None; the key is claimed in
    the same transaction as the user message, so a request that fails before
    (409, 429, 404) does not use it up, and two requests with one key cannot
    both begin. When the key is already claimed, nothing is written and the
    claim is returned as {"existing": row}.

    Returns {"user_message_id", "reply_id", "fence"}, or None when another
    reply is running in this session; raises TooManyTurns when the owner is at
    its limit of running replies (0: no limit), SessionGone when the session
    is gone.
    """
    now = time.time()
    with transaction(db):
        # PostgreSQL: each read-then-write below takes its lock first (SQLite's write lock covers them).
        if idempotency is not None:
            db.lock("idempotency", *idempotency[:2])
            existing = _claim(db, *idempotency, now=now)
            if existing:
                return {"existing": existing}
        db.lock("session", session_id)
        row = db.execute("SELECT generating_message_id, lease_expires, owner FROM sessions WHERE session_id = ?",
                         (session_id,)).fetchone()
        if row is None:
            raise SessionGone(session_id)
        if row["generating_message_id"]:
            if (row["lease_expires"] or 0) >= now:
                return None
            _recover(db, session_id, row["generating_message_id"])
        if max_per_owner:
            db.lock("owner", row["owner"])   # counted, then taken: one at a time per owner
        if max_per_owner and running_turns(db, row["owner"], now) >= max_per_owner:
            raise TooManyTurns(row["owner"])  # rolls the transaction back
        created = now_iso()
        if user_text is None:
            user_id = _drop_last_reply(db, session_id)
        else:
            user_id = _insert_message(db, session_id, "user", user_text, "complete", created)
            db.execute("UPDATE sessions SET title = ? WHERE session_id = ? AND title IS NULL",
                       (make_title(user_text), session_id))
        reply_id = _insert_message(db, session_id, "assistant", "", "pending", created)
        (fence,) = db.execute(
            "UPDATE sessions SET generating_message_id = ?, lease_owner = ?, lease_expires = ?,"
            " lease_fence = lease_fence + 1, stop_requested = 0, watched_until = NULL"
            " WHERE session_id = ? RETURNING lease_fence",
            (reply_id, lease_owner, now + lease_seconds, session_id),
        ).fetchone()
        if idempotency is not None:
            owner, key, fingerprint = idempotency
            db.execute("INSERT INTO idempotency_keys (owner, key, fingerprint, session_id, message_id, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (owner, key, fingerprint, session_id, reply_id, now))
        _touch(db, session_id, created)
    return {"user_message_id": user_id, "reply_id": reply_id, "fence": fence}


def _claim(db, owner, key, fingerprint, now):
    row = db.execute("SELECT fingerprint, session_id, message_id, created_at FROM idempotency_keys"
                     " WHERE owner = ? AND key = ?", (owner, key)).fetchone()
    return dict(row) if row else None


def idempotent_turn(db, owner, key, ttl):
    """The claim of an idempotency key (fingerprint, session_id, message_id), or
    None when the key is unknown or expired, or its reply is gone (a regenerate
    replaced it, the session was deleted): then the key is free again."""
    row = db.execute("SELECT k.fingerprint, k.session_id, k.message_id, k.created_at,"
                     " m.message_id AS found FROM idempotency_keys k"
                     " LEFT JOIN messages m ON m.message_id = k.message_id"
                     " WHERE k.owner = ? AND k.key = ?", (owner, key)).fetchone()
    if row is None:
        return None
    if row["found"] is None or row["created_at"] < time.time() - ttl:
        with transaction(db):
            db.execute("DELETE FROM idempotency_keys WHERE owner = ? AND key = ?", (owner, key))
        return None
    return {"fingerprint": row["fingerprint"], "session_id": row["session_id"], "message_id": row["message_id"]}


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


def running_turns(db, owner, now=None):
    """How many replies of this owner are being generated (expired leases excluded)."""
    (count,) = db.execute(
        "SELECT count(*) FROM sessions WHERE owner = ? AND generating_message_id IS NOT NULL"
        " AND lease_expires >= ?",
        (owner, time.time() if now is None else now),
    ).fetchone()
    return count


def save_progress(db, lease_owner, lease_seconds, pieces, renew):
    """One write for all of a process's running replies: append their new text
    and, when `renew`, extend their leases. `pieces` is [(reply_id, fence,
    end_pos, text)] and `renew` [(reply_id, fence)].

    Returns the reply ids whose lease is no longer ours (taken over after it
    expired, or the reply was recovered): their producers must stop writing.
    """
    lost = set()
    with transaction(db):
        for reply_id, fence, end_pos, text in pieces:
            inserted = db.execute(
                "INSERT INTO reply_log (message_id, end_pos, text) SELECT ?, ?, ? WHERE EXISTS"
                " (SELECT 1 FROM sessions WHERE generating_message_id = ? AND lease_owner = ? AND lease_fence = ?)",
                (reply_id, end_pos, text, reply_id, lease_owner, fence)).rowcount
            if not inserted:
                lost.add(reply_id)
        expires = time.time() + lease_seconds
        for reply_id, fence in renew:
            if not db.execute("UPDATE sessions SET lease_expires = ? WHERE generating_message_id = ?"
                              " AND lease_owner = ? AND lease_fence = ?",
                              (expires, reply_id, lease_owner, fence)).rowcount:
                lost.add(reply_id)
    return lost


def turn_signals(db, reply_ids):
    """{reply_id: (stop_requested, watched_until)} for these running replies."""
    marks = ",".join("?" * len(reply_ids))
    rows = db.execute(f"SELECT generating_message_id, stop_requested, watched_until FROM sessions"
                      f" WHERE generating_message_id IN ({marks})", list(reply_ids))
    return {r[0]: (bool(r[1]), r[2] or 0) for r in rows}


def watch(db, reply_id, seconds):
    """A client attached to this reply through another process is listening
    (its producer then does not end it for lack of listeners)."""
    with transaction(db):
        db.execute("UPDATE sessions SET watched_until = ? WHERE generating_message_id = ?",
                   (time.time() + seconds, reply_id))


def request_stop(db, session_id):
    """Ask whoever generates this session's reply to stop. False if none runs."""
    with transaction(db):
        running = db.execute(
            "UPDATE sessions SET stop_requested = 1 WHERE session_id = ? AND generating_message_id IS NOT NULL",
            (session_id,),
        ).rowcount > 0
        if running and db.engine == "postgresql":
            # The wake-up for the producer's host (delivered at commit, so the flag is set by then).
            db.execute("SELECT pg_notify(?, ?)", (STOP_CHANNEL, session_id))
    return running


def finish_turn(db, session_id, reply_id, fence, content, status, token_usage, finish_reason, error=None):
    """Store the final reply, drop its log and release the lease, in one
    transaction; nothing happens when the lease is no longer held with this
    fence (the reply was recovered as worker_lost). Returns the stored reply."""
    with transaction(db):
        held = db.execute("UPDATE sessions SET generating_message_id = NULL, lease_owner = NULL,"
                          " lease_expires = NULL, stop_requested = 0, watched_until = NULL"
                          " WHERE session_id = ? AND generating_message_id = ? AND lease_fence = ?",
                          (session_id, reply_id, fence)).rowcount
        if held:
            db.execute(
                "UPDATE messages SET content = ?, status = ?, token_usage = ?, finish_reason = ?, error = ?"
                " WHERE message_id = ?",
                (content, status, json.dumps(token_usage) if token_usage else None, finish_reason,
                 json.dumps(error, ensure_ascii=False) if error else None, reply_id),
            )
            db.execute("DELETE FROM reply_log WHERE message_id = ?", (reply_id,))
    return get_message(db, reply_id)


def read_reply(db, reply_id, after):
    """A consistent look at a reply for a client attached at position `after`:
    (message, [(end_pos, text)] of the logged pieces past `after`, lease
    expired). The message is None when it does not exist."""
    with transaction(db, write=False):
        row = db.execute(
            "SELECT m.*, s.lease_expires FROM messages m LEFT JOIN sessions s"
            " ON s.session_id = m.session_id AND s.generating_message_id = m.message_id"
            " WHERE m.message_id = ?", (reply_id,)).fetchone()
        if row is None:
            return None, [], False
        pieces = []
        if row["status"] == "pending":
            pieces = [tuple(r) for r in db.execute(
                "SELECT end_pos, text FROM reply_log WHERE message_id = ? AND end_pos > ? ORDER BY end_pos",
                (reply_id, after))]
    expired = row["status"] == "pending" and (row["lease_expires"] or 0) < time.time()
    return message_dict(row), pieces, expired


def recover_reply(db, session_id, reply_id):
    """Close a running reply whose lease has expired (its worker is gone)."""
    with transaction(db):
        db.lock("session", session_id)
        row = db.execute("SELECT lease_expires FROM sessions WHERE session_id = ? AND generating_message_id = ?",
                         (session_id, reply_id)).fetchone()
        if row is not None and (row["lease_expires"] or 0) < time.time():
            _recover(db, session_id, reply_id)


def question_of(db, reply_id):
    """The id of the user message a reply answers (the last one before it)."""
    row = db.execute("SELECT q.message_id FROM messages r JOIN messages q ON q.session_id = r.session_id"
                     " AND q.role = 'user' AND q.seq < r.seq WHERE r.message_id = ? ORDER BY q.seq DESC LIMIT 1",
                     (reply_id,)).fetchone()
    return row[0] if row else None


def _recover(db, session_id, reply_id):
    """Store the reply as far as its log goes, as worker_lost, and free the session."""
    text = "".join(r[0] for r in db.execute("SELECT text FROM reply_log WHERE message_id = ? ORDER BY end_pos",
                                            (reply_id,)))
    db.execute("UPDATE messages SET content = ?, status = ?, error = ? WHERE message_id = ? AND status = 'pending'",
               (text, "incomplete" if text else "failed", json.dumps(WORKER_LOST), reply_id))
    db.execute("DELETE FROM reply_log WHERE message_id = ?", (reply_id,))
    db.execute("UPDATE sessions SET generating_message_id = NULL, lease_owner = NULL, lease_expires = NULL,"
               " stop_requested = 0, watched_until = NULL WHERE session_id = ? AND generating_message_id = ?",
               (session_id, reply_id))


def recover_dead_generations(db, lease_owner_prefix=None):
    """Close the replies of dead workers: every expired lease, and those held
    by owners whose id starts with `lease_owner_prefix` (gunicorn's master
    knows a worker it reaped is dead, and frees its sessions at once)."""
    now = time.time()
    rows = db.execute("SELECT session_id, generating_message_id, lease_owner, lease_expires FROM sessions"
                      " WHERE generating_message_id IS NOT NULL").fetchall()
    for row in rows:
        dead = lease_owner_prefix is not None and (row["lease_owner"] or "").startswith(lease_owner_prefix)
        if dead or (row["lease_expires"] or 0) < now:
            with transaction(db):
                # Again, on the row itself (PostgreSQL waits for its lock, then reads it anew): an owner that
                # renewed its lease since the look above is alive, and its reply goes on.
                if db.execute("UPDATE sessions SET lease_expires = lease_expires WHERE session_id = ?"
                              " AND generating_message_id = ? AND (lease_expires IS NULL OR lease_expires < ?"
                              " OR lease_owner = ?)",
                              (row["session_id"], row["generating_message_id"], now,
                               row["lease_owner"] if dead else None)).rowcount:
                    _recover(db, row["session_id"], row["generating_message_id"])
    # Pending replies whose marker is gone (should not happen, but never leave one pending).
    with transaction(db):
        db.execute(
            "UPDATE messages SET status = CASE WHEN content = '' THEN 'failed' ELSE 'incomplete' END"
            " WHERE status = 'pending' AND message_id NOT IN"
            " (SELECT generating_message_id FROM sessions WHERE generating_message_id IS NOT NULL)"
        )


def prune(db, idempotency_ttl, activity_keep_seconds=86400):
    """Forget expired idempotency keys, and activity rows that only old list
    cursors could still need (each session keeps its latest)."""
    with transaction(db):
        db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (time.time() - idempotency_ttl,))
        db.execute("DELETE FROM session_activity WHERE at < ? AND seq NOT IN"
                   " (SELECT activity_seq FROM sessions WHERE activity_seq IS NOT NULL)",
                   (ago_iso(activity_keep_seconds),))
