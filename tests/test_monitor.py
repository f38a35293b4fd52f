"""The turn monitor is supervised: a failure costs one round, never the saves
of running replies for good, and a monitor thread that died is started again."""
import os
import threading

from chatbot import generation, store
from conftest import wait_for
from helpers import in_thread, rows


def logged_text(app, reply_id):
    return "".join(r["text"] for r in rows(app.config["DATABASE"],
                                           "SELECT text FROM reply_log WHERE message_id = ? ORDER BY end_pos",
                                           reply_id))


def pending_reply(app):
    found = rows(app.config["DATABASE"], "SELECT message_id FROM messages WHERE status = 'pending'")
    return found[0]["message_id"] if found else None


def test_an_unexpected_error_in_a_round_does_not_stop_the_saves(app, client, session_id, monkeypatch):
    real, failures = store.save_progress, []

    def fails_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("not a database error")   # nothing the monitor expects
        return real(*args, **kwargs)
    monkeypatch.setattr(store, "save_progress", fails_once)
    reply = in_thread(lambda: client.post("/api/chat/stream", json={
        "session_id": session_id, "message": "@@words=60 @@delay=0.05"}).get_data(as_text=True))
    reply_id = wait_for(lambda: pending_reply(app))
    assert wait_for(lambda: "단어5 " in logged_text(app, reply_id), timeout=5)   # saved after the failure
    assert failures
    assert "event: done" in reply()


def test_a_monitor_thread_that_died_is_started_again(app, client, session_id, monkeypatch):
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    monkeypatch.setattr(generation.MONITOR, "thread", dead)
    monkeypatch.setattr(generation.MONITOR, "pid", os.getpid())   # died here, not in a parent
    reply = in_thread(lambda: client.post("/api/chat/stream", json={
        "session_id": session_id, "message": "@@words=40 @@delay=0.05"}).get_data(as_text=True))
    reply_id = wait_for(lambda: pending_reply(app))
    # The reply row is written just before the turn joins the monitor: wait for that too.
    assert wait_for(lambda: generation.MONITOR.thread is not dead and generation.MONITOR.thread.is_alive())
    assert wait_for(lambda: "단어3 " in logged_text(app, reply_id), timeout=5)
    assert "event: done" in reply()
