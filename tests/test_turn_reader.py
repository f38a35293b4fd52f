"""Who reads the upstream (chatbot/generation.py): the client's own thread
while a client of this process follows the reply, so that a piece needs no
hand-off between threads; a producer thread when there is none, or when
the client stops reading (a write blocked on a slow client), so that the
reply never waits on a client."""
import threading

from chatbot import generation, llm
from conftest import wait_for
from helpers import in_thread, rows


def reads_by_thread(monkeypatch):
    """Count, per thread, the upstream reads that brought text."""
    counts, real = {}, llm.Call.read

    def read(self, timeout=None):
        chunks = real(self, timeout)
        if chunks and any(c.text for c in chunks):
            ident = threading.get_ident()
            counts[ident] = counts.get(ident, 0) + 1
        return chunks
    monkeypatch.setattr(llm.Call, "read", read)
    return counts


def reply_of(app, session_id):
    found = rows(app.config["DATABASE"], "SELECT status, content FROM messages WHERE session_id = ?"
                                         " AND role = 'assistant'", session_id)
    return found[0] if found else None


def test_the_clients_own_thread_opens_and_reads_the_upstream(client, session_id, monkeypatch):
    counts = reads_by_thread(monkeypatch)
    relay, opened_by, real_open = {}, [], llm.Call.open
    monkeypatch.setattr(llm.Call, "open", lambda self: (opened_by.append(threading.get_ident()), real_open(self)))

    def stream():
        relay["thread"] = threading.get_ident()
        return client.post("/api/chat/stream", json={"session_id": session_id,
                                                     "message": "@@words=20 @@delay=0.02"}).get_data(as_text=True)
    body = in_thread(stream)()
    assert "event: done" in body and body.count("event: delta") == 20
    # The call was opened, and every piece of text read, by the thread that relayed it.
    assert opened_by == [relay["thread"]]
    assert counts == {relay["thread"]: counts[relay["thread"]]} and counts[relay["thread"]] >= 10


def test_a_client_that_stops_reading_hands_the_reply_to_a_producer(app, client, session_id, monkeypatch):
    monkeypatch.setattr(generation, "READER_STALL_SECONDS", 0.5)
    counts = reads_by_thread(monkeypatch)
    response = client.post("/api/chat/stream", json={"session_id": session_id,
                                                     "message": "@@words=30 @@delay=0.05"}, buffered=False)
    frames = iter(response.response)
    while b"event: delta" not in next(frames):   # this thread reads the upstream now
        pass
    # ... and stops: a write blocked on a client that reads nothing. The reply
    # goes on without it, read by another thread, and is stored whole.
    stored = wait_for(lambda: (reply_of(app, session_id) or {}).get("status") == "complete", timeout=15)
    assert stored, reply_of(app, session_id)
    assert reply_of(app, session_id)["content"].count("단어") == 30
    assert len(counts) == 2 and threading.get_ident() in counts
    rest = b"".join(frames)   # the client reads again: it gets the rest from memory, then done
    assert rest.count(b"event: delta") >= 1 and b"event: done" in rest
    response.close()
