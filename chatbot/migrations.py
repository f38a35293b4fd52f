"""Schema changes after schema.sql, applied in order and recorded, so an
existing database file upgrades itself (by init-db or on start-up).

schema.sql is the first version and stays as it is; each later change is a
function here, appended to MIGRATIONS, never edited once released.
"""

MIGRATIONS = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


def migrate(conn):
    """Apply the migrations this database has not seen; returns their names."""
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another worker may have applied it while we waited for the lock.
            if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (fn.__name__,)).fetchone() is None:
                fn(conn)
                conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, datetime('now'))",
                             (fn.__name__,))
                applied.append(fn.__name__)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return applied
