"""PostgreSQL behind the store's connection interface (see db.py): psycopg 3
connections from a psycopg_pool pool per process, `?` placeholders, rows that
read like sqlite3.Row, and the driver's errors turned into the store's."""
import functools
import hashlib
import logging
import os
import re
import threading
import time
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from .sqlite import Result
from .store.base import Conflict, StoreBusy, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5    # seconds to reach the server
POOL_TIMEOUT = 10      # seconds a request waits for a free connection of its worker's pool
# A lost server is retried in the background this long before the pool gives up
# and tries afresh on the next request: short, so a server that is back is used at once.
RECONNECT_SECONDS = 2


def check_url(url):
    """Raise ValueError with one clear line when `url` cannot be a PostgreSQL URL."""
    scheme = url.split("://", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"CHATBOT_DATABASE must be a file path (SQLite) or a postgresql:// URL, "
                         f"not a {scheme}:// URL")
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise ValueError(f"CHATBOT_DATABASE is not a valid PostgreSQL URL: {str(e).strip()}") from None
    if not all(p.isdigit() for p in str(params.get("port", "5432")).split(",")):
        raise ValueError(f"CHATBOT_DATABASE is not a valid PostgreSQL URL: "
                         f"the port {params['port']!r} is not a number")


def without_password(url):
    """The URL as it may be shown in a message or a log line."""
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


class Row(tuple):
    """A row that reads like sqlite3.Row: row["col"], row[0], unpacking, dict(row)."""
    __slots__ = ()
    _index = {}

    def __getitem__(self, key):
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self):
        return list(self._index)


