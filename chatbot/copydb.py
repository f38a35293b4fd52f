"""copy-db: every session, message and API key (and idempotency key) from one database to another
(SQLite to PostgreSQL when a team outgrows one host, or back), keeping ids,
times, order, statuses and usage; a key made on the source works on the target."""
from .db import connect, init_db

# Parents before children (foreign keys), each with the key it is read in order of.
# A new table that belongs to a conversation goes here too. reply_log: the text
# of replies still running when the servers stopped (their lease expires on the
# target, which then stores them as worker_lost with that text).
TABLES = {"sessions": ("session_id",), "messages": ("seq",), "session_activity": ("seq",),
          "reply_log": ("message_id", "end_pos"), "api_keys": ("key_id",), "idempotency_keys": ("owner", "key")}
# Ids made by the database: the target's next ones must follow the copied ones.
IDENTITIES = {"messages": "seq", "session_activity": "seq"}
BATCH = 1000


class TargetNotEmpty(Exception):
    pass


def columns(conn, table):
    if conn.engine == "sqlite":
        return [row["name"] for row in conn.execute(f"PRAGMA table_info({table})")]
    return [row[0] for row in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = ? ORDER BY ordinal_position", (table,))]


def copy_database(source, target, replace=False, progress=print):
    """Copy TABLES from `source` to `target` (paths or URLs) in one target
    transaction: the target gets all of it or nothing. Returns rows per table."""
    init_db(source)   # both at the current schema: the same tables and columns
    init_db(target)
    src, dst = connect(source), connect(target)
    try:
        (held,) = dst.execute("SELECT count(*) FROM sessions").fetchone()
        if held and not replace:
            raise TargetNotEmpty(f"the target holds {held} sessions already; "
                                 f"--replace deletes them (and its messages and keys) first")
        # One consistent view of the source, however long the copy takes.
        src.execute("BEGIN" if src.engine == "sqlite" else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        counts = {}
        with dst.transaction():
            if replace:
                for table in reversed(TABLES):
                    dst.execute(f"DELETE FROM {table}")
            for table, key in TABLES.items():
                counts[table] = _copy_table(src, dst, table, key, progress)
            if dst.engine == "postgresql":
                for table, column in IDENTITIES.items():
                    dst.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                                f" coalesce(max({column}), 0) + 1, false) FROM {table}")
        src.execute("COMMIT")
        return counts
    finally:
        src.close()
        dst.close()


def _copy_table(src, dst, table, key, progress):
    names = [c for c in columns(src, table) if c in set(columns(dst, table))]
    listed = ", ".join(names)
    overriding = " OVERRIDING SYSTEM VALUE" if dst.engine == "postgresql" and table in IDENTITIES else ""
    insert = (f"INSERT INTO {table} ({listed}){overriding}"
              f" VALUES ({', '.join('?' for _ in names)})")
    order = ", ".join(key)
    last, copied = None, 0
    while True:   # in key order, a batch at a time, each after the last one read
        after = "" if last is None else f" WHERE ({order}) > ({', '.join('?' for _ in key)})"
        rows = src.execute(f"SELECT {listed} FROM {table}{after} ORDER BY {order} LIMIT {BATCH}",
                           last or ()).fetchall()
        if not rows:
            return copied
        dst.executemany(insert, [tuple(row) for row in rows])
        copied += len(rows)
        last = tuple(rows[-1][k] for k in key)
        progress(f"{table}: {copied} rows")
