"""What a key has stored, for the per-key quotas (CHATBOT_MAX_SESSIONS_PER_KEY,
CHATBOT_MAX_STORED_BYTES_PER_KEY)."""

# Bytes of a text column in UTF-8. SQLite before 3.43 has no octet_length();
# PostgreSQL spells this octet_length({}).
TEXT_BYTES = "length(CAST({} AS BLOB))"


def session_count(db, owner):
    (count,) = db.execute("SELECT count(*) FROM sessions WHERE owner = ?", (owner,)).fetchone()
    return count


def stored_bytes(db, owner):
    """Bytes of text the owner's sessions hold: messages, titles, metadata, system prompts."""
    content = TEXT_BYTES.format("m.content")
    (messages,) = db.execute(
        f"SELECT coalesce(sum({content}), 0) FROM messages m JOIN sessions s ON s.session_id = m.session_id"
        " WHERE s.owner = ?", (owner,)).fetchone()
    (sessions,) = db.execute(
        f"SELECT coalesce(sum({TEXT_BYTES.format('metadata')} + coalesce({TEXT_BYTES.format('title')}, 0)"
        f" + coalesce({TEXT_BYTES.format('system_prompt')}, 0)), 0) FROM sessions WHERE owner = ?",
        (owner,)).fetchone()
    return messages + sessions
