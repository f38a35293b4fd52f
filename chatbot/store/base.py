"""What every part of the store shares: the write transaction, ids, times, and
retrying a write that must not be lost while SQLite is busy."""
import sqlite3
import threading
import time
import uuid
import contextlib
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

# SQLite has one writer at a time. Threads of one process queue for it here, in
# order, instead of in SQLite's busy handler, which polls with sleeps and lets a
# crowd of hundreds of streams starve some of them past the busy timeout.
_writer = threading.Lock()


class SessionGone(LookupError):
    """The session was deleted (by another request) between the caller's check and its write."""


@contextmanager
def transaction(db, write=True):
    """BEGIN IMMEDIATE ... COMMIT: take the write lock up front, so a
    read-then-write cannot be overtaken by another process. With write=False,
    a read transaction: several reads that see one consistent snapshot."""
    with _writer if write else _no_lock:
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


_no_lock = contextlib.nullcontext()


def now_iso():
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def ago_iso(seconds):
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def new_id():
    return str(uuid.uuid4())


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


def checkpoint(db):
    """Copy the WAL into the database file as far as readers allow, without
    waiting for anyone (PASSIVE); the next write then restarts the WAL, which
    SQLite truncates to journal_size_limit (db.connect)."""
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
