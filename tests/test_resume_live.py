"""Replies that outlive their connection: positions as ids, re-attach from any
process, a grace period for a client that left, the durable text log, leases.

"Another worker" is made certain here by two gunicorn servers sharing one
database (two process trees, as two hosts would be): a client of server B
follows a reply that a worker of server A produces."""
import json
import os
import signal
import statistics
import threading
import time

import pytest
import requests
import websocket

from chatbot import db
from conftest import SSEStream, wait_for
from helpers import deltas, rows, stored_messages


def stream(server, sid, message, **extra):
    return SSEStream(server.url, "/api/chat/stream", {"session_id": sid, "message": message, **extra})


def resume(server, sid, message_id, after=None, headers=None):
    query = "" if after is None else f"?after={after}"
    return SSEStream(server.url, f"/api/sessions/{sid}/messages/{message_id}/stream{query}", headers=headers)


def read_until_position(events, position):
    """Read events until the text received reaches `position`; (events, text)."""
    got = []
    for event in events:
        got.append(event)
        if len(deltas(got)) >= position:
            break
    return got, deltas(got)


def stored_reply(server, sid):
    return stored_messages(server.db_path, sid)[-1]


def lease_owner_pid(server, sid):
    [row] = rows(server.db_path, "SELECT lease_owner FROM sessions WHERE session_id = ?", sid)
    return int(row["lease_owner"].split(":")[1])


def write(server, *statements):
    """Change the service's database behind its back, as another host would (each statement commits)."""
    conn = db.connect(server.db_path)
    try:
        return [conn.execute(sql, params).fetchall() for sql, params in statements]
    finally:
        conn.close()


@pytest.fixture
def two(start_server):
    """Two servers (A produces, B re-attaches) on one database."""
    a = start_server()
    b = start_server(a.db_path)
    return a, b


def test_ids_are_positions_in_code_points_with_korean_emoji_and_split_reads(live_server):
    sid = live_server.new_session()
    s = stream(live_server, sid, "이모지 😀👍🏽 é 한국어 @@split @@delay=0.005")
    events = list(s.events())
    pieces = [data["content"] for name, data, _ in events if name == "delta"]
    text = "".join(pieces)
    assert "😀👍🏽" in text and "한국어" in text
    assert s.ids[1:-1] == [len("".join(pieces[:i + 1])) for i in range(len(pieces))]
    assert s.ids[-1] == len(text) == len(stored_reply(live_server, sid)["content"])


def test_a_reattach_through_another_server_gets_exactly_the_missing_text_then_live(two, standin_log):
    a, b = two
    sid = a.new_session()
    first = stream(a, sid, "@@words=60 @@delay=0.03")
    events = first.events()
    start = next(events)[1]
    seen, text = read_until_position(events, 20)
    first.close()   # a reload: the connection drops

    again = resume(b, sid, start["message_id"], headers={"Last-Event-ID": str(len(text))})
    assert again.status == 200 and again.headers["Content-Type"].startswith("text/event-stream")
    rest = list(again.events())
    assert rest[0][0] == "start" and rest[0][1] == start
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "complete"
    whole = rest[-1][1]["content"]
    assert text + deltas(rest) == whole == stored_reply(a, sid)["content"]   # no gap, no duplicate
    assert again.ids[-1] == len(whole) and again.raw.endswith(b"data: [DONE]\n\n")
    assert len(standin_log()) == 1 and standin_log()[0]["state"] == "finished"   # one generation


def test_a_reattach_after_the_end_replays_the_rest_and_the_terminal_event(two):
    a, b = two
    sid = a.new_session()
    done = list(stream(a, sid, "안녕 @@words=8").events())[-1][1]
    again = list(resume(b, sid, done["message_id"], after=5).events())
    assert [e[0] for e in again] == ["start", "delta", "done"]
    assert again[1][1]["content"] == done["content"][5:]
    assert again[-1][1]["content"] == done["content"] and again[-1][1]["status"] == "complete"
    # a failed turn ends with its error event on a re-attach too
    failed = stream(a, sid, "@@words=5 @@break=2")
    events = list(failed.events())
    assert events[-1][0] == "error"
    replay = list(resume(b, sid, events[0][1]["message_id"]).events())
    assert replay[-1][0] == "error" and replay[-1][1]["code"] == events[-1][1]["code"]
    assert deltas(replay) == deltas(events)