@functools.lru_cache(maxsize=512)
def _row_class(names):
    # One small class per set of columns: the column index is shared by its rows.
    return type("Row", (Row,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def row_factory(cursor):
    return _row_class(tuple(c.name for c in cursor.description or ()))


_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|\?|(?<!:):([A-Za-z_]\w*)|%""")


@functools.lru_cache(maxsize=1024)
def translate(sql):
    """sqlite3's placeholders (`?`, `:name`) as psycopg's (`%s`, `%(name)s`); `%` escaped."""
    def replace(m):
        text = m.group(0)
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        if m.group(1):
            return f"%({m.group(1)})s"
        return text.replace("%", "%%")  # a string literal, a quoted name or a comment: psycopg reads % there too
    return _TOKENS.sub(replace, sql)


def lock_key(parts):
    """A stable 64-bit key for an advisory lock (Python's hash() differs per process)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def store_error(e, conn=None):
    """The store's error for a psycopg error."""
    if isinstance(e, (pg_errors.TransactionRollback, pg_errors.LockNotAvailable, pg_errors.QueryCanceled)):
        return StoreBusy(str(e))
    if isinstance(e, psycopg.OperationalError) or (conn is not None and conn.broken):
        return StoreUnavailable(str(e).strip() or "the connection to PostgreSQL was lost")
    if isinstance(e, psycopg.IntegrityError):
        return Conflict(str(e))
    return StoreError(str(e))


def _holds_nul(params):
    values = params.values() if isinstance(params, dict) else params
    return any(isinstance(v, str) and "\x00" in v for v in values)


def _without_nul(sql, params):
    """PostgreSQL's text cannot hold U+0000 (SQLite's can). In text written
    (a message, a title, an LLM's reply, a copy from SQLite) the character is
    dropped; in a value looked up (an id in a path) it matches nothing, as
    nothing stored holds it: NULL matches nothing either. (JSON columns hold
    it escaped, as \\u0000, and keep it.)"""
    writes = sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE")

    def clean(v):
        if not (isinstance(v, str) and "\x00" in v):
            return v
        return v.replace("\x00", "") if writes else None
    if isinstance(params, dict):
        return {k: clean(v) for k, v in params.items()}
    return [clean(v) for v in params]


class PgConnection:
    engine = "postgresql"

    def __init__(self, raw, release=None):
        self.raw = raw
        self._release = release or (lambda c: c.close())

    def execute(self, sql, params=()):
        if self.raw is None:
            raise StoreError("the connection is closed")
        try:
            if params and _holds_nul(params):
                params = _without_nul(sql, params)
            if params:
                cursor = self.raw.execute(translate(sql), params)
            else:
                cursor = self.raw.execute(sql)
            rows = cursor.fetchall() if cursor.description else []
            return Result(rows, cursor.rowcount)
        except psycopg.Error as e:
            raise store_error(e, self.raw) from e

    def executemany(self, sql, seq_of_params):
        seq_of_params = [_without_nul(sql, p) if _holds_nul(p) else p for p in seq_of_params]
        try:
            with self.raw.cursor() as cursor:
                cursor.executemany(translate(sql), seq_of_params)
        except psycopg.Error as e:
            raise store_error(e, self.raw) from e

    def executescript(self, sql):
        self.execute(sql)   # no parameters: psycopg sends it as one simple query

    @contextmanager
    def transaction(self, write=True):
        """BEGIN ... COMMIT. The connection is otherwise in autocommit, so no
        read leaves a transaction open on a pooled connection. With
        write=False, reads that see one snapshot (REPEATABLE READ: READ
        COMMITTED takes a new snapshot for every statement)."""
        self.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield
        except BaseException:
            if self.raw is not None and not self.raw.broken:
                try:
                    self.execute("ROLLBACK")
                except StoreError:
                    pass
            raise
        self.execute("COMMIT")

    def lock(self, *key):
        """Serialise with every other transaction taking the same key until
        this transaction ends (a read-then-write no single statement covers)."""
        self.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(key),))

    def close(self):
        raw, self.raw = self.raw, None
        if raw is not None:
            self._release(raw)


def listen(url, channel, callback):
    """Call callback(payload) for each NOTIFY on `channel`, for ever, on a
    connection of its own (reconnecting after a failure). Run it in a thread."""
    while True:
        try:
            with psycopg.connect(url, **_connect_kwargs()) as raw:
                raw.execute(f"LISTEN {channel}")
                for notify in raw.notifies():
                    callback(notify.payload)
        except Exception:
            log.exception("LISTEN %s: connection lost (will reconnect)", channel)
            time.sleep(1)


def _connect_kwargs():
    return {"autocommit": True, "row_factory": row_factory, "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "chatbot"}


def connect(url, busy_timeout_ms=None):
    """A connection of its own (init-db, copy-db, gunicorn's master), outside any
    pool; busy_timeout_ms, when given, bounds its waits for locks (lock_timeout)."""
    try:
        raw = psycopg.connect(url, **_connect_kwargs())
        if busy_timeout_ms is not None:
            raw.execute(f"SET lock_timeout = {int(busy_timeout_ms)}")
        return PgConnection(raw)
    except psycopg.Error as e:
        raise store_error(e) from e


class Pool(ConnectionPool):
    """psycopg_pool's pool, remembering whether its last connection attempt failed,
    so that requests get a quick 503 while the server is down instead of each
    waiting the whole pool timeout."""

    last_error = None

    def _connect(self, timeout=None):
        try:
            conn = super()._connect(timeout)
        except Exception as e:
            self.last_error = str(e).strip() or type(e).__name__
            raise
        self.last_error = None
        return conn


_pools = {}
_pools_lock = threading.Lock()


def pool(url, size):
    """This process's pool for `url`, made on first use: after gunicorn forks,
    never inherited from the master."""
    key = (os.getpid(), url)
    with _pools_lock:
        found = _pools.get(key)
        if found is None:
            found = _pools[key] = Pool(url, min_size=1, max_size=max(1, size), kwargs=_connect_kwargs(),
                                       timeout=POOL_TIMEOUT, reconnect_timeout=RECONNECT_SECONDS,
                                       check=ConnectionPool.check_connection, name="chatbot", open=False)
            found.open(wait=False)
    return found


def borrow(url, size):
    """A pooled connection; closing it gives it back."""
    chosen = pool(url, size)
    deadline = time.monotonic() + POOL_TIMEOUT
    while True:
        try:
            raw = chosen.getconn(timeout=min(0.25, max(deadline - time.monotonic(), 0.01)))
            return PgConnection(raw, chosen.putconn)
        except PoolTimeout:
            if chosen.last_error is not None:
                raise StoreUnavailable(f"cannot reach PostgreSQL: {chosen.last_error}") from None
            if time.monotonic() >= deadline:
                raise StoreBusy(f"no free database connection within {POOL_TIMEOUT} s") from None
        except psycopg.Error as e:
            raise store_error(e) from e


def close_pools(url=None):
    """Close this process's pools (for `url` only, when given): tests, and shutdown."""
    with _pools_lock:
        keys = [k for k in _pools if url is None or k[1] == url]
        closing = [_pools.pop(k) for k in keys]
    for p in closing:
        p.close(timeout=1)
