"""Open WebSockets per key, counted across every worker process (and, with a
shared database, every host), for CHATBOT_MAX_SOCKETS_PER_KEY.

A socket holds a row for as long as it is open. The row is a lease: the
socket renews it while it lives (SOCKET_LEASE_SECONDS), so a worker killed
outright does not count its sockets against the key for longer than that.
"""
import time

from .base import new_id, transaction

SOCKET_LEASE_SECONDS = 90.0   # a live socket renews its row well before this (see ws.py)


def open_socket(db, owner, limit, now=None):
    """Count a new socket of `owner`; its id, or None when `owner` already has
    `limit` live sockets (0: no limit).

    One conditional INSERT: with SQLite's single writer it cannot be
    overtaken; on PostgreSQL the owner's advisory lock keeps two opens racing
    for the last place from both getting it.
    """
    now = time.time() if now is None else now
    socket_id = new_id()
    with transaction(db):
        db.lock("sockets", owner)
        db.execute("DELETE FROM open_sockets WHERE owner = ? AND expires_at < ?", (owner, now))
        inserted = db.execute(
            "INSERT INTO open_sockets (socket_id, owner, expires_at) SELECT ?, ?, ?"
            " WHERE ? = 0 OR (SELECT count(*) FROM open_sockets WHERE owner = ? AND expires_at >= ?) < ?",
            (socket_id, owner, now + SOCKET_LEASE_SECONDS, limit, owner, now, limit),
        ).rowcount
    return socket_id if inserted else None


def renew_socket(db, socket_id, now=None):
    now = time.time() if now is None else now
    with transaction(db):
        db.execute("UPDATE open_sockets SET expires_at = ? WHERE socket_id = ?",
                   (now + SOCKET_LEASE_SECONDS, socket_id))


def close_socket(db, socket_id):
    with transaction(db):
        db.execute("DELETE FROM open_sockets WHERE socket_id = ?", (socket_id,))
