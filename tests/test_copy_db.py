"""`flask --app chatbot copy-db SOURCE TARGET`: SQLite to PostgreSQL and back,
keeping ids, times, order, statuses and usage; keys keep working."""
import os
import subprocess
import sys
import time

import pytest

from chatbot import create_app, db, store
from conftest import ROOT, bearer, new_api_key


def copy_db_cli(source, target, *options):
    """copy-db, run the way an operator runs it."""
    return subprocess.run([sys.executable, "-m", "flask", "--app", "chatbot", "copy-db", str(source), str(target),
                           *options], cwd=ROOT, env={**os.environ, "CHATBOT_DATABASE": str(target)},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(params=[("sqlite", "postgresql"), ("postgresql", "sqlite")], ids=["sqlite-to-pg", "pg-to-sqlite"])
def source_and_target(request, postgres, tmp_path):
    made = {"sqlite": lambda: str(tmp_path / "chatbot.sqlite"), "postgresql": postgres.new_database}
    source, target = request.param
    return made[source](), made[target]()


def secured_app(database, standin):
    return create_app({"TESTING": True, "DATABASE": database, "LLM_URL": standin, "AUTH": "required"})


def everything(client, headers):
    """What a client can read: its sessions (in list order) with all their messages."""
    sessions = client.get("/api/sessions", headers=headers).json["sessions"]
    return [(s, client.get(f"/api/sessions/{s['session_id']}/messages", headers=headers).json["messages"])
            for s in sessions]


def fill(database, standin):
    """A source with two owners' sessions: replies complete and stopped, usage,
    a title set by hand, system prompts, a revoked key."""
    app = secured_app(database, standin)
    client = app.test_client()
    alice, bob = (bearer(new_api_key(database, name)) for name in ("alice", "bob"))
    old = new_api_key(database, "carol")
    conn = db.connect(database)
    store.revoke_api_key(conn, "carol")
    conn.close()
    for headers, n in ((alice, 3), (bob, 2)):
        for i in range(n):
            sid = client.post("/api/sessions", json={"metadata": {"i": i}, "system_prompt": f"p{i}"},
                              headers=headers).json["session_id"]
            for text in (f"안녕 {i} @@words=3", f"again {i} @@words=2"):
                assert client.post("/api/chat", json={"session_id": sid, "message": text},
                                   headers=headers).status_code == 200
    first = client.get("/api/sessions", headers=alice).json["sessions"][-1]["session_id"]
    client.patch(f"/api/sessions/{first}", json={"title": "손으로 쓴 제목"}, headers=alice)
    return alice, bob, bearer(old)


def idempotent_chat(client, headers, session_id):
    return client.post("/api/chat", json={"session_id": session_id, "message": "once @@words=2"},
                       headers={**headers, "Idempotency-Key": "k-1"})


def test_copy_keeps_every_session_message_and_key(source_and_target, standin):
    source, target = source_and_target
    alice, bob, revoked = fill(source, standin)
    source_client = secured_app(source, standin).test_client()
    bobs = source_client.get("/api/sessions", headers=bob).json["sessions"][0]["session_id"]
    once = idempotent_chat(source_client, bob, bobs).json
    before = {name: everything(source_client, h) for name, h in (("alice", alice), ("bob", bob))}

    result = copy_db_cli(source, target)
    assert result.returncode == 0, result.stderr
    assert "Copied 5 sessions, 22 messages" in result.stdout

    client = secured_app(target, standin).test_client()
    after = {name: everything(client, h) for name, h in (("alice", alice), ("bob", bob))}
    assert after == before   # ids, times, titles, order, statuses, usage: the keys found them
    assert client.get("/api/sessions", headers=revoked).status_code == 401   # still revoked
    again = idempotent_chat(client, bob, bobs)   # a client retrying across the move: the same reply
    assert again.headers.get("Idempotent-Replayed") == "true" and again.json == once

    # The copy takes new writes after the copied ones: new messages come last.
    sid = after["alice"][0][0]["session_id"]
    assert client.post("/api/chat", json={"session_id": sid, "message": "새 질문 @@words=2"},
                       headers=alice).status_code == 200
    contents = [m["content"] for m in client.get(f"/api/sessions/{sid}/messages", headers=alice).json["messages"]]
    assert contents[:4] == [m["content"] for m in after["alice"][0][1]] and contents[4] == "새 질문 @@words=2"
    new = secured_app(target, standin).test_client().post("/api/sessions", headers=bob).json["session_id"]
    assert client.get("/api/sessions", headers=bob).json["sessions"][0]["session_id"] == new


def test_a_target_with_sessions_is_refused_unless_replaced(source_and_target, standin):
    source, target = source_and_target
    alice, _, _ = fill(source, standin)
    target_app = create_app({"TESTING": True, "DATABASE": target, "LLM_URL": standin, "AUTH": "disabled"})
    kept = target_app.test_client().post("/api/sessions").json["session_id"]

    refused = copy_db_cli(source, target)
    assert refused.returncode != 0 and "holds 1 sessions already" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert target_app.test_client().get(f"/api/sessions/{kept}").status_code == 200   # untouched

    replaced = copy_db_cli(source, target, "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert target_app.test_client().get(f"/api/sessions/{kept}").status_code == 404
    assert len(secured_app(target, standin).test_client().get("/api/sessions", headers=alice).json["sessions"]) == 3


def test_a_progress_line_per_thousand_rows(source_and_target, standin):
    source, target = source_and_target
    create_app({"TESTING": True, "DATABASE": source, "LLM_URL": standin})
    conn = db.connect(source)
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"m{i}", "status": "complete",
                 "created_at": "2026-01-01T00:00:00.000000+00:00"} for i in range(2500)]
    store.create_session(conn, {}, messages=messages, owner="local")
    conn.close()

    result = copy_db_cli(source, target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("messages:")] == [
        "messages: 1000 rows", "messages: 2000 rows", "messages: 2500 rows"]
    copied = db.connect(target)
    try:
        assert [r["content"] for r in copied.execute("SELECT content FROM messages ORDER BY seq")] == [
            m["content"] for m in messages]
    finally:
        copied.close()


def test_a_reply_running_when_the_servers_stopped_keeps_its_logged_text(source_and_target, standin):
    source, target = source_and_target
    app = create_app({"TESTING": True, "DATABASE": source, "LLM_URL": standin, "AUTH": "disabled"})
    sid = app.test_client().post("/api/sessions").json["session_id"]
    conn = db.connect(source)
    turn = store.begin_turn(conn, sid, "q", lease_owner="gone:1:x", lease_seconds=600)
    store.save_progress(conn, "gone:1:x", 600, [(turn["reply_id"], turn["fence"], 3, "안녕 "),
                                               (turn["reply_id"], turn["fence"], 6, "하세요")], [])
    conn.close()

    assert copy_db_cli(source, target).returncode == 0
    copied = db.connect(target)   # time passes: the lease of the host that was stopped expires
    copied.execute("UPDATE sessions SET lease_expires = ? WHERE session_id = ?", (time.time() - 1, sid))
    copied.close()
    app = create_app({"TESTING": True, "DATABASE": target, "LLM_URL": standin, "AUTH": "disabled"})
    [_, reply] = app.test_client().get(f"/api/sessions/{sid}/messages").json["messages"]
    assert (reply["content"], reply["status"]) == ("안녕 하세요", "incomplete")
    assert reply["error"]["code"] == "worker_lost"
