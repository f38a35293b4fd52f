"""The database: tables from the schema, SQLite's pragmas on every connection,
cascades, and messages ordered by an integer sequence rather than by time."""
import os
import subprocess
import sys
import threading
import time

import pytest

from chatbot import create_app, db, generation, store
from conftest import ROOT
from helpers import in_thread, rows, write_turn

TABLES = {"sessions", "messages", "migrations"}


def tables(path):
    return {r["name"] for r in rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def init_db_cli(path):
    """`flask --app chatbot init-db`, run the way an operator runs it."""
    return subprocess.run([sys.executable, "-m", "flask", "--app", "chatbot", "init-db"], cwd=ROOT,
                          env={**os.environ, "CHATBOT_DATABASE": str(path)}, capture_output=True,
                          text=True, timeout=60)


def test_init_db_command_creates_the_tables(tmp_path):
    path = tmp_path / "fresh" / "by-cli.sqlite"
    result = init_db_cli(path)
    assert result.returncode == 0 and "Initialized" in result.stdout, result.stderr
    assert TABLES <= tables(path)


def test_the_app_creates_a_missing_database_on_start(tmp_path, standin):
    path = tmp_path / "not" / "yet" / "there.sqlite"
    create_app({"DATABASE": str(path), "LLM_URL": standin})
    assert TABLES <= tables(path)


def test_init_db_keeps_existing_data(app, client, session_id):
    assert init_db_cli(app.config["DATABASE"]).returncode == 0
    create_app({"DATABASE": app.config["DATABASE"], "LLM_URL": app.config["LLM_URL"]})
    assert client.get(f"/api/sessions/{session_id}").status_code == 200


def pragmas(conn):
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("foreign_keys", "journal_mode", "busy_timeout")}


@pytest.mark.sqlite_only
def test_every_connection_has_the_pragmas_sqlite_leaves_off(app):
    assert pragmas(db.connect(app.config["DATABASE"])) == {
        "foreign_keys": 1, "journal_mode": "wal", "busy_timeout": db.BUSY_TIMEOUT_MS}
    with app.test_request_context():
        assert pragmas(db.get_db())["foreign_keys"] == 1


def test_a_request_has_one_connection_closed_at_teardown(app):
    with app.test_request_context():
        conn = db.get_db()
        assert db.get_db() is conn
    with pytest.raises(store.StoreError):   # the store's error, whatever the engine
        conn.execute("SELECT 1")


def test_deleting_a_session_deletes_its_messages(app, client, session_id):
    other = client.post("/api/sessions").json["session_id"]
    for sid in (session_id, other):
        assert client.post("/api/chat", json={"session_id": sid, "message": "hi @@words=2"}).status_code == 200
    assert client.delete(f"/api/sessions/{session_id}").status_code == 204
    path = app.config["DATABASE"]
    assert rows(path, "SELECT * FROM messages WHERE session_id = ?", session_id) == []
    assert len(rows(path, "SELECT * FROM messages WHERE session_id = ?", other)) == 2


def write_turns(app, session_id, count):
    conn = db.connect(app.config["DATABASE"])
    for i in range(count):
        write_turn(conn, session_id, f"question {i}", f"answer {i}")
    conn.close()
    return [text for i in range(count) for text in (f"question {i}", f"answer {i}")]


def listed(client, session_id):
    return [m["content"] for m in client.get(f"/api/sessions/{session_id}/messages").json["messages"]]


def test_messages_written_in_the_same_second_stay_in_order(app, client, session_id, monkeypatch):
    for module in (store.sessions, store.turns):  # CURRENT_TIMESTAMP-like
        monkeypatch.setattr(module, "now_iso", lambda: "2026-01-01T00:00:00+00:00")
    written = write_turns(app, session_id, 30)
    assert listed(client, session_id) == written


def test_messages_stay_in_order_when_the_clock_steps_back(app, client, session_id, monkeypatch):
    clock = iter(f"2026-01-01T00:00:{59 - i:02d}+00:00" for i in range(60))
    for module in (store.sessions, store.turns):
        monkeypatch.setattr(module, "now_iso", lambda: next(clock))
    written = write_turns(app, session_id, 20)
    assert listed(client, session_id) == written


