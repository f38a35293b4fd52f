-- The chatbot's tables on PostgreSQL: the same tables as schema.sql plus the
-- migrations up to migrations.POSTGRESQL_BASELINE, in PostgreSQL's types.
-- init-db runs it on a database without tables; later changes are migrations
-- (chatbot/migrations.py), which run on both engines.

CREATE TABLE sessions (
    session_id    TEXT PRIMARY KEY,
    created_at    TEXT NOT NULL,        -- ISO 8601 UTC, as on SQLite
    last_accessed TEXT NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',   -- JSON object
    -- The "reply in progress" marker lives here, so every worker and host sees it.
    generating_message_id TEXT,
    generating_pid        INTEGER,
    heartbeat             DOUBLE PRECISION,
    stop_requested        INTEGER NOT NULL DEFAULT 0,
    title         TEXT,
    system_prompt TEXT,
    activity_seq  BIGINT,
    owner         TEXT NOT NULL DEFAULT 'local',
    -- The lease that owns a running reply (see chatbot/store/turns.py).
    lease_owner   TEXT,
    lease_expires DOUBLE PRECISION,          -- unix time
    lease_fence   BIGINT NOT NULL DEFAULT 0,
    watched_until DOUBLE PRECISION
);

CREATE TABLE messages (
    -- seq orders messages: times tie, and clocks of several hosts disagree.
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  TEXT NOT NULL UNIQUE,
    session_id  TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'complete'
                CHECK (status IN ('pending', 'complete', 'incomplete', 'failed')),
    token_usage TEXT,
    finish_reason TEXT,
    error       TEXT
);

CREATE INDEX messages_by_session ON messages (session_id, seq);
-- One running reply per session, whatever the engine's locking.
CREATE UNIQUE INDEX messages_one_pending ON messages (session_id) WHERE status = 'pending';

CREATE TABLE session_activity (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    at         TEXT NOT NULL
);

CREATE INDEX session_activity_by_session ON session_activity (session_id, seq);
CREATE INDEX sessions_by_activity ON sessions (activity_seq);
CREATE INDEX sessions_by_owner ON sessions (owner, activity_seq);
CREATE INDEX sessions_running ON sessions (lease_expires) WHERE generating_message_id IS NOT NULL;

CREATE TABLE api_keys (
    key_id     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    salt       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;

CREATE TABLE request_counts (
    owner TEXT NOT NULL,
    slot  BIGINT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (owner, slot)
);

-- The text of running replies, as appended pieces (end_pos: the reply's
-- length in code points after the piece).
CREATE TABLE reply_log (
    message_id TEXT NOT NULL REFERENCES messages (message_id) ON DELETE CASCADE,
    end_pos    BIGINT NOT NULL,
    text       TEXT NOT NULL,
    PRIMARY KEY (message_id, end_pos)
);

CREATE TABLE idempotency_keys (
    owner       TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,   -- unix time
    PRIMARY KEY (owner, key)
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
