"""PostgreSQL as the store: the same schema as SQLite, read-then-writes that hold
under READ COMMITTED with many connections at once, and clear answers when the
database is misnamed, unreachable, or lost mid-turn."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from chatbot import create_app, db, pg, store
from chatbot.migrations import MIGRATIONS
from conftest import ROOT, free_port, wait_for
from helpers import assert_problem, in_thread, rows

MESSAGE_COLUMNS = "SELECT status, content FROM messages WHERE role = 'assistant'"


def init_db_cli(database):
    return subprocess.run([sys.executable, "-m", "flask", "--app", "chatbot", "init-db"], cwd=ROOT,
                          env={**os.environ, "CHATBOT_DATABASE": str(database)}, capture_output=True,
                          text=True, timeout=60)


def test_init_db_creates_and_upgrades_a_postgresql_database(postgres):
    url = postgres.new_database()
    for _ in range(2):
        result = init_db_cli(url)
        assert result.returncode == 0 and "Initialized the database at postgresql://" in result.stdout, result.stderr
    assert sorted(r["name"] for r in rows(url, "SELECT name FROM migrations")) == sorted(
        m.__name__ for m in MIGRATIONS)


def sqlite_columns(path):
    conn = db.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                             " AND name NOT LIKE 'sqlite_%'")]
        return {t: [r["name"] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        conn.close()


def postgres_columns(url):
    found = {}
    for r in rows(url, "SELECT table_name, column_name FROM information_schema.columns"
                       " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"):
        found.setdefault(r["table_name"], []).append(r["column_name"])
    return found


def test_both_engines_have_the_same_tables_and_columns(postgres, tmp_path):
    db.init_db(str(tmp_path / "fresh.sqlite"))
    url = postgres.new_database()
    db.init_db(url)
    assert postgres_columns(url) == sqlite_columns(str(tmp_path / "fresh.sqlite"))


def test_servers_starting_at_once_migrate_once(postgres):
    url = postgres.new_database()
    starts = [in_thread(db.init_db, url) for _ in range(6)]
    for wait in starts:
        wait()   # none failed on a table another one was making
    assert len(rows(url, "SELECT name FROM migrations")) == len(MIGRATIONS)


def test_placeholders_are_translated_outside_strings_and_names(postgres):
    sql = "SELECT '?', 'it''s :x', \"a?b\", x::text, :name, ? -- a comment?\nFROM t WHERE y LIKE '5%' AND z % 2 = ?"
    assert pg.translate(sql) == ("SELECT '?', 'it''s :x', \"a?b\", x::text, %(name)s, %s -- a comment?\n"
                                 "FROM t WHERE y LIKE '5%%' AND z %% 2 = %s")
    conn = db.connect(postgres.new_database())
    try:
        row = conn.execute("SELECT '?:x' AS q, '5%' || ? AS p, 7 % ? AS m, ?::text AS t", ("a", 4, 12)).fetchone()
    finally:
        conn.close()
    assert dict(row) == {"q": "?:x", "p": "5%a", "m": 3, "t": "12"}


# --- read-then-writes under READ COMMITTED (both engines) ------------------------

def at_once(count, work):
    """Run work(i) in `count` threads, each on a connection of its own, released together."""
    barrier = threading.Barrier(count)

    def run(i, database):
        conn = db.connect(database)
        try:
            barrier.wait()
            return work(conn, i)
        finally:
            conn.close()
    return run


def together(database, count, work):
    run = at_once(count, work)
    waits = [in_thread(run, i, database) for i in range(count)]
    return [wait() for wait in waits]


def test_only_one_of_many_simultaneous_turns_takes_a_session(app, session_id):
    database = app.config["DATABASE"]
    results = together(database, 20, lambda conn, i: store.begin_turn(conn, session_id, f"q{i}"))
    assert sum(r is not None for r in results) == 1
    assert len(rows(database, "SELECT * FROM messages WHERE session_id = ?", session_id)) == 2


def test_an_owners_running_replies_stay_within_its_limit_under_a_crowd(app, client):
    database = app.config["DATABASE"]
    sessions = [client.post("/api/sessions").json["session_id"] for _ in range(12)]

    def take(conn, i):
        try:
            return store.begin_turn(conn, sessions[i], "q", max_per_owner=3)
        except store.TooManyTurns:
            return "limited"
    results = together(database, 12, take)
    assert results.count("limited") == 9 and sum(isinstance(r, dict) for r in results) == 3


def test_the_rate_limit_counts_every_request_of_a_crowd(app):
    results = together(app.config["DATABASE"], 20, lambda conn, i: store.take_request(conn, "k", 5, 60, now=6000))
    assert results.count(0) == 5


# --- faults ----------------------------------------------------------------------

@pytest.mark.parametrize("url, says", [
    ("mysql://db.example/chat", "must be a file path (SQLite) or a postgresql:// URL"),
    ("postgresql://host/db?sslmod=require", 'not a valid PostgreSQL URL: invalid URI query parameter: "sslmod"'),
    ("postgresql://host:5432x/db", "not a valid PostgreSQL URL: the port '5432x' is not a number"),
])
def test_a_bad_database_url_fails_at_start_with_one_clear_line(url, says, standin):
    with pytest.raises(ValueError, match="CHATBOT_DATABASE") as error:
        create_app({"DATABASE": url, "LLM_URL": standin})
    assert says in str(error.value) and "\n" not in str(error.value)
    result = init_db_cli(url)
    assert result.returncode != 0 and says in result.stderr.strip().splitlines()[-1]


def test_a_gunicorn_with_a_bad_database_url_does_not_start(standin):
    env = {**os.environ, "CHATBOT_DATABASE": "postgresql://host/db?sslmod=require",
           "CHATBOT_BIND": f"127.0.0.1:{free_port()}", "CHATBOT_LLM_URL": standin, "CHATBOT_WORKERS": "1"}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "CHATBOT_DATABASE is not a valid PostgreSQL URL" in result.stderr


class Proxy:
    """A TCP forwarder in front of PostgreSQL that can be cut, as a network or a
    restarting server cuts it: open connections break and new ones are refused."""

    def __init__(self, port):
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(self.target)
            self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.up = False
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.open = []

    def close(self):
        self.cut()
        self.listener.close()


@pytest.fixture
def proxied(postgres):
    """The URL of a new database reached through a Proxy (the proxy too)."""
    url = postgres.new_database()
    proxy = Proxy(postgres.port)
    yield url.replace(f":{postgres.port}/", f":{proxy.port}/"), proxy
    proxy.close()
    pg.close_pools()


def test_an_unreachable_postgresql_is_503_database_unavailable(proxied, standin):
    url, proxy = proxied
    proxy.cut()
    app = create_app({"TESTING": True, "DATABASE": url, "LLM_URL": standin, "AUTH": "required"})
    client = app.test_client()
    started = time.monotonic()
    assert_problem(client.get("/api/sessions", headers={"Authorization": "Bearer cbk_x_y"}), 503,
                   "database_unavailable")
    health = client.get("/api/health")
    assert health.status_code == 503 and health.json["database"]["ok"] is False
    assert time.monotonic() - started < 5   # not a pool timeout per request

    proxy.up = True   # back: served again, without a restart
    assert wait_for(lambda: client.get("/api/health").status_code == 200, timeout=10)


def test_the_final_write_of_a_reply_survives_a_lost_connection(proxied, standin):
    url, proxy = proxied
    app = create_app({"TESTING": True, "DATABASE": url, "LLM_URL": standin, "AUTH": "disabled"})
    client = app.test_client()
    sid = client.post("/api/sessions").json["session_id"]
    reply = in_thread(lambda: client.post("/api/chat/stream", json={
        "session_id": sid, "message": "@@words=6 @@delay=0.1"}).get_data(as_text=True))
    time.sleep(0.3)
    proxy.cut()          # every connection lost mid-answer; none to be had until it is back
    time.sleep(1.5)      # the reply ends meanwhile: its final write finds no database
    proxy.up = True
    body = reply()
    assert "event: done" in body and "event: error" not in body
    [stored] = rows(url, MESSAGE_COLUMNS)
    assert stored["status"] == "complete" and stored["content"].endswith("단어6 ")
    assert rows(url, "SELECT generating_message_id FROM sessions") == [{"generating_message_id": None}]


# --- U+0000, which PostgreSQL's text cannot hold ---------------------------------

def test_text_with_a_nul_character_is_stored_without_it_on_postgresql(app, client, session_id):
    on_postgresql = "://" in app.config["DATABASE"]
    answer = client.post("/api/chat", json={"session_id": session_id, "message": "a\u0000b @@words=1"})
    assert answer.status_code == 200
    expected = "ab @@words=1" if on_postgresql else "a\u0000b @@words=1"   # SQLite keeps it
    assert client.get(f"/api/sessions/{session_id}/messages").json["messages"][0]["content"] == expected
    changed = client.patch(f"/api/sessions/{session_id}", json={"title": "t\u0000", "metadata": {"k": "\u0000"}})
    assert changed.json["title"] == ("t" if on_postgresql else "t\u0000")
    assert changed.json["metadata"] == {"k": "\u0000"}   # JSON holds it escaped, on both


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/sessions/a%00b"), ("GET", "/api/sessions/a%00b/messages"), ("DELETE", "/api/sessions/a%00b"),
    ("POST", "/api/sessions/a%00b/stop"), ("GET", "/api/sessions/{sid}/messages?before=a%00b"),
])
def test_an_id_with_a_nul_character_is_not_found(client, session_id, method, path):
    answer = client.open(path.format(sid=session_id), method=method)
    assert answer.status_code == 404 and answer.json["code"].endswith("not_found")


def test_a_reply_with_a_nul_character_is_stored_without_it(app, session_id):
    conn = db.connect(app.config["DATABASE"])
    try:
        turn = store.begin_turn(conn, session_id, "q")
        stored = store.finish_turn(conn, session_id, turn["reply_id"], turn["fence"], "a\u0000b", "complete",
                                   None, "stop")
    finally:
        conn.close()
    on_postgresql = "://" in app.config["DATABASE"]
    assert stored["content"] == ("ab" if on_postgresql else "a\u0000b")   # SQLite keeps it
    assert stored["status"] == "complete"


def test_a_migration_writes_a_table_once_for_both_engines(database):
    from chatbot.migrations import ddl
    conn = db.connect(database)
    try:
        ddl(conn, "CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, raw BLOB)")
        ids = [conn.execute("INSERT INTO t (at, raw) VALUES (?, ?) RETURNING seq", (1.5, b"\x00\xff")).fetchone()[0]
               for _ in range(3)]
        assert ids == [1, 2, 3]
        assert [tuple(r) for r in conn.execute("SELECT at, raw FROM t WHERE seq = ?", (2,))] == [(1.5, b"\x00\xff")]
    finally:
        conn.close()
