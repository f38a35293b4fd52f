"""Schema changes after schema.sql, applied in order and recorded, so an
existing database file upgrades itself (by init-db or on start-up).

schema.sql is the first version and stays as it is; each later change is a
function here, appended to MIGRATIONS, never edited once released.
"""

from .store.base import now_iso

MIGRATIONS = []
# schema-postgresql.sql is the schema as it stands after these: a new
# PostgreSQL database starts there (no PostgreSQL database predates them).
POSTGRESQL_BASELINE = ("conversations", "add_api_keys", "add_session_owner", "add_request_counts",
                       "resumable_turns")


# SQLite's DDL words and PostgreSQL's for the same thing (see ddl()).
POSTGRESQL_DDL = (
    ("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    (" REAL", " DOUBLE PRECISION"),
    (" BLOB", " BYTEA"),
    (" WITHOUT ROWID", ""),
)


def ddl(conn, sql):
    """Run a CREATE or ALTER statement written for SQLite on either engine: on
    PostgreSQL the few words that differ are replaced (POSTGRESQL_DDL). For a
    migration's tables; anything else that differs, branch on conn.engine."""
    if conn.engine == "postgresql":
        for sqlite_words, postgresql_words in POSTGRESQL_DDL:
            sql = sql.replace(sqlite_words, postgresql_words)
    conn.execute(sql)


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


def create_or_upgrade(conn, schema):
    """Create the tables from `schema` where missing, then apply the migrations
    this database has not seen; returns their names.

    One transaction, serialised across processes and hosts (SQLite's write
    lock; an advisory lock on PostgreSQL), so two servers starting at once do
    not both apply a migration. Migrations after POSTGRESQL_BASELINE run on
    both engines: ddl() writes a table for both; `conn.engine` tells which,
    where more differs. Everything in one migration runs in this transaction
    (PostgreSQL's DDL is transactional; SQLite's ALTER TABLE is too).
    """
    if conn.engine == "sqlite":
        conn.executescript(schema)   # idempotent; executescript commits on its own
    with conn.transaction():
        conn.lock("migrations")
        fresh = (conn.engine == "postgresql"
                 and conn.execute("SELECT to_regclass('sessions')").fetchone()[0] is None)
        if fresh:
            conn.executescript(schema)
        conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
        applied = []
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            if not (fresh and fn.__name__ in POSTGRESQL_BASELINE):
                fn(conn)
                applied.append(fn.__name__)
            conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (fn.__name__, now_iso()))
    return applied


@migration
def conversations(conn):
    """Titles, per-session system prompts, and an activity log for listing sessions.

    session_activity gets a row for every activity of a session (creation, a
    chat turn, a change of its settings); its seq is a global, strictly rising
    order of activity. sessions.activity_seq is the latest one, for ordering;
    the older rows let a list cursor page through the order as it stood when
    its first page was read (store.list_sessions).
    """
    from .store import make_title

    conn.execute("ALTER TABLE sessions ADD COLUMN title TEXT")           # NULL until the first message
    conn.execute("ALTER TABLE sessions ADD COLUMN system_prompt TEXT")   # NULL: the configured default
    conn.execute("ALTER TABLE sessions ADD COLUMN activity_seq INTEGER")
    conn.execute(
        "CREATE TABLE session_activity ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,"
        " at TEXT NOT NULL)"
    )
    conn.execute("CREATE INDEX session_activity_by_session ON session_activity (session_id, seq)")
    # Existing sessions: one activity each, in the order of their last activity.
    conn.execute("INSERT INTO session_activity (session_id, at)"
                 " SELECT session_id, last_accessed FROM sessions ORDER BY last_accessed, rowid")
    conn.execute("UPDATE sessions SET activity_seq = (SELECT max(seq) FROM session_activity a"
                 " WHERE a.session_id = sessions.session_id)")
    conn.execute("CREATE INDEX sessions_by_activity ON sessions (activity_seq)")
    rows = conn.execute(
        "SELECT m.session_id, m.content FROM messages m WHERE m.seq IN"
        " (SELECT min(seq) FROM messages WHERE role = 'user' GROUP BY session_id)"
    ).fetchall()
    for session_id, content in rows:
        conn.execute("UPDATE sessions SET title = ? WHERE session_id = ?", (make_title(content), session_id))


@migration
def add_api_keys(conn):
    # key_id is the public part of a key (it finds the row); only a salted
    # HMAC-SHA256 of the secret part is kept. One active key per name; the name
    # owns the sessions, so a replaced key keeps its client's conversations.
    conn.execute("""
        CREATE TABLE api_keys (
            key_id     TEXT PRIMARY KEY,
            name       TEXT NOT NULL,
            salt       TEXT NOT NULL,
            hash       TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        )""")
    conn.execute("CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL")


