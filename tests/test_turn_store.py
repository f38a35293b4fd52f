"""The store's side of idempotent turns (chatbot/store/turns.py): a key is
claimed with the user message or not at all, forgotten after its time to live,
and pruned with old session_activity rows."""
import time

import pytest

from chatbot import db, store
from chatbot.store.base import ago_iso
from helpers import write_turn

OWNER = "alice"


@pytest.fixture
def conn(app):
    connection = db.connect(app.config["DATABASE"])
    yield connection
    connection.close()


def new_session(conn, owner=OWNER):
    return store.create_session(conn, {}, owner=owner)["session_id"]


def keys(conn):
    return [tuple(r) for r in conn.execute("SELECT owner, key, session_id, message_id FROM idempotency_keys"
                                           " ORDER BY owner, key")]


def messages(conn, session_id):
    return [r["role"] for r in conn.execute("SELECT role FROM messages WHERE session_id = ? ORDER BY seq",
                                            (session_id,))]


def finish(conn, session_id, turn):
    store.finish_turn(conn, session_id, turn["reply_id"], turn["fence"], "answer", "complete", None, "stop")


# --- begin_turn claims the key with the user message -----------------------------

def test_begin_turn_claims_the_key_with_the_user_message(conn):
    sid = new_session(conn)
    turn = store.begin_turn(conn, sid, "hello", idempotency=(OWNER, "k1", "fp"))
    assert keys(conn) == [(OWNER, "k1", sid, turn["reply_id"])]
    assert store.idempotent_turn(conn, OWNER, "k1", 60) == {"fingerprint": "fp", "session_id": sid,
                                                            "message_id": turn["reply_id"]}


def test_a_claimed_key_begins_nothing_and_names_the_turn_that_has_it(conn):
    sid = new_session(conn)
    turn = store.begin_turn(conn, sid, "hello", idempotency=(OWNER, "k1", "fp"))
    finish(conn, sid, turn)
    again = store.begin_turn(conn, sid, "hello", idempotency=(OWNER, "k1", "fp"))
    assert again["existing"]["message_id"] == turn["reply_id"] and again["existing"]["fingerprint"] == "fp"
    assert messages(conn, sid) == ["user", "assistant"]
    # Also while the turn still runs: no 'another reply is running', its own turn is named.
    sid2 = new_session(conn)
    running = store.begin_turn(conn, sid2, "hi", idempotency=(OWNER, "k2", "fp2"))
    again = store.begin_turn(conn, sid2, "hi", idempotency=(OWNER, "k2", "fp2"))
    assert again == {"existing": {"fingerprint": "fp2", "session_id": sid2, "message_id": running["reply_id"],
                                  "created_at": again["existing"]["created_at"]}}


def test_keys_are_per_owner(conn):
    alice, bob = new_session(conn, "alice"), new_session(conn, "bob")
    a = store.begin_turn(conn, alice, "hello", idempotency=("alice", "k", "fp"))
    b = store.begin_turn(conn, bob, "hello", idempotency=("bob", "k", "fp"))
    assert "existing" not in b
    assert keys(conn) == [("alice", "k", alice, a["reply_id"]), ("bob", "k", bob, b["reply_id"])]


def test_a_turn_refused_for_another_running_reply_does_not_claim_the_key(conn):
    sid = new_session(conn)
    running = store.begin_turn(conn, sid, "first")
    assert store.begin_turn(conn, sid, "second", idempotency=(OWNER, "k", "fp")) is None
    assert keys(conn) == [] and messages(conn, sid) == ["user", "assistant"]
    finish(conn, sid, running)
    assert "existing" not in store.begin_turn(conn, sid, "second", idempotency=(OWNER, "k", "fp"))


def test_a_turn_over_the_owners_limit_does_not_claim_the_key(conn):
    busy, sid = new_session(conn), new_session(conn)
    store.begin_turn(conn, busy, "first")
    with pytest.raises(store.TooManyTurns):
        store.begin_turn(conn, sid, "second", 1, idempotency=(OWNER, "k", "fp"))
    assert keys(conn) == [] and messages(conn, sid) == []


def test_a_turn_for_a_gone_session_does_not_claim_the_key(conn):
    with pytest.raises(store.SessionGone):
        store.begin_turn(conn, "no-such-session", "hello", idempotency=(OWNER, "k", "fp"))
    assert keys(conn) == []


def test_a_regenerate_with_nothing_to_regenerate_does_not_claim_the_key(conn):
    sid = new_session(conn)
    with pytest.raises(store.NothingToRegenerate):
        store.begin_turn(conn, sid, None, idempotency=(OWNER, "k", "fp"))
    assert keys(conn) == []


# --- idempotent_turn: a key's claim while it holds ---------------------------------

def test_an_unknown_key_has_no_turn(conn):
    assert store.idempotent_turn(conn, OWNER, "never-used", 60) is None


def test_an_expired_key_has_no_turn_and_is_forgotten(conn):
    sid = new_session(conn)
    finish(conn, sid, store.begin_turn(conn, sid, "hello", idempotency=(OWNER, "k", "fp")))
    conn.execute("UPDATE idempotency_keys SET created_at = ?", (time.time() - 100,))
    assert store.idempotent_turn(conn, OWNER, "k", 1000) is not None
    assert store.idempotent_turn(conn, OWNER, "k", 50) is None
    assert keys(conn) == []