@pytest.mark.sqlite_only
def test_a_write_waits_for_another_writer_instead_of_failing(app, client):
    other = db.connect(app.config["DATABASE"])
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a moment
    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    response = client.post("/api/sessions")
    release.join()
    other.close()
    assert response.status_code == 201
    assert time.monotonic() - started >= 0.4  # it did wait for the lock


def test_a_reader_is_not_blocked_by_a_writer(app, client, session_id):
    other = db.connect(app.config["DATABASE"])
    other.execute("BEGIN EXCLUSIVE" if other.engine == "sqlite" else "BEGIN")  # without WAL this locks readers out
    other.execute("UPDATE sessions SET metadata = '{\"x\": 1}'")
    try:  # WAL: readers see the last committed state while a write is open
        response = client.get(f"/api/sessions/{session_id}")
        assert response.status_code == 200 and response.json["metadata"] == {}
    finally:
        other.execute("ROLLBACK")
        other.close()


@pytest.fixture
def impatient_db(monkeypatch):
    """A short busy_timeout and frequent saves of running replies, so a busy database shows at once."""
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 100)
    monkeypatch.setattr(generation, "LOG_SECONDS", 0.1)


def hold_write_lock(path, seconds):
    """Another process writing for a while (longer than our busy_timeout)."""
    other = db.connect(path)
    other.execute("BEGIN IMMEDIATE")
    time.sleep(seconds)
    other.execute("COMMIT")
    other.close()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("when", ["mid-answer", "at-the-end"])
def test_a_busy_database_does_not_break_or_lose_a_reply(app, client, session_id, impatient_db, when):
    words = 10 if when == "mid-answer" else 3
    message = f"@@words={words} @@delay=0.1" + (" @@first=0.3" if when == "mid-answer" else " @@first=0.6")
    reply = in_thread(lambda: client.post("/api/chat/stream", json={"session_id": session_id,
                                                                    "message": message}).get_data(as_text=True))
    time.sleep(0.2 if when == "mid-answer" else 0.5)
    hold_write_lock(app.config["DATABASE"], 0.8)   # heartbeats, or the final write, find it locked
    body = reply()
    assert "event: done" in body and "event: error" not in body
    stored = rows(app.config["DATABASE"], "SELECT status, content FROM messages WHERE role = 'assistant'")
    assert stored[0]["status"] == "complete" and stored[0]["content"].endswith(f"단어{words} ")
    [session] = rows(app.config["DATABASE"], "SELECT generating_message_id FROM sessions")
    assert session["generating_message_id"] is None


@pytest.mark.sqlite_only
def test_a_sqlite_connection_is_borrowed_from_the_pool_and_given_back_clean(app):
    with app.test_request_context():
        first = db.get_db()
        raw = first.raw
        first.execute("BEGIN IMMEDIATE")   # an error left a transaction open
        first.execute("INSERT INTO sessions (session_id, created_at, last_accessed)"
                      " VALUES ('left-open', '2026-01-01', '2026-01-01')")
    with app.test_request_context():
        second = db.get_db()
        # The same connection (no new one, no pragmas again), its transaction rolled back.
        assert second.raw is raw and not raw.in_transaction
        assert second.execute("SELECT * FROM sessions WHERE session_id = 'left-open'").fetchone() is None
        assert second.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_a_new_sqlite_database_opened_by_two_processes_at_once_waits_for_wal(tmp_path):
    # Two workers starting on a new database: the first turns on WAL (which needs
    # the file to itself for a moment); SQLite answers the second "locked" at
    # once, without its busy wait, and the worker failed to boot.
    import sqlite3
    from chatbot import sqlite
    path = str(tmp_path / "new.sqlite")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")   # the other worker creating the tables
    threading.Timer(0.3, other.execute, ("COMMIT",)).start()
    conn = sqlite.connect(path, busy_timeout_ms=5000, journal_size_limit=1 << 20)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
        other.close()