@migration
def add_session_owner(conn):
    # Sessions made before keys existed belong to the owner used with
    # CHATBOT_AUTH=disabled (and to a key named 'local').
    conn.execute("ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT 'local'")
    # The session list of one owner, most recently active first.
    conn.execute("CREATE INDEX sessions_by_owner ON sessions (owner, activity_seq)")


@migration
def add_request_counts(conn):
    # Requests per owner per fixed time slot: the per-key rate limit, shared by
    # every worker process (a per-process counter would multiply the limit).
    conn.execute("""
        CREATE TABLE request_counts (
            owner TEXT NOT NULL,
            slot  INTEGER NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (owner, slot)
        ) WITHOUT ROWID""")


@migration
def resumable_turns(conn):
    """Leases instead of pids, a durable log of running replies, idempotency keys.

    A running reply is owned through a lease (lease_owner: host, pid and a boot
    nonce; lease_expires: unix time, renewed by the owner's monitor; lease_fence:
    raised at every take, so a stale owner's late writes match nothing).
    reply_log holds the text of running replies as appended pieces (end_pos:
    the reply's length in code points after the piece), so a save never
    rewrites the whole text and a client can re-attach from any position.
    """
    conn.execute("ALTER TABLE sessions ADD COLUMN lease_owner TEXT")
    conn.execute("ALTER TABLE sessions ADD COLUMN lease_expires REAL")
    conn.execute("ALTER TABLE sessions ADD COLUMN lease_fence INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE sessions ADD COLUMN watched_until REAL")  # a client attached elsewhere
    conn.execute("UPDATE sessions SET lease_expires = heartbeat + 20, lease_owner = 'pid:' || generating_pid"
                 " WHERE generating_message_id IS NOT NULL")
    conn.execute("CREATE INDEX sessions_running ON sessions (lease_expires) WHERE generating_message_id IS NOT NULL")
    # One running reply per session, whatever the engine's locking.
    conn.execute("CREATE UNIQUE INDEX messages_one_pending ON messages (session_id) WHERE status = 'pending'")
    conn.execute("""
        CREATE TABLE reply_log (
            message_id TEXT NOT NULL REFERENCES messages (message_id) ON DELETE CASCADE,
            end_pos    INTEGER NOT NULL,
            text       TEXT NOT NULL,
            PRIMARY KEY (message_id, end_pos)
        )""")
    conn.execute("""
        CREATE TABLE idempotency_keys (
            owner       TEXT NOT NULL,
            key         TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            message_id  TEXT NOT NULL,
            created_at  REAL NOT NULL,
            PRIMARY KEY (owner, key)
        )""")
    conn.execute("CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at)")


@migration
def add_conversation_hash(conn):
    # A digest of each session's conversation (store/conversations.py), so that
    # an OpenAI-style request, which sends the whole conversation and no session
    # id, finds the session it continues through an index, not a scan.
    from .store.conversations import conversation_hash

    conn.execute("ALTER TABLE sessions ADD COLUMN conversation_hash TEXT")
    conn.execute("CREATE INDEX sessions_by_conversation ON sessions (owner, conversation_hash, activity_seq)")
    for (session_id,) in conn.execute("SELECT session_id FROM sessions").fetchall():
        rows = conn.execute("SELECT role, content FROM messages WHERE session_id = ? AND status != 'pending'"
                            " ORDER BY seq", (session_id,)).fetchall()
        digest = conversation_hash([{"role": r[0], "content": r[1]} for r in rows])
        conn.execute("UPDATE sessions SET conversation_hash = ? WHERE session_id = ?", (digest, session_id))


@migration
def add_open_sockets(conn):
    # One row per open WebSocket, a lease renewed while it lives: the per-key
    # cap on open sockets (CHATBOT_MAX_SOCKETS_PER_KEY) counts them across workers.
    conn.execute("""
        CREATE TABLE open_sockets (
            socket_id  TEXT PRIMARY KEY,
            owner      TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL   -- unix time (PostgreSQL's REAL is 4 bytes: too coarse)
        )""")
    conn.execute("CREATE INDEX open_sockets_by_owner ON open_sockets (owner, expires_at)")


@migration
def add_server_secrets(conn):
    # Random keys of the service itself, shared by every worker and host (the
    # list cursor's key: cursors are sealed, so they tell nothing and only
    # their owner can use them).
    import secrets

    conn.execute("CREATE TABLE server_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO server_secrets (name, value) VALUES ('cursor', ?)", (secrets.token_hex(32),))