def test_query_after_wins_over_last_event_id(live_server):
    sid = live_server.new_session()
    done = list(stream(live_server, sid, "@@words=6").events())[-1][1]
    again = list(resume(live_server, sid, done["message_id"], after=3, headers={"Last-Event-ID": "10"}).events())
    assert deltas(again) == done["content"][3:]


def test_many_clients_at_once_each_get_every_byte_once_in_order(two):
    a, b = two
    sid = a.new_session()
    first = stream(a, sid, "@@words=40 @@delay=0.03")
    events = first.events()
    start = next(events)[1]
    results = {}

    def follow(i, server, after):
        results[i] = after, list(resume(server, sid, start["message_id"], after=after).events())
    threads = [threading.Thread(target=follow, args=(i, server, after))
               for i, (server, after) in enumerate([(a, 0), (b, 0), (b, 7), (a, 3)])]
    for t in threads:
        t.start()
    own = list(events)
    for t in threads:
        t.join(30)
    whole = own[-1][1]["content"]
    assert deltas(own) == whole
    assert len(results) == 4
    for i, (after, got) in results.items():
        assert deltas(got) == whole[after:], i
        assert got[-1][0] == "done", i


def test_a_client_on_another_server_sees_new_text_within_half_a_second(two):
    a, b = two
    sid = a.new_session()
    first = stream(a, sid, "@@words=30 @@delay=0.1")
    events = first.events()
    start = next(events)[1]
    remote = resume(b, sid, start["message_id"])
    arrivals = {}

    def read_remote():
        got = []
        for event in remote.events():
            got.append(event)
            if event[0] == "delta":
                arrivals[len(deltas(got))] = event[2]
    t = threading.Thread(target=read_remote)
    t.start()
    local, got = {}, []
    for event in events:
        got.append(event)
        if event[0] == "delta":
            local[len(deltas(got))] = event[2]
    t.join(30)
    # Remote deltas may merge pieces: compare at the positions both saw.
    lags = [arrivals[p] - local[p] for p in arrivals if p in local]
    assert len(lags) >= 5
    assert statistics.median(lags) < 0.5, lags


def test_leaving_is_not_stopping_a_reattach_within_the_grace_keeps_the_reply(two, standin_log):
    a, b = two   # CHATBOT_RESUME_GRACE: 5 s by default
    sid = a.new_session()
    first = stream(a, sid, "@@words=40 @@delay=0.05")
    events = first.events()
    start = next(events)[1]
    _, text = read_until_position(events, 5)
    first.close()
    time.sleep(1.5)   # within the grace
    rest = list(resume(b, sid, start["message_id"], after=len(text)).events())
    assert rest[-1][1]["status"] == "complete"
    assert text + deltas(rest) == rest[-1][1]["content"]
    assert standin_log()[0]["state"] == "finished"


def test_after_the_grace_with_nobody_attached_the_reply_is_stopped_as_client_gone(start_server, standin_log):
    server = start_server(CHATBOT_RESUME_GRACE="1")
    sid = server.new_session()
    first = stream(server, sid, "@@words=200 @@delay=0.05")
    events = first.events()
    next(events)
    next(events)
    first.close()
    entry = wait_for(lambda: [e for e in standin_log() if e["state"] == "cancelled"], timeout=6)
    assert entry and entry[0]["pieces_sent"] < 200
    reply = wait_for(lambda: stored_reply(server, sid)["status"] != "pending" and stored_reply(server, sid))
    assert reply["status"] == "incomplete" and reply["finish_reason"] == "client_gone"


