"""API keys (rows made and checked by chatbot/access.py, which owns the hashing),
and the service's own secrets."""
from .base import now_iso, transaction


def insert_api_key(db, key_id, name, salt, key_hash):
    with transaction(db):
        db.execute("INSERT INTO api_keys (key_id, name, salt, hash, created_at) VALUES (?, ?, ?, ?, ?)",
                   (key_id, name, salt, key_hash, now_iso()))


def find_api_key(db, key_id):
    """The active key with this id, or None."""
    return db.execute("SELECT * FROM api_keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,)).fetchone()


def active_api_key_named(db, name):
    return db.execute("SELECT * FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()


def revoke_api_key(db, name):
    """Revoke the active key of this name; False when there is none."""
    with transaction(db):
        return db.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                          (now_iso(), name)).rowcount > 0


def list_api_keys(db):
    return db.execute("SELECT key_id, name, created_at, revoked_at FROM api_keys"
                      " ORDER BY revoked_at IS NOT NULL, name, created_at").fetchall()


def server_secret(db, name):
    """A random secret of the service (made by a migration), as bytes."""
    return bytes.fromhex(db.execute("SELECT value FROM server_secrets WHERE name = ?", (name,)).fetchone()[0])
