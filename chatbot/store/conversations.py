"""Finding a session by its conversation.

OpenAI-style clients (chatbot/openai_api.py) send the whole conversation with
every request and no session id. Each session keeps a digest of its
conversation, refreshed after every turn, so the session a request continues
is found through an index (owner, conversation_hash), then confirmed against
the stored messages.
"""
import hashlib
import json

from .base import transaction


def canonical(messages):
    """The conversation as an OpenAI client holds it: user and assistant
    messages with text, in order, without surrounding whitespace (clients trim
    differently). System messages are left out. A user message with no reply
    after it (its turn failed, and the client sends it again, or a new one) is
    left out too, so a retried turn still finds its session."""
    turns = []
    for m in messages:
        content = (m["content"] or "").strip()
        if m["role"] not in ("user", "assistant") or not content:
            continue
        if m["role"] == "user" and turns and turns[-1][0] == "user":
            turns.pop()
        turns.append((m["role"], content))
    if turns and turns[-1][0] == "user":
        turns.pop()
    return turns


def conversation_hash(messages):
    """A digest of the canonical conversation; None for an empty one (never looked up)."""
    turns = canonical(messages)
    if not turns:
        return None
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode("utf-8")).hexdigest()


def _stored(db, session_id):
    return [{"role": r["role"], "content": r["content"]} for r in db.execute(
        "SELECT role, content FROM messages WHERE session_id = ? AND status != 'pending' ORDER BY seq",
        (session_id,))]


def refresh_conversation_hash(db, session_id):
    """Recompute a session's digest from its stored messages (after a turn or an import)."""
    digest = conversation_hash(_stored(db, session_id))
    with transaction(db):
        db.execute("UPDATE sessions SET conversation_hash = ? WHERE session_id = ?", (digest, session_id))


def find_by_conversation(db, owner, messages):
    """The id of `owner`'s most recently active session whose conversation is
    `messages`, or None."""
    digest = conversation_hash(messages)
    if digest is None:
        return None
    wanted = canonical(messages)
    rows = db.execute("SELECT session_id FROM sessions WHERE owner = ? AND conversation_hash = ?"
                      " ORDER BY activity_seq DESC LIMIT 5", (owner, digest)).fetchall()
    for row in rows:
        # A digest is refreshed after a turn; confirm it is still the stored conversation.
        if canonical(_stored(db, row["session_id"])) == wanted:
            return row["session_id"]
    return None