def test_on_disconnect_continue_generates_to_the_end_whoever_listens(start_server, standin_log):
    server = start_server(CHATBOT_RESUME_GRACE="0")
    sid = server.new_session()
    first = stream(server, sid, "@@words=30 @@delay=0.03", on_disconnect="continue")
    next(first.events())
    first.close()
    reply = wait_for(lambda: stored_reply(server, sid)["status"] != "pending" and stored_reply(server, sid),
                     timeout=10)
    assert reply["status"] == "complete" and reply["content"].endswith("단어30 ")
    assert standin_log()[0]["state"] == "finished"


def test_stop_reaches_a_reply_whoever_listens_and_every_client_gets_the_end(two):
    a, b = two
    sid = a.new_session()
    first = stream(a, sid, "@@words=200 @@delay=0.05")
    events = first.events()
    start = next(events)[1]
    remote = resume(b, sid, start["message_id"])
    remote_events = remote.events()
    next(remote_events)
    assert requests.post(f"{b.url}/api/sessions/{sid}/stop").status_code == 202
    own, theirs = list(events), list(remote_events)
    for got in (own, theirs):
        assert got[-1][0] == "done" and got[-1][1]["finish_reason"] == "stopped"
    assert deltas(own) == own[-1][1]["content"] == stored_reply(a, sid)["content"]


def test_the_websocket_resume_frame_reattaches(two):
    a, b = two
    sid = a.new_session()
    first = stream(a, sid, "@@words=30 @@delay=0.03")
    events = first.events()
    start = next(events)[1]
    _, text = read_until_position(events, 10)
    first.close()
    ws = websocket.create_connection(b.url.replace("http", "ws") + "/api/chat/ws", timeout=15)
    try:
        ws.send(json.dumps({"type": "resume", "session_id": sid, "message_id": start["message_id"],
                            "after": len(text)}))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv()))
    finally:
        ws.close()
    assert frames[0] == {"type": "start", **start}
    rest = "".join(f["content"] for f in frames if f["type"] == "delta")
    assert text + rest == frames[-1]["message"]["content"] and frames[-1]["id"] == len(text + rest)


def test_a_worker_killed_mid_answer_loses_at_most_the_last_second_and_ends_as_worker_lost(two):
    a, b = two
    sid = a.new_session()
    first = stream(a, sid, "@@words=600 @@delay=0.01")
    events = first.events()
    start = next(events)[1]
    got, received = [], []   # (arrival time, text so far)
    for event in events:
        got.append(event)
        received.append((event[2], deltas(got)))
        if event[2] - received[0][0] > 2:
            break
    remote = resume(b, sid, start["message_id"])
    remote_events = remote.events()
    next(remote_events)
    killed_at = time.monotonic()
    os.kill(lease_owner_pid(a, sid), signal.SIGKILL)
    shown_a_second_before = max(text for at, text in received if at <= killed_at - 1.0)
    ending = list(remote_events)[-1]
    assert ending[0] == "error" and ending[1]["code"] == "worker_lost"
    reply = stored_reply(a, sid)
    assert reply["status"] == "incomplete" and json.loads(reply["error"])["code"] == "worker_lost"
    assert reply["content"].startswith(shown_a_second_before)
    # the session takes a new chat (through either server)
    answer = requests.post(b.url + "/api/chat", json={"session_id": sid, "message": "again @@words=2"})
    assert answer.status_code == 200


def test_staleness_is_the_lease_alone_not_a_process_id(live_server):
    """A lease held by a process this host does not know (another host's) is
    respected until it expires, then taken over."""
    sid = live_server.new_session()
    list(stream(live_server, sid, "@@words=2").events())
    [row] = rows(live_server.db_path, "SELECT message_id FROM messages WHERE role = 'assistant'"
                                      " AND session_id = ?", sid)
    reply = row["message_id"]
    write(live_server,
          ("UPDATE messages SET status = 'pending' WHERE message_id = ?", (reply,)),
          ("UPDATE sessions SET generating_message_id = ?, lease_owner = 'other-host:999999:x',"
           " lease_expires = ? WHERE session_id = ?", (reply, time.time() + 2, sid)))
    busy = requests.post(live_server.url + "/api/chat", json={"session_id": sid, "message": "hi @@words=1"})
    assert busy.status_code == 409   # pid 999999 is dead here, but that says nothing about another host
    time.sleep(2.5)
    assert requests.post(live_server.url + "/api/chat",
                         json={"session_id": sid, "message": "hi @@words=1"}).status_code == 200
    taken = [m for m in stored_messages(live_server.db_path, sid) if m["message_id"] == reply][0]
    assert json.loads(taken["error"])["code"] == "worker_lost"


