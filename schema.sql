-- The chatbot's tables. Every statement is idempotent: init-db and app start-up
-- run this file on every database, new or old.

CREATE TABLE IF NOT EXISTS sessions (
    session_id    TEXT PRIMARY KEY,
    created_at    TEXT NOT NULL,
    last_accessed TEXT NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',   -- JSON object
    -- The "reply in progress" marker lives here, not in a Python variable,
    -- so every gunicorn worker process sees it.
    generating_message_id TEXT,   -- the pending assistant reply
    generating_pid        INTEGER,  -- the worker process writing it
    heartbeat             REAL,     -- unix time, refreshed while it streams
    stop_requested        INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS messages (
    -- seq orders messages: CURRENT_TIMESTAMP-style times tie within a second.
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL UNIQUE,
    session_id  TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    -- 'pending' only while a reply is being generated; never listed.
    status      TEXT NOT NULL DEFAULT 'complete'
                CHECK (status IN ('pending', 'complete', 'incomplete', 'failed')),
    token_usage TEXT,            -- JSON object or NULL
    finish_reason TEXT,
    error       TEXT             -- JSON {"code", "detail"} of a failed or cut reply
);

CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_id, seq);
