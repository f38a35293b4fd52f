"""Concurrency: the default gunicorn configuration carries 200 concurrent
streams, and one reply at a time per session across the worker processes.

The 200 streams each send 5 pieces a second (1000 a second in all, what a GPU
server busy with 200 users sends), so that the test measures the service, not
the stand-in and the test client sharing its two cores. A worker killed
mid-answer: tests/test_workers_live.py."""
import os
import signal
import threading
import time

import pytest

from conftest import SSEStream, wait_for
from helpers import assert_problem, chat, rows, stored_messages

STREAMS = 200


def test_200_concurrent_streams_all_complete_and_none_starves(start_server):
    server = start_server(CHATBOT_WORKERS=None, CHATBOT_THREADS=None)  # gunicorn.conf.py's defaults
    sessions = [server.new_session() for _ in range(STREAMS)]
    results = [None] * STREAMS
    go = threading.Event()

    def run(i):
        go.wait()
        try:
            stream = SSEStream(server.url, "/api/chat/stream",
                               {"session_id": sessions[i], "message": f"{i} @@words=80 @@delay=0.2"})
            events = list(stream.events())
            first_delta = next((t for name, _, t in events if name == "delta"), None)
            assert first_delta, (stream.status, stream.raw[:300])
            results[i] = (stream.status, events, first_delta, events[-1][2])
        except Exception as e:  # recorded, so the assertion below names it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started = time.monotonic()
    go.set()
    for t in threads:
        t.join(120)

    failures = [r for r in results if not isinstance(r, tuple)]
    assert not failures, failures[:3]
    for status, events, _, _ in results:
        assert status == 200
        assert events[-1][0] == "done" and events[-1][1]["status"] == "complete", [e for e in events if e[0] != "delta"][-1]
        assert "".join(e[1]["content"] for e in events if e[0] == "delta") == events[-1][1]["content"]
    # No stream waited for another to finish: every one had started before any
    # ended (each lasts 16 s: far longer than the connection storm of 200 takes,
    # far shorter than a stream queued behind another would wait).
    firsts, ends = sorted(r[2] for r in results), sorted(r[3] for r in results)
    assert firsts[-1] < ends[0], (f"first deltas from {firsts[0] - started:.1f} s to {firsts[-1] - started:.1f} s "
                                  f"({sum(f > ends[0] for f in firsts)} after the first end), "
                                  f"ends from {ends[0] - started:.1f} s")


@pytest.fixture
def server(live_server):
    return live_server  # CHATBOT_WORKERS=2 (the fixtures' default)


def generating_pid(server, session_id):
    """The pid of the worker holding the session's lease (owner ids are host:pid:nonce)."""
    [row] = rows(server.db_path, "SELECT lease_owner FROM sessions WHERE session_id = ?", session_id)
    return int(row["lease_owner"].split(":")[1])


def test_a_second_chat_while_a_reply_streams_is_refused_by_every_worker(server):
    assert wait_for(lambda: len(server.worker_pids()) == 2, timeout=30)  # the second may still be booting
    sid = server.new_session()
    s = SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": "@@words=20 @@delay=0.1"})
    events = s.events()
    assert next(events)[0] == "start"
    holder = generating_pid(server, sid)
    assert holder in server.worker_pids()
    # Freeze the worker that streams: the next requests can only be taken by the other one.
    os.kill(holder, signal.SIGSTOP)
    try:
        for path in ("/api/chat", "/api/chat/stream"):
            assert_problem(chat(server, sid, "me too", path), 409, "generation_in_progress")
    finally:
        os.kill(holder, signal.SIGCONT)
    assert_problem(chat(server, sid, "me too"), 409, "generation_in_progress")
    assert list(events)[-1][0] == "done"
    # Refused requests stored nothing; once the reply is done, the session takes a new turn.
    assert [m["content"] for m in stored_messages(server.db_path, sid)][::2] == ["@@words=20 @@delay=0.1"]
    assert chat(server, sid, "@@words=1").status_code == 200


def test_other_sessions_are_not_held_up(server):
    busy, free = server.new_session(), server.new_session()
    s = SSEStream(server.url, "/api/chat/stream", {"session_id": busy, "message": "@@words=10 @@delay=0.1"})
    assert next(s.events())[0] == "start"
    assert chat(server, free, "@@words=1").status_code == 200
    assert list(s.events())[-1][0] == "done"
