"""What a key has stored, for the per-key quotas (CHATBOT_MAX_SESSIONS_PER_KEY,
CHATBOT_MAX_STORED_BYTES_PER_KEY)."""

# Bytes of a text column in UTF-8. SQLite before 3.43 has no octet_length();
# PostgreSQL has no BLOB.
TEXT_BYTES = {"sqlite": "length(CAST({} AS BLOB))", "postgresql": "octet_length({})"}


def session_count(db, owner):
    (count,) = db.execute("SELECT count(*) FROM sessions WHERE owner = ?", (owner,)).fetchone()
    return count


def stored_bytes(db, owner):
    """Bytes of text the owner's sessions hold: messages, titles, metadata, system prompts."""
    text_bytes = TEXT_BYTES[db.engine]
    content = text_bytes.format("m.content")
    (messages,) = db.execute(
        f"SELECT coalesce(sum({content}), 0) FROM messages m JOIN sessions s ON s.session_id = m.session_id"
        " WHERE s.owner = ?", (owner,)).fetchone()
    (sessions,) = db.execute(
        f"SELECT coalesce(sum({text_bytes.format('metadata')} + coalesce({text_bytes.format('title')}, 0)"
        f" + coalesce({text_bytes.format('system_prompt')}, 0)), 0) FROM sessions WHERE owner = ?",
        (owner,)).fetchone()
    return messages + sessions
