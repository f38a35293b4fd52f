"""What every part of the store shares: its errors, the write transaction, ids,
times, and retrying a write that must not be lost while the database is busy."""
import time
import uuid
from datetime import datetime, timedelta, timezone


class StoreError(Exception):
    """A database error, whatever the engine (views never see a driver's own)."""


class StoreBusy(StoreError):
    """Another writer holds the database (SQLite's lock, a PostgreSQL lock or
    serialisation failure, or no free pooled connection): try again soon."""


class StoreUnavailable(StoreError):
    """The database cannot be reached (PostgreSQL down, a lost connection)."""


class Conflict(StoreError):
    """A write broke a unique or foreign-key constraint (a concurrent writer got there first)."""


class SessionGone(LookupError):
    """The session was deleted (by another request) between the caller's check and its write."""


def transaction(db, write=True):
    """A write transaction on either engine (see db.py): on SQLite it takes the
    write lock up front (BEGIN IMMEDIATE), so a read-then-write cannot be
    overtaken; on PostgreSQL (READ COMMITTED) a read-then-write must be one
    conditional statement, or take db.lock(...) first. With write=False, a
    read transaction: several reads that see one consistent snapshot."""
    return db.transaction(write)


def now_iso():
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def ago_iso(seconds):
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def new_id():
    return str(uuid.uuid4())


def is_busy(error):
    """Whether an error says another writer holds the database."""
    return isinstance(error, StoreBusy)


def when_not_busy(write, *args, seconds=60):
    """Call write(*args), again while the database is busy.

    For writes that must not be lost, on a connection the caller holds.
    db.write_surely also survives a lost connection (it takes a new one).
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return write(*args)
        except StoreBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def checkpoint(db):
    """Copy the WAL into the database file as far as readers allow, without
    waiting for anyone (PASSIVE); the next write then restarts the WAL, which
    SQLite truncates to journal_size_limit (db.connect)."""
    if db.engine == "sqlite":   # PostgreSQL manages its own WAL
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