def test_a_key_whose_reply_is_gone_is_free_again(conn):
    sid = new_session(conn)
    finish(conn, sid, store.begin_turn(conn, sid, "hello", idempotency=(OWNER, "k", "fp")))
    # A regenerate replaces the reply the key named.
    finish(conn, sid, store.begin_turn(conn, sid, None))
    assert store.idempotent_turn(conn, OWNER, "k", 60) is None
    assert keys(conn) == []
    # And a deleted session takes its replies with it.
    other = new_session(conn)
    finish(conn, other, store.begin_turn(conn, other, "hello", idempotency=(OWNER, "k2", "fp")))
    assert store.delete_session(conn, other, OWNER)
    assert store.idempotent_turn(conn, OWNER, "k2", 60) is None


# --- prune ------------------------------------------------------------------------

def test_prune_deletes_expired_keys_only(conn):
    sid = new_session(conn)
    for key in ("old", "fresh"):
        finish(conn, sid, store.begin_turn(conn, sid, key, idempotency=(OWNER, key, key)))
    conn.execute("UPDATE idempotency_keys SET created_at = ? WHERE key = 'old'", (time.time() - 7200,))
    store.prune(conn, 3600)
    assert [k for _, k, _, _ in keys(conn)] == ["fresh"]


def activity(conn, session_id):
    return [r["seq"] for r in conn.execute("SELECT seq FROM session_activity WHERE session_id = ? ORDER BY seq",
                                           (session_id,))]


def latest_activity(conn, session_id):
    return conn.execute("SELECT activity_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()[0]


def test_prune_deletes_old_activity_but_keeps_each_sessions_latest(conn):
    old, recent = new_session(conn), new_session(conn)
    for sid in (old, recent):
        write_turn(conn, sid, "one", "answer")
        write_turn(conn, sid, "two", "answer")
    assert len(activity(conn, old)) == 3  # created, two turns
    # Every row of `old` is two days old, latest included; `recent` has one old row among new ones.
    conn.execute("UPDATE session_activity SET at = ? WHERE session_id = ?", (ago_iso(2 * 86400), old))
    first_of_recent = activity(conn, recent)[0]
    conn.execute("UPDATE session_activity SET at = ? WHERE seq = ?", (ago_iso(2 * 86400), first_of_recent))
    recent_rows = activity(conn, recent)

    store.prune(conn, 3600, activity_keep_seconds=86400)

    assert activity(conn, old) == [latest_activity(conn, old)]
    assert activity(conn, recent) == recent_rows[1:]
    assert latest_activity(conn, recent) == recent_rows[-1]
    # The sessions list still orders and pages both.
    first, cursor = store.list_sessions(conn, 1, owner=OWNER)
    second, cursor = store.list_sessions(conn, 1, cursor, owner=OWNER)
    assert [s["session_id"] for s in first + second] == [recent, old] and cursor is None


def test_prune_keeps_recent_activity(conn):
    sid = new_session(conn)
    write_turn(conn, sid, "one", "answer")
    before = activity(conn, sid)
    store.prune(conn, 3600)
    assert activity(conn, sid) == before


# --- the sweep recovers only leases that are still expired ---------------------

class RenewedMeanwhile:
    """A connection on which the owner renews its lease (the monitor, in another
    process) just after the sweep read the expired leases."""

    def __init__(self, conn, renew):
        self.conn, self.renew, self.engine = conn, renew, conn.engine

    def execute(self, sql, params=()):
        result = self.conn.execute(sql, params)
        if sql.startswith("SELECT session_id, generating_message_id, lease_owner, lease_expires"):
            self.renew()
        return result

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_the_sweep_leaves_a_lease_renewed_after_it_looked(app, conn):
    sid = new_session(conn)
    turn = store.begin_turn(conn, sid, "question", lease_owner="host:1:live", lease_seconds=-1)   # expired
    other = db.connect(app.config["DATABASE"])
    try:
        renew = lambda: store.save_progress(other, "host:1:live", 15, [], [(turn["reply_id"], turn["fence"])])
        store.recover_dead_generations(RenewedMeanwhile(conn, renew))
    finally:
        other.close()
    assert store.get_message(conn, turn["reply_id"])["status"] == "pending"
    assert conn.execute("SELECT generating_message_id FROM sessions WHERE session_id = ?",
                        (sid,)).fetchone()[0] == turn["reply_id"]
    store.recover_dead_generations(conn)   # still alive: nothing to do
    assert store.get_message(conn, turn["reply_id"])["status"] == "pending"


def test_the_sweep_recovers_an_expired_lease(conn):
    sid = new_session(conn)
    turn = store.begin_turn(conn, sid, "question", lease_owner="host:1:dead", lease_seconds=-1)
    store.recover_dead_generations(conn)
    reply = store.get_message(conn, turn["reply_id"])
    assert reply["status"] == "failed" and reply["error"]["code"] == "worker_lost"