def test_a_producer_whose_lease_was_taken_stops_writing(live_server):
    sid = live_server.new_session()
    first = stream(live_server, sid, "@@words=300 @@delay=0.02")
    events = first.events()
    next(events)
    next(events)
    # another owner took the lease (a new fence)
    write(live_server, ("UPDATE sessions SET lease_fence = lease_fence + 1, lease_owner = 'other:1:y'"
                        " WHERE session_id = ?", (sid,)))
    ending = list(events)[-1]
    assert ending[0] == "error" and ending[1]["code"] == "worker_lost"
    reply = stored_reply(live_server, sid)
    assert reply["status"] == "pending"   # left to the lease's holder: nothing was written over it


def test_a_stop_sent_to_another_server_ends_the_reply_within_half_a_second(two, engine):
    """SQLite: the producer reads the stop flag every 0.2 s. PostgreSQL: the
    producer's host is woken by NOTIFY at once; its poll of the flag, the
    fallback, is only once a second (so without NOTIFY this takes 0.5 s on average)."""
    a, b = two
    lags = []
    for _ in range(5):
        sid = a.new_session()
        first = stream(a, sid, "@@words=400 @@delay=0.02")
        events = first.events()
        began = next(events)[2]
        for event in events:   # past the first reading of the flag
            if event[2] - began > 1.1:
                break
        sent = time.monotonic()
        assert requests.post(f"{b.url}/api/sessions/{sid}/stop").status_code == 202
        ending = list(events)[-1]
        assert ending[0] == "done" and ending[1]["finish_reason"] == "stopped"
        lags.append(ending[2] - sent)
    assert statistics.median(lags) < (0.25 if engine == "postgresql" else 0.5), lags
    print("stop lags", lags)


def test_a_host_killed_whole_frees_its_sessions_within_the_lease(start_server):
    """SIGKILL of a host's whole process tree (master included, so no child_exit):
    within CHATBOT_LEASE_SECONDS the other host takes a new chat in its session,
    and the cut reply is stored with the text logged up to a second before."""
    a = start_server(CHATBOT_LEASE_SECONDS="3")
    b = start_server(a.db_path, CHATBOT_LEASE_SECONDS="3")
    sid = a.new_session()
    first = stream(a, sid, "@@words=600 @@delay=0.01")
    events = first.events()
    start = next(events)[1]
    got, received = [], []
    for event in events:
        got.append(event)
        received.append((event[2], deltas(got)))
        if event[2] - received[0][0] > 1.5:
            break
    workers = a.worker_pids()
    killed_at = time.monotonic()
    for pid in [a.proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    shown_a_second_before = max(text for at, text in received if at <= killed_at - 1.0)
    busy = requests.post(b.url + "/api/chat", json={"session_id": sid, "message": "again @@words=2"})
    assert busy.status_code == 409   # the lease still runs: the dead host might only be slow
    answer = wait_for(lambda: requests.post(b.url + "/api/chat",
                                            json={"session_id": sid, "message": "again @@words=2"}).ok,
                      timeout=10, interval=0.5)
    assert answer and time.monotonic() - killed_at < 3 + 2
    cut = [m for m in stored_messages(b.db_path, sid) if m["message_id"] == start["message_id"]][0]
    assert cut["status"] == "incomplete" and json.loads(cut["error"])["code"] == "worker_lost"
    assert cut["content"].startswith(shown_a_second_before)
