"""SQLite behind the store's connection interface (see db.py): stdlib sqlite3,
the pragmas it leaves off, one writer at a time, and sqlite3's errors turned
into the store's."""
import contextlib
import os
import sqlite3
import threading
from contextlib import contextmanager

from .store.base import Conflict, StoreBusy, StoreError, StoreUnavailable, when_not_busy

# SQLite has one writer at a time. Threads of one process queue for it here, in
# order, instead of in SQLite's busy handler, which polls with sleeps and lets a
# crowd of hundreds of streams starve some of them past the busy timeout.
_writer = threading.Lock()
_no_lock = contextlib.nullcontext()


def store_error(e):
    """The store's error for a sqlite3 error."""
    text = str(e)
    if isinstance(e, sqlite3.OperationalError):
        if "locked" in text or "busy" in text:
            return StoreBusy(text)
        if "unable to open" in text or "disk I/O" in text:
            return StoreUnavailable(text)
    if isinstance(e, sqlite3.IntegrityError):
        return Conflict(text)
    return StoreError(text)


class Result:
    """The rows of a statement, fetched at once (so driver errors happen in execute)."""

    def __init__(self, rows, rowcount):
        self._rows, self.rowcount = rows, rowcount

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self):
        return self._rows

    def __iter__(self):
        return iter(self._rows)


class SqliteConnection:
    engine = "sqlite"

    def __init__(self, raw, pooled=None):
        self.raw = raw
        self.pooled = pooled   # the database path whose pool close() gives the connection back to

    def execute(self, sql, params=()):
        if self.raw is None:   # closed: given back to the pool, maybe lent to another request
            raise StoreError("Cannot operate on a closed database connection.")
        try:
            cursor = self.raw.execute(sql, params)
            return Result(cursor.fetchall() if cursor.description else [], cursor.rowcount)
        except sqlite3.Error as e:
            raise store_error(e) from e

    def executemany(self, sql, seq_of_params):
        try:
            self.raw.executemany(sql, seq_of_params)
        except sqlite3.Error as e:
            raise store_error(e) from e

    def executescript(self, sql):
        try:
            self.raw.executescript(sql)
        except sqlite3.Error as e:
            raise store_error(e) from e

    @contextmanager
    def transaction(self, write=True):
        """BEGIN IMMEDIATE ... COMMIT: the write lock is taken up front, so a
        read-then-write cannot be overtaken by another process. With
        write=False, BEGIN: reads that see one snapshot (WAL), no lock."""
        with _writer if write else _no_lock:
            self.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield
            except BaseException:
                self.execute("ROLLBACK")
                raise
            self.execute("COMMIT")

    def lock(self, *key):
        """Nothing to do: BEGIN IMMEDIATE already serialises every write transaction."""

    def close(self):
        raw, self.raw = self.raw, None
        if raw is not None:
            _give_back(raw, self.pooled) if self.pooled else raw.close()


# Idle connections of this process, by database path. Opening a connection (and
# its pragmas) and closing it cost more than the rest of a short request's
# database work; a request borrows one and gives it back.
_idle, _idle_lock, _idle_pid = {}, threading.Lock(), os.getpid()
_forked_away = []   # a parent's connections: never used, nor closed (closing may checkpoint its WAL)
KEEP_IDLE = 16


def borrow(path, busy_timeout_ms, journal_size_limit):
    """A connection from this process's pool (a new one if none is idle); its close() gives it back."""
    global _idle_pid
    with _idle_lock:
        if _idle_pid != os.getpid():
            _forked_away.append(_idle.copy())
            _idle.clear()
            _idle_pid = os.getpid()
        idle = _idle.get(path)
        raw = idle.pop() if idle else None
    if raw is None:
        raw = connect(path, busy_timeout_ms, journal_size_limit).raw
    return SqliteConnection(raw, pooled=path)


def _give_back(raw, path):
    try:
        if raw.in_transaction:   # left open by an error: not the next borrower's
            raw.rollback()
    except sqlite3.Error:
        raw.close()
        return
    with _idle_lock:
        if _idle_pid == os.getpid():
            idle = _idle.setdefault(path, [])
            if len(idle) < KEEP_IDLE:
                idle.append(raw)
                return
    raw.close()


def connect(path, busy_timeout_ms, journal_size_limit):
    """A connection with the pragmas SQLite leaves off by default (they are per
    connection, so every connection goes through here). isolation_level=None:
    we open write transactions ourselves and keep them short."""
    try:
        raw = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                              check_same_thread=False)
    except sqlite3.Error as e:
        raise store_error(e) from e
    raw.row_factory = sqlite3.Row
    conn = SqliteConnection(raw)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    # WAL is kept in the file: a no-op once it is on. On a new database it needs
    # the file to itself for a moment, and SQLite answers "locked" at once,
    # without its busy wait, while another connection writes (two workers
    # starting on a new database at once): so wait here.
    when_not_busy(conn.execute, "PRAGMA journal_mode = WAL", seconds=busy_timeout_ms / 1000)
    conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL, far fewer fsyncs
    conn.execute(f"PRAGMA journal_size_limit = {int(journal_size_limit)}")  # the WAL shrinks back after a burst
    return conn
