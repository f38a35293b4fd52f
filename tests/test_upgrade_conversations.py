"""A database made by the first schema (schema.sql alone) upgrades in place and keeps its data."""
import sqlite3

from chatbot import create_app
from chatbot.migrations import MIGRATIONS
from conftest import ROOT

OLD_ROWS = [
    # session_id, created_at, last_accessed, metadata
    ("s-old", "2026-01-01T00:00:00.000000+00:00", "2026-01-02T00:00:00.000000+00:00", '{"team": "가"}'),
    ("s-new", "2026-01-01T00:00:00.000000+00:00", "2026-01-03T00:00:00.000000+00:00", "{}"),
    ("s-empty", "2025-12-31T00:00:00.000000+00:00", "2025-12-31T00:00:00.000000+00:00", "{}"),
]
FIRST = "서울에서 부산까지 KTX로 가는 가장 빠른 방법과 요금을 알려주세요. 주말에도 같나요?"


def first_schema_database(path):
    conn = sqlite3.connect(path)
    conn.executescript((ROOT / "schema.sql").read_text())
    conn.executemany("INSERT INTO sessions (session_id, created_at, last_accessed, metadata) VALUES (?, ?, ?, ?)",
                     OLD_ROWS)
    conn.executemany(
        "INSERT INTO messages (message_id, session_id, role, content, created_at, status) VALUES (?, ?, ?, ?, ?, ?)",
        [("m1", "s-old", "user", FIRST, "2026-01-02T00:00:00.000000+00:00", "complete"),
         ("m2", "s-old", "assistant", "KTX가 가장 빠릅니다.", "2026-01-02T00:00:00.000000+00:00", "complete"),
         ("m3", "s-old", "user", "고마워요", "2026-01-02T00:00:00.000000+00:00", "complete"),
         ("m4", "s-old", "assistant", "", "2026-01-02T00:00:00.000000+00:00", "failed"),
         ("m5", "s-new", "user", "hello", "2026-01-03T00:00:00.000000+00:00", "complete")])
    conn.commit()
    conn.close()


def columns(path, table):
    conn = sqlite3.connect(path)
    try:
        return {row[1]: row[2] for row in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


def test_a_first_schema_database_is_upgraded_in_place(tmp_path, standin):
    path = tmp_path / "old.sqlite"
    first_schema_database(path)
    app = create_app({"TESTING": True, "DATABASE": str(path), "LLM_URL": standin,
                      "AUTH": "disabled"})   # upgrades on start; old sessions are the owner 'local''s
    client = app.test_client()

    listed = client.get("/api/sessions").json["sessions"]
    assert [s["session_id"] for s in listed] == ["s-new", "s-old", "s-empty"]   # by their last activity
    old = client.get("/api/sessions/s-old").json
    assert old == {"session_id": "s-old", "created_at": OLD_ROWS[0][1], "last_accessed": OLD_ROWS[0][2],
                   "title": "서울에서 부산까지 KTX로 가는 가장 빠른 방법과 요금을 알려주세요…",
                   "metadata": {"team": "가"}, "system_prompt": None, "message_count": 4}
    messages = client.get("/api/sessions/s-old/messages").json["messages"]
    assert [(m["message_id"], m["status"]) for m in messages] == [
        ("m1", "complete"), ("m2", "complete"), ("m3", "complete"), ("m4", "failed")]
    assert client.get("/api/sessions/s-empty").json["title"] is None

    # The upgraded sessions work as new ones do.
    assert client.post("/api/chat", json={"session_id": "s-empty", "message": "hi @@words=1"}).status_code == 200
    assert client.get("/api/sessions").json["sessions"][0]["session_id"] == "s-empty"
    assert client.post("/api/chat", json={"session_id": "s-old", "regenerate": True}).status_code == 200

    # Upgraded and new databases end up with the same tables.
    fresh = tmp_path / "fresh.sqlite"
    create_app({"TESTING": True, "DATABASE": str(fresh), "LLM_URL": standin})
    for table in ("sessions", "messages", "session_activity", "api_keys", "request_counts"):
        assert columns(path, table) == columns(fresh, table)


def test_init_db_upgrades_a_database_once(tmp_path, standin):
    app = create_app({"TESTING": True, "DATABASE": str(tmp_path / "new.sqlite"), "LLM_URL": standin,
                      "AUTH": "disabled"})
    path = tmp_path / "old.sqlite"
    first_schema_database(path)
    app.config["DATABASE"] = str(path)
    for _ in range(2):   # the second time there is nothing left to do
        with app.app_context():   # as `flask --app chatbot init-db` runs it
            result = app.test_cli_runner().invoke(args=["init-db"])
        assert result.exit_code == 0, result.output
    conn = sqlite3.connect(path)
    applied = [row[0] for row in conn.execute("SELECT name FROM migrations")]
    assert sorted(applied) == sorted(m.__name__ for m in MIGRATIONS)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 5
    assert conn.execute("SELECT title FROM sessions WHERE session_id = 's-new'").fetchone()[0] == "hello"
    conn.close()
